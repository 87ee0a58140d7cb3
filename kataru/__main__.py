from kataru.cli import run

raise SystemExit(run())
