"""``fieldlib charades train`` and ``python -m fieldlib.models.charades.train``: the options of
:class:`~fieldlib.models.charades.config.TrainConfig` on the command line.

Every option defaults to the TrainConfig default. With ``--resume`` the run directory's
``config.json`` is the configuration; options given beside ``--resume`` may change only what
a resumed run can change (``--steps``, checkpoint and log intervals, data paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fieldlib.errors import FieldlibError

from .config import ABLATIONS, MODES, RESUMABLE_CHANGES, TrainConfig

__all__ = ["add_train_parser", "parse_train", "run_train", "OPTION_HELP"]

#: One line of help for every TrainConfig field.
OPTION_HELP = {
    "mode": "async: frames sampled across videos with the message store (the paper, "
            "Algorithm 2); sync: whole videos, mean-field before each update; none: phi_X "
            "only (no structure)",
    "stream": "rgb (3 channels) or flow (a stack of 10 flow fields, 20 channels)",
    "backbone": "small (a few conv layers, 32-64 px frames, CPU) or vgg16 (torchvision "
                "VGG-16 to fc7, 224 px)",
    "backbone_norm": "normalisation of the small backbone's blocks: batch (BatchNorm; over "
                     "every process's frames when training on several) or group (GroupNorm: "
                     "per frame, no communication between processes; learns slower on the "
                     "synthetic frames)",
    "weights": "local backbone weights file (torchvision's vgg16 state_dict); nothing is "
               "ever downloaded; without one the backbone starts from random weights",
    "data": "synthetic (frames generated from the annotation rows) or a Charades folder "
            "holding Charades_v1_rgb/ and Charades_v1_flow/",
    "annotations": "folder with Charades_v1_train.csv, _test.csv, _classes.txt (and the "
                   "mapping files); default: ../shared/data/charades if present, else the "
                   "rows bundled with fieldlib",
    "rgb_root": "RGB frame folder (default DATA/Charades_v1_rgb)",
    "flow_root": "flow frame folder (default DATA/Charades_v1_flow)",
    "videos": "train on the first N training videos with actions (all: give 0)",
    "image_size": "frame side in pixels (default 32 for small, 224 for vgg16)",
    "synthetic_snr": "one-frame signal-to-noise ratio of the synthetic label patterns",
    "synthetic_seed": "seed of the synthetic patterns and noise",
    "fps": "training frames a second inside annotated intervals (6 = every 4th frame at 24 "
           "fps, the paper)",
    "batch_size": "frames a batch (async, none), over all processes",
    "videos_per_batch": "whole videos a batch (sync; the paper's baseline: 3)",
    "max_frames": "at most this many labelled frames a video (sync)",
    "accumulate": "batches whose gradients are summed into one step (paper: 3 x 80 = 240 "
                  "frames)",
    "steps": "optimiser steps to train to",
    "lr": "learning rate (the default suits the small backbone on synthetic frames; paper: "
          "1e-3 RGB, 1e-5 Flow on VGG-16)",
    "mu_lr_scale": "learning rate of mu and the kernel weights relative to --lr (their "
                   "gradient sums over the ~100 frames within the kernel's reach)",
    "momentum": "SGD Nesterov momentum",
    "weight_decay": "SGD weight decay",
    "lr_milestones": "steps at which the learning rate is multiplied by --lr-gamma "
                     "(comma-separated)",
    "lr_gamma": "learning-rate decay factor at each milestone",
    "n_intents": "intent states N_I (paper: 30; the released RGB config: 60)",
    "component": "what phi_XI and mu act on: object (paper) or object_progress (released "
                 "code)",
    "scene_weight": "weight of the scene potential phi(o,s) (0: dropped, as the released "
                    "code)",
    "detach_intent": "block phi_XI's gradient from the backbone (the released code)",
    "dropout": "dropout of the phi_XI hidden layer",
    "drop": "ablations (paper Fig. 8), comma-separated: temporal (no phi_XX), intent (no "
            "phi_XI), progress (no progress term)",
    "sigma": "width of the Gaussian temporal kernel in seconds (6.25 = 150 frames at 24 fps)",
    "inner_iterations": "Q_i / Q_I alternations of an asynchronous step",
    "l2_intent": "L2 pull of the predicted phi_XI toward zero (paper: 4e-4)",
    "discount": "discount d of stored messages, newest weighted most (paper: 0.9; released "
                "configs: 0.3)",
    "capacity": "messages kept a video (released code: 50)",
    "store": "the message store with several processes: replicated (every process holds "
             "every video; a step's write is one all_gather overlapping the backward, reads "
             "are local) or sharded (a process holds the videos it owns, 1/K of the memory; "
             "a read asks their owners: 3 collectives in each step's critical path)",
    "scale": "h of Eq. 10: frames (the distinct frames averaged), count, or a number",
    "sync_max_iter": "mean-field iterations before each sync update (at most)",
    "sync_tol": "mean-field tolerance before each sync update",
    "dtype": "float32, or float64 (exact comparisons)",
    "device": "auto (a GPU when there is one), cpu or cuda",
    "seed": "seed of the network, the sampler and every random draw",
    "checkpoint_seconds": "write a checkpoint at least this often (seconds)",
    "checkpoint_every": "also write one every N steps (0: by time only)",
    "log_every": "write a metrics line every N steps",
    "eval_every": "evaluate on the first --eval-videos test videos every N steps and at the "
                  "end (official mAP, logged as 'eval' lines; 0: never)",
    "eval_videos": "test videos an evaluation scores",
    "eval_passes": "synchronous mean-field passes of an evaluation (paper: 10)",
    "progress_bar": "show a progress bar (on a terminal)",
    "num_threads": "torch threads (default: torch's choice)",
}


def _list(kind):
    def parse(text: str):
        items = [x for x in text.split(",") if x.strip()]
        try:
            return [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None
    return parse


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _options(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    choices = {"mode": MODES, "stream": ("rgb", "flow"), "backbone": ("small", "vgg16"),
               "backbone_norm": ("batch", "group"), "store": ("sharded", "replicated"),
               "component": ("object", "object_progress"), "dtype": ("float32", "float64"),
               "device": ("auto", "cpu", "cuda")}
    for f in dataclasses.fields(TrainConfig):
        default = getattr(defaults, f.name)
        kind = {"drop": _list(str), "lr_milestones": _list(int)}.get(f.name)
        if kind is None:
            kind = {bool: _bool, int: int, float: float}.get(type(default), str)
            if f.name in ("videos", "image_size", "num_threads"):
                kind = int
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind,
                       choices=choices.get(f.name), default=argparse.SUPPRESS,
                       metavar=None if f.name in choices else f.name.split("_")[-1].upper(),
                       help=f"{OPTION_HELP[f.name]} (default: {shown})")


def add_train_parser(sub) -> argparse.ArgumentParser:
    """Register ``train`` on the ``fieldlib charades`` sub-parsers."""
    p = sub.add_parser("train", help="train the two-stream asynchronous temporal field",
                       description="Train one stream of the Charades Asynchronous Temporal "
                       "Field (docs/charades.md). With only --run-dir: the small backbone on "
                       "synthetic frames from real annotation rows, the paper's asynchronous "
                       "mode. Ablations of the paper's Fig. 8: --drop temporal,intent,progress."
                       " Many processes: torchrun --nproc-per-node=K -m "
                       "fieldlib.models.charades.train ...")
    _arguments(p)
    p.set_defaults(func=run_train)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="folder of the run: config.json, "
                   "metrics.jsonl, checkpoint.pt, model.pt")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir "
                   "from its checkpoint (exactly as if it had not stopped)")
    _options(p)


def parse_train(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fieldlib.models.charades.train",
                                description="Train the Charades Asynchronous Temporal Field "
                                "(the options of `fieldlib charades train`).")
    _arguments(p)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration: the options given (with --resume: config.json, changed by
    the resumable options given)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}
    if given.get("videos") == 0:
        given["videos"] = None
    unknown = [d for d in given.get("drop", []) if d not in ABLATIONS]
    if unknown:
        raise FieldlibError(f"train: --drop {unknown[0]!r} is not one of {', '.join(ABLATIONS)}")
    if not args.resume:
        return TrainConfig(**given)
    path = Path(args.run_dir) / "config.json"
    if not path.is_file():
        raise FieldlibError(f"--resume: {args.run_dir} holds no config.json")
    saved = TrainConfig.load(path)
    fixed = [k for k, v in given.items() if k not in RESUMABLE_CHANGES
             and getattr(saved, k) != v]
    if fixed:
        raise FieldlibError(f"--resume: --{fixed[0].replace('_', '-')} cannot change on resume "
                            f"(the run has {getattr(saved, fixed[0])!r}); resumable: "
                            f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES)}")
    return dataclasses.replace(saved, **given)


def run_train(args: argparse.Namespace) -> int:
    from .train import Trainer

    config = config_from_args(args)
    trainer = Trainer(config, args.run_dir, resume=args.resume)
    if args.resume and trainer.rank == 0:
        config.save(trainer.paths.config)
    result = trainer.run(progress=config.progress_bar and sys.stderr.isatty())
    if trainer.rank == 0:
        summary = {"status": result.status, "steps": result.steps, "frames": result.frames,
                   "seconds": round(result.seconds, 2), "last_loss": result.last_loss,
                   "run_dir": str(result.run_dir)}
        print(json.dumps(summary))
        if result.status == "interrupted":
            print(f"fieldlib: stopped at step {result.steps}; continue with --resume "
                  f"--run-dir {result.run_dir}", file=sys.stderr)
    return 0
