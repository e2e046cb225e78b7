"""The `specflash` command line: parses flags and hands them to one command module.

Each subcommand lives in `specflash/commands/<name>.py` (`register` adds its parser).
No logic lives here. A user mistake (a `SpecflashError`, a bad flag value found while
parsing included) prints one line to stderr and exits with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .commands import COMMAND_MODULES
from .errors import SpecflashError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specflash",
        description="Lossless speculative decoding with DFlash block-diffusion drafters: "
                    "the same tokens as the target model alone, faster.")
    parser.add_argument("--version", action="version", version=f"specflash {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"specflash.commands.{name}").register(sub)
    return parser


def _quiet_libraries() -> None:
    """Keep transformers' per-weight progress bars and advisory warnings off the terminal."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # flag values are checked here (commands/common.py: OptionError)
        if not args.command:
            parser.print_help()
            return 2
        _quiet_libraries()
        return args.handler(args)
    except SpecflashError as exc:
        print(f"specflash: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specflash: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
