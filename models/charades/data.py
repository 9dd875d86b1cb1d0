"""Training data of the Charades model: annotation rows, the state space, a frame source, and
batches of sampled frames (asynchronous training) or whole videos (synchronous training).

Annotations come from ``--annotations DIR`` (``Charades_v1_train.csv``,
``Charades_v1_test.csv``, ``Charades_v1_classes.txt``, and the mapping files when present), or
by default from the project's ``../shared/data/charades`` when it exists, else from the rows
bundled with the package (``models/charades/data``: an excerpt of the official files). Frames
are synthetic (:class:`SyntheticCharades`, from the annotation rows) or the official JPEG
folders (:class:`FolderSource`).

Samples (MATH.md §7, §9): frames at ``fps`` (paper: every 4th frame at 24 fps, 6 fps) inside
annotated intervals, one sample per (frame, active class) as the released code. The frame
state of a sample is ``b * S + s`` (models/charades/crf.py) with b the row of (class,
progress) in B and s the video's scene. Whole videos for synchronous training are a video's
labelled frames at ``fps`` (one label a frame: the lowest class id active there), at most
``max_frames`` of them spread evenly.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fieldlib.errors import FieldlibError

from .annotations import Annotations, read_annotations
from .crf import collapse_progress, frame_state
from .datasets import FolderSource, SyntheticSource
from .labels import LabelSpace, load_labels, scene_vocabulary
from .statespace import JPEG_FPS, StateSpace, build_state_space, frame_class_table, frame_numbers
from .synthetic import SyntheticCharades, SyntheticConfig

__all__ = ["TrainingData", "annotation_files", "bundled_annotations", "load_training_data"]

TRAIN_CSV, TEST_CSV, CLASSES = ("Charades_v1_train.csv", "Charades_v1_test.csv",
                                "Charades_v1_classes.txt")
MAPPING_FILES = ("Charades_v1_mapping.txt", "Charades_v1_objectclasses.txt",
                 "Charades_v1_verbclasses.txt")


def bundled_annotations() -> dict[str, Path]:
    """The excerpt shipped with the package (models/charades/data/README.md)."""
    root = Path(__file__).resolve().parent / "data"
    return {"train": root / "Charades_v1_train_excerpt.csv",
            "test": root / "Charades_v1_test_excerpt.csv", "classes": root / CLASSES}


def annotation_files(folder: str | None = None) -> dict[str, Path]:
    """``{"train", "test", "classes"[, "mapping", "objects", "verbs"]}``: the annotation files
    of ``folder``, or of the default place (module docstring). FieldlibError when a given
    folder lacks the train CSV."""
    if folder is None:
        env = os.environ.get("FIELDLIB_CHARADES")
        shared = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "charades"
        for candidate in (env, shared):
            if candidate and (Path(candidate) / TRAIN_CSV).is_file():
                folder = str(candidate)
                break
        else:
            return bundled_annotations()
    root = Path(folder)
    if not (root / TRAIN_CSV).is_file():
        raise FieldlibError(f"--annotations {folder}: no {TRAIN_CSV} there")
    out = {"train": root / TRAIN_CSV, "test": root / TEST_CSV, "classes": root / CLASSES}
    if all((root / m).is_file() for m in MAPPING_FILES):
        out.update(zip(("mapping", "objects", "verbs"), (root / m for m in MAPPING_FILES)))
    return out


def _first(annotations: Annotations, n: int | None) -> Annotations:
    """The first ``n`` videos with at least one action (file order)."""
    videos = [v for v in annotations if v.actions]
    return Annotations(videos[:n] if n is not None else videos, annotations.path)


@dataclass
class TrainingData:
    """What a run trains on (:func:`load_training_data`).

    Attributes:
        train, test: the annotation rows in use (training videos with actions).
        labels: classes with a class -> object/verb mapping (the files', else derived).
        space: the state space B x S of the training videos (collapsed over progress when
            the progress term is dropped).
        source: frames (``rgb`` / ``flow`` methods); stream: which one; size: frame side.
        frames: the samples, int64/float64 arrays ``video``, ``frame``, ``time``, ``cls``,
            ``progress``, ``state`` (frame state b * S + s), all (n,).
        fps: the sampling rate.
    """

    train: Annotations
    test: Annotations
    labels: LabelSpace
    space: StateSpace
    source: object
    stream: str
    frames: dict
    fps: float

    def __len__(self) -> int:
        return int(self.frames["state"].size)

    def images(self, video_rows: np.ndarray, times: np.ndarray) -> torch.Tensor:
        """``(B, C, H, W)`` float32 frames of the stream at the given (video row, time)
        pairs: the whole batch in one call of a source that renders many videos at once
        (``render_many``: the synthetic frames), else video by video (all of one video's
        frames in one call: a folder of JPEGs)."""
        if hasattr(self.source, "render_many"):
            videos = [self.train[int(r)] for r in video_rows]
            n_frames = np.array([self.source.n_frames(v) for v in videos], dtype=np.int64)
            return self.source.render_many(self.stream, videos,
                                           frame_numbers(times, JPEG_FPS, n_frames))
        out = [None] * len(video_rows)
        order = np.argsort(video_rows, kind="stable")
        rows = video_rows[order]
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], rows.size]):
            video = self.train[int(rows[a])]
            idx = order[a:b]
            numbers = frame_numbers(times[idx], JPEG_FPS, self.source.n_frames(video))
            frames = getattr(self.source, self.stream)(video, numbers)
            for k, i in enumerate(idx):
                out[i] = frames[k]
        return torch.stack(out)

    def frame_batch(self, index: np.ndarray) -> dict:
        """Samples ``index`` (n,): ``images (n, C, H, W)``, ``seq`` (video rows), ``frame``
        (position on the fps grid), ``time`` (seconds), ``state`` (frame states), all (n,)."""
        f = {k: v[index] for k, v in self.frames.items()}
        return {"images": self.images(f["video"], f["time"]),
                "seq": torch.from_numpy(f["video"]), "frame": torch.from_numpy(f["frame"]),
                "time": torch.from_numpy(f["time"]), "state": torch.from_numpy(f["state"])}

    def video_items(self) -> np.ndarray:
        """Rows of the training videos that have labelled frames (the sync sampler's items)."""
        return np.unique(self.frames["video"])

    @functools.cached_property
    def labelled_frames(self) -> np.ndarray:
        """Rows of ``frames`` holding each (video, frame)'s first label: the samples are in
        (video, frame, class) order, so the lowest class id active there."""
        v, fr = self.frames["video"], self.frames["frame"]
        return np.flatnonzero(np.r_[True, (v[1:] != v[:-1]) | (fr[1:] != fr[:-1])])

    def video_batch(self, videos: np.ndarray, max_frames: int) -> dict:
        """Whole videos (their labelled frames, one label a frame, at most ``max_frames``
        spread evenly as ``np.linspace``): ``images (N*T, C, H, W)`` video-major, ``time (N,
        T)`` (padding repeats the last real time), ``state (N, T)`` (-1 on padding), ``mask
        (N, T)``, ``seq (N,)``, padded to the longest. One program for the batch."""
        f, first = self.frames, self.labelled_frames
        videos = np.asarray(videos, dtype=np.int64)
        owner = f["video"][first]
        lo = np.searchsorted(owner, videos, "left")
        count = np.searchsorted(owner, videos, "right") - lo
        if (count == 0).any():
            raise FieldlibError(f"video_batch: video row {int(videos[count == 0][0])} has no "
                                f"labelled frame")
        m = np.minimum(count, max_frames)
        k = np.minimum(np.arange(int(m.max()))[None, :], (m - 1)[:, None])  # padding: last
        step = (count - 1) / np.maximum(m - 1, 1)
        spread = np.round(k * step[:, None]).astype(np.int64)
        rows = first[lo[:, None] + np.where((count > max_frames)[:, None], spread, k)]
        mask = np.arange(k.shape[1])[None, :] < m[:, None]
        time = f["time"][rows]
        state = np.where(mask, f["state"][rows], -1)
        real = rows[mask]
        images = self.images(f["video"][real], f["time"][real])
        full = images.new_zeros(mask.size, *images.shape[1:])
        full[torch.from_numpy(mask.reshape(-1))] = images
        return {"images": full, "time": torch.from_numpy(time),
                "state": torch.from_numpy(state), "mask": torch.from_numpy(mask),
                "seq": torch.from_numpy(videos)}


def load_training_data(config) -> TrainingData:
    """The data of a :class:`~fieldlib.models.charades.config.TrainConfig`: annotation rows,
    labels (derived mapping without the mapping files), state space, frame source, samples."""
    files = annotation_files(config.annotations)
    train = _first(read_annotations(files["train"], reversed_intervals="swap"), config.videos)
    test = (_first(read_annotations(files["test"], reversed_intervals="swap"), None)
            if files["test"].is_file() else Annotations([], ""))
    labels = load_labels(files["classes"] if files["classes"].is_file() else None,
                         files.get("mapping"), files.get("objects"), files.get("verbs"))
    if not labels.has_mapping:
        labels = labels.with_derived_mapping()
    scenes = scene_vocabulary([v.scene for v in train])
    space = build_state_space(train, labels, fps=config.fps, scenes=scenes)
    if not config.uses_progress:
        space = collapse_progress(space)
    size = config.image_size or (224 if config.backbone == "vgg16" else 32)
    if config.data == "synthetic":
        gen = SyntheticCharades(labels, scenes, SyntheticConfig(
            size=size, snr=config.synthetic_snr, seed=config.synthetic_seed))
        source = SyntheticSource(gen)
    else:
        root = Path(config.data)
        rgb = config.rgb_root or root / "Charades_v1_rgb"
        flow = config.flow_root or root / "Charades_v1_flow"
        frames_root = Path(rgb if config.stream == "rgb" else flow)
        if not frames_root.is_dir():
            raise FieldlibError(f"--data {config.data}: no {config.stream} frame folder "
                                f"{frames_root} (expected the official Charades_v1_"
                                f"{config.stream}/<ID>/<ID>-000001.jpg layout)")
        source = FolderSource(rgb if config.stream == "rgb" else None,
                              flow if config.stream == "flow" else None, size=size)
    table = frame_class_table(train, config.fps, labels.n_classes)
    b = space.lookup[table["cls"], table["progress"] if config.uses_progress else 0]
    scene = np.array([space.scenes.get(v.scene, -1) for v in train], dtype=np.int64)
    state = frame_state(torch.from_numpy(b), torch.from_numpy(scene[table["video"]]), space)
    frames = {"video": table["video"].astype(np.int64), "frame": table["frame"].astype(np.int64),
              "time": table["time"].astype(np.float64), "cls": table["cls"].astype(np.int64),
              "state": state.numpy()}
    if (frames["state"] < 0).any():
        raise FieldlibError("training data: a sample's (class, progress) is not in B")
    if not len(frames["state"]):
        raise FieldlibError("training data: no training frames (no annotated intervals)")
    return TrainingData(train, test, labels, space, source, config.stream, frames,
                        float(config.fps))
