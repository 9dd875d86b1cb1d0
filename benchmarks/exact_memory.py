"""Memory estimate against measured peak on square grids (the shape of UAI 2014's Grids_15).

    .venv/bin/python benchmarks/exact_memory.py [--sizes 12 16 18 20]

For each n, a binary n x n grid (random unary and pairwise log-potentials, seed 0) is solved
by the exact engine (log Z and every marginal, float64) in a fresh subprocess, under the
default memory budget (half the available memory). Printed: the engine's estimate, the
measured peak RSS growth (VmHWM, reset before the call), their ratio, the time, and whether
the default budget admitted it. Target: the ratio within 1.5x either way, and a 20 x 20 grid
(about 3.3 GB) solved, not refused, on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def grid(n: int):
    import torch

    from fieldlib import FactorGraph, Table

    gen = torch.Generator().manual_seed(0)
    g = FactorGraph()
    v = [[g.variable(f"x{i}_{j}", 2) for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(n):
            g.add(Table(v[i][j], torch.randn(2, generator=gen, dtype=torch.float64)))
            for di, dj in ((1, 0), (0, 1)):
                if i + di < n and j + dj < n:
                    g.add(Table([v[i][j], v[i + di][j + dj]],
                                torch.randn(2, 2, generator=gen, dtype=torch.float64) * 2))
    return g


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(n: int) -> dict:
    from fieldlib.errors import TooLargeError
    from fieldlib.inference import get_engine

    g = grid(n)
    Path("/proc/self/clear_refs").write_text("5")
    base = _kib("VmRSS")
    t0 = time.perf_counter()
    try:
        r = get_engine("exact")(g)
    except TooLargeError as exc:
        return {"n": n, "refused": str(exc)}
    return {"n": n, "seconds": time.perf_counter() - t0, "log_z": float(r.log_z),
            "estimate": r.info["estimated_bytes"], "budget": r.info["budget_bytes"],
            "peak": (_kib("VmHWM") - base) * 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12, 16, 18, 20])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child)))
        return 0
    print("| grid | log Z | seconds | estimate MiB | peak RSS MiB | estimate / peak | "
          "default budget MiB |")
    print("|---|---|---|---|---|---|---|")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        if "refused" in r:
            print(f"| {n}x{n} | refused: {r['refused'][:60]} | | | | | |")
            continue
        print(f"| {n}x{n} | {r['log_z']:.6f} | {r['seconds']:.2f} | {r['estimate'] / 2**20:.0f} "
              f"| {r['peak'] / 2**20:.0f} | {r['estimate'] / r['peak']:.2f} | "
              f"{r['budget'] / 2**20:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
