"""Loopy BP beside mean-field and exact inference on the seven UAI 2014 problems: one table.

    .venv/bin/python benchmarks/bp_uai.py [--threads N] [--problems A B ...] [--engines SPEC ...]

For each problem (``../shared/data/uai/NAME.uai`` with its ``.evid``) and each engine spec,
in one process and in sequence (float64): one call for log Z (or the Bethe estimate, or the
ELBO) and every marginal, through ``get_engine(spec)(graph, evidence)`` as a user calls it.
Errors are against the stated answers: per unobserved variable the max absolute marginal
error against ``.MAR`` (the table gives its max and mean over the variables), and
``log10 Z (engine) - .PR`` (signed: the ELBO is below, Bethe either side). "seconds" is the
wall time of the call; "converged" the engine's ``info["converged"]`` (``-`` for exact).
The machine's load average is printed before and after (shared machines: compare timings
only beside their load).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exact_uai import PROBLEMS, UAI, answers  # noqa: E402  (.PR / .MAR readers)

ENGINES = ["bp", "bp[schedule=sequential]", "bp[damping=0.5]", "bp[damping=0.8,max_iter=1000]",
           "meanfield", "exact"]




def run_one(name: str, spec: str) -> dict:
    import torch

    from fieldlib.inference import get_engine
    from fieldlib.io import load_model

    model, graph, evidence = load_model(UAI / f"{name}.uai", UAI / f"{name}.uai.evid")
    engine = get_engine(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converging is a column of the table
        t0 = time.perf_counter()
        result = engine(graph, evidence)
        seconds = time.perf_counter() - t0
    pr, mar = answers(name)
    observed = {v.name for v in graph.evidence(evidence)}
    errors = [float((result.marginal(v) - torch.tensor(p, dtype=torch.float64)).abs().max())
              for v, p in zip(model.names, mar) if v not in observed]
    estimate = result.log_z if result.log_z is not None else result.elbo
    converged = result.info.get("converged")
    return {"seconds": seconds, "max_err": max(errors), "mean_err": sum(errors) / len(errors),
            "dlog10": float(estimate) / math.log(10) - pr,
            "iterations": result.info.get("iterations"),
            "converged": "-" if converged is None else ("yes" if converged else "no")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", nargs="*", default=PROBLEMS)
    ap.add_argument("--engines", nargs="*", default=ENGINES)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, one per core)")
    args = ap.parse_args(argv)
    if not UAI.is_dir():
        print(f"no UAI problems at {UAI}", file=sys.stderr)
        return 1

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    run_one("Grids_12", "bp[max_iter=2]")  # warm-up: first-call costs out of the table
    rows = [(name, spec, run_one(name, spec)) for name in args.problems for spec in args.engines]
    load_after = os.getloadavg()
    print(f"torch {torch.__version__}, float64, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load average before {', '.join(f'{x:.2f}' for x in load_before)}"
          f", after {', '.join(f'{x:.2f}' for x in load_after)}")
    print()
    head = ("| problem | engine | max err marginal | mean err marginal | log10 Z - PR | "
            "seconds | iterations | converged |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, spec, r in rows:
        its = "-" if r["iterations"] is None else str(r["iterations"])
        print(f"| {name} | {spec} | {r['max_err']:.2e} | {r['mean_err']:.2e} | "
              f"{r['dlog10']:+.4f} | {r['seconds']:.3f} | {its} | {r['converged']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
