"""Benchmark: read and score full-size official Charades submissions.

Writes random submissions for the official test CSV: classification (1,863 x 157),
localization (1,863 x 25 rows x 157) and a tie-heavy localization one (scores rounded to 2
digits). Times ``read_submission`` (strict, with id checks) and the metric (``classify_map``
/ ``localize_map``, the rules of Charades_v1_classify.m / Charades_v1_localize.m). Prints a
markdown table: task, rows, file size, read time, score time, mAP.

    .venv/bin/python benchmarks/charades_eval.py [--gt ../shared/data/charades/Charades_v1_test.csv]

Times are medians of ``--repeat`` runs, wall clock and this process's CPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fieldlib.models.charades import (
    classify_map,
    localize_map,
    read_annotations,
    read_submission,
    write_classify_submission,
    write_localize_submission,
)

DEFAULT_GT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "charades" / \
    "Charades_v1_test.csv"


def _timed(fn, repeat: int):
    """Run ``fn`` ``repeat`` times: (last result, median wall seconds, median CPU seconds).
    CPU time is what this process used: on a shared machine it does not count the time other
    processes held the cores."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
    return out, statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gt", type=Path, default=DEFAULT_GT)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--digits", type=int, default=6, help="score digits written (%%.Ng)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.gt.is_file():
        print(f"ground truth {args.gt} not found", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    gt, gt_s, _ = _timed(lambda: read_annotations(args.gt), 1)
    n = len(gt)
    cases = []
    specs = [("classify", "classify", (n, 157), args.digits),
             ("localize", "localize", (n, 25, 157), args.digits),
             ("localize, tie-heavy (2 digits)", "localize", (n, 25, 157), 2)]
    with tempfile.TemporaryDirectory() as tmp:
        for k, (label, task, shape, digits) in enumerate(specs):
            path = Path(tmp) / f"sub{k}.txt"
            writer = write_classify_submission if task == "classify" else \
                write_localize_submission
            writer(path, gt.ids, rng.random(shape), digits=digits)
            score = classify_map if task == "classify" else localize_map
            sub, read_s, read_c = _timed(lambda p=path, t=task: read_submission(
                p, t, known_ids=gt.index), args.repeat)
            res, score_s, score_c = _timed(lambda s=sub, f=score: f(gt, s), args.repeat)
            size_mb = path.stat().st_size / 1e6
            cases.append((label, len(sub), size_mb, read_s, read_c, score_s, score_c, res.map))
            del sub, res
    print(f"ground truth: {args.gt.name} ({n} videos, read in {gt_s:.2f} s); random scores "
          f"written with %.{args.digits}g; median of {args.repeat} runs")
    print()
    print("| task | rows | file MB | read s (wall / cpu) | score s (wall / cpu) | "
          "read + score s (wall) | mAP |")
    print("|---|---|---|---|---|---|---|")
    for task, rows, mb, read_s, read_c, score_s, score_c, m in cases:
        print(f"| {task} | {rows} | {mb:.1f} | {read_s:.2f} / {read_c:.2f} | {score_s:.2f} / "
              f"{score_c:.2f} | {read_s + score_s:.2f} | {m:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
