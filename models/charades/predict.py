"""Test-time prediction of the Charades temporal field, two-stream fusion, submissions and
their official scores (MATH.md §3, §7, §8, §9; docs/charades.md, "Prediction").

For every video: the 25 official time points ``((k-1)/25) * length`` (MATH.md §8), one
frame each; one network forward for all frames of a batch of videos; one
:func:`~fieldlib.models.charades.crf.video_graph` and one synchronous mean-field call for
the batch (MATH.md §3, Eq. 5-6). Then (MATH.md §7, §9)

    frame score  s_t(c) = Σ_{states x of class c} Q_t(x)     (over progress and scene)
    video score  s(c)   = max_t s_t(c)

Passes: the engine starts from Q_t ∝ exp φX(x_t) (``init="unary"``: the frames' first
pass from zero messages, "pass 0" here) and then runs ``passes`` synchronous sweeps
(default 10: MATH.md §9's "pass 1 from zero messages, then 10 synchronous passes"), each
"every Q_t from the previous iterate, then Q_I". The intent marginal Q_I starts uniform,
so the frames of sweep 1 receive E_uniform[φXI] = mean_I φXI(x, I) rather than a Q_I
computed from pass 0 (the engine has no option for an initial Q; after a few sweeps the
two agree). ``passes=0`` returns pass 0 (no engine call).

Fusion (:func:`fuse`): ``"product"`` (the paper) multiplies the RGB and flow frame class
probabilities, not renormalised, and takes the video score as the max over frames of the
fused frame scores; ``"average"`` (the released code) averages the two streams'
submission scores 0.5/0.5, frame rows and video rows each.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.inference import get_engine

from .annotations import Annotations
from .crf import class_scores, frame_inputs, frame_layout, video_graph
from .labels import Vocabulary
from .metrics import EvalResult, classify_map, localize_map, submission_from_arrays
from .statespace import JPEG_FPS, N_TEST_FRAMES, frame_numbers, time_points_matrix
from .submission import write_classify_submission, write_localize_submission

__all__ = ["DEFAULT_PASSES", "FUSIONS", "SPLITS", "SUBMISSION_FILES", "Predictions",
           "evaluate", "evaluation_json", "fuse", "load_predictions", "predict_run",
           "predict_videos", "split_videos", "write_submissions"]

#: Synchronous mean-field sweeps after the pass from zero messages (paper: 10).
DEFAULT_PASSES = 10
#: Two-stream fusion methods: the paper's product, the released code's average.
FUSIONS = ("product", "average")
#: Which videos of a run :func:`predict_run` predicts: its data's test or training videos.
SPLITS = ("test", "train")
#: File names :func:`write_submissions` writes in its folder.
SUBMISSION_FILES = {"classify": "classify_submission.txt",
                    "localize": "localize_submission.txt"}


@dataclass
class Predictions:
    """Scores of a set of videos at the official time points (module docstring).

    Attributes:
        video_ids: the videos, in prediction order (list of n ids).
        frame_scores: float64 ``(n, 25, n_classes)``: class probabilities Q_t summed onto
            C at each time point (0 for classes not in B); each row sums to 1.
        video_scores: float64 ``(n, n_classes)``: max over the 25 frames (product fusion),
            or the averaged video scores (average fusion).
        times: float64 ``(n, 25)``: the time points in seconds.
        q_intent: float64 ``(n, N_I)``: Q_I after the last pass, or None (no intent
            factor, ``passes=0``, fused predictions).
        pass_scores: float64 ``(m, passes + 1, 25, n_classes)``: frame scores after pass
            0, 1, ..., passes for the first m videos (``pass_videos``), or None.
        info: what produced them (stream, passes, options, seconds; fusion and the
            streams' info for fused predictions).
    """

    video_ids: list[str]
    frame_scores: np.ndarray
    video_scores: np.ndarray
    times: np.ndarray
    q_intent: np.ndarray | None = None
    pass_scores: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def n_classes(self) -> int:
        return int(self.frame_scores.shape[-1])

    def save(self, path) -> Path:
        """Write an ``.npz`` (no pickles; :func:`load_predictions` reads it back)."""
        arrays = {"video_ids": np.asarray(self.video_ids, dtype=str),
                  "frame_scores": self.frame_scores, "video_scores": self.video_scores,
                  "times": self.times, "info": np.asarray(json.dumps(self.info))}
        for name in ("q_intent", "pass_scores"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        path = Path(path)
        try:
            with path.open("wb") as f:
                np.savez(f, **arrays)
        except OSError as exc:
            raise FieldlibError(f"{path}: cannot write: {exc.strerror or exc}") from None
        return path


def load_predictions(path) -> Predictions:
    """The :class:`Predictions` saved by :meth:`Predictions.save`; FieldlibError naming
    the file when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            doc = {k: z[k] for k in z.files}
        return Predictions([str(v) for v in doc["video_ids"]], doc["frame_scores"],
                           doc["video_scores"], doc["times"], doc.get("q_intent"),
                           doc.get("pass_scores"), json.loads(str(doc["info"])))
    except (OSError, ValueError, KeyError) as exc:
        raise FieldlibError(f"{path}: not a saved Predictions file ({exc})") from None


# -- prediction ---------------------------------------------------------------------------------
def _options(net, config, component, use_temporal, use_intent) -> dict:
    """The field options: explicit ones first, then the config's, then the network's."""
    if config is not None:
        component = config.component if component is None else component
        use_temporal = config.uses_temporal if use_temporal is None else use_temporal
        use_intent = config.uses_intent if use_intent is None else use_intent
    return {"component": getattr(net, "component", "object") if component is None else
            component,
            "use_temporal": True if use_temporal is None else bool(use_temporal),
            "use_intent": True if use_intent is None else bool(use_intent)}


def _count(value, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise FieldlibError(f"predict: {what} must be an integer >= {low}, got {value!r}")
    return int(value)


def _render(videos, times: np.ndarray, source, stream: str) -> torch.Tensor:
    """``(len(videos) * 25, C, H, W)``: each video's frames at its time points, video-major
    (one source call a video)."""
    render = getattr(source, stream, None)
    if render is None:
        raise FieldlibError(f"predict: the frame source has no {stream!r} stream")
    frames = [render(v, frame_numbers(t, JPEG_FPS, source.n_frames(v)))
              for v, t in zip(videos, times)]
    return torch.cat([torch.as_tensor(f) for f in frames])


def _unary_q(heads, layout, component: str) -> torch.Tensor:
    """``(N, T, |B| S)``: pass 0, Q_t ∝ exp φX(x_t) (all messages zero)."""
    n, t = heads.batch_shape
    unary = frame_inputs(heads.flatten(), layout, component=component,
                         use_intent=False)["unary"]
    return torch.softmax(unary, -1).reshape(n, t, -1)


def _field(heads, layout, net, times, opts):
    return video_graph(heads, layout, mu=net.mu if opts["use_temporal"] else None,
                       kernel=net.kernel(), times=times, **opts)


def _engine(passes: int):
    return get_engine("meanfield", schedule="synchronous", max_iter=passes, tol=0.0,
                      init="unary", track_elbo=False)


def _subset(heads, m: int):
    return type(heads)(**{k: v[:m] for k, v in heads.tensors().items()})


def predict_videos(net, space, annotations, source, stream: str | None = None, *,
                   config=None, component: str | None = None,
                   use_temporal: bool | None = None, use_intent: bool | None = None,
                   passes: int = DEFAULT_PASSES, batch_videos: int = 8, pass_videos: int = 0,
                   n_frames: int = N_TEST_FRAMES, progress: bool = True) -> Predictions:
    """Frame and video class scores of ``annotations`` (module docstring; MATH.md §7).

    Args:
        net: a :class:`~fieldlib.models.charades.network.StreamNet` (run in eval mode
            under ``torch.no_grad``; its mode is restored afterwards), on any device.
        space: its :class:`StateSpace` (or a ``FrameLayout``).
        annotations: the videos (an ``Annotations`` or a sequence of ``Video``); only
            ids and lengths are read.
        source: frames, ``source.rgb(video, frame_numbers)`` / ``.flow(...)`` and
            ``source.n_frames(video)`` (a run's ``data.source``).
        stream: ``"rgb"`` or ``"flow"`` (default: ``config.stream``, else ``net.stream``).
        config: a TrainConfig giving ``component``, ``uses_temporal``, ``uses_intent``
            (mode ``"none"``: φX only); explicit options override it.
        passes: synchronous sweeps after pass 0 (0: pass 0 only).
        batch_videos: videos per network forward and engine call.
        pass_videos: record :attr:`Predictions.pass_scores` for the first this many videos
            (one extra engine run per pass count 1..passes, on those videos only).
        n_frames: time points a video (the official scorer: 25).
        progress: a tqdm bar over batches.

    Raises:
        FieldlibError: no videos, bad counts, a source without the stream; the CRF's and
            engine's errors (ShapeError when the network does not fit the state space).
    """
    from tqdm import tqdm

    videos = list(annotations)
    if not videos:
        raise FieldlibError("predict: no videos to predict")
    passes = _count(passes, "passes", 0)
    batch_videos = _count(batch_videos, "batch_videos", 1)
    pass_videos = min(_count(pass_videos, "pass_videos", 0), len(videos))
    n_frames = _count(n_frames, "n_frames", 1)
    stream = stream or (config.stream if config is not None else getattr(net, "stream", None))
    opts = _options(net, config, component, use_temporal, use_intent)
    layout = frame_layout(space)
    engine = _engine(passes) if passes else None
    param = next(net.parameters())
    t0 = time.perf_counter()
    times_all = time_points_matrix([v.length for v in videos], n_frames)
    frames_out, intents, traces = [], [], []
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(videos), batch_videos)
            for start in tqdm(starts, desc=f"predict {stream}", unit="batch",
                              disable=not progress):
                batch = videos[start:start + batch_videos]
                times = times_all[start:start + len(batch)]
                images = _render(batch, times, source, stream)
                heads = net(images.to(device=param.device, dtype=param.dtype))
                heads = heads.view(len(batch), n_frames)
                tt = torch.from_numpy(times).to(param.device)
                if engine is None:
                    q, qi = _unary_q(heads, layout, opts["component"]), None
                else:
                    result = engine(_field(heads, layout, net, tt, opts).graph)
                    q = result.marginals["x"]
                    qi = result.marginals["I"] if opts["use_intent"] else None
                frames_out.append(class_scores(q, layout).double().cpu())
                if qi is not None:
                    intents.append(qi.double().cpu())
                m = min(len(batch), pass_videos - start)
                if m > 0:
                    traces.append(_pass_trace(_subset(heads, m), layout, net, tt[:m], opts,
                                              passes))
    finally:
        net.train(was_training)
    frame_scores = torch.cat(frames_out).numpy()
    info = {"stream": stream, "passes": passes, "engine": "meanfield synchronous, init unary",
            "videos": len(videos), "n_frames": n_frames, "batch_videos": batch_videos,
            "seconds": time.perf_counter() - t0, **opts}
    return Predictions([v.id for v in videos], frame_scores, frame_scores.max(1), times_all,
                       torch.cat(intents).numpy() if intents else None,
                       torch.cat(traces).numpy() if traces else None, info)


def _pass_trace(heads, layout, net, times, opts, passes: int) -> torch.Tensor:
    """``(m, passes + 1, T, n_classes)``: frame scores after pass 0..passes (pass 0 by
    hand, pass k from a fresh engine run of k sweeps: the engine's trace holds no
    iterates; with ``tol=0`` its first k sweeps are those of the full run)."""
    out = [class_scores(_unary_q(heads, layout, opts["component"]), layout)]
    if passes:
        graph = _field(heads, layout, net, times, opts).graph
        for k in range(1, passes + 1):
            out.append(class_scores(_engine(k)(graph).marginals["x"], layout))
    return torch.stack(out, 1).double().cpu()


def split_videos(data, split: str = "test", videos: int | None = None) -> Annotations:
    """The first ``videos`` (all when None) of a run's ``data.test`` or ``data.train``.

    Raises FieldlibError: an unknown split, a bad count, no videos in the split."""
    if split not in SPLITS:
        raise FieldlibError(f"predict: split must be one of {', '.join(SPLITS)}, "
                            f"got {split!r}")
    rows = data.test if split == "test" else data.train
    if videos is not None:
        rows = Annotations(list(rows)[:_count(videos, "videos", 1)], rows.path)
    if not len(rows):
        where = "no test annotations (Charades_v1_test.csv)" if split == "test" else \
            "no training videos"
        raise FieldlibError(f"predict: the run's data has {where}")
    return rows


def predict_run(run_dir, *, split: str = "test", videos: int | None = None,
                model_file: str | None = None, device=None, **options):
    """Load a run (:func:`~fieldlib.models.charades.runs.load_run`) and predict the
    first ``videos`` of its ``split`` with its configuration's options.

    ``options`` go to :func:`predict_videos` (``passes``, ``batch_videos``,
    ``pass_videos``, ``progress``, ...); ``device`` moves the network there first.
    Returns ``(predictions, ground-truth Annotations of those videos, TrainingData)``.
    Raises FieldlibError as load_run, :func:`split_videos` and :func:`predict_videos`."""
    from .runs import load_run

    config, data, net = load_run(run_dir, model_file=model_file)
    if device is not None:
        try:
            net = net.to(device)
        except (RuntimeError, AssertionError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FieldlibError(f"predict: cannot use device {device!r} ({first})") from None
    gt = split_videos(data, split, videos)
    preds = predict_videos(net, data.space, gt, data.source, data.stream, config=config,
                           **options)
    preds.info.update(run_dir=str(run_dir), split=split)
    return preds, gt, data


# -- fusion -------------------------------------------------------------------------------------
def _aligned(rgb: Predictions, flow: Predictions) -> Predictions:
    """``flow`` in the video order of ``rgb``; FieldlibError when they cover other videos."""
    if rgb.video_ids == flow.video_ids:
        return flow
    a, b = set(rgb.video_ids), set(flow.video_ids)
    if a != b or len(a) != len(rgb) or len(b) != len(flow):
        only_a, only_b = sorted(a - b), sorted(b - a)
        what = []
        if only_a:
            what.append(f"{len(only_a)} only in the first (e.g. {only_a[0]!r})")
        if only_b:
            what.append(f"{len(only_b)} only in the second (e.g. {only_b[0]!r})")
        if not what:
            what.append("a video id appears twice")
        raise FieldlibError(f"fuse: the two predictions cover different videos: "
                            f"{'; '.join(what)} ({len(rgb)} and {len(flow)} videos)")
    where = {v: i for i, v in enumerate(flow.video_ids)}
    order = np.array([where[v] for v in rgb.video_ids])
    return Predictions(list(rgb.video_ids), flow.frame_scores[order],
                       flow.video_scores[order], flow.times[order], info=flow.info)


def fuse(rgb: Predictions, flow: Predictions, method: str = "product") -> Predictions:
    """Two-stream fusion (MATH.md §7, §9), in the first argument's video order.

    ``"product"`` (paper): fused frame score ``s_t(c) = p_rgb,t(c) * p_flow,t(c)`` (the
    product of the class probabilities, not renormalised: a per-frame constant would
    reorder frames and videos in a class's ranking), video score ``max_t s_t(c)``.
    ``"average"`` (released code): ``0.5 * (rgb + flow)`` of the submission scores, the
    frame rows and the video rows each (so the video score is the mean of the two video
    maxima).

    Raises FieldlibError: an unknown method; predictions of other videos (naming one) or
    other time points; ShapeError: different class or frame counts.
    """
    if method not in FUSIONS:
        raise FieldlibError(f"fuse: method must be one of {', '.join(FUSIONS)}, "
                            f"got {method!r}")
    flow = _aligned(rgb, flow)
    if rgb.frame_scores.shape != flow.frame_scores.shape:
        raise ShapeError(f"fuse: frame scores of shape {rgb.frame_scores.shape} and "
                         f"{flow.frame_scores.shape} (frames or classes differ)")
    if not np.array_equal(rgb.times, flow.times):
        raise FieldlibError("fuse: the two predictions are at different time points (video "
                            "lengths differ between their annotations)")
    if method == "product":
        frames = rgb.frame_scores * flow.frame_scores
        videos = frames.max(1)
    else:
        frames = 0.5 * (rgb.frame_scores + flow.frame_scores)
        videos = 0.5 * (rgb.video_scores + flow.video_scores)
    info = {"fusion": method, "streams": [rgb.info, flow.info]}
    return Predictions(list(rgb.video_ids), frames, videos, rgb.times.copy(), info=info)


# -- submissions and scores ---------------------------------------------------------------------
def write_submissions(preds: Predictions, out_dir, *, digits: int | None = None,
                      prefix: str = "") -> dict[str, Path]:
    """Write the official classification (one row a video) and localization (25 rows a
    video, frames 1..25) submissions into ``out_dir`` (created if needed), named
    ``prefix + SUBMISSION_FILES[task]``. ``digits=None`` writes exact floats (the files
    score exactly as the arrays); an int writes ``%.{digits}g``.

    Returns ``{"classify": path, "localize": path}``. Raises FieldlibError when the folder
    or a file cannot be written, or the scores hold NaN."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FieldlibError(f"{out}: cannot create the folder: {exc.strerror or exc}") from None
    paths = {task: out / f"{prefix}{name}" for task, name in SUBMISSION_FILES.items()}
    write_classify_submission(paths["classify"], preds.video_ids, preds.video_scores,
                              digits=digits)
    write_localize_submission(paths["localize"], preds.video_ids, preds.frame_scores,
                              digits=digits)
    return paths


def evaluate(preds: Predictions, annotations: Annotations) -> dict[str, EvalResult]:
    """The official scores (MATH.md §8) of ``preds`` against the ground truth
    ``annotations``: ``{"classify": EvalResult (Charades_v1_classify.m), "localize":
    EvalResult (Charades_v1_localize.m)}``, each with per-class AP, the official mAP (NaN
    when a class has no positive), ``map_nanmean`` and wAP. Ground-truth videos absent
    from ``preds`` score -inf (``n_missing``).

    Raises FieldlibError when a predicted video is not in ``annotations``, or the frame
    count is not the annotations' scorer's (``frame_scores`` must be ``(n, 25, C)``)."""
    if not isinstance(annotations, Annotations):
        annotations = Annotations(list(annotations))
    unknown = [v for v in preds.video_ids if v not in annotations.index]
    if unknown:
        raise FieldlibError(f"evaluate: {len(unknown)} predicted videos are not in the "
                            f"ground truth (e.g. {unknown[0]!r})")
    if preds.frame_scores.ndim != 3 or preds.frame_scores.shape[1] != N_TEST_FRAMES:
        raise FieldlibError(f"evaluate: localization needs {N_TEST_FRAMES} frames a video, "
                            f"the predictions have shape {preds.frame_scores.shape}")
    n_classes = preds.n_classes
    cls = submission_from_arrays("classify", preds.video_ids, preds.video_scores)
    loc = submission_from_arrays("localize", preds.video_ids, preds.frame_scores)
    return {"classify": classify_map(annotations, cls, n_classes),
            "localize": localize_map(annotations, loc, n_classes)}


def evaluation_json(results: dict[str, EvalResult], classes: Vocabulary | None = None,
                    **extra) -> dict:
    """A JSON-ready document of :func:`evaluate`'s results: ``{"classify": ...,
    "localize": ..., "note": ..., **extra}``, each task as ``EvalResult.to_json`` (``map``:
    the official plain mean, null when NaN; ``map_nanmean``: the mean over classes with
    positives; ``wap``; ``ap`` per class)."""
    doc = {task: res.to_json(classes) for task, res in results.items()}
    doc["note"] = ("map is the official plain mean over all classes (null = NaN when a class "
                   "has no positive); map_nanmean is the mean over the classes with "
                   "positives, not an official figure")
    doc.update(extra)
    return doc
