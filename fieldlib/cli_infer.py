"""``fieldlib infer``: run an engine on a UAI or libDAI .fg model, print UAI competition output.

    fieldlib infer MODEL.uai|MODEL.fg [--evid FILE.evid] --task PR|MAR|MAP
                   [--engine NAME] [-o OUT] [--memory-budget BYTES] [--search-time S]

Output (the UAI 2014 competition's result format; docs/formats.md):

* ``PR``: a line ``PR`` then log10 Z (with evidence: log10 of the sum over the free
  variables);
* ``MAR``: a line ``MAR`` then one line ``n d1 p1.. d2 p1.. ...``, each variable's domain
  size and its marginal P(x | e) (evidence variables show a delta);
* ``MAP``: a line ``MAP`` then ``n x1 .. xn``, the most probable joint state.

Bad input (a malformed file, evidence out of range, an unknown engine) and refusals (a
problem too large for the engine's memory budget, evidence of probability zero) exit with
code 2 and one line on stderr, via fieldlib.cli.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fieldlib.errors import FieldlibError, UnsupportedQueryError

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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL",
                   help="model file: NAME.uai (UAI format) or NAME.fg (libDAI format)")
    p.add_argument("--evid", metavar="FILE.evid", default=None,
                   help="UAI evidence file 'n v1 x1 .. vn xn' (variable indices are the "
                   "model's: UAI positions, .fg labels); default: no evidence")
    p.add_argument("--task", required=True, choices=TASKS, type=str.upper,
                   help="PR: log10 partition function; MAR: marginals; MAP: most probable "
                   "assignment")
    p.add_argument("--engine", default="exact", metavar="NAME",
                   help=f"inference engine, one of: {', '.join(names)} (exact = variable "
                   f"elimination, bruteforce = enumeration of all joint states)")
    p.add_argument("-o", "--output", metavar="OUT", default=None,
                   help="also write the result to this file (it is always printed)")
    p.add_argument("--memory-budget", metavar="BYTES", type=_size, default=None,
                   help="exact engine: refuse problems needing more memory than this "
                   "(accepts suffixes K, M, G); default: half the available memory")
    p.add_argument("--search-time", metavar="S", type=float, default=None,
                   help="exact engine: at most this many seconds of elimination-order "
                   "search (default: the engine's)")
    p.add_argument("--schedule", choices=("sequential", "synchronous"), default=None,
                   help="meanfield engine: update one variable at a time (sequential: the "
                   "ELBO never decreases) or all frames from the previous iterate "
                   "(synchronous: the paper's test-time schedule); default: the engine's")
    p.add_argument("--damping", type=float, default=None, metavar="X",
                   help="meanfield engine: fraction of the previous iterate kept, in [0, 1)")
    p.add_argument("--max-iter", type=int, default=None, metavar="K",
                   help="meanfield engine: at most K sweeps (default: the engine's)")
    p.set_defaults(func=run)
    return p


def _size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t and t[-1] in units:
        scale, t = units[t[-1]], t[:-1]
    try:
        value = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a size in bytes like 512M, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the memory budget must be positive, got {text!r}")
    return int(value)


def _engine(args):
    from fieldlib.inference import get_engine

    options = {}
    if args.memory_budget is not None:
        options["memory_budget"] = args.memory_budget
    if args.search_time is not None:
        options["search_time"] = args.search_time
    if args.schedule is not None:
        options["schedule"] = args.schedule
    if args.damping is not None:
        options["damping"] = args.damping
    if args.max_iter is not None:
        options["max_iter"] = args.max_iter
    return get_engine(args.engine, **options)


def _format(x: float) -> str:
    return f"{x:.10g}"


def solve(model_path, task: str, evid=None, engine=None) -> str:
    """The UAI competition result text for ``task`` on a model file (see module docstring).

    Raises FieldlibError (FormatError, EvidenceError, TooLargeError, ...) on bad input or a
    refusal.
    """
    from fieldlib.inference import get_engine
    from fieldlib.io import load_model

    model, graph, evidence = load_model(model_path, evid)
    engine = engine or get_engine("exact")
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
    text = solve(args.model, args.task, args.evid, _engine(args))
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            raise FieldlibError(f"cannot write {args.output}: {exc}") from None
    sys.stdout.write(text)
    return 0
