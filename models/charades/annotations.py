"""Reader for the Charades annotation CSVs (``Charades_v1_train.csv``, ``Charades_v1_test.csv``).

Columns: id, subject, scene, quality, relevance, verified, script, objects, descriptions,
actions, length. Fields are comma-separated with double quotes around fields that contain
commas (read with the ``csv`` module). ``actions`` is a ``;``-separated list of
``cNNN start end`` instances (seconds), possibly empty; ``length`` is the video length in
seconds. Instances may end after ``length`` (about a third do); that is kept as given, the
official scorer does the same.

Every malformed row raises :class:`fieldlib.errors.FormatError` naming the file, the line
(1-based, the header is line 1) and the field: a missing or repeated column, an empty or
duplicate id, an unknown class id, a non-numeric or negative time, a non-numeric length, and
an instance whose end is before its start. Nothing is dropped silently.

End-before-start instances: the official ``Charades_v1_train.csv`` has seven (e.g. video
00SL4, ``c071 18.00 10.00``); the test CSV has none. ``reversed_intervals`` chooses what to
do: ``"error"`` (default), ``"swap"`` (use [end, start]) or ``"keep"`` (keep as given: the
official scorer then counts the class for the video in classification and at no time point
in localization). With ``"swap"``/``"keep"`` each one is recorded in
:attr:`Annotations.notes` so callers can report it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldlib.errors import FieldlibError, FormatError

from .labels import N_CLASSES, class_index

#: The CSV columns, in the official order.
COLUMNS = ("id", "subject", "scene", "quality", "relevance", "verified", "script",
           "objects", "descriptions", "actions", "length")
REVERSED_POLICIES = ("error", "swap", "keep")


@dataclass(frozen=True)
class Instance:
    """One annotated activity: class index (``cNNN`` -> NNN), start and end in seconds."""

    cls: int
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Video:
    """One CSV row. ``actions`` keeps the CSV order; ``line`` is the row's line in the file."""

    id: str
    scene: str
    length: float
    actions: tuple[Instance, ...]
    subject: str = ""
    quality: str = ""
    relevance: str = ""
    verified: str = ""
    script: str = ""
    objects: str = ""
    descriptions: str = ""
    line: int = 0

    @property
    def classes(self) -> np.ndarray:
        """Sorted distinct class indices of the video, int64 [k]."""
        return np.unique(np.array([a.cls for a in self.actions], dtype=np.int64))


@dataclass
class Annotations(Sequence):
    """The videos of one CSV, in file order (the order that breaks ties in the metrics).

    ``index[id]`` is a video's row; ``notes`` lists tolerated irregularities (reversed
    intervals under ``"swap"``/``"keep"``), one line each, naming file and line.
    """

    videos: list[Video]
    path: str = ""
    notes: list[str] = field(default_factory=list)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {v.id: i for i, v in enumerate(self.videos)}

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i):  # type: ignore[override]
        return self.videos[i]

    def __iter__(self) -> Iterator[Video]:
        return iter(self.videos)

    @property
    def ids(self) -> list[str]:
        return [v.id for v in self.videos]

    @property
    def lengths(self) -> np.ndarray:
        """Video lengths in seconds, float64 [n_videos]."""
        return np.array([v.length for v in self.videos], dtype=np.float64)

    def instance_table(self) -> dict[str, np.ndarray]:
        """All instances as flat arrays (CSV order): ``video`` int64 [n] (row), ``cls`` int64
        [n], ``start``/``end`` float64 [n]."""
        vid, cls, s, e = [], [], [], []
        for i, v in enumerate(self.videos):
            for a in v.actions:
                vid.append(i)
                cls.append(a.cls)
                s.append(a.start)
                e.append(a.end)
        return {
            "video": np.array(vid, dtype=np.int64),
            "cls": np.array(cls, dtype=np.int64),
            "start": np.array(s, dtype=np.float64),
            "end": np.array(e, dtype=np.float64),
        }

    def video_labels(self, n_classes: int = N_CLASSES) -> np.ndarray:
        """Multi-hot video labels, bool [n_videos, n_classes] (all instances count)."""
        t = self.instance_table()
        out = np.zeros((len(self.videos), n_classes), dtype=bool)
        out[t["video"], t["cls"]] = True
        return out


def _shown(text: str) -> str:
    """``text`` for an error message: as is, or repr'd when it holds a line break or another
    control character (a quoted CSV field may), so the message stays one line."""
    return text if text.isprintable() else repr(text)


def _time(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FormatError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise FormatError(f"{where}: {text!r} is not a finite time >= 0 seconds")
    return value


def parse_actions(
    text: str, where: str, n_classes: int = N_CLASSES, reversed_intervals: str = "error",
    notes: list[str] | None = None,
) -> tuple[Instance, ...]:
    """Parse an ``actions`` field (``cNNN start end;...``, possibly empty).

    ``where`` prefixes error messages (file, line, field). Raises FormatError.
    """
    text = text.strip()
    if not text:
        return ()
    out = []
    for k, item in enumerate(text.split(";"), 1):
        here = f"{where} instance {k}"
        parts = item.split()
        if len(parts) != 3:
            raise FormatError(f"{here}: {item!r} is not 'cNNN start end'")
        c = class_index(parts[0])
        if c is None or c >= n_classes:
            raise FormatError(f"{here}: bad class id {parts[0]!r} (expected c000..c"
                              f"{n_classes - 1:03d})")
        start = _time(parts[1], f"{here} start")
        end = _time(parts[2], f"{here} end")
        if end < start:
            msg = f"{here}: end {parts[2]} before start {parts[1]} ({item!r})"
            if reversed_intervals == "error":
                raise FormatError(msg + "; pass reversed_intervals='swap' or 'keep' "
                                  "(CLI: --reversed-intervals swap|keep) to accept it")
            if reversed_intervals == "swap":
                start, end = end, start
            if notes is not None:
                notes.append(f"{msg}: {'swapped' if reversed_intervals == 'swap' else 'kept'}")
        out.append(Instance(c, start, end))
    return tuple(out)


def read_annotations(
    path: str | Path, *, n_classes: int = N_CLASSES, reversed_intervals: str = "error"
) -> Annotations:
    """Read a Charades CSV into :class:`Annotations` (videos in file order).

    ``reversed_intervals``: ``"error"`` | ``"swap"`` | ``"keep"`` (see the module docstring).
    Raises FormatError (file, line, field) for any malformed row, and FieldlibError for a
    bad policy name.
    """
    if reversed_intervals not in REVERSED_POLICIES:
        raise FieldlibError(f"reversed_intervals must be one of {REVERSED_POLICIES}, "
                            f"not {reversed_intervals!r}")
    path = Path(path)
    notes: list[str] = []
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    videos: list[Video] = []
    seen: dict[str, int] = {}
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise FormatError(f"{path}: empty file (expected a header line)") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: line 1: {exc}") from None
        header = [h.strip() for h in header]
        col: dict[str, int] = {}
        for i, name in enumerate(header):
            if name in col and name in COLUMNS:
                raise FormatError(f"{path}: line 1: column {name} appears twice in the header "
                                  f"(fields {col[name] + 1} and {i + 1})")
            col.setdefault(name, i)
        for name in COLUMNS:
            if name not in col:
                raise FormatError(f"{path}: line 1: field {name}: column missing from the "
                                  f"header (found {', '.join(map(_shown, header))})")
        start_line = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except (csv.Error, UnicodeDecodeError) as exc:
                raise FormatError(f"{path}: line {start_line}: {exc}") from None
            line = start_line
            start_line = reader.line_num + 1
            if not row or all(not f.strip() for f in row):
                continue
            if len(row) != len(header):
                missing = [h for h, i in col.items() if i >= len(row)]
                detail = f"field {missing[0]} missing" if missing else "extra fields"
                raise FormatError(f"{path}: line {line}: {detail} ({len(row)} fields, "
                                  f"header has {len(header)})")
            get = {name: row[col[name]] for name in COLUMNS}
            vid = get["id"].strip()
            if not vid:
                raise FormatError(f"{path}: line {line}: field id: empty")
            if vid in seen:
                raise FormatError(f"{path}: line {line}: field id: duplicate video {vid!r} "
                                  f"(first on line {seen[vid]})")
            seen[vid] = line
            where = f"{path}: line {line} (video {_shown(vid)}): field"
            try:
                length = float(get["length"])
            except ValueError:
                raise FormatError(f"{where} length: {get['length']!r} is not a number") from None
            if not math.isfinite(length) or length < 0:
                raise FormatError(f"{where} length: {get['length']!r} is not a finite "
                                  "length >= 0 seconds")
            actions = parse_actions(get["actions"], f"{where} actions", n_classes,
                                    reversed_intervals, notes)
            videos.append(Video(
                id=vid, scene=get["scene"], length=length, actions=actions,
                subject=get["subject"], quality=get["quality"], relevance=get["relevance"],
                verified=get["verified"], script=get["script"], objects=get["objects"],
                descriptions=get["descriptions"], line=line,
            ))
    return Annotations(videos, str(path), notes)
