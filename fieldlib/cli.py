"""The ``fieldlib`` command.

Sub-commands live in their own modules; each provides ``add_parser(subparsers)`` which
registers its parser and sets ``func`` (a callable taking the parsed namespace and
returning an exit code). Errors that are the user's (a :class:`FieldlibError`) become one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fieldlib.errors import FieldlibError

#: Modules that contribute sub-commands, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = (
    "fieldlib.cli_infer",
    "fieldlib.cli_gradcheck",
    "fieldlib.models.charades.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fieldlib",
        description="Conditional random fields with neural potentials: exact and mean-field "
        "inference, gradient checks, and the Charades asynchronous temporal field.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a sub-command not built yet
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except FieldlibError as exc:
        print(f"fieldlib: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError as exc:
        print(f"fieldlib: error: out of memory: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
