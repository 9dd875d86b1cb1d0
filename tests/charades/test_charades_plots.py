"""Charades figures (models/charades/plots.py, cli_plot.py): Fig. 4, 6, 7, 9, 11 from tiny
fake inputs, their errors, and ``fieldlib charades plot`` on a two-step training run."""

from __future__ import annotations

import json
import shutil

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.models.charades import plots
from fieldlib.models.charades.annotations import Annotations, Instance, Video, read_annotations
from fieldlib.models.charades.data import bundled_annotations
from fieldlib.models.charades.labels import load_labels
from fieldlib.models.charades.predict import Predictions, evaluate, load_predictions
from fieldlib.models.charades.statespace import time_points_matrix

MIN_BYTES = 15_000  # a PNG with axes, names and colour is well above this; a blank one not


@pytest.fixture(scope="module", autouse=True)
def _agg():
    """No screen: pyplot figures on the Agg backend (chosen before the first figure)."""
    matplotlib.use("Agg")


@pytest.fixture(scope="module")
def gt():
    ann = read_annotations(bundled_annotations()["test"], reversed_intervals="swap")
    return Annotations([v for v in ann if v.actions][:8], ann.path)


@pytest.fixture(scope="module")
def labels():
    return load_labels(bundled_annotations()["classes"]).with_derived_mapping()


def _fake(gt, seed=0, passes=3, pass_videos=2, intent=True) -> Predictions:
    """Class probabilities that are high inside each video's annotated intervals."""
    rng = np.random.default_rng(seed)
    times = time_points_matrix(gt.lengths)
    logit = rng.normal(0.0, 1.0, (len(gt), 25, 157))
    for i, v in enumerate(gt):
        for a in v.actions:
            logit[i, (times[i] >= a.start) & (times[i] <= a.end), a.cls] += 3.0
    p = np.exp(logit)
    p /= p.sum(-1, keepdims=True)
    trace = np.stack([p[:pass_videos] ** (1 / (1 + 0.3 * k)) for k in range(passes + 1)], 1)
    trace /= trace.sum(-1, keepdims=True)
    q = rng.dirichlet(np.full(30, 0.3), len(gt)) if intent else None
    return Predictions(gt.ids, p, p.max(1), times, q, trace if pass_videos else None, {})


@pytest.fixture(scope="module")
def preds(gt):
    return _fake(gt)


def _png(path):
    assert path.is_file() and path.stat().st_size > MIN_BYTES, path
    with path.open("rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _lines(rate, official=True, evals=True):
    out = []
    for s in range(1, 41):
        out.append({"step": s, "frames": 32 * s, "loss": 0.1, "nll": 5 * np.exp(-rate * s / 20),
                    "lr": 0.03, "seconds": 0.1 * s, "grad_norm": {}})
        if evals and s % 10 == 0:
            out.append({"eval": {"step": s, "frames": 32 * s,
                                 "classify_map": 0.1 + rate * s / 400 if official else None,
                                 "classify_map_nanmean": 0.12 + rate * s / 400,
                                 "localize_map": None, "localize_map_nanmean": 0.1}})
    return out


# -- Fig. 4 -------------------------------------------------------------------------------------
def test_fig4_png_and_figure(preds, labels, tmp_path):
    out = plots.plot_message_passes(preds, preds.video_ids[1], labels,
                                    path=tmp_path / "a" / "fig4.png")
    assert out == tmp_path / "a" / "fig4.png"
    _png(out)
    fig = plots.plot_message_passes(preds, labels=labels, passes=(0, 2), top=3)
    try:
        assert len(fig.axes) == 2 * 2 + 2  # (scores, change) a row + two colour bars
        names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        top = np.argsort(-preds.pass_scores[0, 2].max(0), kind="stable")[:3]
        assert names == [labels.classes.names[c][:34] for c in top]
        assert fig.axes[0].get_xlabel() == "" and "time" in fig.axes[-4].get_xlabel()
    finally:
        plt.close(fig)


def test_fig4_errors(preds, gt, labels):
    with pytest.raises(FieldlibError, match="'nope' is not in the predictions"):
        plots.plot_message_passes(preds, "nope", labels)
    with pytest.raises(FieldlibError, match="has no pass scores .only the first 2"):
        plots.plot_message_passes(preds, preds.video_ids[5], labels)
    with pytest.raises(FieldlibError, match=r"passes must lie in 0\.\.3"):
        plots.plot_message_passes(preds, passes=(0, 4))
    with pytest.raises(FieldlibError, match="no pass_scores"):
        plots.plot_message_passes(_fake(gt, pass_videos=0))
    with pytest.raises(ShapeError, match="12 class names for 157"):
        plots.plot_message_passes(preds, labels=labels.classes.__class__(
            labels.classes.ids[:12], labels.classes.names[:12]))


# -- Fig. 9 -------------------------------------------------------------------------------------
def test_verb_object_scores_are_marginals(preds, labels):
    verbs, objects = plots.verb_object_scores(preds.frame_scores, labels)
    assert verbs.shape == (len(preds), 25, len(labels.verbs))
    np.testing.assert_allclose(verbs.sum(-1), 1.0)
    np.testing.assert_allclose(objects.sum(-1), 1.0)
    v = int(labels.class_verb[7])
    np.testing.assert_allclose(verbs[2, :, v], preds.frame_scores[2][:, labels.class_verb == v]
                               .sum(-1))
    with pytest.raises(FieldlibError, match="mapping"):
        plots.verb_object_scores(preds.frame_scores, load_labels(bundled_annotations()
                                                                 ["classes"]))


def test_fig9_png_with_ground_truth(preds, gt, labels, tmp_path):
    video = preds.video_ids[0]
    _png(plots.plot_video_timeline(preds, video, labels, gt, path=tmp_path / "fig9.png"))
    fig = plots.plot_video_timeline(preds, video, labels, gt)
    try:
        n_gt = len({a.cls for a in gt[0].actions})
        assert len(fig.axes) == 3 + 2 + 1 + 1
        rows = [ax.get_yticklabels()[0].get_text() for ax in fig.axes[:6]]
        assert [r.split(":")[0] for r in rows] == ["Category"] * 3 + ["Action"] * 2 + \
            ["Object"]
        best = int(np.argmax(preds.frame_scores[0].max(0)))
        assert rows[0] == plots._short("Category: " + labels.classes.names[best], 44)
        assert len(fig.axes[-1].get_yticks()) == n_gt
        assert fig.axes[-1].get_xlim() == pytest.approx((0.0, gt[0].length))
    finally:
        plt.close(fig)
    fig = plots.plot_video_timeline(preds, video, labels.classes, categories=2)
    try:  # class names only: categories, no ground truth panel
        assert len(fig.axes) == 2 and "no class mapping" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_fig9_errors(preds, gt, labels):
    with pytest.raises(FieldlibError, match="'XXXXX' is not in the predictions"):
        plots.plot_video_timeline(preds, "XXXXX", labels, gt)
    with pytest.raises(FieldlibError, match="not in the ground-truth"):
        plots.plot_video_timeline(preds, preds.video_ids[0], labels, Annotations(list(gt)[1:]))
    with pytest.raises(FieldlibError, match=">= 0"):
        plots.plot_video_timeline(preds, preds.video_ids[0], labels, verbs=-1)


# -- Fig. 6 -------------------------------------------------------------------------------------
def test_fig6_png_and_nanmean_label(tmp_path):
    runs = {"async": _lines(1.0), "sync": _lines(0.5, official=False), "none": _lines(0.8)}
    _png(plots.plot_training_curves(runs, path=tmp_path / "fig6.png"))
    fig = plots.plot_training_curves(runs)
    try:
        left, right = fig.axes
        assert left.get_xlabel() == right.get_xlabel() == "frames processed"
        assert "mAP" in left.get_ylabel() and "NLL" in right.get_ylabel()
        legend = [t.get_text() for t in left.get_legend().get_texts()]
        assert legend == ["async", "sync (nan-mean)", "none"]
        x, y = left.lines[0].get_data()
        np.testing.assert_allclose(x, [320, 640, 960, 1280])
        np.testing.assert_allclose(y, [0.1 + s / 400 for s in (10, 20, 30, 40)])
    finally:
        plt.close(fig)


def test_fig6_without_evaluations(tmp_path):
    runs = {"async": _lines(1.0, evals=False)}
    with pytest.raises(FieldlibError, match="no evaluation lines .*--eval-every"):
        plots.plot_training_curves(runs)
    out = plots.plot_training_curves(runs, require_eval=False, path=tmp_path / "loss.png")
    _png(out)
    with pytest.raises(FieldlibError, match="neither training nor evaluation"):
        plots.plot_training_curves({"x": [{"step": 1}]}, require_eval=False)
    with pytest.raises(FieldlibError, match="no runs"):
        plots.plot_training_curves({})


def test_read_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in _lines(1.0)) + "\n\n")
    assert plots.read_metrics(path) == json.loads("[" + ",".join(
        json.dumps(d) for d in _lines(1.0)) + "]")
    path.write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(FieldlibError, match="metrics.jsonl: line 2: not a JSON object"):
        plots.read_metrics(path)
    with pytest.raises(FieldlibError, match="cannot read"):
        plots.read_metrics(tmp_path / "nowhere.jsonl")


# -- Fig. 11 ------------------------------------------------------------------------------------
def test_most_frequent_activity_and_neighbours():
    videos = Annotations([
        Video("a", "S", 10.0, (Instance(5, 0, 1), Instance(3, 0, 2), Instance(5, 2, 3))),
        Video("b", "S", 10.0, (Instance(3, 0, 1), Instance(7, 0, 4))),  # tie: longer wins
        Video("c", "S", 10.0, ()),
        Video("d", "S", 10.0, (Instance(7, 0, 1), Instance(3, 0, 1)))])
    act = plots.most_frequent_activity(videos, ["a", "b", "c", "d"])
    assert act.tolist() == [5, 7, -1, 3]
    q = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]])
    near = plots.activity_colours(q, act, videos, ["a", "b", "c", "d"], neighbors=2)
    assert near.tolist() == [3, 3, -1, 3]  # a's neighbours b, d both have class 3
    with pytest.raises(FieldlibError, match="'z' is not in the ground-truth"):
        plots.most_frequent_activity(videos, ["z"])


def test_fig11_png_pca(preds, gt, labels, tmp_path):
    _png(plots.plot_intent_embedding(preds, gt, labels, path=tmp_path / "fig11.png"))
    fig, ax = plt.subplots()
    try:
        assert plots.plot_intent_embedding(preds, gt, labels, ax=ax, neighbors=3) is fig
        assert ax.get_xlabel().startswith("PC 1 (") and "variance" in ax.get_ylabel()
        q = preds.q_intent - preds.q_intent.mean(0)
        pts = np.concatenate([c.get_offsets() for c in ax.collections])
        assert len(pts) == len(preds)
        u, sv, _ = np.linalg.svd(q, full_matrices=False)
        expect = u[:, :2] * sv[:2]
        got = np.sort(np.abs(pts), axis=0)
        np.testing.assert_allclose(got, np.sort(np.abs(expect), axis=0), atol=1e-12)
    finally:
        plt.close(fig)


def test_fig11_errors(preds, gt, labels):
    with pytest.raises(FieldlibError, match="no intent distributions"):
        plots.plot_intent_embedding(_fake(gt, intent=False), gt, labels)
    two = Predictions(preds.video_ids[:2], preds.frame_scores[:2], preds.video_scores[:2],
                      preds.times[:2], preds.q_intent[:2])
    with pytest.raises(FieldlibError, match="at least 3 videos"):
        plots.plot_intent_embedding(two, gt, labels)
    with pytest.raises(FieldlibError, match="method must be one of pca, tsne"):
        plots.plot_intent_embedding(preds, gt, labels, method="umap")
    with pytest.raises(FieldlibError, match="not in the ground-truth"):
        plots.plot_intent_embedding(preds, Annotations(list(gt)[:3]), labels)


def test_fig11_tsne_where_available(preds, gt, labels):
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        with pytest.raises(FieldlibError, match="t-SNE needs scikit-learn"):
            plots.plot_intent_embedding(preds, gt, labels, method="tsne")
        return
    fig, ax = plt.subplots()
    try:
        plots.plot_intent_embedding(preds, gt, labels, method="tsne", ax=ax)
        assert ax.get_xlabel() == "t-SNE 1" and "TSNE" in ax.get_title()
        assert sum(len(c.get_offsets()) for c in ax.collections) == len(preds)
    finally:
        plt.close(fig)


# -- Fig. 7 -------------------------------------------------------------------------------------
def test_fig7_png_gains_and_losses(gt, labels, tmp_path):
    full, base = (evaluate(_fake(gt, seed=s), gt)["classify"] for s in (1, 2))
    _png(plots.plot_ap_difference(full, base, labels, path=tmp_path / "fig7.png"))
    fig, ax = plt.subplots()
    try:
        plots.plot_ap_difference(full, base, labels, top=3, ax=ax)
        widths = [p.get_width() for p in ax.patches]
        diff = full.ap - base.ap
        ok = np.isfinite(diff)
        assert max(widths) == pytest.approx(diff[ok].max())
        if (diff[ok] < 0).any():
            assert min(widths) == pytest.approx(diff[ok].min())
        assert len(widths) <= 6 and widths == sorted(widths, reverse=True)
        assert "AP difference" in ax.get_xlabel()
        names = {t.get_text() for t in ax.get_yticklabels()}
        assert labels.classes.names[int(np.nanargmax(diff))][:39] in {n[:39] for n in names}
    finally:
        plt.close(fig)


def test_fig7_errors(labels):
    with pytest.raises(ShapeError, match="differ"):
        plots.plot_ap_difference(np.zeros(157), np.zeros(12))
    with pytest.raises(FieldlibError, match="no class has an AP in both"):
        plots.plot_ap_difference(np.full(157, np.nan), np.zeros(157), labels)
    with pytest.raises(FieldlibError, match="top must be >= 1"):
        plots.plot_ap_difference(np.zeros(157), np.zeros(157), top=0)


# -- the CLI ------------------------------------------------------------------------------------
def _main(argv, monkeypatch):
    """``fieldlib`` with ``argv`` (``charades plot`` is wired in models/charades/cli.py)."""
    from fieldlib.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A two-step training run with the test predictions of 3 videos (pass scores of 1)."""
    import torch

    from fieldlib.models.charades.config import TrainConfig
    from fieldlib.models.charades.predict import predict_run
    from fieldlib.models.charades.train import Trainer

    root = tmp_path_factory.mktemp("plot_run") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(TrainConfig(videos=6, steps=2), root).run(progress=False)
        preds, _, _ = predict_run(root, split="test", videos=3, passes=3, pass_videos=1,
                                  progress=False)
    finally:
        torch.set_num_threads(n)
    (root / "predict").mkdir()
    preds.save(root / "predict" / "predictions.npz")
    return root


def _none_run(run_dir, where):
    """A fake 'none' run: the run's config with mode none, perturbed predictions."""
    where.mkdir()
    doc = json.loads((run_dir / "config.json").read_text())
    doc["mode"] = "none"
    (where / "config.json").write_text(json.dumps(doc))
    shutil.copy(run_dir / "metrics.jsonl", where / "metrics.jsonl")
    p = load_predictions(run_dir / "predict" / "predictions.npz")
    rng = np.random.default_rng(3)
    fs = p.frame_scores * rng.uniform(0.2, 1.8, p.frame_scores.shape)
    (where / "predict").mkdir()
    Predictions(p.video_ids, fs, fs.max(1), p.times).save(where / "predict" /
                                                           "predictions.npz")
    return where


def test_cli_writes_every_figure(run_dir, tmp_path, capsys, monkeypatch):
    none = _none_run(run_dir, tmp_path / "none")
    out = tmp_path / "figs"
    assert _main(["charades", "plot", "--run-dir", str(run_dir), "--none-run-dir", str(none),
                  "--out", str(out)], monkeypatch) == 0
    text = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    video = next(n for n in names if n.startswith("fig9_")).removeprefix(
        "fig9_timeline_").removesuffix(".png")
    assert names == sorted(["fig4_message_passes.png", f"fig9_timeline_{video}.png",
                            "fig11_intent_embedding.png", "fig7_ap_difference.png",
                            "fig6_training_loss.png"])
    for name in names:
        _png(out / name)
        assert str(out / name) in text
    assert "skipped:" in text and "no evaluation lines" in text and "--eval-every" in text
    assert "runs: async, none" in text

    # without --none-run-dir: Fig. 7 skipped and said why; --video chooses Fig. 9's video
    other = tmp_path / "figs2"
    ids = load_predictions(run_dir / "predict" / "predictions.npz").video_ids
    assert _main(["charades", "plot", "--run-dir", str(run_dir), "--out", str(other),
                  "--video", ids[2]], monkeypatch) == 0
    text = capsys.readouterr().out
    assert "fig7" in text and "needs --none-run-dir" in text
    assert (other / f"fig9_timeline_{ids[2]}.png").is_file()
    assert f"--video {ids[2]} has no pass scores" in text


def test_cli_errors_are_one_line_exit_2(run_dir, tmp_path, capsys, monkeypatch):
    def one_line(argv, *needles):
        assert _main(["charades", "plot", *argv], monkeypatch) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("fieldlib: error:"), err
        for needle in needles:
            assert needle in err[0], (needle, err[0])

    one_line(["--run-dir", str(tmp_path / "nowhere")], "--run-dir", "no such folder")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.json", bare / "config.json")
    one_line(["--run-dir", str(bare)], "predict/predictions.npz", "fieldlib charades predict")
    one_line(["--run-dir", str(run_dir), "--video", "NOPE1"], "--video NOPE1",
             "not among the 3 predicted videos")
    one_line(["--run-dir", str(run_dir), "--none-run-dir", str(bare)], "--none-run-dir",
             "predictions.npz")
    one_line(["--run-dir", str(run_dir), "--top", "0"], "--top must be >= 1")
