"""Model files: the UAI format (:mod:`fieldlib.io.uai`) and libDAI's .fg (:mod:`fieldlib.io.fg`).

Both read into a :class:`TableModel` (variables, scopes, tables of potentials in C order),
which converts to and from a :class:`~fieldlib.graph.FactorGraph`. Conventions:
docs/formats.md. Readers check the sizes a file declares against a memory budget before
allocating them (:mod:`fieldlib.io.budget`; ``memory_budget=``, default half the memory
available when the read starts) and raise TooLargeError naming the file, line and figure.
"""

from .fg import format_fg, parse_fg, read_fg, write_fg
from .load import load_model, read_model
from .model import TableModel
from .uai import (
    format_uai,
    parse_evidence,
    parse_uai,
    read_evidence,
    read_uai,
    write_evidence,
    write_uai,
)

__all__ = [
    "TableModel",
    "read_model", "load_model",
    "read_uai", "parse_uai", "write_uai", "format_uai",
    "read_evidence", "parse_evidence", "write_evidence",
    "read_fg", "parse_fg", "write_fg", "format_fg",
]
