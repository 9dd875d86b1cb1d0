"""Frame labels, progress, frame sampling and the sparse frame state space B (MATH.md §1, §7-§9).

Conventions used throughout:

- A frame at time ``t`` (seconds) shows instance ``[s, e]`` when ``s <= t <= e`` (both ends
  inclusive, as the official localization scorer, MATH.md §8).
- Progress (MATH.md §7): the interval is cut into three equal parts by its *duration*
  ``d = e - s``: 0 = start for ``t < s + d/3``, 1 = middle for ``t < s + 2d/3``, 2 = end
  otherwise (the released Torch code divided by ``e`` instead, a bug not copied). A
  zero-length interval is all "middle".
- Training frames: ``t_k = k / fps`` for ``k = 0, 1, ...`` while ``t_k < length`` (the
  paper samples 8 fps); a frame is a training sample only inside an annotated interval.
- Test frames: 25 a video at the official localization time points
  ``t_k = ((k-1)/25) * length``, ``k = 1..25``, in float64 and in that operation order
  (MATH.md §8, Charades_v1_localize.m). The same points serve classification (video score =
  max over them, MATH.md §7).
- B: the (category, object, verb, progress) tuples seen in training frames, or (category,
  progress) without a class mapping (object/verb stored as -1). The scene is a separate
  factor: the frame variable ranges over B x S (MATH.md §1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fieldlib.errors import FieldlibError

from .annotations import Annotations, Video
from .labels import N_CLASSES, LabelSpace, Vocabulary, scene_vocabulary

PROGRESS_NAMES = ("start", "middle", "end")
N_PROGRESS = 3
#: Frames a test video is scored on (official scorer, MATH.md §8).
N_TEST_FRAMES = 25
#: Paper's training frame rate (frames per second).
TRAIN_FPS = 8.0
#: Frame rate of the official Charades_v1_rgb / _flow JPEG folders.
JPEG_FPS = 24.0


def progress_labels(times, start, end) -> np.ndarray:
    """Progress (0 start, 1 middle, 2 end) of time(s) inside ``[start, end]`` (MATH.md §7).

    Arguments broadcast against each other; returns int64 of the broadcast shape. Times
    outside the interval are clipped to the first or last third.
    """
    t = np.asarray(times, dtype=np.float64)
    s = np.asarray(start, dtype=np.float64)
    e = np.asarray(end, dtype=np.float64)
    d = e - s
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.floor(3.0 * (t - s) / d)
    p = np.where(d > 0, np.clip(np.nan_to_num(p, nan=1.0), 0, 2), 1.0)
    return p.astype(np.int64)


#: Most frames one video may have at a chosen fps (a guard against absurd rates).
MAX_FRAMES_PER_VIDEO = 2**31


def check_fps(fps, lengths=()) -> float:
    """``fps`` as a float; FieldlibError unless it is a finite number > 0 that gives at most
    :data:`MAX_FRAMES_PER_VIDEO` frames for the longest of ``lengths`` (seconds)."""
    if isinstance(fps, bool | str | bytes):
        raise FieldlibError(f"fps must be a number, not {fps!r}")
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise FieldlibError(f"fps must be a number, not {fps!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise FieldlibError(f"fps must be a finite number > 0, not {fps!r}")
    longest = float(np.max(lengths, initial=0.0))
    if longest * value > MAX_FRAMES_PER_VIDEO:
        raise FieldlibError(f"fps {value:g} gives {longest * value:.3g} frames for a video of "
                            f"{longest:g} s, above {MAX_FRAMES_PER_VIDEO:,}")
    return value


def frame_times(length: float, fps: float = TRAIN_FPS) -> np.ndarray:
    """Times ``k / fps`` (k = 0, 1, ...) with ``t < length`` (at least t = 0), float64 [T].

    Raises FieldlibError when ``fps`` is not a finite number > 0."""
    check_fps(fps, [length])
    n = max(1, int(np.ceil(length * fps)))
    t = np.arange(n, dtype=np.float64) / fps
    return t[(t < length) | (np.arange(n) == 0)]


def time_points(length: float, n: int = N_TEST_FRAMES) -> np.ndarray:
    """The official scorer's time points ``((k-1)/n) * length``, k = 1..n, float64 [n]."""
    return (np.arange(n, dtype=np.float64) / n) * np.float64(length)


def time_points_matrix(lengths, n: int = N_TEST_FRAMES) -> np.ndarray:
    """:func:`time_points` for many videos at once: float64 [n_videos, n] (same bits)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return (np.arange(n, dtype=np.float64) / n)[None, :] * lengths[:, None]


def frame_numbers(times, fps: float = JPEG_FPS, n_frames: int | None = None) -> np.ndarray:
    """1-based JPEG frame numbers for times: ``floor(t * fps) + 1``, clipped to
    ``[1, n_frames]``; int64 of the shape of ``times``."""
    f = np.floor(np.asarray(times, dtype=np.float64) * fps).astype(np.int64) + 1
    return np.clip(f, 1, n_frames if n_frames is not None else None)


def frame_labels(
    video: Video, times, n_classes: int = N_CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """All labels of each frame (for evaluation).

    Returns ``active`` bool [T, n_classes] and ``progress`` int64 [T, n_classes] (-1 where
    the class is inactive). When two instances of one class cover a frame, the progress is
    the one of the instance listed first in the CSV.
    """
    t = np.asarray(times, dtype=np.float64)
    active = np.zeros((t.size, n_classes), dtype=bool)
    progress = np.full((t.size, n_classes), -1, dtype=np.int64)
    for a in reversed(video.actions):  # first-listed instance written last, so it wins
        inside = (a.start <= t) & (t <= a.end)
        if inside.any():
            active[inside, a.cls] = True
            progress[inside, a.cls] = progress_labels(t[inside], a.start, a.end)
    return active, progress


def training_samples(
    video: Video, fps: float = TRAIN_FPS, *, one_per_frame: bool = False,
    rng: np.random.Generator | None = None, n_classes: int = N_CLASSES,
) -> dict[str, np.ndarray]:
    """Training samples of a video, one activity label each (MATH.md §7, §9).

    Frames at ``fps`` (see :func:`frame_times`) inside at least one annotated interval.
    ``one_per_frame=False`` gives one sample per (frame, active class), as the released
    code; ``True`` keeps one of a frame's classes drawn with ``rng`` (seeded by the caller).
    Returns int64/float64 arrays of one length n: ``frame`` (index into the fps grid),
    ``time``, ``cls``, ``progress``.
    """
    times = frame_times(video.length, fps)
    active, progress = frame_labels(video, times, n_classes)
    f, c = np.nonzero(active)
    if one_per_frame and f.size:
        rng = rng if rng is not None else np.random.default_rng(0)
        starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
        counts = np.diff(np.r_[starts, f.size])
        pick = starts + (rng.random(starts.size) * counts).astype(np.int64)
        f, c = f[pick], c[pick]
    return {"frame": f.astype(np.int64), "time": times[f], "cls": c.astype(np.int64),
            "progress": progress[f, c]}


def time_point_labels(annotations: Annotations, n: int = N_TEST_FRAMES,
                      n_classes: int = N_CLASSES) -> np.ndarray:
    """Localization ground truth: bool [n_videos * n, n_classes], rows video-major
    (video i, point k at row ``i * n + k``), positive when ``start <= t_k <= end``
    (inclusive, MATH.md §8). Vectorised over all instances."""
    times = time_points_matrix(annotations.lengths, n)
    tab = annotations.instance_table()
    labels = np.zeros((len(annotations) * n, n_classes), dtype=bool)
    if tab["cls"].size:
        t = times[tab["video"]]  # [n_inst, n]
        hit = (tab["start"][:, None] <= t) & (t <= tab["end"][:, None])
        inst, k = np.nonzero(hit)
        labels[tab["video"][inst] * n + k, tab["cls"][inst]] = True
    return labels


@dataclass(frozen=True)
class StateSpace:
    """The sparse frame state space B (MATH.md §1) and the scene vocabulary S.

    ``states``: int64 [|B|, 4], columns (category, object, verb, progress), sorted by
    (category, progress); object and verb are -1 without a class mapping. ``counts``: int64
    [|B|], training frames per state. ``lookup``: int64 [n_classes, 3], the row of
    (category, progress) in ``states`` or -1 (object and verb follow from the category).
    """

    labels: LabelSpace
    states: np.ndarray
    counts: np.ndarray
    scenes: Vocabulary
    lookup: np.ndarray
    fps: float

    @property
    def size(self) -> int:
        """|B|."""
        return int(self.states.shape[0])

    @property
    def n_scenes(self) -> int:
        return len(self.scenes)

    @property
    def joint_size(self) -> int:
        """|B| x |S|: the states of one frame variable."""
        return self.size * self.n_scenes

    def index(self, cls, progress) -> np.ndarray:
        """State rows for arrays of classes and progress values (-1 when not in B)."""
        return self.lookup[np.asarray(cls, dtype=np.int64), np.asarray(progress, dtype=np.int64)]

    def _indicator(self, column: int, size: int) -> np.ndarray:
        out = np.zeros((size, self.size), dtype=bool)
        keep = self.states[:, column] >= 0
        out[self.states[keep, column], np.flatnonzero(keep)] = True
        return out

    def class_matrix(self) -> np.ndarray:
        """bool [n_classes, |B|]: state b belongs to class c. A class score is the sum of
        Q over its states (and scenes), MATH.md §9."""
        return self._indicator(0, self.labels.n_classes)

    def object_matrix(self) -> np.ndarray:
        """bool [n_objects, |B|]; raises FieldlibError without a class mapping."""
        if not self.labels.has_mapping:
            raise FieldlibError("no class -> object mapping: frames are category-only")
        return self._indicator(1, len(self.labels.objects))

    def verb_matrix(self) -> np.ndarray:
        """bool [n_verbs, |B|]; raises FieldlibError without a class mapping."""
        if not self.labels.has_mapping:
            raise FieldlibError("no class -> verb mapping: frames are category-only")
        return self._indicator(2, len(self.labels.verbs))

    def progress_matrix(self) -> np.ndarray:
        """bool [3, |B|]."""
        return self._indicator(3, N_PROGRESS)

    def summary(self) -> dict:
        """Plain-number description used by ``fieldlib charades info``."""
        return {
            "mapping": "derived" if self.labels.derived else
                       ("file" if self.labels.has_mapping else "none"),
            "fps": self.fps,
            "B": self.size,
            "S": self.n_scenes,
            "B_x_S": self.joint_size,
            "classes_in_B": int(np.unique(self.states[:, 0]).size),
            "training_frames": int(self.counts.sum()),
        }


def frame_class_table(
    annotations: Annotations, fps: float = TRAIN_FPS, n_classes: int = N_CLASSES
) -> dict[str, np.ndarray]:
    """Every (video, training frame, active class) of a set of videos, vectorised.

    Equals the concatenation of :func:`training_samples` (``one_per_frame=False``) over the
    videos, in (video, frame, class) order. Returns int64 arrays ``video`` (row in
    ``annotations``), ``frame``, ``cls``, ``progress`` and float64 ``time``, all [n].
    """
    check_fps(fps, annotations.lengths)
    tab = annotations.instance_table()
    lengths = annotations.lengths
    n = np.maximum(1, np.ceil(lengths * fps)).astype(np.int64)
    last_ok = ((n - 1) / fps < lengths) | (n == 1)  # frame_times keeps t < length (or t = 0)
    n_frames = np.where(last_ok, n, n - 1)
    vid, s, e = tab["video"], tab["start"], tab["end"]
    lo = np.maximum(0, np.floor(s * fps).astype(np.int64) - 1)
    hi = np.minimum(n_frames[vid] - 1, np.ceil(np.minimum(e, lengths[vid]) * fps)
                    .astype(np.int64) + 1)
    count = np.maximum(hi - lo + 1, 0)
    inst = np.repeat(np.arange(vid.size), count)
    k = lo[inst] + np.arange(inst.size) - np.repeat(np.cumsum(count) - count, count)
    t = k / fps
    ok = (s[inst] <= t) & (t <= e[inst])
    inst, k, t = inst[ok], k[ok], t[ok]
    v, c = vid[inst], tab["cls"][inst]
    key = (v * (int(n_frames.max(initial=1)) + 1) + k) * n_classes + c
    _, first = np.unique(key, return_index=True)  # sorted keys; first-listed instance wins
    inst, k, t, v, c = inst[first], k[first], t[first], v[first], c[first]
    return {"video": v, "frame": k, "time": t, "cls": c,
            "progress": progress_labels(t, s[inst], e[inst])}


def build_state_space(
    annotations: Annotations, labels: LabelSpace, fps: float = TRAIN_FPS,
    scenes: Vocabulary | None = None,
) -> StateSpace:
    """Collect B from the training videos' frames at ``fps`` (one count per (frame, class)).

    ``scenes`` defaults to the distinct scene strings of these videos.
    """
    table = frame_class_table(annotations, fps, labels.n_classes)
    counts = np.bincount(table["cls"] * N_PROGRESS + table["progress"],
                         minlength=labels.n_classes * N_PROGRESS)
    counts = counts.reshape(labels.n_classes, N_PROGRESS).astype(np.int64)
    c, p = np.nonzero(counts)
    if labels.has_mapping:
        o, a = labels.class_object[c], labels.class_verb[c]
    else:
        o = a = np.full(c.size, -1, dtype=np.int64)
    states = np.stack([c, o, a, p], axis=1).astype(np.int64)
    lookup = np.full((labels.n_classes, N_PROGRESS), -1, dtype=np.int64)
    lookup[c, p] = np.arange(c.size)
    if scenes is None:
        scenes = scene_vocabulary([v.scene for v in annotations])
    return StateSpace(labels, states, counts[c, p], scenes, lookup, float(fps))
