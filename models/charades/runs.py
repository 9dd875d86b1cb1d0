"""A run directory and the model of a run (docs/charades.md, "Training").

Layout of ``--run-dir DIR``::

    DIR/config.json        the TrainConfig (checked on --resume)
    DIR/metrics.jsonl      one JSON object a logged step
    DIR/checkpoint.pt      the latest checkpoint (written then renamed: never half-written)
    DIR/model.pt           the final model's state_dict (StreamNet), at the end of training
    DIR/store_rank{r}.pt   with several processes: each rank's message-store shard (also
                           inside the checkpoint)

:func:`build_network` makes the :class:`StreamNet` a configuration describes, and
:func:`load_run` the configuration, data and trained network of a finished run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fieldlib.errors import FieldlibError

from .config import TrainConfig
from .data import TrainingData, load_training_data
from .network import StreamNet

__all__ = ["RunPaths", "build_network", "load_run"]


@dataclass(frozen=True)
class RunPaths:
    """The files of a run directory (module docstring)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def model(self) -> Path:
        return self.root / "model.pt"


def build_network(config: TrainConfig, space, *, weights: bool = True) -> StreamNet:
    """The :class:`StreamNet` of ``config`` on the state space ``space`` (float64 when
    ``config.dtype`` says so). ``weights=False`` ignores ``config.weights`` (e.g. before a
    checkpoint's own weights are loaded)."""
    net = StreamNet(space, stream=config.stream, backbone=config.backbone,
                    weights=config.weights if weights else None, n_intents=config.n_intents,
                    component=config.component, scene_weight=config.scene_weight,
                    progress=config.uses_progress, detach_intent=config.detach_intent,
                    sigmas=(config.sigma,), learn_kernel_weights=config.mode == "sync",
                    dropout=config.dropout,
                    backbone_options=({"norm": config.backbone_norm}
                                      if config.backbone == "small" else None))
    return net.to(getattr(torch, config.dtype))


def load_run(run_dir, *, model_file: str | None = None) -> tuple[TrainConfig, TrainingData,
                                                                   StreamNet]:
    """``(config, data, net)`` of a run: its configuration, its data (the same videos, state
    space and frame source) and its trained network in eval mode, from ``model.pt`` (or a
    given file; a checkpoint's model is read too). FieldlibError naming the file when
    something is missing or does not fit."""
    paths = RunPaths(Path(run_dir))
    if not paths.config.is_file():
        raise FieldlibError(f"--run-dir {run_dir}: no config.json (not a training run)")
    config = TrainConfig.load(paths.config)
    data = load_training_data(config)
    net = build_network(config, data.space, weights=False)
    path = Path(model_file) if model_file else paths.model
    if not path.is_file():
        if model_file is None and paths.checkpoint.is_file():
            path = paths.checkpoint
        else:
            raise FieldlibError(f"{path}: no trained model (training did not finish?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
        raise FieldlibError(f"{path}: not a readable model file ({exc})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise FieldlibError(f"{path}: does not fit the run's network ({first})") from None
    return config, data, net.eval()
