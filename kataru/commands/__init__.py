"""The `kataru` subcommands, one module each: `add_arguments(parser)` and `run(args)`.

A module imports only argparse at the top, so `kataru --help` and a command's parser cost nothing; the
library is imported when the command runs. Library functions take typed parameters, never a Namespace.
"""
