"""The UAI model format (.uai) and its evidence files (.evid): read and write.

Layout (docs/formats.md)::

    MARKOV                 # or BAYES
    3                      # number of variables
    2 2 3                  # their domain sizes
    2                      # number of factors
    1 0                    # factor 0's scope: size, then variable indices
    2 1 2                  # factor 1's scope
    2                      # factor 0's table: entry count, then the values
     0.4 0.6
    6
     1 2 0.5 1e-3 0 4      # factor 1: LAST variable of the scope changes fastest

Values are non-negative potentials (zeros allowed: impossible configurations), parsed with
``float()`` so exponents (``1e-3``, ``2.5E+10``), are accepted. A BAYES file has the same
layout; each factor is the CPT P(child | parents) over ``(parents..., child)``. Evidence is
``n v1 x1 .. vn xn``; the older form with a leading sample count of 1 is also read.

Every error is a :class:`~fieldlib.errors.FormatError` naming the file, the line, the entry
when it is a table value, and what was expected. Declared sizes (domain sizes, table sizes)
are checked against a memory budget as they are read, before anything of that size is
allocated (:mod:`fieldlib.io.budget`): past it the reader raises
:class:`~fieldlib.errors.TooLargeError` naming the file, the line, the variable or factor
and the bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fieldlib.errors import FormatError
from fieldlib.graph import FactorGraph

from ._tokens import Tokens, read_text
from .budget import ReadBudget
from .model import TableModel

__all__ = [
    "read_uai", "parse_uai", "write_uai", "format_uai",
    "read_evidence", "parse_evidence", "write_evidence",
]


def parse_uai(text: str, where: str = "<string>", *, memory_budget=None,
              max_table_elements: int | None = None) -> TableModel:
    """Parse UAI model text; ``where`` names it in errors. See the module docstring.

    Args:
        memory_budget: bytes the model may occupy (:class:`~fieldlib.io.budget.ReadBudget`;
            default: half the memory available when the parse starts; ``math.inf``: no
            limit).
        max_table_elements: refuse any one table larger than this (default: no limit).

    Raises:
        FormatError: malformed text. TooLargeError: the declared domains and tables would
            exceed ``memory_budget`` (raised before they are allocated).
    """
    budget = ReadBudget(memory_budget, where, max_table_elements)
    tok = Tokens(text, where)
    if tok.done:
        raise FormatError(f"{where}: the file is empty; expected MARKOV or BAYES")
    kind = tok.word("the preamble").upper()
    if kind not in ("MARKOV", "BAYES"):
        raise tok.error(f"expected MARKOV or BAYES as the first word, got {kind!r}", 0)
    n = tok.integer("the number of variables", low=1)
    cards = []
    for i in range(n):
        pos = tok.pos
        d = tok.integer(f"the domain size of variable {i}", low=1)
        budget.states(d, f"variable {i} has {d:,} states", tok.line(pos))
        cards.append(d)
    m = tok.integer("the number of factors", low=0)
    scopes = []
    for j in range(m):
        k = tok.integer(f"the scope size of factor {j}", low=0, high=n)
        scope = []
        for t in range(k):
            pos = tok.pos
            v = tok.integer(f"variable {t} of factor {j}'s scope (a variable index)",
                            low=0, high=n - 1)
            if v in scope:
                raise tok.error(f"factor {j}'s scope lists variable {v} twice", pos)
            scope.append(v)
        size = math.prod(cards[v] for v in scope)
        budget.entries(size, f"factor {j}'s table over variables {tuple(scope)} has {size:,} "
                       f"entries", tok.line(tok.pos - 1))
        scopes.append(tuple(scope))
    tables = []
    for j, scope in enumerate(scopes):
        shape = tuple(cards[v] for v in scope)
        expected = math.prod(shape)
        pos = tok.pos
        count = tok.integer(f"the entry count of factor {j}'s table", low=0)
        if count != expected:
            dims = " x ".join(map(str, shape)) or "1 (empty scope)"
            raise tok.error(
                f"factor {j}'s table declares {count} entries; expected {expected} "
                f"(the product of its scope's domain sizes {dims})", pos)
        values = tok.values(count, f"factor {j}'s table")
        tables.append(values.reshape(shape))
    tok.expect_end(f"the {m} factor tables")
    return TableModel(cards, scopes, tables, kind=kind, source=where)


def read_uai(path, *, memory_budget=None,
             max_table_elements: int | None = None) -> TableModel:
    """Read a ``.uai`` file (MARKOV or BAYES) into a :class:`TableModel`.

    ``memory_budget`` and ``max_table_elements`` as in :func:`parse_uai` (the default
    budget is measured before reading).
    Raises FormatError naming the file and line on any malformed content, TooLargeError
    when the declared model would not fit the budget.
    """
    budget = ReadBudget(memory_budget, str(path))
    return parse_uai(read_text(path), str(path), memory_budget=budget.budget,
                    max_table_elements=max_table_elements)


def parse_evidence(text: str, where: str = "<string>",
                   model: TableModel | None = None) -> dict[int, int]:
    """Parse evidence text ``n v1 x1 .. vn xn`` into ``{variable position: state}``.

    Also accepted: the older multi-sample form ``1 n v1 x1 ..`` holding exactly one sample
    (the two forms differ in token-count parity, so they are never confused). With
    ``model``, each ``v`` is looked up among the model's labels (for UAI its indices) and
    mapped to its position, and states are checked against the domains.
    """
    tok = Tokens(text, where)
    if tok.done:
        return {}
    total = len(tok.tokens)
    first = tok.integer("the number of observed variables", low=0)
    if total != 1 + 2 * first:
        if first == 1 and total >= 2:
            # older form: sample count 1, then one sample
            n = tok.integer("the number of observed variables (after the sample count 1)",
                            low=0)
            if total != 2 + 2 * n:
                raise _count_error(tok, where, n, total - 2)
        else:
            raise _count_error(tok, where, first, total - 1)
    else:
        n = first
    evidence: dict[int, int] = {}
    for k in range(n):
        pos = tok.pos
        label = tok.integer(f"the variable index of observation {k}", low=0)
        v = label
        if model is not None:
            v = model.index_of(label)
            if v is None:
                raise tok.error(
                    f"observation {k} names variable {label}, which the model does not have "
                    f"({_describe_labels(model)})", pos)
        high_x = None if model is None else model.cards[v] - 1
        x = tok.integer(f"the state of variable {label} (observation {k})", low=0, high=high_x)
        if v in evidence and evidence[v] != x:
            raise tok.error(f"variable {label} is observed twice, as {evidence[v]} and {x}",
                            pos)
        evidence[v] = x
    return evidence


def _describe_labels(model: TableModel) -> str:
    n = model.num_variables
    if model.labels == list(range(n)):
        return f"its variables are 0..{n - 1}"
    shown = ", ".join(map(str, model.labels[:10])) + (", ..." if n > 10 else "")
    return f"its variable labels are {shown}"


def _count_error(tok: Tokens, where: str, n: int, have: int) -> FormatError:
    return FormatError(
        f"{where}:{tok.lines[0]}: the evidence declares {n} observations, so expected "
        f"{2 * n} numbers (variable, state pairs) after the count, got {have}")


def read_evidence(path, model: TableModel | None = None) -> dict[int, int]:
    """Read a ``.evid`` file into ``{variable index: state}`` (see :func:`parse_evidence`)."""
    return parse_evidence(read_text(path), str(path), model)


def format_uai(model: TableModel | FactorGraph) -> str:
    """UAI MARKOV text of a model (a graph is converted with TableModel.from_graph).

    Values are written with ``repr`` (shortest text that reads back to the same float).
    """
    if isinstance(model, FactorGraph):
        model = TableModel.from_graph(model)
    lines = ["MARKOV", str(len(model.cards)), " ".join(map(str, model.cards)),
             str(len(model.scopes))]
    lines.extend(" ".join(map(str, (len(s), *s))) for s in model.scopes)
    for table in model.tables:
        lines.append("")
        lines.append(str(table.size))
        rows = table.reshape(-1, table.shape[-1]) if table.ndim else table.reshape(1, 1)
        lines.extend(" " + " ".join(map(repr, row)) for row in rows.tolist())
    return "\n".join(lines) + "\n"


def write_uai(path, model: TableModel | FactorGraph) -> None:
    """Write a model (or an unbatched graph) as a UAI MARKOV file."""
    Path(path).write_text(format_uai(model))


def write_evidence(path, evidence: dict[int, int]) -> None:
    """Write ``{variable index: state}`` as ``n v1 x1 .. vn xn``."""
    items = sorted((int(v), int(x)) for v, x in evidence.items())
    Path(path).write_text(" ".join(map(str, [len(items), *np.ravel(items).tolist()])) + "\n")
