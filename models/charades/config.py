"""The configuration of a Charades training run (MATH.md §5, §6, §9): one dataclass, written
to ``config.json`` in the run directory and checked on resume.

Defaults follow the paper where the released code differs (MATH.md §9); the code's choices
are options: ``component="object_progress"``, ``scene_weight=0``, ``detach_intent=True``,
``discount=0.3``, ``n_intents=60`` (RGB config), ``l2_intent=1e-3``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from fieldlib.errors import FieldlibError

__all__ = ["MODES", "ABLATIONS", "TrainConfig", "RESUMABLE_CHANGES"]

#: Training modes: Algorithm 2 (async), whole videos (sync), φX only (none).
MODES = ("async", "sync", "none")
#: Fig. 8's ablations: which parts of the field a run drops.
ABLATIONS = ("temporal", "intent", "progress")
#: Options a resumed run may change (the rest must equal the checkpoint's).
RESUMABLE_CHANGES = ("steps", "checkpoint_seconds", "checkpoint_every", "log_every",
                     "progress_bar", "rgb_root", "flow_root", "weights", "annotations",
                     "eval_every", "eval_videos", "eval_passes", "num_threads", "device",
                     "store")


@dataclass
class TrainConfig:
    """Every option of ``fieldlib charades train`` (``--help`` explains each)."""

    mode: str = "async"
    stream: str = "rgb"
    backbone: str = "small"
    backbone_norm: str = "batch"
    weights: str | None = None
    data: str = "synthetic"
    annotations: str | None = None
    rgb_root: str | None = None
    flow_root: str | None = None
    videos: int | None = 64
    image_size: int | None = None
    synthetic_snr: float = 2.0
    synthetic_seed: int = 0
    fps: float = 6.0
    batch_size: int = 32
    videos_per_batch: int = 3
    max_frames: int = 25
    accumulate: int = 1
    steps: int = 200
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mu_lr_scale: float = 0.01
    lr_milestones: list = field(default_factory=list)
    lr_gamma: float = 0.1
    n_intents: int = 30
    component: str = "object"
    scene_weight: float = 1.0
    detach_intent: bool = False
    dropout: float = 0.5
    drop: list = field(default_factory=list)
    sigma: float = 6.25
    inner_iterations: int = 5
    l2_intent: float = 4e-4
    discount: float = 0.9
    capacity: int = 50
    store: str = "replicated"
    scale: str = "frames"
    sync_max_iter: int = 50
    sync_tol: float = 1e-4
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    checkpoint_seconds: float = 120.0
    checkpoint_every: int = 0
    log_every: int = 1
    eval_every: int = 0
    eval_videos: int = 50
    eval_passes: int = 10
    progress_bar: bool = True
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def uses_temporal(self) -> bool:
        return self.mode != "none" and "temporal" not in self.drop

    @property
    def uses_intent(self) -> bool:
        return self.mode != "none" and "intent" not in self.drop

    @property
    def uses_progress(self) -> bool:
        return "progress" not in self.drop

    @property
    def frames_per_step(self) -> int:
        """Frames one optimiser step sees (all processes)."""
        per_batch = self.batch_size if self.mode != "sync" else \
            self.videos_per_batch * self.max_frames
        return per_batch * self.accumulate

    def validate(self) -> None:
        """FieldlibError naming the first bad option."""
        def bad(name, why):
            raise FieldlibError(f"train: --{name.replace('_', '-')} {why}")

        if self.mode not in MODES:
            bad("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.stream not in ("rgb", "flow"):
            bad("stream", f"must be rgb or flow, got {self.stream!r}")
        if self.backbone not in ("small", "vgg16"):
            bad("backbone", f"must be small or vgg16, got {self.backbone!r}")
        if self.backbone_norm not in ("batch", "group"):
            bad("backbone_norm", f"must be batch or group, got {self.backbone_norm!r}")
        if self.backbone_norm != "batch" and self.backbone != "small":
            bad("backbone_norm", f"applies to the small backbone only (VGG-16 has no "
                                 f"normalisation layers), got {self.backbone_norm!r} with "
                                 f"--backbone {self.backbone}")
        if self.store not in ("sharded", "replicated"):
            bad("store", f"must be sharded or replicated, got {self.store!r}")
        if self.component not in ("object", "object_progress"):
            bad("component", f"must be object or object_progress, got {self.component!r}")
        if self.dtype not in ("float32", "float64"):
            bad("dtype", f"must be float32 or float64, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", f"must be auto, cpu or cuda, got {self.device!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            bad("dropout", f"must lie in [0, 1), got {self.dropout!r}")
        if self.scale not in ("count", "frames"):
            try:
                float(self.scale)
            except ValueError:
                bad("scale", f"must be count, frames or a number, got {self.scale!r}")
        for name in ("batch_size", "videos_per_batch", "max_frames", "accumulate", "steps",
                     "n_intents", "inner_iterations", "capacity", "sync_max_iter",
                     "log_every", "eval_videos"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, f"must be an integer >= 1, got {value!r}")
        for name in ("checkpoint_every", "eval_every", "eval_passes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, f"must be an integer >= 0, got {getattr(self, name)!r}")
        if self.videos is not None and self.videos < 1:
            bad("videos", f"must be >= 1, got {self.videos}")
        for name in ("lr", "fps", "sigma", "sync_tol", "checkpoint_seconds", "synthetic_snr"):
            if not float(getattr(self, name)) > 0:
                bad(name, f"must be > 0, got {getattr(self, name)!r}")
        for name in ("momentum", "discount", "lr_gamma"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                bad(name, f"must lie in [0, 1], got {getattr(self, name)!r}")
        for name in ("weight_decay", "l2_intent", "scene_weight", "mu_lr_scale"):
            if not float(getattr(self, name)) >= 0:
                bad(name, f"must be >= 0, got {getattr(self, name)!r}")
        unknown = [d for d in self.drop if d not in ABLATIONS]
        if unknown:
            bad("drop", f"{unknown[0]!r} is not one of {', '.join(ABLATIONS)}")
        if sorted(self.lr_milestones) != list(self.lr_milestones) or any(
                int(m) < 1 for m in self.lr_milestones):
            bad("lr_milestones", f"must be increasing steps >= 1, got {self.lr_milestones}")

    # -- files ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict, what: str = "configuration") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - names)
        if unknown:
            raise FieldlibError(f"{what}: unknown option(s) {', '.join(unknown)}")
        return cls(**doc)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FieldlibError(f"{path}: not a readable configuration ({exc})") from None
        if not isinstance(doc, dict):
            raise FieldlibError(f"{path}: a configuration is a JSON object")
        return cls.from_dict(doc, str(path))

    def differences(self, other: TrainConfig) -> list[str]:
        """The options (not in :data:`RESUMABLE_CHANGES`) whose values differ."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]
