"""``fieldlib charades ...``: data summary, official evaluation, baseline and synthetic frames.

Sub-commands::

    fieldlib charades info --train CSV [--test CSV] [--classes TXT]
                           [--mapping TXT --objects TXT --verbs TXT] [--fps 8] [--json OUT]
    fieldlib charades eval classify --gt TEST.csv --submission FILE [--lenient] [--json OUT]
    fieldlib charades eval localize --gt TEST.csv --submission FILE [--lenient] [--json OUT]
    fieldlib charades prior --train CSV --gt TEST.csv --task classify|localize --out FILE
    fieldlib charades synth --csv CSV --out DIR [--limit 3] [--size 32] [--max-frames 48]

``--classes`` defaults to ``Charades_v1_classes.txt`` next to the CSV when it is there.
``--reversed-intervals error|swap|keep`` chooses how end-before-start instances are read
(the official train CSV has seven; see annotations.py). Errors are FieldlibErrors: one line
on stderr and exit code 2 (fieldlib.cli).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fieldlib.cli import command_help
from fieldlib.errors import FieldlibError

from .annotations import REVERSED_POLICIES, Annotations, read_annotations
from .baseline import prior_classify_scores, prior_localize_scores
from .cli_plot import add_plot_parser
from .cli_predict import add_predict_parser
from .cli_train import add_train_parser
from .labels import LabelSpace, load_labels, scene_vocabulary
from .metrics import EvalResult, classify_map, localize_map
from .statespace import TRAIN_FPS, build_state_space, check_fps
from .submission import read_submission, write_classify_submission, write_localize_submission
from .synthetic import SyntheticCharades, SyntheticConfig, write_jpeg_folders

CLASSES_FILE = "Charades_v1_classes.txt"


def _note(msg: str) -> None:
    print(f"fieldlib: {msg}", file=sys.stderr)


def _read_csv(path: str, args) -> Annotations:
    ann = read_annotations(path, reversed_intervals=args.reversed_intervals)
    for line in ann.notes:
        _note(f"tolerated: {line}")
    return ann


def _labels(args, csv_path: str) -> LabelSpace:
    classes = args.classes
    if classes is None:
        guess = Path(csv_path).parent / CLASSES_FILE
        classes = guess if guess.is_file() else None
    return load_labels(classes, getattr(args, "mapping", None), getattr(args, "objects", None),
                       getattr(args, "verbs", None))


def _check_output(path: str | None, option: str) -> None:
    """Refuse (FieldlibError) an output file whose folder does not exist, before any work."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise FieldlibError(f"{option} {path}: is a folder; give a file name")
    folder = target.parent
    if not folder.is_dir():
        raise FieldlibError(f"{option} {path}: folder {folder} does not exist")


def _write_json(path: str, doc: dict) -> None:
    try:
        Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n",
                              encoding="utf-8")
    except OSError as exc:
        raise FieldlibError(f"--json {path}: cannot write: {exc.strerror or exc}") from None


def cmd_info(args) -> int:
    _check_output(args.json, "--json")
    check_fps(args.fps)
    train = _read_csv(args.train, args)
    labels = _labels(args, args.train)
    space = build_state_space(train, labels, fps=args.fps)
    tab = train.instance_table()
    summary = {
        "train_csv": args.train,
        "videos": len(train),
        "videos_without_actions": sum(1 for v in train if not v.actions),
        "instances": int(tab["cls"].size),
        "classes": labels.n_classes,
        "objects": len(labels.objects) if labels.has_mapping else None,
        "verbs": len(labels.verbs) if labels.has_mapping else None,
        **space.summary(),
        "scenes": list(space.scenes.ids),
    }
    if labels.has_mapping:  # the released code's B: distinct (object, verb, progress)
        summary["B_object_verb_progress"] = int(np.unique(space.states[:, 1:], axis=0).shape[0])
    if args.test:
        test = _read_csv(args.test, args)
        summary["test_videos"] = len(test)
        summary["test_videos_without_actions"] = sum(1 for v in test if not v.actions)
        summary["test_instances"] = int(test.instance_table()["cls"].size)
    frames = "(category, object, verb, progress)" if labels.has_mapping else \
        "(category, progress): no class mapping, category-only frames"
    print(f"Charades training annotations: {args.train}")
    print(f"  videos {summary['videos']} ({summary['videos_without_actions']} without actions),"
          f" instances {summary['instances']}, classes {summary['classes']}")
    if labels.has_mapping:
        print(f"  objects {summary['objects']}, verbs {summary['verbs']}")
    print(f"  training frames at {args.fps:g} fps inside annotations: "
          f"{summary['training_frames']} (frame, class) pairs")
    print(f"  state space B of {frames}: |B| = {summary['B']}")
    if labels.has_mapping:
        print(f"  distinct (object, verb, progress) in B: {summary['B_object_verb_progress']}")
    print(f"  scenes |S| = {summary['S']}; frame variable states |B| x |S| = {summary['B_x_S']}")
    if args.test:
        print(f"Test: {summary['test_videos']} videos ({summary['test_videos_without_actions']} "
              f"without actions), {summary['test_instances']} instances")
    if args.json:
        _write_json(args.json, summary)
    return 0


def _print_result(res: EvalResult, labels: LabelSpace, top: int, read_s: float,
                  score_s: float) -> None:
    def fmt(x: float) -> str:
        return "nan" if np.isnan(x) else f"{x:.4f}"

    n_nan = int(np.isnan(res.ap).sum())
    rows = "videos" if res.task == "classify" else "(video, frame) rows"
    script = "Charades_v1_classify.m" if res.task == "classify" else "Charades_v1_localize.m"
    print(f"Charades {res.task} ({script} rules): {res.n_rows} {rows}, {res.n_missing} missing "
          f"from the submission (scored -inf)")
    print(f"  mAP          {fmt(res.map)}   official: plain mean over {res.ap.size} classes"
          + (f" (NaN: {n_nan} classes have no positives)" if n_nan else ""))
    print(f"  mAP nan-mean {fmt(res.map_nanmean)}   mean over the {res.ap.size - n_nan} "
          "classes with positives")
    print(f"  wAP          {fmt(res.wap)}   weighted by positives per class")
    ranked = res.ranked()
    k = min(top, ranked.size)
    for title, idx in ((f"best {k}", ranked[:k]), (f"worst {k}", ranked[::-1][:k])):
        print(f"  {title} classes:")
        for c in idx:
            print(f"    {labels.classes.ids[c]}  {res.ap[c]:.4f}  n_pos {int(res.n_pos[c]):5d}  "
                  f"{labels.classes.names[c]}")
    print(f"  (read {read_s:.2f} s, scored {score_s:.2f} s)")


def cmd_eval(args) -> int:
    _check_output(args.json, "--json")
    t0 = time.perf_counter()
    gt = _read_csv(args.gt, args)
    labels = _labels(args, args.gt)
    sub = read_submission(args.submission, args.task, known_ids=gt.index, lenient=args.lenient,
                          n_classes=labels.n_classes)
    for line in sub.tolerated:
        _note(f"lenient: {line}")
    t1 = time.perf_counter()
    if args.task == "classify":
        res = classify_map(gt, sub, labels.n_classes)
    else:
        res = localize_map(gt, sub, labels.n_classes)
    t2 = time.perf_counter()
    if res.n_missing:
        what = "videos" if args.task == "classify" else "(video, frame) rows"
        _note(f"warning: {res.n_missing} of {res.n_rows} {what} missing from the submission; "
              "they score -inf, as in the official script")
    _print_result(res, labels, args.top, t1 - t0, t2 - t1)
    if args.json:
        _write_json(args.json, res.to_json(labels.classes))
    return 0


def cmd_prior(args) -> int:
    _check_output(args.out, "--out")
    train = _read_csv(args.train, args)
    gt = _read_csv(args.gt, args)
    if args.task == "classify":
        write_classify_submission(args.out, gt.ids, prior_classify_scores(train, len(gt)),
                                  digits=6)
    else:
        write_localize_submission(args.out, gt.ids, prior_localize_scores(train, len(gt)),
                                  digits=6)
    print(f"wrote {args.task} prior submission for {len(gt)} videos to {args.out}")
    return 0


def cmd_synth(args) -> int:
    ann = _read_csv(args.csv, args)
    labels = _labels(args, args.csv)
    videos = list(ann)
    if args.ids:
        wanted = args.ids.split(",")
        missing = [v for v in wanted if v not in ann.index]
        if missing:
            raise FieldlibError(f"videos not in {args.csv}: {', '.join(missing)}")
        videos = [ann[ann.index[v]] for v in wanted]
    if args.limit < 1:
        raise FieldlibError(f"--limit must be at least 1, not {args.limit}")
    videos = videos[: args.limit]
    gen = SyntheticCharades(labels, scene_vocabulary([v.scene for v in ann]),
                            SyntheticConfig(size=args.size, snr=args.snr, seed=args.seed))
    out = Path(args.out)
    n = write_jpeg_folders(gen, videos, out / "Charades_v1_rgb", out / "Charades_v1_flow",
                           max_frames=args.max_frames)
    print(f"wrote {n} JPEG files for {len(videos)} synthetic videos under {out} "
          "(Charades_v1_rgb/, Charades_v1_flow/)")
    return 0


def _common(p: argparse.ArgumentParser, classes: bool = True) -> None:
    if classes:
        p.add_argument("--classes", help=f"class names file (default: {CLASSES_FILE} next to "
                       "the CSV, if present)")
    p.add_argument("--reversed-intervals", choices=REVERSED_POLICIES, default="error",
                   help="instances whose end is before their start: error (default), swap "
                        "them, or keep them as given (the official scorer's reading)")


def _help(parser: argparse.ArgumentParser):
    def show(_args) -> int:
        parser.print_help()
        return 0
    return show


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fieldlib charades`` and its sub-commands on ``subparsers``."""
    top = subparsers.add_parser("charades", help=command_help("charades"),
                                description="Charades: data summary, official evaluation, a "
                                "prior baseline and synthetic frames.")
    top.set_defaults(func=_help(top))
    sub = top.add_subparsers(dest="charades_command", metavar="COMMAND")

    p = sub.add_parser("info", help="summarise annotations and the frame state space B",
                       description="Summarise a Charades annotation CSV: videos, instances, "
                       "and the frame state space B of the temporal field (the distinct "
                       "(category, object, verb, progress) tuples of the training frames).")
    p.add_argument("--train", required=True, help="Charades_v1_train.csv")
    p.add_argument("--test", help="Charades_v1_test.csv (optional summary)")
    p.add_argument("--mapping", help="Charades_v1_mapping.txt (cNNN oNNN vNNN)")
    p.add_argument("--objects", help="Charades_v1_objectclasses.txt")
    p.add_argument("--verbs", help="Charades_v1_verbclasses.txt")
    p.add_argument("--fps", type=float, default=TRAIN_FPS,
                   help="training frame rate, a finite number > 0 (8)")
    p.add_argument("--json", help="also write the summary as JSON")
    _common(p)
    p.set_defaults(func=cmd_info)

    ev = sub.add_parser("eval", help="official Charades metrics of a submission",
                        description="Score a submission file with the official Charades "
                        "metrics: 'classify' (per-video class scores; mAP and wAP as "
                        "Charades_v1_classify.m) or 'localize' (25 time points a video; mAP "
                        "as Charades_v1_localize.m). Strict by default: a malformed file is "
                        "an error naming the line; --lenient reads what the official scripts "
                        "read.")
    ev.set_defaults(func=_help(ev))
    ev_sub = ev.add_subparsers(dest="task", metavar="TASK")
    for task, what in (("classify", "classification mAP/wAP (Charades_v1_classify.m)"),
                       ("localize", "localization mAP (Charades_v1_localize.m)")):
        p = ev_sub.add_parser(task, help=what, description=f"Score a {task} submission "
                              f"against the ground truth: {what}.")
        p.add_argument("--gt", required=True, help="ground truth CSV (Charades_v1_test.csv)")
        p.add_argument("--submission", required=True, help="submission file")
        p.add_argument("--lenient", action="store_true",
                       help="accept what the official reader accepts (158 fields, 0-based "
                            "frames, repeated rows, unknown ids, NaN) and report it on stderr")
        p.add_argument("--json", help="write {map, map_nanmean, wap, ap, classes, ...}")
        p.add_argument("--top", type=int, default=10, help="best/worst classes shown (10)")
        _common(p)
        p.set_defaults(func=cmd_eval)

    p = sub.add_parser("prior", help="write a training-frequency baseline submission",
                       description="Write a baseline submission that scores every video "
                       "with how often each class occurs in the training annotations.")
    p.add_argument("--train", required=True,
                   help="training CSV (Charades_v1_train.csv) the class frequencies come from")
    p.add_argument("--gt", required=True, help="the CSV whose videos the submission covers")
    p.add_argument("--task", choices=("classify", "localize"), required=True,
                   help="classify: one row a video; localize: 25 rows a video (one per "
                        "official time point)")
    p.add_argument("--out", required=True, help="submission file to write (its folder must "
                   "exist)")
    _common(p, classes=False)
    p.set_defaults(func=cmd_prior)

    p = sub.add_parser("synth", help="write synthetic videos as official JPEG folders",
                       description="Render synthetic frames for annotated videos (patterns of "
                       "their labels in noise) as the official Charades_v1_rgb/ and "
                       "Charades_v1_flow/ JPEG folders.")
    p.add_argument("--csv", required=True, help="annotation CSV whose rows drive the content")
    p.add_argument("--out", required=True, help="folder for Charades_v1_rgb/ and _flow/")
    p.add_argument("--ids", help="comma-separated video ids (default: the first --limit)")
    p.add_argument("--limit", type=int, default=3,
                   help="write at most this many videos (3)")
    p.add_argument("--size", type=int, default=32,
                   help="frame width and height in pixels (32)")
    p.add_argument("--snr", type=float, default=SyntheticConfig.snr,
                   help="one-frame signal-to-noise ratio of each label's pattern "
                        f"({SyntheticConfig.snr:g}); higher is easier to recognise")
    p.add_argument("--seed", type=int, default=0, help="random seed of the noise (0)")
    p.add_argument("--max-frames", type=int, default=48, help="frames a video (48 = 2 s)")
    _common(p)
    p.set_defaults(func=cmd_synth)
    add_train_parser(sub)
    add_predict_parser(sub)
    add_plot_parser(sub)

    p = sub.add_parser("demo", help="the Charades demo: train async and none, predict, score, "
                       "plot", description="Train the small two-stream backbone on synthetic "
                       "frames from real annotation rows in the async (paper) and none (no "
                       "structure) modes, predict test videos at the official time points, "
                       "score them with the official metrics, draw the figures, and print a "
                       "table (models/charades/demo.py). A folder holding a finished demo is "
                       "reused; an interrupted one resumes.")
    p.add_argument("--out", default="out/charades-demo",
                   help="folder for the runs, submissions, figures (out/charades-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps a mode (600)")
    p.add_argument("--videos", type=int, default=None,
                   help="training videos (64; the first ones with actions)")
    p.add_argument("--test-videos", type=int, default=60, help="test videos scored (60)")
    p.add_argument("--modes", default="async,none",
                   help="comma-separated training modes (async,none; sync also works)")
    p.set_defaults(func=cmd_demo)
    return top


def cmd_demo(args) -> int:
    from .demo import run_demo

    options = {k: getattr(args, k) for k in ("steps", "videos") if getattr(args, k) is not None}
    modes = tuple(m for m in args.modes.split(",") if m)
    if args.test_videos < 1:
        raise FieldlibError(f"--test-videos must be at least 1, not {args.test_videos}")
    start = time.perf_counter()
    result = run_demo(args.out, modes=modes, test_videos=args.test_videos,
                      progress=sys.stderr.isatty(), **options)
    print(result.table())
    print(f"wall time {time.perf_counter() - start:.0f} s; everything is in {result.out}/ "
          f"(runs {', '.join(m + '/' for m in modes)}, plots/, summary.txt)")
    return 0
