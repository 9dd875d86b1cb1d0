"""The Charades demo (``make demo``, ``fieldlib charades demo``): the main job on its embedded
default, end to end.

Synthetic videos from real annotation rows (``../shared/data/charades`` when present, else the
excerpt bundled with the package), the small two-stream backbone (the RGB stream), training
in the ``async`` mode (the paper) and the ``none`` mode (no structure) with evaluation lines,
prediction on test videos at the official time points, the official metrics, the figures
(Fig. 4, 6, 7, 9, 11), and a final table: classification mAP, localization mAP and wall time
per mode, and the folder where everything was written.

The synthetic frames use ``snr = 4`` (the generator's default is 2): at snr 2, in the demo's
budget of steps, the no-structure baseline barely moves away from the training-frequency
prior (classification nan-mean mAP 0.166 against the prior's 0.147 on 60 test videos,
after 600 steps on 150 videos), and a demo should show learning. The same frames serve
every mode; docs/results.md reports what the modes reach.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fieldlib.errors import FieldlibError

from .config import TrainConfig

__all__ = ["DemoResult", "DEMO_DEFAULTS", "run_demo"]

#: The demo's training options beside the TrainConfig defaults.
DEMO_DEFAULTS = dict(videos=64, steps=600, synthetic_snr=4.0, eval_every=150, eval_videos=60,
                     num_threads=None)


@dataclass
class DemoResult:
    """``rows``: one dict a mode (mode, classify_map, classify_map_nanmean, localize_map,
    localize_map_nanmean, train_seconds, predict_seconds, frames); ``out``: the folder;
    ``figures``: the PNG files written."""

    rows: list
    out: Path
    figures: list = field(default_factory=list)

    def table(self) -> str:
        head = (f"{'mode':<6} {'cls mAP':>8} {'cls mAP*':>9} {'loc mAP':>8} {'loc mAP*':>9} "
                f"{'frames':>7} {'train s':>8} {'predict s':>10}")
        lines = [head, "-" * len(head)]

        def num(x):
            return "nan" if x is None else f"{x:.4f}"

        for r in self.rows:
            lines.append(f"{r['mode']:<6} {num(r['classify_map']):>8} "
                         f"{num(r['classify_map_nanmean']):>9} {num(r['localize_map']):>8} "
                         f"{num(r['localize_map_nanmean']):>9} {r['frames']:>7} "
                         f"{r['train_seconds']:>8.1f} {r['predict_seconds']:>10.1f}")
        lines.append("mAP: the official plain mean over the 157 classes (nan when a class has "
                     "no positive among the test videos);")
        lines.append("mAP*: the mean over the classes with positives (not an official figure).")
        return "\n".join(lines)


def run_demo(out, *, modes=("async", "none"), test_videos: int = 60, passes: int = 10,
             progress: bool = True, **options) -> DemoResult:
    """Train, predict, score and plot (module docstring) into ``out`` (a new folder, or one
    holding a finished demo: its runs are reused). ``options`` override
    :data:`DEMO_DEFAULTS` and any :class:`TrainConfig` field (e.g. ``steps=50``)."""
    from .plots import (
        plot_ap_difference,
        plot_intent_embedding,
        plot_message_passes,
        plot_training_curves,
        plot_video_timeline,
        read_metrics,
    )
    from .predict import evaluate, evaluation_json, predict_run, write_submissions
    from .train import Trainer

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FieldlibError(f"demo: --out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    settings = {**DEMO_DEFAULTS, "progress_bar": progress, **options}
    rows, results, preds_of, lines_of = [], {}, {}, {}
    data = None
    for mode in modes:
        run = out / mode
        config = TrainConfig(mode=mode, **settings)
        start = time.perf_counter()
        if not (run / "model.pt").is_file():
            resume = (run / "checkpoint.pt").is_file()
            Trainer(config, run, resume=resume).run(progress=progress)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        preds, gt, data = predict_run(run, split="test", videos=test_videos, passes=passes,
                                      pass_videos=1, progress=progress)
        res = evaluate(preds, gt)
        write_submissions(preds, run / "predict")
        preds.save(run / "predict" / "predictions.npz")
        (run / "predict" / "metrics.json").write_text(
            json.dumps(evaluation_json(res, data.labels.classes), indent=1) + "\n",
            encoding="utf-8")
        predict_s = time.perf_counter() - start
        lines_of[mode] = read_metrics(run / "metrics.jsonl")
        frames = max((x.get("frames", 0) for x in lines_of[mode]), default=0)
        rows.append({"mode": mode, "frames": frames, "train_seconds": train_s,
                     "predict_seconds": predict_s, **_scores(res)})
        results[mode], preds_of[mode] = res, (preds, gt)
    figures = []
    plots = out / "plots"
    first = modes[0]
    preds, gt = preds_of[first]
    video = preds.video_ids[0]
    figures.append(plot_message_passes(preds, video, data.labels, passes=range(4),
                                       path=plots / "fig4_message_passes.png"))
    figures.append(plot_video_timeline(preds, video, data.labels, gt,
                                       path=plots / f"fig9_timeline_{video}.png"))
    figures.append(plot_training_curves(lines_of, path=plots / "fig6_training_curves.png"))
    if preds.q_intent is not None:
        figures.append(plot_intent_embedding(preds, gt, data.labels,
                                             path=plots / "fig11_intent_embedding.png"))
    if "none" in results and first != "none":
        figures.append(plot_ap_difference(results[first]["classify"],
                                          results["none"]["classify"], data.labels,
                                          path=plots / "fig7_ap_difference.png"))
    result = DemoResult(rows, out, [Path(f) for f in figures])
    (out / "summary.json").write_text(json.dumps({"rows": rows, "figures": [
        str(f) for f in result.figures]}, indent=1) + "\n", encoding="utf-8")
    (out / "summary.txt").write_text(result.table() + "\n", encoding="utf-8")
    return result


def _scores(res: dict) -> dict:
    def official(x):
        return None if x != x else float(x)

    return {"classify_map": official(res["classify"].map),
            "classify_map_nanmean": float(res["classify"].map_nanmean),
            "localize_map": official(res["localize"].map),
            "localize_map_nanmean": float(res["localize"].map_nanmean)}
