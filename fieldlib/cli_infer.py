"""``fieldlib infer``: run an engine on a UAI or libDAI .fg model, print UAI competition output.

    fieldlib infer MODEL.uai|MODEL.fg [--evid FILE.evid] --task PR|MAR|MAP
                   [--engine NAME] [-o OUT] [--memory-budget BYTES] [--search-effort X]

Output (the UAI 2014 competition's result format; docs/formats.md):

* ``PR``: a line ``PR`` then log10 Z (with evidence: log10 of the sum over the free
  variables);
* ``MAR``: a line ``MAR`` then one line ``n d1 p1.. d2 p1.. ...``, each variable's domain
  size and its marginal P(x | e) (evidence variables show a delta);
* ``MAP``: a line ``MAP`` then ``n x1 .. xn``, the most probable joint state.

Bad input (a malformed file, evidence out of range, an unknown engine) and refusals (a
problem too large for the memory budget, evidence of probability zero, an engine whose
tensor allocation failed) exit with code 2 and one line on stderr, via fieldlib.cli.

The memory budget is measured once, before the model is read: the reader checks the sizes
the file declares against it before allocating them, and the exact engine gets the same
figure for its contraction.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from fieldlib.cli import allocation_failure, command_help
from fieldlib.errors import FieldlibError, TooLargeError, UnsupportedQueryError

TASKS = ("PR", "MAR", "MAP")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "infer",
        help=command_help("infer"),
        description="Read a model (UAI .uai, MARKOV or BAYES, or libDAI .fg; chosen by the "
        "extension) and optional UAI evidence, run an inference engine, and print the UAI "
        "competition result: PR = log10 of the partition function (of the evidence), MAR = "
        "every variable's marginal, MAP = the most probable assignment. Exit code 2 with "
        "one line on stderr on bad input or when the engine refuses the problem.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="model file: NAME.uai (UAI format) or NAME.fg (libDAI format); "
                   "required unless --list-options")
    p.add_argument("--evid", metavar="FILE.evid", default=None,
                   help="UAI evidence file 'n v1 x1 .. vn xn' (variable indices are the "
                   "model's: UAI positions, .fg labels); default: no evidence")
    p.add_argument("--task", choices=TASKS, type=str.upper,
                   help="required unless --list-options. PR: log10 partition function; MAR: "
                   "marginals; MAP: most probable assignment")
    p.add_argument("--engine", default="exact", metavar="SPEC",
                   help="inference engine: a registered name (exact = variable elimination, "
                   "bruteforce = enumeration of all joint states, meanfield = structured "
                   "mean-field, or one a plug-in registered) or a spec with options, "
                   "libDAI-style: 'meanfield[schedule=synchronous,damping=0.5]'; default: "
                   "exact")
    p.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="set an option of the engine (repeatable), e.g. -O schedule=synchronous "
                   "-O max_iter=50 or -O search_effort=0; --list-options shows an engine's "
                   "options; default: the engine's defaults")
    p.add_argument("--list-options", action="store_true",
                   help="print the options of the engine given by --engine (name, type, "
                   "default, meaning) and exit")
    p.add_argument("-o", "--output", metavar="OUT", default=None,
                   help="also write the result to this file (it is always printed); "
                   "default: print only")
    p.add_argument("--memory-budget", metavar="BYTES", type=_size, default=None,
                   help="refuse, before allocating, models whose declared sizes need more "
                   "memory than this, and (exact engine) contractions that would; a positive "
                   "number of bytes with an optional suffix K, M, G, T (powers of 1024: 512M, "
                   "1.5G), fractions rounded up to whole bytes; 'inf' (or a number too large "
                   "for a float, like 1e400) means no limit; default: half the memory "
                   "available when the command starts, measured before the model is read")
    p.set_defaults(func=run)
    return p


def _size(text: str) -> float:
    """A memory budget in bytes: ``int`` (fractions rounded up) or ``math.inf``."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper()
    if t in ("INF", "INFINITY", "UNLIMITED"):
        return math.inf
    t = t.removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in units:
        scale, t = units[t[-1]], t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes like 512M, 1.5G or inf, got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"the memory budget must be a positive number of bytes (or inf), got {text!r}")
    return math.inf if math.isinf(value) else math.ceil(value)


def _engine(args, budget=None):
    """The engine ``--engine`` and ``--option`` ask for. ``budget`` (bytes, measured before
    reading) goes to an engine that declares a ``memory_budget`` option. Nothing here knows
    any engine: options are checked against what the engine declares."""
    from fieldlib.inference import engine_options, get_engine, parse_engine_spec

    name, spec = parse_engine_spec(args.engine)
    options = dict(spec)
    for item in args.option:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise FieldlibError(f"--option {item!r}: expected KEY=VALUE, e.g. -O max_iter=50")
        if key in options:
            raise FieldlibError(f"engine option {key!r} given twice")
        options[key] = value
    declared = {o.name: o for o in engine_options(name)}
    if "memory_budget" in declared and "memory_budget" not in options:
        if args.memory_budget is not None or budget is not None:
            options["memory_budget"] = str(args.memory_budget if args.memory_budget is not None
                                           else budget)
    text = ",".join(f"{k}={v}" for k, v in options.items())
    return get_engine(f"{name}[{text}]" if text else name)


def list_options(spec: str) -> str:
    """The options an engine declares, one per line (for ``--list-options``)."""
    from fieldlib.inference import engine_options, parse_engine_spec

    name, _ = parse_engine_spec(spec)
    lines = [f"options of engine {name!r} (set with -O KEY=VALUE or {name}[KEY=VALUE,...]):"]
    for o in engine_options(name):
        lines.append(f"  {o.name} ({o.kind}, default {o.default!r})")
        lines.append(f"      {o.help}")
    return "\n".join(lines) + "\n"


def _dense_limit(engine) -> int | None:
    """The most entries a table may have for ``engine``: engines that give log Z contract
    dense tables and refuse any above their ``max_dense`` (default
    DEFAULT_MAX_DENSE_ELEMENTS); others (mean-field) take any size."""
    from fieldlib.factors.base import DEFAULT_MAX_DENSE_ELEMENTS

    if "log_z" not in getattr(engine, "supports", ()):
        return None
    return getattr(engine, "max_dense", None) or DEFAULT_MAX_DENSE_ELEMENTS


class _RefuseOutOfMemory:
    """An engine whose failed tensor allocations become a TooLargeError (one clear line)."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name

    def __call__(self, *args, **kwargs):
        try:
            return self.engine(*args, **kwargs)
        except (MemoryError, RuntimeError) as exc:
            reason = allocation_failure(exc)
            if reason is None:
                raise
            raise TooLargeError(
                f"engine {self.name!r} ran out of memory ({reason}); the problem does not fit "
                f"this machine: lower --memory-budget so that it is refused up front, or use "
                f"a mean-field engine") from None


def _format(x: float) -> str:
    return f"{x:.10g}"


def solve(model_path, task: str, evid=None, engine=None, memory_budget=None) -> str:
    """The UAI competition result text for ``task`` on a model file (see module docstring).

    ``memory_budget``: bytes the model read from the file may occupy (default: half the
    memory available before reading; ``math.inf``: no limit). For an engine that builds
    dense tables (one giving log Z: exact, bruteforce) a table larger than it would accept
    is refused while reading, before it is allocated.

    Raises FieldlibError (FormatError, EvidenceError, TooLargeError, ...) on bad input or a
    refusal, TooLargeError too when the engine's tensor allocation fails.
    """
    from fieldlib.inference import get_engine
    from fieldlib.io import load_model

    engine = engine or get_engine("exact")
    model, graph, evidence = load_model(model_path, evid, memory_budget=memory_budget,
                                        max_table_elements=_dense_limit(engine))
    engine = _RefuseOutOfMemory(engine)
    names = model.names
    if task == "PR":
        result = _call(engine, graph, evidence, marginals=False)
        log_z = result.log_z
        if log_z is None and result.elbo is not None:
            print(f"fieldlib: note: engine {engine.name!r} gives a lower bound: PR is the "
                  f"ELBO in log10, not log10 Z", file=sys.stderr)
            log_z = result.elbo
        if log_z is None:
            raise UnsupportedQueryError(
                f"engine {engine.name!r} gives no log partition function; use --engine exact")
        return f"PR\n{_format(float(log_z) / math.log(10))}\n"
    if task == "MAR":
        result = _call(engine, graph, evidence, marginals=True)
        fields = [str(len(names))]
        for name, d in zip(names, model.cards):
            p = result.marginal(name).detach().double().cpu().tolist()
            fields.append(str(d))
            fields.extend(_format(x) for x in p)
        return "MAR\n" + " ".join(fields) + "\n"
    if task == "MAP":
        result = _call(engine, graph, evidence, marginals=False, map=True)
        states = [str(int(result.map[name])) for name in names]
        return "MAP\n" + " ".join([str(len(names)), *states]) + "\n"
    raise FieldlibError(f"unknown task {task!r}; choose PR, MAR or MAP")


def _call(engine, graph, evidence, **query):
    """Run ``engine``. A mean-field warning becomes one ``fieldlib: warning:`` line; a
    mean-field result with no configuration of positive probability (ELBO -inf) raises."""
    from fieldlib.inference.meanfield import InfeasibleWarning, MeanFieldWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MeanFieldWarning)
        result = engine(graph, evidence, **query)
    for w in caught:
        if not issubclass(w.category, MeanFieldWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif not issubclass(w.category, InfeasibleWarning):
            print(f"fieldlib: warning: {w.message}", file=sys.stderr)
    if result.info.get("feasible") is False:
        raise FieldlibError(
            f"engine {engine.name!r} found no configuration of positive probability (its "
            f"search for one ran out; the ELBO is -inf); the exact engine decides whether "
            f"one exists")
    return result


def run(args) -> int:
    if args.list_options:
        sys.stdout.write(list_options(args.engine))
        return 0
    if args.model is None or args.task is None:  # an argument error: answered before torch
        raise FieldlibError("infer needs a MODEL file and --task PR|MAR|MAP (see fieldlib "
                            "infer --help)")
    from fieldlib.io.budget import default_budget

    # measured before anything is read, so the model's own memory is not counted against it
    budget = args.memory_budget if args.memory_budget is not None else default_budget()
    text = solve(args.model, args.task, args.evid, _engine(args, budget), budget)
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            raise FieldlibError(f"cannot write {args.output}: {exc}") from None
    sys.stdout.write(text)
    return 0
