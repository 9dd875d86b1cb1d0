"""The official Charades metrics: Charades_v1_classify.m and Charades_v1_localize.m (MATH.md §8).

Per class (the scripts' ``THUMOSeventclspr``): order the rows by ``sort(-conf)``, a stable
ascending sort, so ties keep the ground-truth row order, every -inf ties with every other
-inf, and NaN comes after everything; precision at rank r is ``tp_r / (tp_r + fp_r)``; AP is
the sum, in rank order, of the precision at the positive ranks divided by the number of
positives (no interpolation); a class without positives gets 0/0 = NaN.
mAP is the plain mean over the classes (NaN if any class is NaN; ``map_nanmean`` is reported
beside it), and wAP = sum_c AP_c n_pos_c / sum_c n_pos_c (also NaN when any AP is NaN).

Classification rows are the ground-truth videos in CSV order; a video missing from the
submission scores -inf, and so does every video whose ``actions`` field is empty whatever
the submission says (the script never records its id); those videos are negatives.
Localization rows are (video, k) for k = 1..25 in CSV order, positive at the time point
``((k-1)/25) * length`` when ``start <= t <= end``; missing rows score -inf; videos with
empty ``actions`` keep their submitted scores (all negatives).

Speed: one unstable sort of all classes at once, then per class binary searches for the
positives' ranks (ties resolved among the tied rows only) and a sequential cumulative sum,
so the sums are added in the scripts' order (bit-identical AP).
:func:`average_precision_loop` is the slow transcription kept as the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fieldlib.errors import FieldlibError, ShapeError

from .annotations import Annotations
from .labels import N_CLASSES, Vocabulary, default_classes
from .statespace import N_TEST_FRAMES, time_point_labels
from .submission import Submission


def _positive_ranks_stable(neg_row: np.ndarray, pos_row: np.ndarray) -> np.ndarray:
    """1-based ranks of the positives under ``sort(-conf)`` by one stable sort (float64)."""
    order = np.argsort(neg_row, kind="stable")
    return np.flatnonzero(pos_row[order]) + 1.0


def _positive_ranks(neg_row, sorted_row, pos_rows, pos_row) -> np.ndarray:
    """Sorted 1-based ranks of a class's positives under the scripts' stable ``sort(-conf)``.

    ``neg_row`` float64 [N] (minus the scores), ``sorted_row`` the same sorted ascending,
    ``pos_rows`` int [P] ascending rows of the positives, ``pos_row`` bool [N]. A positive's
    rank is the number of rows with a smaller -score, plus the rows with an equal one and a
    smaller row index, plus one. Ties are resolved only among the rows that share a value
    with a positive; when those are over half the rows (or NaN is present) one stable sort
    does it instead.
    """
    n = neg_row.size
    if np.isnan(sorted_row[-1]):  # NaN sorts last and never compares equal: stable sort
        return _positive_ranks_stable(neg_row, pos_row)
    x = neg_row[pos_rows]
    left = np.searchsorted(sorted_row, x, "left")
    right = np.searchsorted(sorted_row, x, "right")
    tied = right - left > 1
    before = np.zeros(x.size, dtype=np.int64)
    if tied.any():
        values, first = np.unique(x[tied], return_index=True)
        if (right - left)[tied][first].sum() > n // 2:
            return _positive_ranks_stable(neg_row, pos_row)
        at = np.minimum(np.searchsorted(values, neg_row), values.size - 1)
        members = np.flatnonzero(values[at] == neg_row)  # rows sharing a tied value
        member_values = neg_row[members]
        order = np.argsort(member_values, kind="stable")  # by (value, row)
        grouped = member_values[order]
        within = np.arange(grouped.size) - np.searchsorted(grouped, grouped, "left")
        slot = np.empty_like(order)
        slot[order] = np.arange(order.size)
        before[tied] = within[slot[np.searchsorted(members, pos_rows[tied])]]
    return np.sort(left + before) + 1.0


def average_precision(scores, labels) -> np.ndarray:
    """Official AP of every column. ``scores`` float [N, C] (or [N]), ``labels`` bool of the
    same shape. Returns float64 [C] (or a 0-d array), NaN where a column has no positive.

    Rows are ranked as the scripts' stable ``sort(-conf)`` ranks them (ties in row order, all
    -inf equal, NaN last). The precision at the k-th positive, at rank r, is k / r (the
    scripts' tp ./ (fp + tp)), and the precisions are added in rank order (a sequential
    cumulative sum), so the result is bit-identical to the scripts' loop. One unstable sort
    of all classes at once plus binary searches find the ranks (:func:`_positive_ranks`).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ShapeError(f"scores {s.shape} and labels {y.shape} differ in shape")
    one = s.ndim == 1
    if one:
        s, y = s[:, None], y[:, None]
    neg = np.ascontiguousarray(np.negative(s.T))  # [C, N]: the scripts sort -conf ascending
    pos = np.ascontiguousarray(y.T)
    ascending = np.sort(neg, axis=1)
    cls, rows = np.nonzero(pos)  # class-major, rows ascending within a class
    n_pos = np.bincount(cls, minlength=neg.shape[0])
    bounds = np.r_[0, np.cumsum(n_pos)]
    ap = np.full(neg.shape[0], np.nan)
    for c in np.flatnonzero(n_pos):
        ranks = _positive_ranks(neg[c], ascending[c], rows[bounds[c]:bounds[c + 1]], pos[c])
        ap[c] = np.cumsum(np.arange(1, ranks.size + 1) / ranks)[-1] / ranks.size
    return ap[0] if one else ap


def average_precision_loop(scores, labels) -> float:
    """Slow oracle: a line-by-line transcription of the scripts' ``THUMOSeventclspr`` for
    one class (``scores`` float [N], ``labels`` bool [N])."""
    conf = np.asarray(scores, dtype=np.float64)
    lab = np.asarray(labels, dtype=bool)
    order = np.argsort(-conf, kind="stable")
    tp = fp = 0
    ap = 0.0
    npos = int(lab.sum())
    for i in order:
        if lab[i]:
            tp += 1
        else:
            fp += 1
        if lab[i]:
            ap += tp / (fp + tp)
    return ap / npos if npos else float("nan")


def _seq_sum(x: np.ndarray) -> float:
    return float(np.cumsum(x)[-1]) if x.size else 0.0


@dataclass(frozen=True)
class EvalResult:
    """Scores of one submission. ``ap``: float64 [C] (NaN without positives); ``n_pos``:
    int64 [C]; ``n_rows``: rows scored (videos, or videos x 25); ``n_missing``: of those,
    rows the submission did not give (scored -inf)."""

    task: str
    ap: np.ndarray
    n_pos: np.ndarray
    map: float
    map_nanmean: float
    wap: float
    n_rows: int
    n_missing: int

    def ranked(self) -> np.ndarray:
        """Class indices with an AP, best first (ties by class index); NaN classes excluded."""
        ok = np.flatnonzero(~np.isnan(self.ap))
        return ok[np.argsort(-self.ap[ok], kind="stable")]

    def to_json(self, classes: Vocabulary | None = None) -> dict:
        """The ``--json`` document: ``map`` / ``wap`` null when NaN (the script's NaN),
        ``map_nanmean``, ``ap`` [C] with null for NaN, ``classes`` (ids) and more."""
        classes = classes or default_classes(self.ap.size)

        def num(x: float):
            return None if np.isnan(x) else float(x)

        return {
            "task": self.task,
            "map": num(self.map),
            "map_nanmean": num(self.map_nanmean),
            "wap": num(self.wap),
            "ap": [num(x) for x in self.ap],
            "classes": list(classes.ids),
            "class_names": list(classes.names),
            "n_pos": [int(x) for x in self.n_pos],
            "n_rows": self.n_rows,
            "n_missing": self.n_missing,
        }


def _result(task: str, scores: np.ndarray, labels: np.ndarray, n_missing: int) -> EvalResult:
    ap = average_precision(scores, labels)
    n_pos = labels.sum(axis=0).astype(np.int64)
    with np.errstate(invalid="ignore"):
        mean = _seq_sum(ap) / ap.size
        ok = ~np.isnan(ap)
        nanmean = np.float64(_seq_sum(ap[ok])) / ok.sum() if ok.any() else float("nan")
        wap = np.float64(_seq_sum(ap * n_pos)) / np.float64(_seq_sum(n_pos.astype(float)))
    return EvalResult(task, ap, n_pos, float(mean), float(nanmean), float(wap),
                      int(scores.shape[0]), n_missing)


def _check(sub: Submission, task: str, n_classes: int) -> None:
    if sub.task != task:
        raise FieldlibError(f"a {sub.task} submission cannot be scored as {task}")
    if sub.scores.ndim != 2 or sub.scores.shape[1] != n_classes:
        raise ShapeError(f"submission scores have shape {tuple(sub.scores.shape)}, expected "
                         f"[rows, {n_classes}]")


def _scatter(scores: np.ndarray, rows: np.ndarray, ok: np.ndarray, n_rows: int) -> np.ndarray:
    """Class-major float64 [C, n_rows], -inf except ``rows[ok]`` (later rows win)."""
    out = np.full((scores.shape[1], n_rows), -np.inf)
    if ok.all():
        out[:, rows] = scores.T
    else:
        out[:, rows[ok]] = scores[ok].T
    return out


def classification_arrays(
    gt: Annotations, sub: Submission, n_classes: int = N_CLASSES
) -> tuple[np.ndarray, np.ndarray, int]:
    """The script's ``test`` and ``gtlabel`` matrices: float64 [N, C] scores (-inf where
    missing or where the video has no actions; a transposed view of a class-major array),
    bool [N, C] labels, and the number of ground-truth videos absent from the submission.
    Ids not in ``gt`` are ignored."""
    _check(sub, "classify", n_classes)
    rows = np.array([gt.index.get(v, -1) for v in sub.ids], dtype=np.int64)
    by_class = _scatter(sub.scores, rows, rows >= 0, len(gt))
    missing = len(gt) - np.unique(rows[rows >= 0]).size
    empty = np.array([not v.actions for v in gt], dtype=bool)
    by_class[:, empty] = -np.inf
    return by_class.T, gt.video_labels(n_classes), int(missing)


def localization_arrays(
    gt: Annotations, sub: Submission, n_classes: int = N_CLASSES, n_frames: int = N_TEST_FRAMES
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores float64 [N * F, C] (row ``i * F + k - 1`` is video i, frame k; -inf where
    missing), labels bool [N * F, C] and the number of missing rows."""
    _check(sub, "localize", n_classes)
    if sub.frames is None:
        raise FieldlibError("a localization submission needs frame numbers")
    vid = np.array([gt.index.get(v, -1) for v in sub.ids], dtype=np.int64)
    ok = (vid >= 0) & (sub.frames >= 1) & (sub.frames <= n_frames)
    rows = vid * n_frames + sub.frames - 1
    by_class = _scatter(sub.scores, rows, ok, len(gt) * n_frames)
    missing = by_class.shape[1] - np.unique(rows[ok]).size
    return by_class.T, time_point_labels(gt, n_frames, n_classes), int(missing)


def classify_map(gt: Annotations, sub: Submission, n_classes: int = N_CLASSES) -> EvalResult:
    """Charades_v1_classify.m: per-class AP, mAP, nan-mean mAP and wAP (MATH.md §8)."""
    scores, labels, missing = classification_arrays(gt, sub, n_classes)
    return _result("classify", scores, labels, missing)


def localize_map(
    gt: Annotations, sub: Submission, n_classes: int = N_CLASSES, n_frames: int = N_TEST_FRAMES
) -> EvalResult:
    """Charades_v1_localize.m: per-class AP over all (video, frame) rows, mAP, wAP."""
    scores, labels, missing = localization_arrays(gt, sub, n_classes, n_frames)
    return _result("localize", scores, labels, missing)


def submission_from_arrays(
    task: str, ids: Sequence[str], scores, frames=None
) -> Submission:
    """An in-memory :class:`Submission` (no file): ``scores`` float [n, C]; for
    localization ``frames`` int [n] (1-based), or ``scores`` [n_videos, F, C] with frames
    1..F implied."""
    s = np.asarray(scores, dtype=np.float64)
    ids = list(ids)
    if task == "localize" and frames is None:
        if s.ndim != 3 or s.shape[0] != len(ids):
            raise ShapeError("localization scores without frames must be [videos, frames, C]")
        f = s.shape[1]
        frames = np.tile(np.arange(1, f + 1), len(ids))
        ids = [v for v in ids for _ in range(f)]
        s = s.reshape(-1, s.shape[2])
    if s.ndim != 2 or s.shape[0] != len(ids):
        raise ShapeError(f"scores of shape {tuple(s.shape)} for {len(ids)} rows")
    fr = None if frames is None else _frame_numbers(frames, len(ids))
    return Submission(task, ids, s, fr)


def _frame_numbers(frames, n: int) -> np.ndarray:
    """``frames`` as int64 [n]: integers >= 1 (no rounding); FieldlibError otherwise."""
    raw = np.asarray(frames, dtype=object if isinstance(frames, list | tuple) else None)
    if raw.dtype.kind in "iu":
        f = raw.astype(np.float64)
    else:
        if raw.dtype.kind == "b" or any(isinstance(x, bool | str | bytes) for x in raw.ravel()):
            raise FieldlibError("frame numbers must be integers, not booleans or strings")
        try:
            f = np.asarray(raw, dtype=np.float64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise FieldlibError(f"frame numbers must be integers ({exc})") from None
    if f.shape != (n,):
        raise ShapeError(f"{f.shape} frame numbers for {n} rows")
    bad = ~np.isfinite(f) | (f != np.round(f)) | (f < 1) | (f > 2.0**62)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FieldlibError(f"row {i}: frame {float(f[i]):g} is not a 1-based frame number "
                            "(an integer >= 1)")
    return f.astype(np.int64)
