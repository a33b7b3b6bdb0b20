"""One module per `qwen35` subcommand: `add_arguments(parser)` and `run(args) -> int`.\n\nModules here import nothing heavy at import time; torch loads inside `run`."""
