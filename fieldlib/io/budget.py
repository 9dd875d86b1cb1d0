"""Memory budgets for reading model files: declared sizes are refused before allocation.

A model file declares sizes it does not have to back up: ``MARKOV 1 3000000000 0`` (22 bytes)
declares a variable of three billion states, and a 23-byte .fg file a table of 2e8 entries
that are all omitted (zero). Readers therefore add up what the declared model will occupy,
as each size is read and before anything of that size is allocated, and raise
:class:`~fieldlib.errors.TooLargeError` naming the file, the line, the variable or factor
and the figure once the total passes the budget.

What is counted (deliberately generous; a refusal should err on the safe side):

* a table entry, :data:`ENTRY_BYTES` = 16: its float64 potential in the
  :class:`~fieldlib.io.TableModel` and its float64 log in the graph;
* a domain state, :data:`STATE_BYTES` = 32: what inference keeps per state and batch
  element at the least (the marginal, the probe table whose gradient it is, that gradient,
  the result), in float64.

The default budget is half of the memory available when the read starts (MemAvailable on
Linux), the exact engine's default too; ``math.inf`` turns the check off. A caller that
knows its engine will refuse large dense tables anyway (the exact engines refuse tables
above ``DEFAULT_MAX_DENSE_ELEMENTS``) passes that figure as ``max_table_elements``, so such a
table is refused before it is read rather than after it is built.
"""

from __future__ import annotations

import math
import os

from fieldlib.errors import FieldlibError, TooLargeError

__all__ = ["ENTRY_BYTES", "STATE_BYTES", "ReadBudget", "available_memory", "default_budget",
           "describe_bytes", "resolve_budget"]

ENTRY_BYTES = 16
STATE_BYTES = 32


def available_memory() -> int:
    """Bytes of host memory available now (``MemAvailable``, else free pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 2**63


def default_budget() -> int:
    """Half the memory available now: the default for readers and the exact engine."""
    return max(available_memory() // 2, 1)


def resolve_budget(memory_budget) -> float:
    """A budget in bytes from ``memory_budget``: None measures :func:`default_budget` now;
    a positive number is rounded up to whole bytes; ``math.inf`` (or an int beyond the float
    range) means no limit. Anything else (zero, negative, NaN, not a number) raises
    FieldlibError."""
    if memory_budget is None:
        return default_budget()
    try:
        value = float(memory_budget)
    except OverflowError:  # an int beyond the float range
        value = math.inf if memory_budget > 0 else -math.inf
    except (TypeError, ValueError):
        value = math.nan
    if not value > 0:
        raise FieldlibError(
            f"memory_budget must be a positive number of bytes (or math.inf: no limit), got "
            f"{memory_budget!r}")
    return math.ceil(memory_budget) if math.isfinite(value) else math.inf


def describe_bytes(n) -> str:
    """``'24,000,000,000 bytes (22.35 GiB)'``; astronomically large counts in powers of 10."""
    if n == math.inf:
        return "unlimited"
    n = int(n)
    if n < 2**20:
        return f"{n:,} byte{'' if n == 1 else 's'}"
    if n < 2**30:
        return f"{n:,} bytes ({n / 2**20:.1f} MiB)"
    if n < 10**18:
        return f"{n:,} bytes ({n / 2**30:.2f} GiB)"
    digits = str(n)
    return f"about {digits[0]}.{digits[1:3]}e{len(digits) - 1} bytes"


class ReadBudget:
    """Running total of the bytes a model being read will occupy, checked on every addition.

    Args:
        memory_budget: bytes (see :func:`resolve_budget`; None: half the memory available now).
        where: the file name, for messages.
        max_table_elements: refuse any one table with more entries than this (None: no
            limit beyond the budget).
    """

    def __init__(self, memory_budget=None, where: str = "<string>",
                 max_table_elements: int | None = None):
        self.budget = resolve_budget(memory_budget)
        self.where = where
        self.max_table_elements = max_table_elements
        self.used = 0

    def _at(self, line: int | None) -> str:
        return f"{self.where}:{line}" if line is not None else self.where

    def _add(self, nbytes: int, what: str, line: int | None) -> None:
        self.used += nbytes
        if self.used > self.budget:
            raise TooLargeError(
                f"{self._at(line)}: {what}; the model would occupy about "
                f"{describe_bytes(self.used)} in memory, over the memory budget of "
                f"{describe_bytes(self.budget)}; refused before allocating it (raise "
                f"memory_budget, or --memory-budget, if the machine really has the memory)")

    def states(self, count: int, what: str, line: int | None = None) -> None:
        """Count ``count`` domain states (``what``: e.g. "variable 0 has 3 states")."""
        self._add(count * STATE_BYTES, what, line)

    def entries(self, count: int, what: str, line: int | None = None) -> None:
        """Count a table of ``count`` entries (``what`` names the factor and its size)."""
        limit = self.max_table_elements
        if limit is not None and count > limit:
            raise TooLargeError(
                f"{self._at(line)}: {what}, above the limit of {limit:,} entries per table "
                f"(max_table_elements; the exact engines refuse larger dense tables, a "
                f"mean-field engine takes them); refused before allocating it")
        self._add(count * ENTRY_BYTES, what, line)
