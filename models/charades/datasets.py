"""torch Datasets over Charades videos: (video, frame) samples for asynchronous training and
whole videos for synchronous training and testing (MATH.md §7, §9).

Frames come from a *source*:

- :class:`FolderSource` reads the official JPEG layouts when the user has them:
  ``Charades_v1_rgb/<ID>/<ID>-000001.jpg`` (24 fps, 1-based, 6 digits) and
  ``Charades_v1_flow/<ID>/<ID>-000001x.jpg`` / ``...y.jpg`` (one grayscale image per flow
  axis). A flow stack for frame f is frames f..f+9 (clipped to the last), channels
  (x_f, y_f, x_f+1, y_f+1, ...), 20 in all. Pixels become ``(v / 255 - mean) / std``
  (defaults 0.5 and 0.125), optionally resized to ``size`` x ``size``.
- :class:`SyntheticSource` renders frames with :class:`SyntheticCharades`.

Time ``t`` (seconds) maps to the JPEG frame ``floor(24 t) + 1`` (clipped to the video's
frames); at the paper's 8 fps that frame is exactly at ``t``.

Sample keys (all tensors unless noted; streams not requested are absent):

========== ====================== ===========================================================
key        shape / dtype          meaning
========== ====================== ===========================================================
rgb        [3, H, W] float32      RGB frame
flow       [20, H, W] float32     flow stack
label      [] int64               the sample's one activity class (CharadesFrames)
object     [] int64               its object (-1 without a class mapping)
verb       [] int64               its verb (-1 without a class mapping)
progress   [] int64               0 start, 1 middle, 2 end (MATH.md §7)
state      [] int64               row of (label, progress) in B, -1 if absent/no state space
scene      [] int64               scene index (-1 if the scene is unknown)
labels     [157] bool             every class active at this time
time       [] float64             seconds
frame      [] int64               1-based JPEG frame number
video      str                    video id
index      [] int64               the video's row in the annotations
========== ====================== ===========================================================

:class:`CharadesVideos` gives the same keys with a leading time axis [T, ...] (``label``,
``object``, ``verb``, ``progress``, ``state``: one label a frame, the first-listed active
instance, -1 where nothing is active; ``labels`` [T, 157]; ``progress_all`` [T, 157] with -1
where inactive) plus ``video_labels`` [157] bool and ``length`` [] float64;
:func:`collate_videos` pads a batch to the longest video and adds ``mask`` [B, T] bool.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from fieldlib.errors import FieldlibError, FormatError

from .annotations import Annotations, Video
from .labels import LabelSpace, Vocabulary
from .statespace import (
    JPEG_FPS,
    N_TEST_FRAMES,
    TRAIN_FPS,
    StateSpace,
    frame_class_table,
    frame_labels,
    frame_numbers,
    frame_times,
    time_points,
)
from .synthetic import FLOW_CHANNELS, SyntheticCharades

STREAMS = ("rgb", "flow")


class SyntheticSource:
    """Frames from a :class:`SyntheticCharades` generator (24 fps numbering)."""

    def __init__(self, generator: SyntheticCharades) -> None:
        self.generator = generator

    def n_frames(self, video: Video) -> int:
        return self.generator.n_frames(video)

    def rgb(self, video: Video, frames) -> torch.Tensor:
        return self.generator.rgb(video, frames)

    def flow(self, video: Video, frames) -> torch.Tensor:
        return self.generator.flow(video, frames)

    def render_many(self, stream: str, videos, frames) -> torch.Tensor:
        """One frame of each (video, frame number) pair, the batch in one program
        (:meth:`SyntheticCharades.render_many`)."""
        return self.generator.render_many(stream, videos, frames)


class FolderSource:
    """Frames from the official JPEG folders (either root may be ``None`` if unused).

    ``n_frames`` counts ``<ID>-NNNNNN.jpg`` in the RGB folder (or the ``x`` files of the
    flow folder). Raises FieldlibError when a video's folder or a frame file is missing.
    """

    def __init__(self, rgb_root: str | Path | None = None, flow_root: str | Path | None = None,
                 *, size: int | None = None, mean: float = 0.5, std: float = 0.125) -> None:
        self.rgb_root = Path(rgb_root) if rgb_root is not None else None
        self.flow_root = Path(flow_root) if flow_root is not None else None
        self.size, self.mean, self.std = size, mean, std
        self._counts: dict[str, int] = {}

    def n_frames(self, video: Video) -> int:
        if video.id not in self._counts:
            if self.rgb_root is not None:
                folder, suffix = self.rgb_root / video.id, ".jpg"
            elif self.flow_root is not None:
                folder, suffix = self.flow_root / video.id, "x.jpg"
            else:
                raise FieldlibError("FolderSource has neither an rgb nor a flow root")
            try:
                names = os.listdir(folder)
            except OSError as exc:
                raise FieldlibError(f"no frame folder for video {video.id}: {folder}") from exc
            prefix = video.id + "-"
            n = sum(1 for x in names if x.startswith(prefix) and x.endswith(suffix)
                    and len(x) == len(prefix) + 6 + len(suffix)
                    and x[len(prefix):len(prefix) + 6].isdigit())
            if n == 0:
                raise FieldlibError(f"no frames for video {video.id} in {folder}")
            self._counts[video.id] = n
        return self._counts[video.id]

    def _load(self, path: Path, mode: str) -> np.ndarray:
        from PIL import Image  # pillow comes with torchvision

        try:
            with Image.open(path) as im:
                return np.asarray(im.convert(mode), dtype=np.float32)
        except FileNotFoundError:
            raise FieldlibError(f"missing frame {path}") from None
        except OSError as exc:
            raise FormatError(f"{path}: not a readable image: {exc}") from exc

    def _finish(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        t = (t / 255.0 - self.mean) / self.std
        if self.size is not None and tuple(t.shape[-2:]) != (self.size, self.size):
            t = F.interpolate(t, size=(self.size, self.size), mode="bilinear",
                              align_corners=False)
        return t

    def rgb(self, video: Video, frames) -> torch.Tensor:
        """float32 [T, 3, H, W]."""
        if self.rgb_root is None:
            raise FieldlibError("FolderSource has no rgb root")
        folder = self.rgb_root / video.id
        imgs = [self._load(folder / f"{video.id}-{int(f):06d}.jpg", "RGB") for f in frames]
        return self._finish(np.stack(imgs).transpose(0, 3, 1, 2).copy())

    def flow(self, video: Video, frames) -> torch.Tensor:
        """float32 [T, 20, H, W]: frames f..f+9 (clipped), channels x, y alternating."""
        if self.flow_root is None:
            raise FieldlibError("FolderSource has no flow root")
        folder = self.flow_root / video.id
        last = self._flow_count(video)
        stacks = []
        for f in frames:
            chans = []
            for j in range(FLOW_CHANNELS // 2):
                g = min(int(f) + j, last)
                chans.append(self._load(folder / f"{video.id}-{g:06d}x.jpg", "L"))
                chans.append(self._load(folder / f"{video.id}-{g:06d}y.jpg", "L"))
            stacks.append(np.stack(chans))
        return self._finish(np.stack(stacks))

    def _flow_count(self, video: Video) -> int:
        key = "flow:" + video.id
        if key not in self._counts:
            folder = self.flow_root / video.id
            try:
                names = os.listdir(folder)
            except OSError as exc:
                raise FieldlibError(f"no flow folder for video {video.id}: {folder}") from exc
            self._counts[key] = max(1, sum(1 for x in names if x.endswith("x.jpg")))
        return self._counts[key]


def _check_streams(streams) -> tuple[str, ...]:
    streams = tuple(streams)
    bad = [s for s in streams if s not in STREAMS]
    if bad or not streams:
        raise FieldlibError(f"streams must be a non-empty subset of {STREAMS}, not {streams}")
    return streams


class CharadesFrames(Dataset):
    """(video, frame) samples for asynchronous training: frames at ``fps`` (paper: 8) inside
    annotated intervals, one activity label a sample (MATH.md §7, §9).

    ``one_per_frame=False`` gives one sample per (frame, active class), as the released
    code; ``True`` keeps one class per frame, drawn once with ``seed``. Keys: see the module
    docstring. ``len`` is the number of samples.
    """

    def __init__(self, annotations: Annotations, source, labels: LabelSpace,
                 scenes: Vocabulary, *, fps: float = TRAIN_FPS, streams=STREAMS,
                 state_space: StateSpace | None = None, one_per_frame: bool = False,
                 seed: int = 0) -> None:
        self.annotations, self.source, self.labels, self.scenes = (annotations, source,
                                                                   labels, scenes)
        self.streams = _check_streams(streams)
        self.state_space = state_space
        self.fps = fps
        t = frame_class_table(annotations, fps, labels.n_classes)
        if one_per_frame and t["cls"].size:
            grp = np.flatnonzero(np.r_[True, (np.diff(t["video"]) != 0)
                                       | (np.diff(t["frame"]) != 0)])
            counts = np.diff(np.r_[grp, t["cls"].size])
            rng = np.random.default_rng(seed)
            pick = grp + (rng.random(grp.size) * counts).astype(np.int64)
            t = {k: v[pick] for k, v in t.items()}
        compact = {"video": np.int32, "frame": np.int32, "cls": np.int16, "progress": np.int8}
        self.table = {k: v.astype(compact.get(k, v.dtype)) for k, v in t.items()}

    def __len__(self) -> int:
        return int(self.table["cls"].size)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = {k: v[i] for k, v in self.table.items()}
        video = self.annotations[int(row["video"])]
        c = int(row["cls"])
        p = int(row["progress"])
        t = float(row["time"])
        frame = int(frame_numbers(t, JPEG_FPS, self.source.n_frames(video)))
        active, _ = frame_labels(video, [t], self.labels.n_classes)
        out = {s: getattr(self.source, s)(video, [frame])[0] for s in self.streams}
        lab = self.labels
        out.update({
            "label": torch.tensor(c),
            "object": torch.tensor(int(lab.class_object[c]) if lab.has_mapping else -1),
            "verb": torch.tensor(int(lab.class_verb[c]) if lab.has_mapping else -1),
            "progress": torch.tensor(p),
            "state": torch.tensor(int(self.state_space.lookup[c, p])
                                  if self.state_space is not None else -1),
            "scene": torch.tensor(self.scenes.get(video.scene, -1)),
            "labels": torch.from_numpy(active[0]),
            "time": torch.tensor(t, dtype=torch.float64),
            "frame": torch.tensor(frame),
            "video": video.id,
            "index": torch.tensor(int(row["video"])),
        })
        return out


class CharadesVideos(Dataset):
    """Whole videos for synchronous training and testing.

    ``times="test"`` samples the official 25 time points ``((k-1)/25) * length`` (MATH.md
    §8); a number samples frames at that many fps (:func:`frame_times`), keeping at most
    ``max_frames`` evenly spread ones when given. Keys: see the module docstring.
    """

    def __init__(self, annotations: Annotations, source, labels: LabelSpace,
                 scenes: Vocabulary, *, times: str | float = "test", max_frames: int | None = None,
                 streams=STREAMS, state_space: StateSpace | None = None,
                 n_test: int = N_TEST_FRAMES) -> None:
        if times != "test" and not (isinstance(times, (int, float)) and times > 0):
            raise FieldlibError(f"times must be 'test' or a positive fps, not {times!r}")
        self.annotations, self.source, self.labels, self.scenes = (annotations, source,
                                                                   labels, scenes)
        self.streams = _check_streams(streams)
        self.times, self.max_frames, self.n_test = times, max_frames, n_test
        self.state_space = state_space

    def __len__(self) -> int:
        return len(self.annotations)

    def sample_times(self, video: Video) -> np.ndarray:
        """The times (seconds, float64 [T]) this dataset samples from ``video``."""
        if self.times == "test":
            return time_points(video.length, self.n_test)
        t = frame_times(video.length, float(self.times))
        if self.max_frames is not None and t.size > self.max_frames:
            t = t[np.linspace(0, t.size - 1, self.max_frames).round().astype(np.int64)]
        return t

    def __getitem__(self, i: int) -> dict:
        video = self.annotations[i]
        times = self.sample_times(video)
        frames = frame_numbers(times, JPEG_FPS, self.source.n_frames(video))
        active, progress = frame_labels(video, times, self.labels.n_classes)
        first = _first_active(video, times)
        prog1 = np.where(first >= 0, progress[np.arange(times.size), np.maximum(first, 0)], -1)
        lab = self.labels
        safe = np.maximum(first, 0)
        obj = np.where(first >= 0, lab.class_object[safe], -1) if lab.has_mapping else \
            np.full(times.size, -1)
        verb = np.where(first >= 0, lab.class_verb[safe], -1) if lab.has_mapping else \
            np.full(times.size, -1)
        state = (np.where(first >= 0, self.state_space.lookup[safe, np.maximum(prog1, 0)], -1)
                 if self.state_space is not None else np.full(times.size, -1))
        out = {s: getattr(self.source, s)(video, frames) for s in self.streams}
        video_labels = np.zeros(lab.n_classes, dtype=bool)
        video_labels[[a.cls for a in video.actions]] = True
        out.update({
            "label": torch.from_numpy(first.astype(np.int64)),
            "object": torch.from_numpy(np.asarray(obj, dtype=np.int64)),
            "verb": torch.from_numpy(np.asarray(verb, dtype=np.int64)),
            "progress": torch.from_numpy(prog1.astype(np.int64)),
            "state": torch.from_numpy(np.asarray(state, dtype=np.int64)),
            "progress_all": torch.from_numpy(progress),
            "labels": torch.from_numpy(active),
            "scene": torch.tensor(self.scenes.get(video.scene, -1)),
            "time": torch.from_numpy(times),
            "frame": torch.from_numpy(frames),
            "video_labels": torch.from_numpy(video_labels),
            "length": torch.tensor(video.length, dtype=torch.float64),
            "video": video.id,
            "index": torch.tensor(i),
        })
        return out


def _first_active(video: Video, times: np.ndarray) -> np.ndarray:
    """Class of the first-listed instance covering each time, -1 where none: int64 [T]."""
    out = np.full(times.size, -1, dtype=np.int64)
    for a in reversed(video.actions):
        out[(a.start <= times) & (times <= a.end)] = a.cls
    return out


#: Padding value of each per-frame key in :func:`collate_videos` (others pad with 0/False).
_PAD = {"label": -1, "object": -1, "verb": -1, "progress": -1, "state": -1,
        "progress_all": -1, "frame": 0, "time": 0.0}


def collate_videos(batch: list[dict]) -> dict:
    """Pad whole videos to the longest: per-frame tensors become [B, T_max, ...] padded
    (-1 for label-like keys, 0 / False otherwise), ``mask`` [B, T_max] bool marks real
    frames, ``video`` is a list of ids, the rest is stacked."""
    if not batch:
        raise FieldlibError("empty batch")
    lengths = [b["time"].shape[0] for b in batch]
    t_max = max(lengths)
    per_frame = [k for k, v in batch[0].items()
                 if isinstance(v, torch.Tensor) and v.dim() >= 1 and k not in ("video_labels",)]
    out: dict = {}
    for k in per_frame:
        first = batch[0][k]
        pad = torch.full((len(batch), t_max, *first.shape[1:]), _PAD.get(k, 0),
                         dtype=first.dtype)
        for j, b in enumerate(batch):
            pad[j, : lengths[j]] = b[k]
        out[k] = pad
    out["mask"] = torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]
    rest = [k for k in batch[0] if k not in per_frame]
    out.update(default_collate([{k: b[k] for k in rest} for b in batch]))
    return out
