"""Figures of a Charades run (the paper's Fig. 4, 6, 7, 9 and 11; docs/charades.md, "Plots").

One function a figure, each from plain data (:class:`~.predict.Predictions`,
:class:`~.metrics.EvalResult`, :class:`~.annotations.Annotations`, metrics.jsonl lines) and
class names from a :class:`~.labels.LabelSpace` (or a class :class:`~.labels.Vocabulary`):

- :func:`plot_message_passes` (Fig. 4): one video's top categories over its 25 time points
  after pass 0 (zero messages), 1, 2, 3, and the change each pass made.
- :func:`plot_video_timeline` (Fig. 9): the 3 most confident categories, 2 verbs and 1
  object of a video over time, each with its ground-truth intervals beneath.
- :func:`plot_training_curves` (Fig. 6): test mAP against frames processed for several
  runs (async, sync, none), and the training NLL beside it.
- :func:`plot_intent_embedding` (Fig. 11): a 2-D embedding (PCA; t-SNE when scikit-learn
  is installed) of the videos' intent distributions Q_I, coloured by activity.
- :func:`plot_ap_difference` (Fig. 7): the classes whose AP the full model gains and loses
  most over a ``none`` run.

Every function takes ``path`` (write a PNG there, parents created, and return the path) and
``fig`` or ``ax`` (draw into an existing figure or axes); with neither it returns a new
pyplot Figure. With ``path`` and no ``fig``/``ax`` the figure is a plain
``matplotlib.figure.Figure`` outside pyplot (any backend, nothing left open).
Errors: FieldlibError naming what is wrong (a video not in the predictions, predictions
without pass scores or intents, metrics lines without evaluations, arrays that disagree).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from fieldlib.errors import FieldlibError, ShapeError

from .labels import LabelSpace, Vocabulary, default_classes

__all__ = ["EMBEDDINGS", "activity_colours", "most_frequent_activity", "plot_ap_difference",
           "plot_intent_embedding", "plot_message_passes", "plot_training_curves",
           "plot_video_timeline", "read_metrics", "verb_object_scores"]

#: 2-D embeddings of :func:`plot_intent_embedding` ("tsne" needs scikit-learn).
EMBEDDINGS = ("pca", "tsne")
#: Object names not shown as "the most confident object" (the official "None" object).
NO_OBJECT = ("none", "no object")
#: Colours of the training modes in Fig. 6 (other labels take the next free ones).
MODE_COLOURS = {"async": "C0", "sync": "C1", "none": "C2"}
_DPI = 130


# -- figures, names, checks ---------------------------------------------------------------------
def _new_figure(figsize, path):
    if path is not None:
        from matplotlib.figure import Figure

        return Figure(figsize=figsize)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize)


def _figure(fig, figsize, path):
    """An empty figure to draw into: ``fig`` cleared, or a new one."""
    if fig is None:
        return _new_figure(figsize, path)
    fig.clear()
    fig.set_size_inches(*figsize)
    return fig


def _axes(ax, figsize, path):
    return ax if ax is not None else _new_figure(figsize, path).add_subplot()


def _finish(fig, path):
    """The figure, or the path it was written to (PNG unless the suffix says otherwise)."""
    if path is None:
        return fig
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    except OSError as exc:
        raise FieldlibError(f"{path}: cannot write the figure: {exc.strerror or exc}") \
            from None
    return path


def _classes(labels, n: int) -> Vocabulary:
    if labels is None:
        return default_classes(n)
    vocab = labels.classes if isinstance(labels, LabelSpace) else labels
    if len(vocab) != n:
        raise ShapeError(f"plot: {len(vocab)} class names for {n} class scores")
    return vocab


def _short(name: str, width: int = 34) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def _video_row(preds, video_id) -> int:
    try:
        return preds.video_ids.index(video_id)
    except ValueError:
        shown = ", ".join(preds.video_ids[:5]) + (", ..." if len(preds) > 5 else "")
        raise FieldlibError(f"plot: video {video_id!r} is not in the predictions "
                            f"({len(preds)} videos: {shown})") from None


def _gt_video(annotations, video_id):
    if annotations is None:
        return None
    index = {v.id: v for v in annotations}
    if video_id not in index:
        raise FieldlibError(f"plot: video {video_id!r} is not in the ground-truth annotations")
    return index[video_id]


def _extent(times: np.ndarray, length: float | None) -> tuple[float, float]:
    """Seconds covered by the time points: frame k spans [t_k, t_k + L/25)."""
    step = times[1] - times[0] if times.size > 1 else 1.0
    end = length if length else times[-1] + step
    return float(times[0]), float(end)


# -- Fig. 4: message passes ---------------------------------------------------------------------
def plot_message_passes(preds, video_id: str | None = None, labels=None, *,
                        passes: Sequence[int] = (0, 1, 2, 3), top: int = 5, fig=None,
                        path=None):
    """Fig. 4: how one video's frame class scores change with message passes.

    Rows: pass 0 (Q_t ∝ exp φX, all messages zero) and the passes in ``passes``; left, the
    ``top`` categories' scores s_t(c) over the 25 time points (one colour scale for all
    rows, darker = more likely); right, the change from the previous row (blue: up, brown:
    down). The categories are those with the highest max-over-frames score after the last
    row's pass.

    Args:
        preds: :class:`Predictions` with ``pass_scores`` (predict with ``pass_videos >= 1``).
        video_id: one of the first ``pass_scores.shape[0]`` videos (default: the first).
        labels: a LabelSpace or class Vocabulary (names on the y axis).

    Raises FieldlibError: no pass scores, a video not in the predictions or without pass
    scores, a pass beyond those stored, ``top < 1``.
    """
    if preds.pass_scores is None:
        raise FieldlibError("plot: the predictions have no pass_scores (predict with "
                            "pass_videos >= 1, CLI --pass-videos 1)")
    stored = preds.pass_scores.shape[1] - 1
    video_id = preds.video_ids[0] if video_id is None else video_id
    row = _video_row(preds, video_id)
    if row >= preds.pass_scores.shape[0]:
        raise FieldlibError(f"plot: video {video_id!r} has no pass scores (only the first "
                            f"{preds.pass_scores.shape[0]} videos do)")
    passes = sorted(set(int(p) for p in passes))
    if not passes or passes[0] < 0 or passes[-1] > stored:
        raise FieldlibError(f"plot: passes must lie in 0..{stored} (the passes stored), "
                            f"got {list(passes)}")
    if top < 1:
        raise FieldlibError(f"plot: top must be >= 1, got {top}")
    names = _classes(labels, preds.n_classes).names
    scores = preds.pass_scores[row][passes]  # (R, 25, C)
    cls = np.argsort(-scores[-1].max(0), kind="stable")[:top]
    shown = scores[:, :, cls].transpose(0, 2, 1)  # (R, top, 25)
    times = preds.times[row]
    x0, x1 = _extent(times, None)
    vmax = float(shown.max()) or 1.0
    change = np.diff(shown, axis=0)
    dmax = float(np.abs(change).max()) if change.size else 0.0
    dmax = dmax or 1e-12
    height = 1.0 + (0.25 * top + 0.9) * len(passes)
    fig = _figure(fig, (12.5, height), path)
    grid = fig.add_gridspec(len(passes), 5, width_ratios=(1, 0.022, 0.13, 1, 0.022),
                            hspace=0.55, wspace=0.05, top=1 - 0.6 / height,
                            bottom=0.5 / height)
    extent = (x0, x1, top - 0.5, -0.5)
    left_img = right_img = None
    for r, p in enumerate(passes):
        ax = fig.add_subplot(grid[r, 0])
        left_img = ax.imshow(shown[r], aspect="auto", cmap="Greys", vmin=0, vmax=vmax,
                             extent=extent, interpolation="nearest")
        ax.set_yticks(range(top))
        ax.set_yticklabels([_short(names[c]) for c in cls], fontsize=8)
        what = "pass 0: no messages (initial prediction)" if p == 0 else \
            f"after {p} message pass{'es' if p > 1 else ''}"
        ax.set_title(what, fontsize=9, loc="left")
        ax_d = fig.add_subplot(grid[r, 3], sharey=ax)
        ax_d.tick_params(labelleft=False)
        if r == 0:
            ax_d.axis("off")
            ax_d.text(0.5, 0.5, "change from the previous row\n(blue: up, brown: down)",
                      ha="center", va="center", transform=ax_d.transAxes, fontsize=9)
        else:
            right_img = ax_d.imshow(change[r - 1], aspect="auto", cmap="BrBG", vmin=-dmax,
                                    vmax=dmax, extent=extent, interpolation="nearest")
            ax_d.set_title(f"change: pass {passes[r - 1]} → {p}", fontsize=9, loc="left")
        for a in (ax, ax_d):
            if r == len(passes) - 1:
                a.set_xlabel("time (s)")
            else:
                a.tick_params(labelbottom=False)
    fig.colorbar(left_img, cax=fig.add_subplot(grid[:, 1]), label="class score $s_t(c)$")
    if right_img is not None:
        fig.colorbar(right_img, cax=fig.add_subplot(grid[1:, 4]), label="change in $s_t(c)$")
    fig.suptitle(f"Video {video_id}: top {top} categories after each message pass "
                 "(Fig. 4)", fontsize=11, y=1 - 0.15 / height)
    return _finish(fig, path)


# -- Fig. 9: categories, verbs, objects over time ------------------------------------------------
def verb_object_scores(frame_scores, labels: LabelSpace) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame verb and object scores from class scores: ``Q_t(a) = Σ_{c: verb(c)=a}
    s_t(c)`` and ``Q_t(o) = Σ_{c: object(c)=o} s_t(c)`` (the frame marginals of the verb
    and the object, since every state of B has its class's verb and object).

    ``frame_scores`` (..., n_classes) -> ``(verbs (..., n_verbs), objects (..., n_objects))``.
    Raises FieldlibError when ``labels`` has no class -> verb/object mapping.
    """
    if not isinstance(labels, LabelSpace) or not labels.has_mapping:
        raise FieldlibError("plot: verb and object scores need a LabelSpace with the class "
                            "-> object/verb mapping")
    s = np.asarray(frame_scores, dtype=np.float64)
    if s.shape[-1] != labels.n_classes:
        raise ShapeError(f"plot: {s.shape[-1]} class scores for {labels.n_classes} classes")
    to_verb = np.eye(len(labels.verbs))[labels.class_verb]  # (C, n_verbs) one-hot rows
    to_object = np.eye(len(labels.objects))[labels.class_object]
    return s @ to_verb, s @ to_object


def _top(scores: np.ndarray, k: int, skip=()) -> list[int]:
    order = np.argsort(-scores.max(0), kind="stable")
    return [int(i) for i in order if int(i) not in skip][:k]


def plot_video_timeline(preds, video_id: str, labels, annotations=None, *,
                        categories: int = 3, verbs: int = 2, objects: int = 1, fig=None,
                        path=None):
    """Fig. 9: one video's most confident categories, verbs ("actions") and objects over
    its 25 time points, each row drawn over the ground-truth intervals that match it.

    Rows are ranked by their max score over the frames of ``preds.frame_scores``. Verb and
    object scores are sums of class scores (:func:`verb_object_scores`); the "None" object
    is not shown. Each row has its own colour scale, 0 to its max (darker = more likely;
    its max and min written at the right). Beneath a row, black bars mark the annotated
    intervals of that class (or of the classes with that verb / object); a last panel lists
    all the video's annotated actions.

    Args:
        labels: a LabelSpace (with the class mapping for verbs and objects; without one
            only categories are drawn).
        annotations: the ground truth (Annotations or Videos); None draws no intervals.

    Raises FieldlibError: a video not in the predictions or annotations, negative counts.
    """
    if min(categories, verbs, objects) < 0 or categories + verbs + objects < 1:
        raise FieldlibError("plot: categories, verbs and objects must be >= 0, not all 0")
    row = _video_row(preds, video_id)
    vocab = _classes(labels, preds.n_classes)
    video = _gt_video(annotations, video_id)
    s = preds.frame_scores[row]  # (25, C)
    rows = [(f"Category: {vocab.names[c]}", s[:, c], {c}) for c in _top(s, categories)]
    mapped = isinstance(labels, LabelSpace) and labels.has_mapping
    if mapped:
        v_scores, o_scores = verb_object_scores(s, labels)
        for v in _top(v_scores, verbs):
            rows.append((f"Action: {labels.verbs.names[v]}", v_scores[:, v],
                         set(np.flatnonzero(labels.class_verb == v).tolist())))
        none = {i for i, n in enumerate(labels.objects.names) if n.lower() in NO_OBJECT}
        for o in _top(o_scores, objects, none):
            rows.append((f"Object: {labels.objects.names[o]}", o_scores[:, o],
                         set(np.flatnonzero(labels.class_object == o).tolist())))
    times = preds.times[row]
    x0, x1 = _extent(times, video.length if video is not None else None)
    actions = list(video.actions) if video is not None else []
    gt_classes = sorted({a.cls for a in actions})
    n_gt = len(gt_classes)
    height = 0.8 * len(rows) + (0.3 * n_gt + 1.0 if n_gt else 0) + 1.0
    fig = _figure(fig, (11, height), path)
    grid = fig.add_gridspec(len(rows) + (1 if n_gt else 0), 1, hspace=0.35,
                            top=1 - 0.55 / height, bottom=0.5 / height,
                            height_ratios=[1.0] * len(rows) + ([0.4 * n_gt + 0.4] if n_gt
                                                                 else []))
    first = None
    for r, (title, values, classes) in enumerate(rows):
        ax = fig.add_subplot(grid[r], sharex=first)
        first = first or ax
        peak = float(values.max()) or 1.0
        ax.imshow(values[None, :], aspect="auto", cmap="Blues", vmin=0, vmax=peak,
                  extent=(x0, x1, 1.0, 0.35), interpolation="nearest")
        spans = [(max(a.start, x0), min(a.end, x1) - max(a.start, x0)) for a in actions
                 if a.cls in classes and a.end > x0 and a.start < x1]
        if spans:
            ax.broken_barh(spans, (0.05, 0.2), color="black")
        ax.set_ylim(0.0, 1.0)
        ax.set_yticks([0.675] + ([0.15] if video is not None else []))
        ax.set_yticklabels([_short(title, 44)] + (["ground truth"] if video is not None
                                                   else []), fontsize=8)
        ax.text(1.005, 0.675, f"max {peak:.2f}\nmin {float(values.min()):.2f}",
                transform=ax.get_yaxis_transform(), va="center", fontsize=7)
        ax.tick_params(labelbottom=False)
    if n_gt:
        ax = fig.add_subplot(grid[len(rows)], sharex=first)
        for k, c in enumerate(gt_classes):
            spans = [(max(a.start, x0), max(min(a.end, x1) - max(a.start, x0), 0.0))
                     for a in actions if a.cls == c]
            ax.broken_barh(spans, (k - 0.35, 0.7), color="0.35")
        ax.set_ylim(n_gt - 0.5, -0.5)
        ax.set_yticks(range(n_gt))
        ax.set_yticklabels([_short(vocab.names[c], 44) for c in gt_classes], fontsize=8)
        ax.set_title("annotated actions (ground truth)", fontsize=9, loc="left")
    ax.tick_params(labelbottom=True)
    ax.set_xlabel("time (s)")
    ax.set_xlim(x0, x1)
    what = f"{categories} categories" + (f", {verbs} verbs, {objects} object"
                                         f"{'s' if objects != 1 else ''}" if mapped else
                                         " (no class mapping: no verbs or objects)")
    fig.suptitle(f"Video {video_id}: the most confident {what} over time (Fig. 9)",
                 fontsize=11, y=1 - 0.15 / height)
    return _finish(fig, path)


# -- Fig. 6: training curves --------------------------------------------------------------------
def read_metrics(path) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` (one a line, blank lines skipped).

    Raises FieldlibError naming the file (missing, unreadable) or the line (not JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FieldlibError(f"{path}: cannot read: {exc.strerror or exc}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise FieldlibError(f"{path}: line {n}: not a JSON object ({exc})") from None
        if not isinstance(doc, dict):
            raise FieldlibError(f"{path}: line {n}: not a JSON object")
        out.append(doc)
    return out


def _number(x) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


def _curves(lines: Sequence[dict], task: str) -> dict:
    train = [d for d in lines if "eval" not in d and "frames" in d and "nll" in d]
    evals = [d["eval"] for d in lines if isinstance(d.get("eval"), dict)]
    official = np.array([_number(e.get(f"{task}_map")) for e in evals])
    nanmean = np.array([_number(e.get(f"{task}_map_nanmean")) for e in evals])
    use_official = bool(evals) and bool(np.isfinite(official).all())
    return {"frames": np.array([_number(d["frames"]) for d in train]),
            "nll": np.array([_number(d["nll"]) for d in train]),
            "eval_frames": np.array([_number(e.get("frames")) for e in evals]),
            "map": official if use_official else nanmean, "official": use_official}


def _smooth(y: np.ndarray) -> np.ndarray:
    k = max(1, y.size // 40)
    if k == 1:
        return y
    c = np.cumsum(np.r_[0.0, y])
    out = (c[k:] - c[:-k]) / k
    return np.r_[y[:k - 1].cumsum() / np.arange(1, k), out]


def plot_training_curves(runs: Mapping[str, Sequence[dict]], *, task: str = "classify",
                         require_eval: bool = True, fig=None, path=None):
    """Fig. 6: test mAP against frames processed for several runs (left), and the training
    NLL against frames (right; faint: every logged step, solid: a running mean).

    Args:
        runs: ``{label: metrics.jsonl lines}`` (:func:`read_metrics`), e.g. one run a mode
            ``{"async": ..., "sync": ..., "none": ...}``. Evaluation lines are
            ``{"eval": {"frames", "classify_map", "classify_map_nanmean", ...}}``; a run
            whose official mAP is ever null (NaN: a class of the evaluated videos has no
            positive) is plotted with its nan-mean and labelled "(nan-mean)".
        task: ``"classify"`` or ``"localize"`` mAP.
        require_eval: when no run has evaluation lines, raise (True) or draw the NLL panel
            alone (False).

    Raises FieldlibError: no runs, an unknown task, no evaluation lines (with
    ``require_eval``), no training lines with an NLL either.
    """
    if task not in ("classify", "localize"):
        raise FieldlibError(f"plot: task must be classify or localize, got {task!r}")
    if not runs:
        raise FieldlibError("plot: no runs to plot")
    curves = {label: _curves(lines, task) for label, lines in runs.items()}
    has_eval = [lab for lab, c in curves.items() if c["eval_frames"].size]
    if not has_eval and require_eval:
        raise FieldlibError(f"plot: no evaluation lines in the metrics of "
                            f"{', '.join(curves)} (train with --eval-every N to log test mAP)")
    if not any(c["frames"].size for c in curves.values()) and not has_eval:
        raise FieldlibError("plot: the metrics hold neither training nor evaluation lines")
    fig = _figure(fig, (12, 4.2) if has_eval else (6.5, 4.2), path)
    axes = fig.subplots(1, 2 if has_eval else 1, squeeze=False)[0]
    free = iter(f"C{k}" for k in range(3, 10))
    colours = {lab: MODE_COLOURS.get(lab) or next(free, "k") for lab in curves}
    if has_eval:
        ax = axes[0]
        for label in has_eval:
            c = curves[label]
            ax.plot(c["eval_frames"], c["map"], marker="o", color=colours[label],
                    label=label if c["official"] else f"{label} (nan-mean)")
        ax.set_xlabel("frames processed")
        ax.set_ylabel(f"test {task} mAP")
        ax.set_title("test mAP (nan-mean: over the classes with positives, where the "
                     "official mean is NaN)", fontsize=8)
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for label, c in curves.items():
        ok = np.isfinite(c["nll"]) & np.isfinite(c["frames"])
        if ok.any():
            ax.plot(c["frames"][ok], c["nll"][ok], color=colours[label], alpha=0.25, lw=0.8)
            ax.plot(c["frames"][ok], _smooth(c["nll"][ok]), color=colours[label], label=label)
    ax.set_xlabel("frames processed")
    ax.set_ylabel("training NLL a frame, $-\\log Q_t(x^*_t)$")
    ax.set_title("training loss" + ("" if has_eval else
                                    " (no evaluation lines: no mAP panel)"), fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    for a in axes:
        a.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    fig.suptitle("Training curves (Fig. 6)", fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)


# -- Fig. 11: intent embedding ------------------------------------------------------------------
def most_frequent_activity(annotations, video_ids: Sequence[str]) -> np.ndarray:
    """Each video's most frequent activity: most instances, then longest total duration,
    then lowest class index; -1 for a video without actions. int64 (len(video_ids),).

    Raises FieldlibError when a video is not in ``annotations``."""
    index = {v.id: v for v in annotations}
    out = np.full(len(video_ids), -1, dtype=np.int64)
    for i, vid in enumerate(video_ids):
        if vid not in index:
            raise FieldlibError(f"plot: video {vid!r} is not in the ground-truth annotations")
        stats: dict[int, list[float]] = {}
        for a in index[vid].actions:
            s = stats.setdefault(a.cls, [0, 0.0])
            s[0] += 1
            s[1] += a.end - a.start
        if stats:
            out[i] = min(stats, key=lambda c: (-stats[c][0], -stats[c][1], c))
    return out


def _embed(q: np.ndarray, method: str) -> tuple[np.ndarray, tuple[str, str]]:
    if method == "pca":
        x = q - q.mean(0)
        _, sv, vt = np.linalg.svd(x, full_matrices=False)
        var = sv ** 2 / max((sv ** 2).sum(), 1e-300)
        pts = x @ vt[:2].T
        if pts.shape[1] < 2:
            pts = np.c_[pts, np.zeros(len(pts))]
            var = np.r_[var, 0.0]
        return pts, (f"PC 1 ({100 * var[0]:.0f}% of variance)",
                     f"PC 2 ({100 * var[1]:.0f}% of variance)")
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise FieldlibError("plot: t-SNE needs scikit-learn, which is not installed; use "
                            "method='pca'") from None
    perplexity = min(30.0, (len(q) - 1) / 3)
    pts = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(q)
    return pts, ("t-SNE 1", "t-SNE 2")


def activity_colours(q_intent, activities, annotations=None, video_ids=None, *,
                     neighbors: int = 0) -> np.ndarray:
    """The activity each video is coloured by in Fig. 11: ``activities`` as given
    (``neighbors=0``), or the paper's: of the video's own activities, the one that most of
    its ``neighbors`` nearest videos (Euclidean, in Q_I) also have (ties: ``activities``'s
    class, then the lowest index; needs ``annotations`` and ``video_ids``)."""
    activities = np.asarray(activities, dtype=np.int64)
    if not neighbors:
        return activities
    q = np.asarray(q_intent, dtype=np.float64)
    index = {v.id: v for v in annotations}
    has = [set(index[v].classes.tolist()) for v in video_ids]
    dist = ((q[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    out = activities.copy()
    for i, own in enumerate(has):
        if not own:
            continue
        near = np.argsort(dist[i], kind="stable")[:min(neighbors, len(q) - 1)]
        votes = {c: sum(c in has[j] for j in near) for c in own}
        out[i] = min(votes, key=lambda c: (-votes[c], c != activities[i], c))
    return out


def plot_intent_embedding(preds, annotations, labels=None, *, method: str = "pca",
                          neighbors: int = 0, legend: int = 10, ax=None, path=None):
    """Fig. 11: each video's intent distribution Q_I (``preds.q_intent``) embedded in 2-D,
    one point a video, coloured by its most frequent activity
    (:func:`most_frequent_activity`; with ``neighbors=k`` the paper's "activity shared by
    most of the k nearest neighbours", :func:`activity_colours`).

    ``method``: ``"pca"`` (numpy SVD of the centred Q_I) or ``"tsne"`` (scikit-learn). The
    ``legend`` most common activities get their own colour and a legend entry; the rest are
    grey ("other activities").

    Raises FieldlibError: predictions without intents (mode none, passes 0, fused), fewer
    than 3 videos, a video not in ``annotations``, an unknown method, t-SNE without
    scikit-learn; ShapeError: ``q_intent`` not (videos, N_I).
    """
    if method not in EMBEDDINGS:
        raise FieldlibError(f"plot: method must be one of {', '.join(EMBEDDINGS)}, "
                            f"got {method!r}")
    if preds.q_intent is None:
        raise FieldlibError("plot: the predictions have no intent distributions (a run "
                            "without the intent factor, passes=0, or fused predictions)")
    q = np.asarray(preds.q_intent, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] != len(preds):
        raise ShapeError(f"plot: q_intent of shape {q.shape} for {len(preds)} videos")
    if len(q) < 3:
        raise FieldlibError(f"plot: an embedding needs at least 3 videos, got {len(q)}")
    names = _classes(labels, preds.n_classes).names
    act = activity_colours(q, most_frequent_activity(annotations, preds.video_ids),
                           annotations, preds.video_ids, neighbors=neighbors)
    pts, (xlabel, ylabel) = _embed(q, method)
    import matplotlib
    ax = _axes(ax, (8.5, 6), path)
    kinds, counts = np.unique(act[act >= 0], return_counts=True)
    common = kinds[np.argsort(-counts, kind="stable")][:legend]
    rest = ~np.isin(act, common)
    ax.scatter(pts[rest, 0], pts[rest, 1], s=18, color="0.75", label="other activities"
               if rest.any() else None)
    palette = [f"C{k}" for k in range(10)] if len(common) <= 10 else \
        [matplotlib.colormaps["tab20"](k) for k in range(20)]
    for k, c in enumerate(common):
        sel = act == c
        ax.scatter(pts[sel, 0], pts[sel, 1], s=30, color=palette[k % len(palette)],
                   label=f"{_short(names[c])} ({int(sel.sum())})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    how = (f"activity shared by most of the {neighbors} nearest videos" if neighbors else
           "each video's most frequent activity")
    ax.set_title(f"Intent distributions Q_I of {len(q)} videos, {method.upper()} "
                 f"(Fig. 11)\ncoloured by {how}", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    return _finish(ax.figure, path)


# -- Fig. 7: AP gain and loss over none ---------------------------------------------------------
def _ap(x) -> np.ndarray:
    return np.asarray(x.ap if hasattr(x, "ap") else x, dtype=np.float64)


def plot_ap_difference(full, baseline, labels=None, *, top: int = 8,
                       names: tuple[str, str] = ("full model", "none"), ax=None, path=None):
    """Fig. 7: the ``top`` classes whose AP the full model gains most over the baseline
    (a ``none`` run: φX only) and the ``top`` it loses most, as horizontal bars of
    ``AP_full - AP_baseline`` with both APs written beside. Classes whose AP is NaN in
    either (no positive among the evaluated videos) are left out.

    Args:
        full, baseline: :class:`EvalResult` (or per-class AP arrays) of the same classes,
            scored on the same videos.
        names: the two models' names in the title and axis label.

    Raises FieldlibError: ``top < 1``, no class with an AP in both; ShapeError: class
    counts differ.
    """
    a, b = _ap(full), _ap(baseline)
    if a.shape != b.shape or a.ndim != 1:
        raise ShapeError(f"plot: AP arrays of shape {a.shape} and {b.shape} differ")
    if top < 1:
        raise FieldlibError(f"plot: top must be >= 1, got {top}")
    vocab = _classes(labels, a.size)
    ok = np.flatnonzero(np.isfinite(a) & np.isfinite(b))
    if not ok.size:
        raise FieldlibError("plot: no class has an AP in both results (no positives among "
                            "the evaluated videos)")
    diff = a[ok] - b[ok]
    order = ok[np.argsort(-diff, kind="stable")]
    gains = [c for c in order[:top] if a[c] - b[c] > 0]
    losses = [c for c in order[::-1][:top] if a[c] - b[c] < 0 and c not in gains][::-1]
    shown = gains + losses
    if not shown:
        shown = list(order[:top])
    d = np.array([a[c] - b[c] for c in shown])
    ax = _axes(ax, (9, 1.0 + 0.32 * len(shown)), path)
    y = np.arange(len(shown))
    ax.barh(y, d, color=["#2b7bba" if v > 0 else "#a6611a" for v in d])
    ax.set_yticks(y)
    ax.set_yticklabels([_short(vocab.names[c], 40) for c in shown], fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.axvline(0, color="k", lw=0.8)
    span = float(np.abs(d).max()) or 1.0
    for k, c in enumerate(shown):
        ax.text(d[k] + (0.02 if d[k] >= 0 else -0.02) * span, k,
                f"{a[c]:.2f} vs {b[c]:.2f}", va="center", fontsize=7,
                ha="left" if d[k] >= 0 else "right")
    ax.set_xlim(-1.35 * span if (d < 0).any() else -0.05 * span,
                1.35 * span if (d > 0).any() else 0.05 * span)
    ax.set_xlabel(f"AP difference ({names[0]} − {names[1]}); beside: AP {names[0]} vs "
                  f"{names[1]}")
    none_side = "" if gains and losses else \
        ("; no class lost AP" if gains else "; no class gained AP" if losses else
         "; no AP differs")
    ax.set_title(f"Classes with the largest AP gain and loss over {names[1]} (Fig. 7; "
                 f"{ok.size} classes with positives{none_side})", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _finish(ax.figure, path)
