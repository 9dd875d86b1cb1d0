"""The ``fieldlib`` command.

Sub-commands live in their own modules; each provides ``add_parser(subparsers)`` which
registers its parser and sets ``func`` (a callable taking the parsed namespace and
returning an exit code). Errors that are the user's (a :class:`FieldlibError`) and failed
memory allocations (MemoryError, torch's OutOfMemoryError, an allocator's RuntimeError)
become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from fieldlib.errors import FieldlibError

#: Modules that contribute sub-commands, in the order ``--help`` lists them.
SUBCOMMAND_MODULES = (
    "fieldlib.cli_infer",
    "fieldlib.cli_gradcheck",
    "fieldlib.models.charades.cli",
)


def allocation_failure(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` is a failed memory allocation (MemoryError, torch's
    OutOfMemoryError, or a RuntimeError from an allocator), else None."""
    import torch

    if isinstance(exc, MemoryError):
        return f"MemoryError: {exc}" if str(exc) else "MemoryError"
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    lower = text.lower()
    oom_type = getattr(torch, "OutOfMemoryError", None)
    markers = ("can't allocate memory", "cannot allocate memory", "out of memory",
               "not enough memory", "failed to allocate")
    if not ((oom_type is not None and isinstance(exc, oom_type))
            or any(m in lower for m in markers)):
        return None
    line = next((x.strip() for x in text.splitlines() if x.strip()), type(exc).__name__)
    # torch's "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: ..." prefix
    line = re.sub(r"^\[enforce fail at [^\]]*\][^.]*\.\s*", "", line)
    return line[:300]


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
    except (MemoryError, RuntimeError) as exc:
        reason = allocation_failure(exc)
        if reason is None:
            raise
        print(f"fieldlib: error: out of memory ({reason}); the problem does not fit this "
              f"machine", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
