"""The engine interface, its Result, and the registry of engines by name.

Every engine is called the same way (as libDAI's InfAlg)::

    result = engine(graph, evidence={"x": states}, marginals=True, map=False)

and returns a :class:`Result`. Engines are interchangeable on every graph they support;
``get_engine("exact", memory_budget=2**30)`` builds one by name. An engine asked for
something it cannot give raises :class:`~fieldlib.errors.UnsupportedQueryError`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from fieldlib.errors import FieldlibError, UnsupportedQueryError

__all__ = ["Result", "Engine", "Option", "register_engine", "get_engine", "engine_names",
           "engine_options", "parse_engine_spec"]


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


@dataclass(frozen=True)
class Option:
    """One option an engine takes: the keyword of its constructor.

    Attributes:
        name: the keyword. kind: ``"int"``, ``"float"``, ``"bool"`` or ``"str"`` (how a
        string value is read). default: the constructor's default. optional: None is
        accepted (written ``none``). help: the line from the engine's docstring.
    """

    name: str
    kind: str
    default: Any
    optional: bool
    help: str

    def parse(self, text: str):
        """The value of ``text`` (from a spec string or the command line) as this option's
        type; FieldlibError naming the option when it does not read as one."""
        t = text.strip()
        if self.optional and t.lower() == "none":
            return None
        try:
            if self.kind == "bool":
                if t.lower() in ("1", "true", "yes", "on"):
                    return True
                if t.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if self.kind == "int":
                return int(t)
            if self.kind == "float":
                value = float(t)
                if math.isnan(value):
                    raise ValueError
                return value
        except ValueError:
            raise FieldlibError(f"option {self.name}={text!r}: expected {self.kind}"
                                f"{' or none' if self.optional else ''}") from None
        return t

    def describe(self) -> str:
        return f"{self.name} ({self.kind}, default {self.default!r}): {self.help}"


def _kind(annotation) -> tuple[str, bool]:
    args = typing.get_args(annotation)
    optional = type(None) in args
    types = [a for a in args if a is not type(None)] or [annotation]
    for kind in (bool, int, float):      # bool before int: bool is an int
        if kind in types:
            return kind.__name__, optional
    return "str", optional


def _help_lines(cls) -> dict[str, str]:
    """``{option: first sentence}`` from the class docstring's ``Args:`` section."""
    doc = inspect.getdoc(cls) or ""
    found: dict[str, str] = {}
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    current = None
    for line in section.splitlines():
        if line and not line.startswith(" "):
            break                                     # the next section
        m = re.match(r"\s{4}(\w+):\s*(.*)", line)
        if m and not line.startswith(" " * 5):
            current = m.group(1)
            found[current] = m.group(2).strip()
        elif current and line.strip():
            found[current] += " " + line.strip()
    return found


def engine_options(engine) -> list[Option]:
    """The options an engine (name, class or instance) declares: its constructor's keyword
    parameters, typed by their annotations, with the help its docstring's ``Args:`` gives.
    An engine class may set ``options`` itself to declare them explicitly."""
    cls = _ENGINES[engine] if isinstance(engine, str) and engine in _ENGINES else engine
    if isinstance(engine, str) and engine not in _ENGINES:
        raise FieldlibError(f"unknown engine {engine!r}; choose from {engine_names()}")
    cls = cls if isinstance(cls, type) else type(cls)
    if getattr(cls, "options", None) is not None:
        return list(cls.options)
    hints = typing.get_type_hints(cls.__init__)
    helps = _help_lines(cls)
    out = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind, optional = _kind(hints.get(p.name, str))
        default = None if p.default is inspect.Parameter.empty else p.default
        out.append(Option(p.name, kind, default, optional or default is None,
                          helps.get(p.name, "")))
    return out


def parse_engine_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"meanfield[schedule=synchronous,damping=0.5]"`` -> ``("meanfield", {"schedule":
    "synchronous", "damping": "0.5"})`` (values still strings; libDAI's spec syntax)."""
    m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[(.*)\])?\s*", spec or "")
    if not m:
        raise FieldlibError(f"engine spec {spec!r}: expected NAME or NAME[key=value,...]")
    name, body = m.group(1), m.group(2)
    values: dict[str, str] = {}
    for item in (body.split(",") if body and body.strip() else []):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise FieldlibError(f"engine spec {spec!r}: {item.strip()!r} is not key=value")
        if key in values:
            raise FieldlibError(f"engine spec {spec!r}: option {key!r} given twice")
        values[key] = value.strip()
    return name, values


def get_engine(spec: str, **options) -> Engine:
    """Build a registered engine from a name or a spec string, with keyword options:
    ``get_engine("meanfield", schedule="synchronous")`` or
    ``get_engine("meanfield[schedule=synchronous,damping=0.5]")``.

    Raises FieldlibError for an unknown engine, an option the engine does not declare (the
    message lists the ones it does), a value that does not read as the option's type, or
    an option given both in the spec and as a keyword.
    """
    name, text = parse_engine_spec(spec)
    if name not in _ENGINES:
        raise FieldlibError(f"unknown engine {name!r}; choose from {engine_names()}")
    declared = {o.name: o for o in engine_options(name)}
    unknown = [k for k in (*text, *options) if k not in declared]
    if unknown:
        close = difflib.get_close_matches(unknown[0], declared, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FieldlibError(f"engine {name!r} has no option {unknown[0]!r}{hint}; its options: "
                            f"{', '.join(declared) or 'none'}")
    both = set(text) & set(options)
    if both:
        raise FieldlibError(f"engine {name!r}: option {sorted(both)[0]!r} given twice")
    kwargs = {k: declared[k].parse(v) for k, v in text.items()}
    kwargs.update(options)
    try:
        return _ENGINES[name](**kwargs)
    except TypeError as exc:
        raise FieldlibError(f"engine {name!r}: {exc}") from None


def engine_names() -> list[str]:
    return sorted(_ENGINES)
