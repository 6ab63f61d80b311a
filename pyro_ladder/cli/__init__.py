"""``pyro-ladder train | evaluate | report | sample``: parse the arguments, build the run,
call the library. Bad input ends with one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import sys

from ..allocator import keep_freed_memory
from ..errors import PyroLadderError
from .commands import as_flags, cmd_evaluate, cmd_report, cmd_sample, cmd_train
from .parser import build_parser as _build_parser

COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "sample": cmd_sample,
}


def build_parser():
    """The ``pyro-ladder`` parser, each subcommand bound to its command."""
    return _build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pyro-ladder`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        keep_freed_memory()  # this process is ours: reuse freed memory (pyro_ladder.allocator)
        return args.func(args)
    except PyroLadderError as err:
        print(f"pyro-ladder: error: {as_flags(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-ladder: interrupted", file=sys.stderr)
        return 130
