"""Read a model file of either format, plus UAI evidence, ready for an engine."""

from __future__ import annotations

import torch

from fieldlib.errors import FormatError

from .fg import read_fg
from .model import TableModel
from .uai import read_evidence, read_uai

__all__ = ["read_model", "load_model"]


def read_model(path, *, memory_budget=None,
               max_table_elements: int | None = None) -> TableModel:
    """A :class:`TableModel` from ``.uai`` or ``.fg`` (chosen by the file's extension).

    ``memory_budget``: bytes the model may occupy (default: half the memory available when
    the read starts; ``math.inf``: no limit); ``max_table_elements``: the most entries one
    table may have (default: no limit). Declared sizes past either raise TooLargeError
    before they are allocated (:mod:`fieldlib.io.budget`).
    """
    name = str(path).lower()
    limits = {"memory_budget": memory_budget, "max_table_elements": max_table_elements}
    if name.endswith(".fg"):
        return read_fg(path, **limits)
    if name.endswith(".uai"):
        return read_uai(path, **limits)
    raise FormatError(f"{path}: unknown model format; expected a .uai or .fg file")


def load_model(path, evidence_path=None, dtype: torch.dtype = torch.float64, *,
               memory_budget=None, max_table_elements: int | None = None):
    """``(model, graph, evidence)``: the file's model, its FactorGraph (log-potentials of
    ``dtype``), and the evidence file's observations keyed by variable name (``{"v3": 1}``;
    empty without ``evidence_path``). ``memory_budget`` and ``max_table_elements`` as in
    :func:`read_model`."""
    model = read_model(path, memory_budget=memory_budget,
                       max_table_elements=max_table_elements)
    graph = model.to_graph(dtype)
    evidence = {}
    if evidence_path is not None:
        observed = read_evidence(evidence_path, model)
        evidence = {model.names[v]: x for v, x in observed.items()}
    return model, graph, evidence
