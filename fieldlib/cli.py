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

#: Sub-commands in the order ``--help`` lists them: (name, module, one-line help). Only the
#: module of the command being run is imported, so ``fieldlib --help`` and a mistyped
#: command answer without importing torch.
SUBCOMMANDS = (
    ("infer", "fieldlib.cli_infer",
     "run inference on a UAI or libDAI .fg model (UAI competition output)"),
    ("gradcheck", "fieldlib.cli_gradcheck",
     "verify mean-field gradients against exact inference on random toy fields"),
    ("charades", "fieldlib.models.charades.cli",
     "Charades data: summary, official evaluation, baseline, synthetic frames"),
)


def command_help(name: str) -> str:
    """The one-line help of sub-command ``name`` (modules use it in their add_parser)."""
    return next(text for command, _, text in SUBCOMMANDS if command == name)


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


def _chosen(argv: list[str]) -> str | None:
    """The sub-command ``argv`` names: its first token that is not an option (the top-level
    parser takes no option with a value), if it is a command."""
    names = {name for name, _, _ in SUBCOMMANDS}
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in names else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``fieldlib`` parser. Sub-commands other than the one ``argv`` names get a stub
    (name and help line), so building it imports only that one module; ``argv=None``
    builds every sub-command in full."""
    parser = argparse.ArgumentParser(
        prog="fieldlib",
        description="Conditional random fields with neural potentials: exact and mean-field "
        "inference, gradient checks, and the Charades asynchronous temporal field.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    for name, module, text in SUBCOMMANDS:
        if argv is None or name == chosen:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
