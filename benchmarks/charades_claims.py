"""The paper's claims, measured on synthetic Charades videos (issue 12 §4; docs/results.md).

Runs, on synthetic frames from real annotation rows with the small backbone, 3 seeds each:
``none``, ``sync``, ``async``, and the Fig. 8 ablations of the asynchronous model (drop φXX,
drop φXI, drop both), every mode with the same budget of training frames; reports
classification and localization mAP (the official metrics on the first ``--test-videos``
test videos) as mean and spread per mode, and the frames each mode needed to first reach
the ``sync`` mode's final mAP (the Fig. 6 claim: asynchronous training gets there with
fewer frames); writes the tables and the Fig. 6 / Fig. 7 / Fig. 8 plots into
docs/results.md and docs/img/.

    .venv/bin/python benchmarks/charades_claims.py                 # ~15 min on 2 cores
    .venv/bin/python benchmarks/charades_claims.py --quick         # a smoke run, ~1 min

Each run is ``fieldlib charades train`` in its own process (``--jobs`` at a time, one torch
thread each); finished runs in ``--out`` are reused (an unfinished one starts again), so an
interrupted sweep continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: name -> (mode, drop)
MODES = {
    "none": ("none", ""),
    "sync": ("sync", ""),
    "async": ("async", ""),
    "async -phiXX": ("async", "temporal"),
    "async -phiXI": ("async", "intent"),
    "async -both": ("async", "temporal,intent"),
}


def _slug(name: str) -> str:
    return name.replace(" ", "").replace("-", "_minus_")


def run_one(name, seed, args, out: Path) -> Path:
    mode, drop = MODES[name]
    run = out / f"{_slug(name)}-seed{seed}"
    if (run / "model.pt").is_file():
        return run
    frames_per_step = args.batch * 1 if mode != "sync" else 3 * 25
    steps = max(1, args.frames // frames_per_step)
    eval_every = max(1, steps // args.evals)
    cmd = [sys.executable, "-m", "fieldlib.models.charades.train", "--run-dir", str(run),
           "--mode", mode, "--seed", str(seed), "--steps", str(steps),
           "--videos", str(args.videos), "--synthetic-snr", str(args.snr),
           "--batch-size", str(args.batch), "--eval-every", str(eval_every),
           "--eval-videos", str(args.test_videos), "--num-threads", "1",
           "--log-every", str(max(1, steps // 50))]
    if drop:
        cmd += ["--drop", drop]
    if run.exists():  # an unfinished run: start it again
        shutil.rmtree(run)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-2000:]}")
    return run


def _evals(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["eval"] for x in lines if "eval" in x]


def _metric(e: dict, task: str) -> float:
    return e[f"{task}_map"] if e[f"{task}_map"] is not None else e[f"{task}_map_nanmean"]


def summarise(runs: dict, task: str) -> dict:
    """name -> {"mean", "std", "values"} of the final mAP."""
    out = {}
    for name, paths in runs.items():
        vals = np.array([_metric(_evals(p)[-1], task) for p in paths])
        out[name] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1))
                     if len(vals) > 1 else 0.0, "values": vals.tolist()}
    return out


def frames_to_reach(paths, target: float, task: str = "classify"):
    """Per seed: the frames at the first evaluation reaching ``target`` (None: never)."""
    out = []
    for p in paths:
        hit = [e["frames"] for e in _evals(p) if _metric(e, task) >= target]
        out.append(hit[0] if hit else None)
    return out


def figures(runs: dict, cls: dict, out_dir: Path, args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fieldlib.models.charades.plots import (
        plot_ap_difference,
        plot_training_curves,
        read_metrics,
    )
    from fieldlib.models.charades.predict import evaluate, predict_run

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    curves = {name: read_metrics(runs[name][0] / "metrics.jsonl")
              for name in ("async", "sync", "none")}
    paths["fig6"] = plot_training_curves(curves, path=out_dir / "results_fig6_curves.png")
    scored = {}
    for name in ("async", "none"):
        preds, gt, data = predict_run(runs[name][0], split="test", videos=args.test_videos,
                                      progress=False)
        scored[name] = evaluate(preds, gt)["classify"]
    paths["fig7"] = plot_ap_difference(scored["async"], scored["none"], data.labels,
                                       path=out_dir / "results_fig7_ap_difference.png")
    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    names = list(cls)
    means = [cls[n]["mean"] for n in names]
    stds = [cls[n]["std"] for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4a78b5")
    for i, n in enumerate(names):
        ax.scatter([i] * len(cls[n]["values"]), cls[n]["values"], color="k", s=10, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("classification mAP (nan-mean)")
    ax.set_title("Fig. 8: ablations, mean and spread over seeds (dots: seeds)")
    fig.savefig(out_dir / "results_fig8_ablations.png", dpi=120)
    plt.close(fig)
    paths["fig8"] = out_dir / "results_fig8_ablations.png"
    return paths


def write_results(path: Path, args, runs, cls, loc, reach, figs, seconds) -> None:
    def row(name):
        c, lo = cls[name], loc[name]
        r = reach.get(name)
        got = "-" if r is None else ", ".join("never" if x is None else f"{x:,}" for x in r)
        return (f"| {name} | {c['mean']:.4f} ± {c['std']:.4f} | {lo['mean']:.4f} ± "
                f"{lo['std']:.4f} | {got} |")

    target = cls["sync"]["mean"]
    rel = {k: Path(v).relative_to(path.parent) for k, v in figs.items()}
    text = f"""# The paper's claims, measured on synthetic Charades videos

Command: `{' '.join(['.venv/bin/python', 'benchmarks/charades_claims.py'] + args.argv)}`
({seconds / 60:.0f} min on this machine, {args.jobs} runs at a time, one torch thread each).

Set-up: synthetic frames (snr {args.snr:g}, models/charades/synthetic.py) for the first
{args.videos} training videos with actions of the real annotations; the small backbone
(RGB stream); {args.frames:,} training frames a run whatever the mode (async and none:
batches of {args.batch} frames; sync: batches of 3 videos x 25 frames); seeds
{', '.join(map(str, range(args.seeds)))}; evaluation every {args.frames // args.evals:,}
frames or so on the first {args.test_videos} test videos with the official metrics
(models/charades/metrics.py), 10 synchronous mean-field passes. With {args.test_videos}
test videos some of the 157 classes have no positive, so the official mAP (a plain mean)
is NaN: the figures below are the mean over the classes with positives (the official
script's number once every class has a positive), labelled nan-mean.

## Final mAP per mode (mean ± standard deviation over {args.seeds} seeds)

""" + HEADER.format(target=target) + "\n".join(row(n) for n in MODES) + f"""

(The frames column is read off the evaluations: the first evaluation at or above the
target; "never" when none reached it within the budget.)

![Fig. 6]({rel['fig6']})

![Fig. 8]({rel['fig8']})

![Fig. 7]({rel['fig7']})

## What came out

{_verdict(cls, loc, reach)}

The paper's own figures (22.4 mAP two-stream, 18.3 RGB; localization 9.69 / 12.8) come from
VGG-16 streams trained for GPU weeks on the real frames; these synthetic runs say nothing
about those numbers, only about how the modes compare on a problem with the model's
structure. docs/charades.md walks from the real frame folders to a submission.
"""
    path.write_text(text, encoding="utf-8")


HEADER = ("| mode | classification mAP (nan-mean) | localization mAP (nan-mean) | frames to "
          "reach sync's final classification mAP ({target:.4f}), per seed |\n"
          "|---|---|---|---|\n")


def _verdict(cls, loc, reach) -> str:
    a, s, n = (cls[k]["mean"] for k in ("async", "sync", "none"))
    sd = {k: cls[k]["std"] for k in ("async", "sync", "none")}
    lines = []
    lines.append(f"- Structure vs none: async {a:.4f} ± {sd['async']:.4f}, sync {s:.4f} ± "
                 f"{sd['sync']:.4f}, none {n:.4f} ± {sd['none']:.4f} (classification). "
                 + ("The structured modes beat the baseline."
                    if min(a, s) > n + max(sd.values()) else
                    "The structured modes do NOT clearly beat the no-structure baseline here "
                    "(the gaps are within the seeds' spread or reversed)."))
    r = reach.get("async") or []
    got = [x for x in r if x is not None]
    rs = reach.get("sync") or []
    lines.append(f"- Fig. 6 claim (async reaches sync's final mAP with fewer frames): async "
                 f"reached it in {len(got)} of {len(r)} seeds"
                 + (f" (after {', '.join(f'{x:,}' for x in got)} frames; sync itself needed "
                    f"{', '.join('never' if x is None else f'{x:,}' for x in rs)})"
                    if got else "") + ".")
    abl = {k: cls[k]["mean"] for k in ("async -phiXX", "async -phiXI", "async -both")}
    lines.append("- Fig. 8 ablations (full async " f"{a:.4f}): " + ", ".join(
        f"{k} {v:.4f}" for k, v in abl.items()) + ". " +
        ("Dropping parts lowers the score, as the paper reports."
         if all(v < a for v in abl.values()) else
         "Dropping parts does not uniformly lower the score here."))
    lines.append("- What we believe is the reason where a claim does not hold: the runs are "
                 "short (tens of thousands of frames against the paper's millions), the "
                 "backbone is tiny and far from converged, µ and φXI start at zero and "
                 "learn slowly (µ at a hundredth of the learning rate), and in async mode a "
                 "frame's messages come from other frames' older marginals (d = 0.9 over up "
                 "to 50 stored messages), which early in training are those of a poorer "
                 "network; the intent's messages sum φXI over every stored frame (h = the "
                 "number of frames), so an early, noisy φXI makes Q_I confident and wrong.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "out" / "claims"), help="runs folder")
    p.add_argument("--results", default=str(ROOT / "docs" / "results.md"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--test-videos", type=int, default=60)
    p.add_argument("--frames", type=int, default=19200, help="training frames a run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--evals", type=int, default=6, help="evaluations a run")
    p.add_argument("--snr", type=float, default=4.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="2 seeds, 640 frames, 10 videos")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.quick:
        args.seeds, args.frames, args.test_videos, args.evals = 2, 640, 10, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = [(name, seed) for seed in range(args.seeds) for name in MODES]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda job: run_one(*job, args, out), jobs))
    runs = {name: [] for name in MODES}
    for (name, _), path in zip(jobs, done):
        runs[name].append(path)
    cls, loc = summarise(runs, "classify"), summarise(runs, "localize")
    target = cls["sync"]["mean"]
    reach = {name: frames_to_reach(runs[name], target) for name in MODES}
    figs = figures(runs, cls, Path(args.results).parent / "img", args)
    seconds = time.perf_counter() - start
    write_results(Path(args.results), args, runs, cls, loc, reach, figs, seconds)
    print(f"{'mode':<14} {'cls mAP*':>18} {'loc mAP*':>18}  frames to sync's final mAP")
    for name in MODES:
        print(f"{name:<14} {cls[name]['mean']:.4f} ± {cls[name]['std']:.4f}   "
              f"{loc[name]['mean']:.4f} ± {loc[name]['std']:.4f}  {reach[name]}")
    print(f"wrote {args.results} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
