"""Benchmark: read and score full-size official Charades submissions.

Writes random classification (1,863 x 157) and localization (1,863 x 25 rows x 157) submissions
for the official test CSV, then times ``read_submission`` (strict, with id checks) and the
metric (``classify_map`` / ``localize_map``, the rules of Charades_v1_classify.m /
Charades_v1_localize.m). Prints a markdown table: task, rows, read time, score time, mAP.

    .venv/bin/python benchmarks/charades_eval.py [--gt ../shared/data/charades/Charades_v1_test.csv]

Times are the median of ``--repeat`` runs (wall clock, one process).
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
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


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
    gt, gt_s = _timed(lambda: read_annotations(args.gt), 1)
    n = len(gt)
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        cls_path, loc_path = Path(tmp) / "classify.txt", Path(tmp) / "localize.txt"
        write_classify_submission(cls_path, gt.ids, rng.random((n, 157)), digits=args.digits)
        write_localize_submission(loc_path, gt.ids, rng.random((n, 25, 157)),
                                  digits=args.digits)
        for task, path, score in (("classify", cls_path, classify_map),
                                  ("localize", loc_path, localize_map)):
            sub, read_s = _timed(lambda p=path, t=task: read_submission(
                p, t, known_ids=gt.index), args.repeat)
            res, score_s = _timed(lambda s=sub, f=score: f(gt, s), args.repeat)
            size_mb = path.stat().st_size / 1e6
            cases.append((task, len(sub), size_mb, read_s, score_s, res.map))
    print(f"ground truth: {args.gt.name} ({n} videos, read in {gt_s:.2f} s); random scores "
          f"written with %.{args.digits}g; median of {args.repeat} runs")
    print()
    print("| task | rows | file MB | read s | score s | read + score s | mAP |")
    print("|---|---|---|---|---|---|---|")
    for task, rows, mb, read_s, score_s, m in cases:
        print(f"| {task} | {rows} | {mb:.1f} | {read_s:.2f} | {score_s:.2f} | "
              f"{read_s + score_s:.2f} | {m:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
