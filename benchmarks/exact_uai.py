"""Exact inference on the seven UAI 2014 problems of ../shared/data/uai: one table.

    .venv/bin/python benchmarks/exact_uai.py [--pgmpy-timeout 60] [--problems A B ...]

For each problem, in ONE process and in sequence (float64, order search included): time to
read the file, to search the elimination order, to contract (log Z and every marginal, one
call); the error of log10 Z (relative) and of the marginals (max absolute) against the
stated answers; the largest intermediate and the engine's memory estimate. Then, each in a
fresh subprocess: the problem's peak resident memory (ru_maxrss minus the RSS after
importing and reading), and pgmpy's VariableElimination computing every marginal of the
same model (built from fieldlib's parser, since pgmpy's UAI reader fails on most of these
files), killed after ``--pgmpy-timeout`` seconds ("timeout").
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UAI = ROOT.parent / "shared" / "data" / "uai"
THREADS = None
PROBLEMS = ["ObjectDetection_11", "CSP_12", "Promedus_15", "Grids_12", "Segmentation_11",
            "DBN_11", "Pedigree_12"]


def answers(name):
    pr = float((UAI / f"{name}.uai.PR").read_text().split()[1])
    mar = (UAI / f"{name}.uai.MAR").read_text().split()
    n, pos, out = int(mar[1]), 2, []
    for _ in range(n):
        d = int(mar[pos])
        out.append([float(x) for x in mar[pos + 1: pos + 1 + d]])
        pos += 1 + d
    return pr, out


def run_fieldlib(name: str) -> dict:
    """Read, order, contract one problem; timings, errors and sizes."""
    import torch

    from fieldlib.inference import get_engine
    from fieldlib.io import load_model

    t0 = time.perf_counter()
    model, graph, evidence = load_model(UAI / f"{name}.uai", UAI / f"{name}.uai.evid")
    t1 = time.perf_counter()
    result = get_engine("exact")(graph, evidence)
    t2 = time.perf_counter()
    info = result.info
    pr, mar = answers(name)
    log10_z = float(result.log_z) / math.log(10)
    err_m = max(float((result.marginal(v) - torch.tensor(p, dtype=torch.float64)).abs().max())
                for v, p in zip(model.names, mar))
    return {
        "read": t1 - t0, "order": info["order_seconds"],
        "contract": (t2 - t1) - info["order_seconds"], "total": t2 - t0,
        "log10_z": log10_z, "err_z": abs(log10_z - pr) / abs(pr), "err_m": err_m,
        "largest": info["largest_intermediate"], "estimate": info["estimated_bytes"],
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_memory(name: str) -> dict:
    """In a fresh process: peak RSS growth while ordering and contracting (the kernel's
    high-water mark VmHWM, reset just before the run via /proc/self/clear_refs)."""
    from fieldlib.inference import get_engine
    from fieldlib.io import load_model

    model, graph, evidence = load_model(UAI / f"{name}.uai", UAI / f"{name}.uai.evid")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS")
        get_engine("exact")(graph, evidence)
        peak = _status_kib("VmHWM")
    except OSError:  # no /proc: fall back to ru_maxrss (a lower bound on the growth)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        get_engine("exact")(graph, evidence)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": max(peak - base, 0) * 1024}


def child_pgmpy(name: str) -> dict:
    """In a fresh process: pgmpy's VariableElimination, every marginal of the model."""
    import warnings

    warnings.simplefilter("ignore")
    from pgmpy.factors.discrete import DiscreteFactor
    from pgmpy.inference import VariableElimination

    try:
        from pgmpy.models import DiscreteMarkovNetwork as MarkovNetwork
    except ImportError:  # pragma: no cover
        from pgmpy.models import MarkovNetwork

    from fieldlib.io import read_evidence, read_uai

    model = read_uai(UAI / f"{name}.uai")
    observed = read_evidence(UAI / f"{name}.uai.evid", model)
    t0 = time.perf_counter()
    net = MarkovNetwork()
    net.add_nodes_from(model.names)
    factors = []
    for scope, table in zip(model.scopes, model.tables):
        names = [model.names[v] for v in scope]
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                net.add_edge(names[a], names[b])
        factors.append(DiscreteFactor(names, [model.cards[v] for v in scope], table.ravel()))
    net.add_factors(*factors)
    evidence = {model.names[v]: x for v, x in observed.items()}
    ve = VariableElimination(net)
    for v in model.names:
        if v not in evidence:
            ve.query([v], evidence=evidence or None, show_progress=False)
    return {"pgmpy_seconds": time.perf_counter() - t0}


def in_child(mode: str, name: str, timeout: float | None) -> dict | None:
    cmd = [sys.executable, __file__, f"--child-{mode}", name]
    if THREADS:
        cmd += ["--threads", str(THREADS)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", nargs="*", default=PROBLEMS)
    ap.add_argument("--pgmpy-timeout", type=float, default=60.0,
                    help="seconds before pgmpy's run on one problem is killed")
    ap.add_argument("--no-pgmpy", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's, one per core)")
    ap.add_argument("--child-memory", metavar="NAME")
    ap.add_argument("--child-pgmpy", metavar="NAME")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads
    if args.child_memory:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(child_memory(args.child_memory)))
        return 0
    if args.child_pgmpy:
        print(json.dumps(child_pgmpy(args.child_pgmpy)))
        return 0
    if not UAI.is_dir():
        print(f"no UAI problems at {UAI}", file=sys.stderr)
        return 1

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {}
    start = time.perf_counter()
    for name in args.problems:
        rows[name] = run_fieldlib(name)
    together = time.perf_counter() - start
    for name in args.problems:
        rows[name].update(in_child("memory", name, None) or {})
        if not args.no_pgmpy:
            rows[name]["pgmpy"] = in_child("pgmpy", name, args.pgmpy_timeout)

    print(f"fieldlib exact engine (VariableElimination), float64, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; pgmpy limit {args.pgmpy_timeout:g} s")
    print()
    head = ("| problem | read s | order s | log Z + marginals s | total s | log10 Z | "
            "rel. err log10 Z | max err marginal | largest interm. (MiB) | estimate MiB | "
            "peak RSS MiB | estimate / peak | pgmpy VE s | speed-up |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in args.problems:
        r = rows[name]
        pg = r.get("pgmpy")
        if args.no_pgmpy:
            pg_s, speed = "-", "-"
        elif pg is None:
            pg_s, speed = "timeout", f"> {args.pgmpy_timeout / r['total']:.0f}x"
        elif "error" in pg:
            pg_s, speed = f"failed: {pg['error'][:40]}", "-"
        else:
            pg_s, speed = f"{pg['pgmpy_seconds']:.2f}", f"{pg['pgmpy_seconds'] / r['total']:.0f}x"
        peak = r.get("peak_bytes")
        ratio = f"{r['estimate'] / peak:.2f}" if peak else "-"
        print(f"| {name} | {r['read']:.3f} | {r['order']:.3f} | {r['contract']:.3f} | "
              f"{r['total']:.3f} | {r['log10_z']:.6f} | {r['err_z']:.1e} | {r['err_m']:.1e} | "
              f"{mib(r['largest'] * 8)} | {mib(r['estimate'])} | "
              f"{mib(r.get('peak_bytes', float('nan')))} | {ratio} | {pg_s} | {speed} |")
    print()
    print(f"all {len(args.problems)} together (read + order + log Z + every marginal, one "
          f"process): {together:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
