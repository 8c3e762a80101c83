"""One module per ``icegrt`` subcommand, each exposing ``register(subparsers)``."""
