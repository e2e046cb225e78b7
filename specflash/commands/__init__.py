"""One module per `specflash` subcommand; each has `register(subparsers)` that adds its
parser and sets `handler`. Add a command by adding its module to COMMAND_MODULES."""

COMMAND_MODULES = ("generate", "demo", "models", "train", "serve", "export", "bench")
