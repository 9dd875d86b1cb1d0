"""libDAI's factor-graph format (.fg): read and write.

Layout (docs/formats.md)::

    2               # number of factors; then one block per factor, blocks separated by
                    # blank lines
    1               # number of variables in the factor
    4               # their labels (any non-negative integers)
    2               # their domain sizes
    2               # number of listed (nonzero) entries
    0 0.3           # entry index, value: the FIRST variable of the scope changes fastest
    1 0.7

    2
    4 7
    2 3
    5
    ...

Entries not listed are zero. Lines starting with ``#`` are comments. A variable's label is
its identity: every factor naming it must give the same domain size. The graph's variables
are the labels in ascending order, named ``v{label}``. This is the opposite layout to UAI
(last variable fastest): :func:`read_fg` converts to C order, :func:`write_fg` back.

Every error is a :class:`~fieldlib.errors.FormatError` naming the file, the line, the factor
and entry, and what was expected. Declared sizes are checked against a memory budget before
anything of that size is allocated (:mod:`fieldlib.io.budget`): a short file may declare a
huge table whose entries are all omitted; past the budget the reader raises
:class:`~fieldlib.errors.TooLargeError` naming the file, the line, the factor and the bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fieldlib.graph import FactorGraph

from ._tokens import Tokens, read_text
from .budget import ReadBudget
from .model import TableModel

__all__ = ["read_fg", "parse_fg", "write_fg", "format_fg"]


def parse_fg(text: str, where: str = "<string>", *, memory_budget=None,
              max_table_elements: int | None = None) -> TableModel:
    """Parse .fg text into a :class:`TableModel` (tables in C order); ``where`` names it in
    errors. See the module docstring for the layout.

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
    tok = Tokens(text, where, comments=True)
    m = tok.integer("the number of factors", low=0)
    card_of: dict[int, tuple[int, int]] = {}  # label -> (domain size, factor declaring it)
    raw = []
    for j in range(m):
        k = tok.integer(f"the number of variables of factor {j}", low=0)
        labels = []
        for t in range(k):
            pos = tok.pos
            label = tok.integer(f"label {t} of factor {j}", low=0)
            if label in labels:
                raise tok.error(f"factor {j} lists variable {label} twice", pos)
            labels.append(label)
        cards = []
        for label in labels:
            pos = tok.pos
            d = tok.integer(f"the domain size of variable {label} in factor {j}", low=1)
            if label in card_of and card_of[label][0] != d:
                first, where_first = card_of[label]
                raise tok.error(
                    f"variable {label} has domain size {d} in factor {j} but {first} in "
                    f"factor {where_first}; expected the same size everywhere", pos)
            if label not in card_of:
                budget.states(d, f"variable {label} has {d:,} states (factor {j})",
                              tok.line(pos))
                card_of[label] = (d, j)
            cards.append(d)
        size = math.prod(cards)
        budget.entries(size, f"factor {j}'s table over variables {tuple(labels)} has "
                       f"{size:,} entries", tok.line(tok.pos - 1))
        nnz = tok.integer(f"the number of listed entries of factor {j}", low=0, high=size)
        index_of: dict[int, int] = {}  # listed index -> entry number
        values = []
        for e in range(nnz):
            pos = tok.pos
            index = tok.integer(f"the index of entry {e} of factor {j}", low=0,
                                high=size - 1)
            if index in index_of:
                raise tok.error(f"factor {j} lists index {index} twice (entry {e})", pos)
            index_of[index] = e
            vpos = tok.pos
            value = tok.number(f"the value of entry {e} of factor {j}")
            if not math.isfinite(value) or value < 0:
                raise tok.error(
                    f"factor {j}, entry {e} (index {index}): the value {tok.tokens[vpos]} is "
                    f"not a finite non-negative potential", vpos)
            values.append(value)
        raw.append((labels, _c_order_table(cards, list(index_of), values)))
    tok.expect_end(f"the {m} factors")
    labels = sorted(card_of)
    position = {label: i for i, label in enumerate(labels)}
    scopes = [tuple(position[label] for label in ls) for ls, _ in raw]
    tables = [table for _, table in raw]
    cards = [card_of[label][0] for label in labels]
    return TableModel(cards, scopes, tables, kind="MARKOV", source=where, labels=labels)


def _c_order_table(cards: list[int], indices: list[int], values: list[float]) -> np.ndarray:
    """The C-order table of shape ``cards`` (``()`` for an empty scope) holding ``values`` at
    the libDAI (first variable fastest) flat ``indices``, zero elsewhere."""
    shape = tuple(cards)
    table = np.zeros(shape, dtype=np.float64)
    if not shape:  # a constant factor: one entry, index 0
        table[()] = values[0] if values else 0.0
    elif indices:
        at = np.unravel_index(np.asarray(indices, dtype=np.int64), shape, order="F")
        table[at] = values
    return table


def read_fg(path, *, memory_budget=None,
             max_table_elements: int | None = None) -> TableModel:
    """Read a libDAI ``.fg`` file into a :class:`TableModel`.

    ``memory_budget`` and ``max_table_elements`` as in :func:`parse_fg` (the default
    budget is measured before reading).
    Raises FormatError on bad content, TooLargeError when the declared model would not fit
    the budget.
    """
    budget = ReadBudget(memory_budget, str(path))
    return parse_fg(read_text(path), str(path), memory_budget=budget.budget,
                    max_table_elements=max_table_elements)


def format_fg(model: TableModel | FactorGraph) -> str:
    """libDAI .fg text of a model (a graph is converted with TableModel.from_graph).

    Zero entries are omitted. A variable in no factor (which .fg cannot declare otherwise)
    gets a unary factor of ones, so log Z and the variable survive a round trip.
    """
    if isinstance(model, FactorGraph):
        model = TableModel.from_graph(model)
    scopes = list(model.scopes)
    tables = list(model.tables)
    for v in model.isolated():
        scopes.append((v,))
        tables.append(np.ones(model.cards[v]))
    out = [str(len(scopes))]
    for scope, table in zip(scopes, tables):
        flat = np.asarray(table, dtype=np.float64).ravel(order="F")
        nonzero = np.flatnonzero(flat)
        out.append("")
        out.append(str(len(scope)))
        out.append(" ".join(str(model.labels[v]) for v in scope))
        out.append(" ".join(str(model.cards[v]) for v in scope))
        out.append(str(len(nonzero)))
        out.extend(f"{i} {value!r}" for i, value in zip(nonzero.tolist(),
                                                        flat[nonzero].tolist()))
    return "\n".join(out) + "\n"


def write_fg(path, model: TableModel | FactorGraph) -> None:
    """Write a model (or an unbatched graph) as a libDAI .fg file."""
    Path(path).write_text(format_fg(model))
