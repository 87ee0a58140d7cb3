from kataru.cli import main

raise SystemExit(main())
