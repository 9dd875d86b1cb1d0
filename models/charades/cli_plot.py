"""``fieldlib charades plot``: the paper's figures of trained runs (docs/charades.md, "Plots").

    fieldlib charades plot --run-dir DIR [--compare-run-dir DIR ...] [--none-run-dir DIR]
                           [--out DIR] [--video ID] [--task classify|localize] [--top N]
                           [--top-categories N] [--embedding pca|tsne]

Writes into ``--out`` (default ``RUN_DIR/plots``) every figure it has data for, and lists
what it wrote and what it skipped and why:

- ``fig4_message_passes.png``: from ``DIR/predict/predictions.npz`` with pass scores
  (``fieldlib charades predict --pass-videos 1``);
- ``fig9_timeline_<video>.png``: the predictions and the run's test annotations;
- ``fig11_intent_embedding.png``: the predictions' intent distributions (not mode none;
  PCA, or t-SNE with ``--embedding tsne``);
- ``fig7_ap_difference.png``: also ``--none-run-dir``'s predictions (a mode ``none`` run);
- ``fig6_training_curves.png``: the ``metrics.jsonl`` of ``--run-dir``, each
  ``--compare-run-dir`` and ``--none-run-dir`` (labelled by their modes), when they hold
  evaluation lines (``train --eval-every N``); without any, the NLL panel alone as
  ``fig6_training_loss.png``, and the mAP panel is listed as skipped.

Errors are FieldlibErrors (one line on stderr, exit code 2): a missing run folder, missing
predictions, a ``--video`` not among the predictions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fieldlib.errors import FieldlibError

from .annotations import Annotations
from .config import TrainConfig
from .plots import (
    EMBEDDINGS,
    plot_ap_difference,
    plot_intent_embedding,
    plot_message_passes,
    plot_training_curves,
    plot_video_timeline,
    read_metrics,
)
from .predict import Predictions, evaluate, load_predictions

__all__ = ["PREDICTION_FILES", "add_plot_parser", "cmd_plot"]

#: Where ``fieldlib charades predict`` leaves a run's test predictions, in order of choice
#: (one run: predictions.npz; with --flow-run-dir: the RGB stream's).
PREDICTION_FILES = ("predict/predictions.npz", "predict/predictions_rgb.npz")


def _folder(path, option: str) -> Path:
    if not Path(path).is_dir():
        raise FieldlibError(f"{option} {path}: no such folder")
    return Path(path)


def _predictions(run: Path, option: str) -> Predictions:
    for name in PREDICTION_FILES:
        if (run / name).is_file():
            return load_predictions(run / name)
    raise FieldlibError(f"{option} {run}: no {PREDICTION_FILES[0]} (run 'fieldlib charades "
                        f"predict --run-dir {run} --pass-videos 1' first)")


def _config(run: Path, option: str) -> TrainConfig:
    if not (run / "config.json").is_file():
        raise FieldlibError(f"{option} {run}: no config.json (not a training run)")
    return TrainConfig.load(run / "config.json")


def _subset(preds: Predictions, ids: list[str]) -> Predictions:
    row = {v: i for i, v in enumerate(preds.video_ids)}
    k = [row[v] for v in ids]
    return Predictions(list(ids), preds.frame_scores[k], preds.video_scores[k],
                       preds.times[k], info=preds.info)


def _fig7(args, modes, preds, gt, labels, none_preds, out: Path, wrote, skipped) -> None:
    if none_preds is None:
        skipped.append(("fig7", "needs --none-run-dir (a mode none run with predictions)"))
        return
    common = [v for v in preds.video_ids if v in set(none_preds.video_ids)]
    if not common:
        skipped.append(("fig7", "the two runs' predictions share no video"))
        return
    index = {v.id: v for v in gt}
    truth = Annotations([index[v] for v in common])
    full = evaluate(_subset(preds, common), truth)[args.task]
    base = evaluate(_subset(none_preds, common), truth)[args.task]
    try:
        path = plot_ap_difference(full, base, labels, top=args.top,
                                  names=modes, path=out / "fig7_ap_difference.png")
    except FieldlibError as exc:
        skipped.append(("fig7", str(exc).removeprefix("plot: ")))
        return
    note = "" if modes[1] == "none" else f"; note: the baseline is a {modes[1]} run, not none"
    wrote.append(("fig7", path, f"{args.task} AP on {len(common)} common videos{note}"))


def _fig6(args, runs: list[tuple[str, Path]], out: Path, wrote, skipped) -> None:
    lines, labels = {}, {}
    for option, run in runs:
        if not (run / "metrics.jsonl").is_file():
            skipped.append(("fig6", f"{option} {run}: no metrics.jsonl"))
            continue
        mode = _config(run, option).mode
        label = mode if mode not in labels.values() else f"{mode} ({run.name})"
        labels[run] = label
        lines[label] = read_metrics(run / "metrics.jsonl")
    if not lines:
        return
    has_eval = any("eval" in d for doc in lines.values() for d in doc)
    name = "fig6_training_curves.png" if has_eval else "fig6_training_loss.png"
    try:
        path = plot_training_curves(lines, task=args.task, require_eval=False,
                                    path=out / name)
    except FieldlibError as exc:
        skipped.append(("fig6", str(exc).removeprefix("plot: ")))
        return
    wrote.append(("fig6", path, f"runs: {', '.join(lines)}"))
    if not has_eval:
        skipped.append(("fig6 mAP", "no evaluation lines in the runs' metrics.jsonl (train "
                                    "with --eval-every N); wrote the training loss alone"))


def cmd_plot(args) -> int:
    for name in ("top", "top_categories"):
        if getattr(args, name) < 1:
            raise FieldlibError(f"plot: --{name.replace('_', '-')} must be >= 1, got "
                                f"{getattr(args, name)}")
    run = _folder(args.run_dir, "--run-dir")
    compare = [_folder(d, "--compare-run-dir") for d in args.compare_run_dir or []]
    none_dir = _folder(args.none_run_dir, "--none-run-dir") if args.none_run_dir else None
    out = Path(args.out) if args.out else run / "plots"
    if out.exists() and not out.is_dir():
        raise FieldlibError(f"--out {out}: is a file; give a folder")
    config = _config(run, "--run-dir")
    preds = _predictions(run, "--run-dir")
    none_preds = none_mode = None
    if none_dir is not None:
        none_mode = _config(none_dir, "--none-run-dir").mode
        none_preds = _predictions(none_dir, "--none-run-dir")
    if args.video is not None and args.video not in preds.video_ids:
        raise FieldlibError(f"--video {args.video}: not among the {len(preds)} predicted "
                            f"videos of {run} (e.g. {', '.join(preds.video_ids[:3])})")
    from .data import load_training_data

    data = load_training_data(config)
    split = preds.info.get("split", "test")
    gt = data.train if split == "train" else data.test
    missing = [v for v in preds.video_ids if v not in gt.index]
    if missing:
        raise FieldlibError(f"--run-dir {run}: {len(missing)} predicted videos are not in "
                            f"the run's {split} annotations (e.g. {missing[0]!r})")
    wrote, skipped = [], []

    if preds.pass_scores is None:
        skipped.append(("fig4", "the predictions have no pass scores (predict with "
                                "--pass-videos 1)"))
    else:
        m, stored = preds.pass_scores.shape[0], preds.pass_scores.shape[1] - 1
        video = args.video if args.video in preds.video_ids[:m] else preds.video_ids[0]
        note = "" if args.video in (None, video) else \
            f"; --video {args.video} has no pass scores (only the first {m} videos do)"
        path = plot_message_passes(preds, video, data.labels,
                                   passes=range(min(3, stored) + 1), top=args.top_categories,
                                   path=out / "fig4_message_passes.png")
        wrote.append(("fig4", path, f"video {video}, passes 0-{min(3, stored)}{note}"))

    video = args.video or preds.video_ids[0]
    path = plot_video_timeline(preds, video, data.labels, gt,
                               path=out / f"fig9_timeline_{video}.png")
    wrote.append(("fig9", path, f"video {video}"))

    try:
        path = plot_intent_embedding(preds, gt, data.labels, method=args.embedding,
                                     path=out / "fig11_intent_embedding.png")
        wrote.append(("fig11", path, f"{len(preds)} videos, {args.embedding.upper()}"))
    except FieldlibError as exc:
        skipped.append(("fig11", str(exc).removeprefix("plot: ")))

    _fig7(args, (config.mode, none_mode), preds, gt, data.labels, none_preds, out, wrote, skipped)
    runs = [("--run-dir", run)] + [("--compare-run-dir", d) for d in compare]
    if none_dir is not None and none_dir not in {d for _, d in runs}:
        runs.append(("--none-run-dir", none_dir))
    _fig6(args, runs, out, wrote, skipped)

    print(f"Charades plots of {run} ({config.mode} run, {len(preds)} predicted {split} "
          "videos)")
    print("wrote:")
    for fig, path, what in wrote:
        print(f"  {fig:<8} {path}  ({what})")
    if skipped:
        print("skipped:")
        for fig, why in skipped:
            print(f"  {fig:<8} {why}")
    return 0


def add_plot_parser(sub) -> argparse.ArgumentParser:
    """Register ``plot`` on the ``fieldlib charades`` sub-parsers object ``sub``."""
    p = sub.add_parser(
        "plot", help="draw the paper's figures (Fig. 4, 6, 7, 9, 11) of trained runs",
        description="Draw the figures of a trained run as PNGs: Fig. 4 (a video's top "
        "categories after 0-3 message passes), Fig. 9 (a video's most confident categories, "
        "verbs and object over time beside the ground truth), Fig. 11 (PCA of the videos' "
        "intent distributions), Fig. 7 (classes with the largest AP gain and loss over a "
        "'none' run) and Fig. 6 (test mAP and training loss against frames). Reads "
        "RUN_DIR/predict/predictions.npz (fieldlib charades predict) and metrics.jsonl; "
        "lists what it wrote and what it skipped and why.")
    p.add_argument("--run-dir", required=True, help="training run folder with "
                   "predict/predictions.npz (the full model)")
    p.add_argument("--compare-run-dir", action="append", metavar="DIR",
                   help="another run whose metrics.jsonl joins Fig. 6 (repeatable)")
    p.add_argument("--none-run-dir", help="a mode 'none' run with predictions: Fig. 7 (and "
                   "its curve in Fig. 6)")
    p.add_argument("--out", help="output folder (default RUN_DIR/plots)")
    p.add_argument("--video", help="video id of Fig. 9 and, when it has pass scores, "
                   "Fig. 4 (default: the first predicted video)")
    p.add_argument("--task", choices=("classify", "localize"), default="classify",
                   help="the mAP/AP of Fig. 6 and Fig. 7 (classify)")
    p.add_argument("--embedding", choices=EMBEDDINGS, default="pca",
                   help="Fig. 11's embedding: pca (default) or tsne (the paper's; needs "
                        "scikit-learn)")
    p.add_argument("--top", type=int, default=8,
                   help="classes gained and lost shown in Fig. 7 (8)")
    p.add_argument("--top-categories", type=int, default=5,
                   help="categories shown in Fig. 4 (5)")
    p.set_defaults(func=cmd_plot)
    return p
