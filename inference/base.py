"""The engine interface, its Result, and the registry of engines by name.

Every engine is called the same way (as libDAI's InfAlg)::

    result = engine(graph, evidence={"x": states}, marginals=True, map=False)

and returns a :class:`Result`. Engines are interchangeable on every graph they support;
``get_engine("exact", memory_budget=2**30)`` builds one by name. An engine asked for
something it cannot give raises :class:`~fieldlib.errors.UnsupportedQueryError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fieldlib.errors import FieldlibError, UnsupportedQueryError

__all__ = ["Result", "Engine", "register_engine", "get_engine", "engine_names"]


@dataclass
class Result:
    """What an engine returns. Tensors carry the batch axis N when the graph is batched.

    Attributes:
        log_z: ``([N])`` log partition function log Z (with evidence: log Σ over the free
            variables); None for approximate engines, which give ``elbo``.
        elbo: ``([N])`` evidence lower bound (mean-field engines), <= log Z.
        marginals: ``{name: ([N,] d)}`` for every variable, plus ``{array: ([N,] T, d)}``
            for every array. Padded positions have all-zero rows.
        factor_marginals: ``{factor name: [([N,] d1..dk) per term]}`` when requested.
        map: ``{name: LongTensor ([N])}`` and ``{array: ([N,] T)}`` (-1 on padding).
        map_score: ``([N])`` log-score of the MAP assignment.
        trace: per-iteration diagnostics (iterative engines).
        info: engine-specific figures (order, contraction cost, timings).
    """

    engine: str
    log_z: torch.Tensor | None = None
    elbo: torch.Tensor | None = None
    marginals: dict[str, torch.Tensor] | None = None
    factor_marginals: dict[str, list[torch.Tensor]] | None = None
    map: dict[str, torch.Tensor] | None = None
    map_score: torch.Tensor | None = None
    trace: list[dict] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def marginal(self, key) -> torch.Tensor:
        """Marginal of a variable or array (object or name)."""
        if self.marginals is None:
            raise UnsupportedQueryError(f"the {self.engine} result holds no marginals")
        name = getattr(key, "name", key)
        if name not in self.marginals:
            raise FieldlibError(f"no marginal for {name!r} in this result")
        return self.marginals[name]


class Engine:
    """Base class: subclasses implement :meth:`run` and declare what they support."""

    name = "engine"
    #: queries this engine answers: any of "log_z", "elbo", "marginals", "map"
    supports: frozenset = frozenset()

    def __call__(self, graph, evidence=None, *, marginals: bool = True,
                 factor_marginals: bool = False, map: bool = False) -> Result:
        wanted = {"marginals"} if marginals or factor_marginals else set()
        if map:
            wanted.add("map")
        missing = wanted - self.supports
        if missing:
            raise UnsupportedQueryError(
                f"engine {self.name!r} cannot give {', '.join(sorted(missing))}; it supports "
                f"{', '.join(sorted(self.supports))}"
            )
        return self.run(graph, evidence, marginals=marginals,
                        factor_marginals=factor_marginals, map=map)

    def run(self, graph, evidence, *, marginals, factor_marginals, map) -> Result:
        raise NotImplementedError

    def log_partition(self, graph, evidence=None) -> torch.Tensor:
        """log Z (or the ELBO for approximate engines)."""
        r = self(graph, evidence, marginals=False)
        return r.log_z if r.log_z is not None else r.elbo


_ENGINES: dict[str, type] = {}


def register_engine(name: str):
    """Class decorator registering an Engine subclass under ``name``."""

    def wrap(cls):
        cls.name = name
        _ENGINES[name] = cls
        return cls

    return wrap


def get_engine(name: str, **options) -> Engine:
    """Build a registered engine by name with keyword options.

    Raises FieldlibError for an unknown name or an option the engine does not take.
    """
    if name not in _ENGINES:
        raise FieldlibError(f"unknown engine {name!r}; choose from {engine_names()}")
    try:
        return _ENGINES[name](**options)
    except TypeError as exc:
        raise FieldlibError(f"engine {name!r}: {exc}") from None


def engine_names() -> list[str]:
    return sorted(_ENGINES)
