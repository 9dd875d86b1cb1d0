"""``fieldlib charades predict``: test-time prediction of trained runs, two-stream fusion,
the official submission files and their scores (docs/charades.md, "Prediction").

    fieldlib charades predict --run-dir DIR [--flow-run-dir DIR] [--fusion product|average]
                              [--split test|train] [--videos N] [--passes 10]
                              [--batch-videos 8] [--pass-videos 0] [--out DIR]
                              [--model FILE] [--flow-model FILE] [--digits N]
                              [--device cpu] [--no-progress]

Writes into ``--out`` (default ``RUN_DIR/predict``, ``RUN_DIR/predict-train`` for the
training split): ``classify_submission.txt``, ``localize_submission.txt`` (of the fused
predictions when ``--flow-run-dir`` is given), ``metrics.json`` (official scores of every
stream and of the fusion) and ``predictions.npz`` (``predictions_rgb.npz`` and
``predictions_flow.npz`` with two runs; :func:`~.predict.load_predictions` reads them).
Errors are FieldlibErrors: one line on stderr and exit code 2 (fieldlib.cli).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fieldlib.errors import FieldlibError

from .predict import (
    DEFAULT_PASSES,
    FUSIONS,
    SPLITS,
    evaluate,
    evaluation_json,
    fuse,
    predict_run,
    write_submissions,
)

__all__ = ["add_predict_parser", "cmd_predict"]


def _note(msg: str) -> None:
    print(f"fieldlib: {msg}", file=sys.stderr)


def _check(args) -> Path:
    """Option checks before any work; the output folder."""
    for name, low in (("videos", 1), ("passes", 0), ("batch_videos", 1), ("pass_videos", 0),
                      ("digits", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise FieldlibError(f"predict: --{name.replace('_', '-')} must be >= {low}, "
                                f"got {value}")
    if not Path(args.run_dir).is_dir():
        raise FieldlibError(f"--run-dir {args.run_dir}: no such folder")
    if args.flow_run_dir is not None and not Path(args.flow_run_dir).is_dir():
        raise FieldlibError(f"--flow-run-dir {args.flow_run_dir}: no such folder")
    if args.flow_model is not None and args.flow_run_dir is None:
        raise FieldlibError("predict: --flow-model needs --flow-run-dir")
    default = "predict" if args.split == "test" else "predict-train"
    out = Path(args.out) if args.out else Path(args.run_dir) / default
    if out.exists() and not out.is_dir():
        raise FieldlibError(f"--out {out}: is a file; give a folder")
    return out


def _fmt(x: float) -> str:
    return "nan" if np.isnan(x) else f"{x:.4f}"


def _row(label: str, results: dict, n: int, seconds: float | None) -> str:
    c, loc = results["classify"], results["localize"]
    sec = "" if seconds is None else f"{seconds:.1f}"
    return (f"  {label:<16} {_fmt(c.map):>8} {_fmt(c.map_nanmean):>10} {_fmt(c.wap):>8} "
            f"{_fmt(loc.map):>8} {_fmt(loc.map_nanmean):>10} {n:>7} {sec:>8}")


def _write_json(path: Path, doc: dict) -> None:
    try:
        path.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    except OSError as exc:
        raise FieldlibError(f"{path}: cannot write: {exc.strerror or exc}") from None


def cmd_predict(args) -> int:
    out = _check(args)
    common = {"split": args.split, "videos": args.videos, "passes": args.passes,
              "batch_videos": args.batch_videos, "pass_videos": args.pass_videos,
              "progress": not args.no_progress, "device": args.device}
    first, gt, data = predict_run(args.run_dir, model_file=args.model, **common)
    runs = [(first.info["stream"], first)]
    if args.flow_run_dir is not None:
        second, _, _ = predict_run(args.flow_run_dir, model_file=args.flow_model, **common)
        for role, preds, option in (("rgb", first, "--run-dir"),
                                    ("flow", second, "--flow-run-dir")):
            if preds.info["stream"] != role:
                _note(f"note: {option} is a {preds.info['stream']} run, fused as the "
                      f"{role} stream")
        runs = [("rgb", first), ("flow", second)]
    streams = {label: (preds, evaluate(preds, gt)) for label, preds in runs}
    if len(runs) == 2:
        final = fuse(first, runs[1][1], args.fusion)
        final_label = f"fused ({args.fusion})"
        final_results = evaluate(final, gt)
    else:
        final, final_label = first, None
        final_results = streams[runs[0][0]][1]

    paths = write_submissions(final, out, digits=args.digits)
    if len(runs) == 1:
        paths["predictions"] = first.save(out / "predictions.npz")
    else:
        for label, (preds, _) in streams.items():
            paths[f"predictions_{label}"] = preds.save(out / f"predictions_{label}.npz")
    paths["metrics"] = out / "metrics.json"
    classes = data.labels.classes
    doc = evaluation_json(
        final_results, classes, split=args.split, videos=len(gt), passes=args.passes,
        fusion=args.fusion if len(runs) == 2 else None, run_dir=str(args.run_dir),
        flow_run_dir=None if args.flow_run_dir is None else str(args.flow_run_dir),
        streams={label: {"seconds": preds.info["seconds"],
                         **{task: res.to_json(classes) for task, res in results.items()}}
                 for label, (preds, results) in streams.items()},
        files={k: str(p) for k, p in paths.items()})
    _write_json(paths["metrics"], doc)

    print(f"Charades predict: {len(gt)} {args.split} videos, 25 time points each, "
          f"{args.passes} synchronous mean-field passes after the first from zero messages")
    print(f"  {'predictions':<16} {'cls mAP':>8} {'(nan-mean)':>10} {'cls wAP':>8} "
          f"{'loc mAP':>8} {'(nan-mean)':>10} {'videos':>7} {'seconds':>8}")
    for label, (preds, results) in streams.items():
        print(_row(label, results, len(preds), preds.info["seconds"]))
    if final_label is not None:
        print(_row(final_label, final_results, len(final), None))
    print("  mAP: the official plain mean over all classes (nan when a class has no "
          "positive); nan-mean: over the classes with positives")
    print("wrote:")
    for key, path in paths.items():
        print(f"  {key:<20} {path}")
    return 0


def add_predict_parser(sub) -> argparse.ArgumentParser:
    """Register ``predict`` on the ``fieldlib charades`` sub-parsers object ``sub``."""
    p = sub.add_parser(
        "predict", help="predict with trained runs; write and score official submissions",
        description="Predict the videos of a training run's data with its trained model: "
        "the official 25 time points a video, synchronous mean-field (the first pass from "
        "zero messages, then --passes sweeps), frame score = Q summed onto the classes, "
        "video score = max over its frames. With --flow-run-dir the two streams are fused "
        "(the paper's product of class probabilities, or the released code's 0.5/0.5 "
        "average). Writes the official classification and localization submissions and "
        "their official scores (metrics.json).")
    p.add_argument("--run-dir", required=True,
                   help="training run folder (config.json, model.pt): the RGB stream")
    p.add_argument("--flow-run-dir", help="a second run (the flow stream) to fuse with")
    p.add_argument("--fusion", choices=FUSIONS, default="product",
                   help="product (paper; default) or average (released code)")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test: the run's test videos with actions (default); train: its "
                        "training videos")
    p.add_argument("--videos", type=int, help="only the first N videos of the split")
    p.add_argument("--passes", type=int, default=DEFAULT_PASSES,
                   help=f"synchronous mean-field sweeps after the pass from zero messages "
                        f"({DEFAULT_PASSES}; 0: that pass only)")
    p.add_argument("--batch-videos", type=int, default=8,
                   help="videos per network forward and engine call (8)")
    p.add_argument("--pass-videos", type=int, default=0,
                   help="store the frame scores after every pass for the first N videos "
                        "(predictions.npz 'pass_scores'; 0)")
    p.add_argument("--out", help="output folder (default RUN_DIR/predict, or "
                   "RUN_DIR/predict-train for --split train)")
    p.add_argument("--model", help="model file of --run-dir (default model.pt, else "
                   "checkpoint.pt)")
    p.add_argument("--flow-model", help="model file of --flow-run-dir")
    p.add_argument("--digits", type=int, help="significant digits of the submission scores "
                   "(default: exact floats, which score exactly as the arrays)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)
    return p
