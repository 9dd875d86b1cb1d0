"""Read a model file of either format, plus UAI evidence, ready for an engine."""

from __future__ import annotations

import torch

from fieldlib.errors import FormatError

from .fg import read_fg
from .model import TableModel
from .uai import read_evidence, read_uai

__all__ = ["read_model", "load_model"]


def read_model(path) -> TableModel:
    """A :class:`TableModel` from ``.uai`` or ``.fg`` (chosen by the file's extension)."""
    name = str(path).lower()
    if name.endswith(".fg"):
        return read_fg(path)
    if name.endswith(".uai"):
        return read_uai(path)
    raise FormatError(f"{path}: unknown model format; expected a .uai or .fg file")


def load_model(path, evidence_path=None, dtype: torch.dtype = torch.float64):
    """``(model, graph, evidence)``: the file's model, its FactorGraph (log-potentials of
    ``dtype``), and the evidence file's observations keyed by variable name (``{"v3": 1}``;
    empty without ``evidence_path``)."""
    model = read_model(path)
    graph = model.to_graph(dtype)
    evidence = {}
    if evidence_path is not None:
        observed = read_evidence(evidence_path, model)
        evidence = {model.names[v]: x for v, x in observed.items()}
    return model, graph, evidence
