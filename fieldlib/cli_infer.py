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
from pathlib import Path

from fieldlib.cli import allocation_failure
from fieldlib.errors import FieldlibError, TooLargeError, UnsupportedQueryError

TASKS = ("PR", "MAR", "MAP")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from fieldlib.inference import engine_names

    names = engine_names()
    p = subparsers.add_parser(
        "infer",
        help="run inference on a UAI or libDAI .fg model (UAI competition output)",
        description="Read a model (UAI .uai, MARKOV or BAYES, or libDAI .fg; chosen by the "
        "extension) and optional UAI evidence, run an inference engine, and print the UAI "
        "competition result: PR = log10 of the partition function (of the evidence), MAR = "
        "every variable's marginal, MAP = the most probable assignment. Exit code 2 with "
        "one line on stderr on bad input or when the engine refuses the problem.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="model file: NAME.uai (UAI format) or NAME.fg (libDAI format)")
    p.add_argument("--evid", metavar="FILE.evid", default=None,
                   help="UAI evidence file 'n v1 x1 .. vn xn' (variable indices are the "
                   "model's: UAI positions, .fg labels); default: no evidence")
    p.add_argument("--task", required=True, choices=TASKS, type=str.upper,
                   help="required. PR: log10 partition function; MAR: marginals; MAP: most "
                   "probable assignment")
    p.add_argument("--engine", default="exact", metavar="NAME",
                   help=f"inference engine, one of: {', '.join(names)} (exact = variable "
                   f"elimination, bruteforce = enumeration of all joint states); default: "
                   f"exact")
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
    p.add_argument("--search-effort", metavar="X", type=_effort, default=None,
                   help="exact engine: elimination-order search effort, a multiple of the "
                   "default budget of randomised restarts (0: the two deterministic greedy "
                   "runs only). Counted in search work, not seconds: the same file gets the "
                   "same order on a busy machine as on a quiet one; default: 1")
    p.add_argument("--search-time", metavar="S", type=float, default=None,
                   help="deprecated, use --search-effort: exact engine, order search work "
                   "equal to S seconds on the reference machine (no longer timed); default: "
                   "not used")
    p.add_argument("--schedule", choices=("sequential", "synchronous"), default=None,
                   help="meanfield engine: update one variable at a time (sequential: the "
                   "ELBO never decreases) or all frames from the previous iterate "
                   "(synchronous: the paper's test-time schedule); default: the engine's "
                   "(sequential)")
    p.add_argument("--damping", type=float, default=None, metavar="X",
                   help="meanfield engine: fraction of the previous iterate kept, in [0, 1); "
                   "default: the engine's (0, no damping)")
    p.add_argument("--max-iter", type=int, default=None, metavar="K",
                   help="meanfield engine: at most K sweeps; default: the engine's (100)")
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


def _effort(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(
            f"expected a finite number >= 0 (1: the default search), got {text!r}")
    return value


def _engine(args, budget=None):
    """The engine the options ask for; ``budget`` (bytes, measured before reading) goes to
    an engine that takes a memory budget when ``--memory-budget`` was not given."""
    import inspect
    import warnings

    from fieldlib.inference import get_engine

    options = {}
    if args.memory_budget is not None:
        options["memory_budget"] = args.memory_budget
    if args.search_effort is not None:
        options["search_effort"] = args.search_effort
    if args.search_time is not None:
        print("fieldlib: note: --search-time is deprecated; the order search is budgeted in "
              "work (use --search-effort)", file=sys.stderr)
        options["search_time"] = args.search_time
    if args.schedule is not None:
        options["schedule"] = args.schedule
    if args.damping is not None:
        options["damping"] = args.damping
    if args.max_iter is not None:
        options["max_iter"] = args.max_iter
    with warnings.catch_warnings():  # --search-time's deprecation is said above, once
        warnings.simplefilter("ignore", DeprecationWarning)
        engine = get_engine(args.engine, **options)
        takes_budget = "memory_budget" in inspect.signature(type(engine)).parameters
        if budget is not None and "memory_budget" not in options and takes_budget:
            engine = get_engine(args.engine, memory_budget=budget, **options)
    return engine


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
        result = engine(graph, evidence, marginals=False)
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
        result = engine(graph, evidence, marginals=True)
        fields = [str(len(names))]
        for name, d in zip(names, model.cards):
            p = result.marginal(name).detach().double().cpu().tolist()
            fields.append(str(d))
            fields.extend(_format(x) for x in p)
        return "MAR\n" + " ".join(fields) + "\n"
    if task == "MAP":
        result = engine(graph, evidence, marginals=False, map=True)
        states = [str(int(result.map[name])) for name in names]
        return "MAP\n" + " ".join([str(len(names)), *states]) + "\n"
    raise FieldlibError(f"unknown task {task!r}; choose PR, MAR or MAP")


def run(args) -> int:
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
