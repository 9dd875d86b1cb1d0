"""Readers and writers for the official Charades submission files (MATH.md §8).

Formats, one row a line:

- classification: ``id s_1 ... s_157`` (157 class scores, column k is class c(k-1));
- localization: ``id frame s_1 ... s_157`` with ``frame`` in 1..25, the k-th time point
  ``((k-1)/25) * length`` of the video.

The official scripts split a line on tabs when it has them, else on single spaces; accept
157 or 158 score fields and use the first 157 (a 158th is typically the empty field after a
trailing separator); keep the last line of a repeated key; ignore ids (and frames) that are
not in the ground truth; and in localization add 1 to every frame number when the smallest
is 0. Missing rows score -inf.

``lenient=False`` (default) is stricter and raises :class:`fieldlib.errors.FormatError`
naming the file and line for: a wrong number of fields, an empty field (two separators in
a row), a score that is not a number or is NaN, an id not in the ground truth, a duplicate
row, a frame outside 1..25 (including 0-based frames). Every file it accepts is scored
exactly as the official script scores it.

``lenient=True`` accepts what the official reader accepts (158 score fields, 0-based frames,
last duplicate wins, unknown ids and out-of-range frames ignored, NaN scores, which the
official ``sort(-conf)`` ranks after every number including -inf) and lists each kind of
thing it tolerated in :attr:`Submission.tolerated`. Fields that are not numbers at all are
errors in both modes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldlib.errors import FieldlibError, FormatError, ShapeError

from .labels import N_CLASSES, read_text
from .statespace import N_TEST_FRAMES

TASKS = ("classify", "localize")
_INT = re.compile(r"[+-]?\d+")
#: Frame numbers beyond this are out of range whatever n_frames is (and fit int64).
_FRAME_CAP = 2**62


@dataclass
class Submission:
    """Parsed submission rows (after duplicates are resolved and ignored rows removed).

    ``ids``: list [n] of video ids; ``frames``: int64 [n] 1-based frame numbers
    (localization) or ``None``; ``scores``: float64 [n, n_classes]; ``lines``: int64 [n],
    the file line each row came from; ``tolerated``: what lenient mode accepted, one
    message a kind.
    """

    task: str
    ids: list[str]
    scores: np.ndarray
    frames: np.ndarray | None = None
    lines: np.ndarray | None = None
    tolerated: list[str] = field(default_factory=list)
    path: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def _first(lines: list[int], k: int = 3) -> str:
    shown = ", ".join(str(n) for n in lines[:k])
    return f"line {shown}" if len(lines) == 1 else f"lines {shown}" + (
        ", ..." if len(lines) > k else "")


def _parse_scores(texts: list[str], line_nos: list[int], path, n_classes: int) -> np.ndarray:
    """Parse space-separated score strings (one a row) into float64 [n, n_classes]. Numbers
    follow float(): numpy's C reader first, then a per-field pass naming the first bad one."""
    if not texts:
        return np.zeros((0, n_classes), dtype=np.float64)
    try:
        out = np.loadtxt(texts, dtype=np.float64, delimiter=" ", comments=None, ndmin=2,
                         quotechar=None)
        if out.shape == (len(texts), n_classes):
            return out
    except ValueError:
        pass
    out = np.empty((len(texts), n_classes), dtype=np.float64)
    for r, (text, n) in enumerate(zip(texts, line_nos)):
        for k, tok in enumerate(text.split(" ")):
            try:
                out[r, k] = float(tok)
            except ValueError:
                raise FormatError(f"{path}: line {n}: score field {k + 1}: {tok!r} is not a "
                                  "number") from None
    return out


def _unknown_message(path, n: int, vid: str) -> str:
    return (f"{path}: line {n}: field id: unknown video {vid!r} (not in the ground truth; "
            "--lenient ignores it as the official scorer)")


def _scan_lines(text, path, head, expected, known_ids, lenient, n_classes, n_frames):
    """Careful per-line scan: tabs or single spaces, 158-field rows, error messages."""
    localize = head == 2
    ids: list[str] = []
    frames: list[int] = []
    texts: list[str] = []
    line_nos: list[int] = []
    extra_field: list[int] = []
    unknown: list[int] = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        sep = "\t" if "\t" in line else " "
        n_fields = line.count(sep) + 1
        if n_fields == expected + 1 and lenient:
            extra_field.append(n)
            line = line.rsplit(sep, 1)[0]
        elif n_fields != expected:
            more = (" (a trailing separator? --lenient uses the first 157 scores, as the "
                    "official scorer)") if n_fields == expected + 1 else ""
            layout = f"id frame s_1 .. s_{n_classes}" if localize else f"id s_1 .. s_{n_classes}"
            raise FormatError(f"{path}: line {n}: {n_fields} fields separated by "
                              f"{'tabs' if sep == chr(9) else 'single spaces'}, expected "
                              f"{expected} ({layout}){more}")
        if sep + sep in line or line.startswith(sep) or line.endswith(sep):
            k = line.split(sep).index("") + 1
            raise FormatError(f"{path}: line {n}: field {k} is empty (two separators in a row "
                              "or a leading/trailing separator)")
        parts = line.split(sep, head)
        vid = parts[0]
        if localize:
            if not _INT.fullmatch(parts[1]):
                raise FormatError(f"{path}: line {n}: field frame: {parts[1]!r} is not an "
                                  "integer")
            frame = int(parts[1])
            if not -_FRAME_CAP <= frame <= _FRAME_CAP:  # beyond int64: outside 1..n anyway
                if not lenient:
                    raise FormatError(f"{path}: line {n}: field frame: {parts[1]} outside "
                                      f"1..{n_frames}")
                frame = _FRAME_CAP if frame > 0 else -_FRAME_CAP
            frames.append(frame)
        if known_ids is not None and vid not in known_ids:
            if not lenient:
                raise FormatError(_unknown_message(path, n, vid))
            unknown.append(n)
        ids.append(vid)
        texts.append(parts[head].replace("\t", " ") if sep == "\t" else parts[head])
        line_nos.append(n)
    return texts, ids, frames, line_nos, extra_field, unknown


def read_submission(
    path: str | Path, task: str, *, known_ids: Mapping[str, int] | Sequence[str] | None = None,
    lenient: bool = False, n_classes: int = N_CLASSES, n_frames: int = N_TEST_FRAMES,
) -> Submission:
    """Read a classification or localization submission.

    ``known_ids``: the ground-truth ids (a mapping or sequence); rows with other ids are an
    error (strict) or ignored (lenient). ``None`` accepts every id.
    Raises FormatError (naming file and line) as listed in the module docstring.
    """
    if task not in TASKS:
        raise FieldlibError(f"task must be one of {TASKS}, not {task!r}")
    localize = task == "localize"
    head = 2 if localize else 1
    path = Path(path)
    text = read_text(path)
    if known_ids is not None and not isinstance(known_ids, Mapping):
        known_ids = {k: i for i, k in enumerate(known_ids)}

    texts, ids, frames, line_nos, extra_field, unknown = _scan_lines(
        text, path, head, head + n_classes, known_ids, lenient, n_classes, n_frames)
    scores = _parse_scores(texts, line_nos, path, n_classes)
    lines = np.array(line_nos, dtype=np.int64)
    tolerated: list[str] = []
    if extra_field:
        tolerated.append(f"{len(extra_field)} rows have {n_classes + 1} score fields; the "
                         f"first {n_classes} are used ({_first(extra_field)})")
    nan_rows = np.flatnonzero(np.isnan(scores).any(axis=1))
    if nan_rows.size:
        bad = [int(lines[r]) for r in nan_rows]
        if not lenient:
            col = int(np.flatnonzero(np.isnan(scores[nan_rows[0]]))[0]) + 1
            raise FormatError(f"{path}: line {bad[0]}: score field {col} is NaN")
        tolerated.append(f"{len(bad)} rows hold NaN scores, ranked after every number as the "
                         f"official sort does ({_first(bad)})")

    keep = np.ones(len(ids), dtype=bool)
    frame_arr = None
    if localize:
        frame_arr = np.array(frames, dtype=np.int64)
        if frame_arr.size and frame_arr.min() == 0:
            if not lenient:
                n0 = int(lines[np.flatnonzero(frame_arr == 0)[0]])
                raise FormatError(f"{path}: line {n0}: field frame: 0; frames are 1-based "
                                  f"(1..{n_frames}); --lenient adds 1 to every frame when the "
                                  "smallest is 0, as the official scorer")
            frame_arr = frame_arr + 1
            tolerated.append("frames are 0-based (smallest is 0): 1 added to every frame, as "
                             "the official scorer")
        out = (frame_arr < 1) | (frame_arr > n_frames)
        if out.any():
            bad = [int(x) for x in lines[out]]
            if not lenient:
                raise FormatError(f"{path}: line {bad[0]}: field frame: "
                                  f"{int(frame_arr[out][0])} outside 1..{n_frames}")
            tolerated.append(f"{len(bad)} rows with a frame outside 1..{n_frames} ignored "
                             f"({_first(bad)})")
            keep &= ~out
    if unknown:
        unknown_set = set(unknown)
        keep &= np.array([n not in unknown_set for n in line_nos], dtype=bool)
        tolerated.append(f"{len(unknown)} rows with ids not in the ground truth ignored "
                         f"({_first(unknown)})")

    # duplicates: the last line of a key wins (official containers.Map)
    last: dict = {}
    dups: list[int] = []
    for r in np.flatnonzero(keep):
        key = (ids[r], int(frame_arr[r])) if localize else ids[r]
        if key in last:
            if not lenient:
                what = f"video {key[0]} frame {key[1]}" if localize else f"video {key}"
                raise FormatError(f"{path}: line {line_nos[r]}: duplicate row for {what} "
                                  f"(first on line {line_nos[last[key]]}; --lenient keeps the "
                                  "last, as the official scorer)")
            keep[last[key]] = False
            dups.append(line_nos[r])
        last[key] = r
    if dups:
        tolerated.append(f"{len(dups)} repeated rows: the last line of each key kept "
                         f"({_first(dups)})")

    idx = np.flatnonzero(keep)
    return Submission(
        task=task,
        ids=[ids[r] for r in idx],
        scores=scores[idx],
        frames=frame_arr[idx] if frame_arr is not None else None,
        lines=lines[idx],
        tolerated=tolerated,
        path=str(path),
    )


def read_classify_submission(path: str | Path, **kwargs) -> Submission:
    """``read_submission(path, "classify", **kwargs)``."""
    return read_submission(path, "classify", **kwargs)


def read_localize_submission(path: str | Path, **kwargs) -> Submission:
    """``read_submission(path, "localize", **kwargs)``."""
    return read_submission(path, "localize", **kwargs)


def _row_format(n: int, digits: int | None) -> str | None:
    return None if digits is None else " ".join([f"%.{int(digits)}g"] * n)


def _format_row(values: list[float], fmt: str | None) -> str:
    return " ".join(map(repr, values)) if fmt is None else fmt % tuple(values)


def _open_for_writing(path: str | Path):
    """Open ``path`` for writing; FieldlibError naming it when that fails (no folder...)."""
    try:
        return Path(path).open("w", encoding="utf-8")
    except OSError as exc:
        raise FieldlibError(f"{path}: cannot write: {exc.strerror or exc}") from None


def _check_scores(scores: np.ndarray, n: int, what: str) -> None:
    if scores.ndim < 2 or scores.shape[0] != n:
        raise ShapeError(f"{what}: scores of shape {tuple(scores.shape)} for {n} videos")
    if np.isnan(scores).any():
        raise FieldlibError(f"{what}: scores hold NaN")


def write_classify_submission(
    path: str | Path, ids: Sequence[str], scores, *, digits: int | None = None
) -> None:
    """Write ``id s_1 .. s_C`` lines. ``scores``: float [n_videos, C] (array or tensor).

    ``digits=None`` writes each float's shortest exact repr (reads back bit-identical);
    an int writes ``%.{digits}g``. Raises ShapeError / FieldlibError (NaN).
    """
    scores = np.asarray(scores, dtype=np.float64)
    _check_scores(scores, len(ids), "classification submission")
    fmt = _row_format(scores.shape[1], digits)
    with _open_for_writing(path) as f:
        for vid, row in zip(ids, scores.tolist()):
            f.write(f"{vid} {_format_row(row, fmt)}\n")


def write_localize_submission(
    path: str | Path, ids: Sequence[str], scores, *, digits: int | None = None
) -> None:
    """Write ``id frame s_1 .. s_C`` lines, frames 1..F. ``scores``: float [n_videos, F, C]
    (F = 25 for the official scorer). Same ``digits`` rule and errors as
    :func:`write_classify_submission`."""
    scores = np.asarray(scores, dtype=np.float64)
    _check_scores(scores, len(ids), "localization submission")
    if scores.ndim != 3:
        raise ShapeError(f"localization submission: scores must be [videos, frames, classes], "
                         f"got shape {tuple(scores.shape)}")
    fmt = _row_format(scores.shape[2], digits)
    with _open_for_writing(path) as f:
        for vid, video in zip(ids, scores.tolist()):
            for k, row in enumerate(video, 1):
                f.write(f"{vid} {k} {_format_row(row, fmt)}\n")

