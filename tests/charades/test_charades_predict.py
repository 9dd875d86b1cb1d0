"""Charades prediction (models/charades/predict.py, cli_predict.py; MATH.md §7-8): scores of
the 25 official time points, batching, pass 0 by hand, submissions, fusion, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fieldlib.errors import FieldlibError
from fieldlib.models.charades.config import TrainConfig
from fieldlib.models.charades.data import load_training_data
from fieldlib.models.charades.metrics import classify_map, localize_map
from fieldlib.models.charades.predict import (
    SUBMISSION_FILES,
    Predictions,
    evaluate,
    evaluation_json,
    fuse,
    load_predictions,
    predict_videos,
    split_videos,
    write_submissions,
)
from fieldlib.models.charades.runs import build_network, load_run
from fieldlib.models.charades.statespace import JPEG_FPS, frame_numbers, time_points
from fieldlib.models.charades.submission import (
    read_classify_submission,
    read_localize_submission,
)


def _make_run(root, stream: str, seed: int):
    """A run directory with random weights: µ and φXI made large enough to matter."""
    root.mkdir()
    config = TrainConfig(videos=8, stream=stream, seed=seed)
    config.save(root / "config.json")
    data = load_training_data(config)
    torch.manual_seed(seed)
    net = build_network(config, data.space)
    with torch.no_grad():
        net.mu.normal_(0.0, 1.0)
        net.phi_xi[-1].weight.mul_(30.0)
        net.phi_b.weight.mul_(30.0)
    torch.save(net.state_dict(), root / "model.pt")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict_runs")
    return {"rgb": _make_run(base / "rgb", "rgb", 1), "flow": _make_run(base / "flow", "flow", 2)}


@pytest.fixture(scope="module")
def run(runs):
    config, data, net = load_run(runs["rgb"])
    return config, data, net, split_videos(data, "test", 4)


@pytest.fixture(scope="module")
def preds(run):
    config, data, net, gt = run
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's per-test fixture (not active yet here)
    try:
        return predict_videos(net, data.space, gt, data.source, config=config,
                              batch_videos=4, pass_videos=2, passes=4, progress=False)
    finally:
        torch.set_num_threads(n)


def _unary_by_hand(net, data, gt):
    """(N, 25, |B| S) φX(b * S + s) = φ(o,p) + φ(a,p) + φ(o,s) + φ(c,o,a,p), from the
    network's heads on frames rendered here."""
    frames = [data.source.rgb(v, frame_numbers(time_points(v.length), JPEG_FPS,
                                               data.source.n_frames(v))) for v in gt]
    with torch.no_grad():
        h = net(torch.cat(frames))
    cfg = torch.as_tensor(data.space.states)  # (|B|, 4): c, o, a, p
    o, a, p = cfg[:, 1], cfg[:, 2], cfg[:, 3]
    phi = (h.phi_op[:, o, p] + h.phi_ap[:, a, p] + h.phi_b)[:, :, None] + h.phi_os[:, o, :]
    return phi.reshape(len(gt), 25, -1).double()


def _classes_by_hand(q, space):
    """Σ over the states of each class (numpy add.at, states b * S + s)."""
    q = q.numpy().reshape(*q.shape[:2], space.size, space.n_scenes).sum(-1)
    out = np.zeros((*q.shape[:2], space.labels.n_classes))
    np.add.at(out.transpose(2, 0, 1), space.states[:, 0], q.transpose(2, 0, 1))
    return out


def test_shapes_and_video_score_is_max_over_frames(preds, run):
    _, data, _, gt = run
    c = data.labels.n_classes
    assert preds.video_ids == gt.ids and len(preds) == 4
    assert preds.frame_scores.shape == (4, 25, c) and preds.video_scores.shape == (4, c)
    assert preds.q_intent.shape == (4, 30) and preds.pass_scores.shape == (2, 5, 25, c)
    np.testing.assert_array_equal(preds.video_scores, preds.frame_scores.max(1))
    np.testing.assert_array_equal(preds.times, np.stack([time_points(v.length) for v in gt]))
    np.testing.assert_allclose(preds.q_intent.sum(-1), 1.0, atol=1e-6)


def test_frame_scores_are_class_probabilities(preds, run):
    _, data, _, _ = run
    assert (data.space.states[:, 0] >= 0).all()  # every state belongs to one class
    np.testing.assert_allclose(preds.frame_scores.sum(-1), 1.0, atol=1e-5)
    assert (preds.frame_scores >= 0).all()
    absent = np.setdiff1d(np.arange(data.labels.n_classes), data.space.states[:, 0])
    assert absent.size and (preds.frame_scores[..., absent] == 0).all()


def test_no_temporal_no_intent_is_softmax_of_unary_by_hand(run):
    config, data, net, gt = run
    expect = _classes_by_hand(torch.softmax(_unary_by_hand(net, data, gt), -1), data.space)
    for kwargs in ({"use_temporal": False, "use_intent": False},
                   {"config": TrainConfig(videos=8, mode="none")}):
        p = predict_videos(net, data.space, gt, data.source, "rgb", passes=3,
                           progress=False, **kwargs)
        np.testing.assert_allclose(p.frame_scores, expect, atol=1e-6)
        assert p.q_intent is None
    # pass 0 of the full field is the same (all messages zero); passes=0 returns it
    p0 = predict_videos(net, data.space, gt, data.source, config=config, passes=0,
                        pass_videos=1, progress=False)
    np.testing.assert_allclose(p0.frame_scores, expect, atol=1e-6)
    np.testing.assert_allclose(p0.pass_scores[:, 0], expect[:1], atol=1e-6)


def test_passes_change_scores_and_trace_ends_at_the_result(preds, run):
    config, data, net, gt = run
    expect0 = _classes_by_hand(torch.softmax(_unary_by_hand(net, data, gt), -1), data.space)
    np.testing.assert_allclose(preds.pass_scores[:, 0], expect0[:2], atol=1e-6)
    np.testing.assert_allclose(preds.pass_scores[:, -1], preds.frame_scores[:2], atol=1e-6)
    assert np.abs(preds.pass_scores[:, 1] - preds.pass_scores[:, 0]).max() > 1e-2  # coupled


def test_batching_invariance(run, preds):
    config, data, net, gt = run
    one = predict_videos(net, data.space, gt, data.source, config=config, batch_videos=1,
                         passes=4, progress=False)
    three = predict_videos(net, data.space, gt, data.source, config=config, batch_videos=3,
                           passes=4, progress=False)
    for p in (one, three):
        np.testing.assert_allclose(p.frame_scores, preds.frame_scores, atol=1e-6, rtol=0)
        np.testing.assert_allclose(p.video_scores, preds.video_scores, atol=1e-6, rtol=0)
        np.testing.assert_allclose(p.q_intent, preds.q_intent, atol=1e-6, rtol=0)


def test_submission_files_round_trip_and_score_as_the_arrays(preds, run, tmp_path):
    _, data, _, gt = run
    paths = write_submissions(preds, tmp_path / "sub")
    assert {k: p.name for k, p in paths.items()} == SUBMISSION_FILES
    cls = read_classify_submission(paths["classify"], known_ids=gt.index)
    loc = read_localize_submission(paths["localize"], known_ids=gt.index)
    assert cls.ids == preds.video_ids and len(loc) == 4 * 25
    assert loc.frames.tolist() == list(range(1, 26)) * 4
    np.testing.assert_array_equal(cls.scores, preds.video_scores)
    np.testing.assert_array_equal(loc.scores, preds.frame_scores.reshape(-1, 157))
    results = evaluate(preds, gt)
    from_files = {"classify": classify_map(gt, cls), "localize": localize_map(gt, loc)}
    for task in ("classify", "localize"):
        a, b = results[task], from_files[task]
        np.testing.assert_array_equal(a.ap, b.ap)
        assert (a.map_nanmean, a.n_missing, b.n_missing) == (b.map_nanmean, 0, 0)
        # 4 videos: classes without positives make the official mAP and wAP NaN
        assert np.isnan(a.map) and np.isnan(a.wap) and np.isnan(b.wap)
    doc = json.loads(json.dumps(evaluation_json(results, data.labels.classes, videos=4),
                                allow_nan=False))
    assert doc["classify"]["map"] is None and doc["videos"] == 4
    assert doc["localize"]["map_nanmean"] == pytest.approx(results["localize"].map_nanmean)


def test_evaluate_refuses_unknown_videos(preds, run):
    _, data, _, gt = run
    with pytest.raises(FieldlibError, match="not in the ground truth"):
        evaluate(preds, split_videos(data, "test", 2))


def _tiny(ids, seed):
    rng = np.random.default_rng(seed)
    f = rng.random((len(ids), 2, 3))
    return Predictions(list(ids), f, f.max(1), np.zeros((len(ids), 2)))


def test_fuse_product_and_average_by_hand():
    a, b = _tiny(["v1", "v2"], 0), _tiny(["v1", "v2"], 1)
    prod = fuse(a, b, "product")
    for i in range(2):
        for t in range(2):
            for c in range(3):
                assert prod.frame_scores[i, t, c] == a.frame_scores[i, t, c] * \
                    b.frame_scores[i, t, c]
        for c in range(3):
            assert prod.video_scores[i, c] == max(a.frame_scores[i, t, c] *
                                                  b.frame_scores[i, t, c] for t in range(2))
    avg = fuse(a, b, "average")
    np.testing.assert_array_equal(avg.frame_scores, 0.5 * (a.frame_scores + b.frame_scores))
    np.testing.assert_array_equal(avg.video_scores, 0.5 * (a.video_scores + b.video_scores))
    assert prod.info["fusion"] == "product" and avg.video_ids == ["v1", "v2"]


def test_fuse_aligns_order_and_refuses_other_videos():
    a = _tiny(["v1", "v2", "v3"], 0)
    b = _tiny(["v1", "v2", "v3"], 1)
    swapped = Predictions(["v3", "v1", "v2"], b.frame_scores[[2, 0, 1]],
                          b.video_scores[[2, 0, 1]], b.times)
    np.testing.assert_array_equal(fuse(a, swapped).frame_scores, fuse(a, b).frame_scores)
    with pytest.raises(FieldlibError, match=r"different videos: 1 only in the first "
                                            r"\(e.g. 'v3'\); 1 only in the second"):
        fuse(a, _tiny(["v1", "v2", "x9"], 1))
    with pytest.raises(FieldlibError, match="method must be one of product, average"):
        fuse(a, b, "sum")


def test_predictions_save_and_load(preds, tmp_path):
    back = load_predictions(preds.save(tmp_path / "p.npz"))
    assert back.video_ids == preds.video_ids and back.info == preds.info
    for name in ("frame_scores", "video_scores", "times", "q_intent", "pass_scores"):
        np.testing.assert_array_equal(getattr(back, name), getattr(preds, name))
    (tmp_path / "bad.npz").write_text("no")
    with pytest.raises(FieldlibError, match="not a saved Predictions file"):
        load_predictions(tmp_path / "bad.npz")


def _main(argv, monkeypatch):
    """``fieldlib`` with ``argv`` (``charades predict`` is wired in models/charades/cli.py)."""
    from fieldlib.cli import main

    return main(argv)


def test_cli_end_to_end_two_streams(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code = _main(["charades", "predict", "--run-dir", str(runs["rgb"]), "--flow-run-dir",
                  str(runs["flow"]), "--videos", "3", "--passes", "2", "--out", str(out),
                  "--no-progress"], monkeypatch)
    assert code == 0
    text = capsys.readouterr().out
    assert "fused (product)" in text and "cls mAP" in text and "wrote:" in text
    for name in (*SUBMISSION_FILES.values(), "metrics.json", "predictions_rgb.npz",
                 "predictions_flow.npz"):
        assert (out / name).is_file(), name
        assert str(out / name) in text
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["videos"] == 3 and doc["fusion"] == "product" and set(doc["streams"]) == \
        {"rgb", "flow"}
    rgb, flow = (load_predictions(out / f"predictions_{s}.npz") for s in ("rgb", "flow"))
    fused = fuse(rgb, flow)
    cls = read_classify_submission(out / SUBMISSION_FILES["classify"])
    np.testing.assert_array_equal(cls.scores, fused.video_scores)
    gt = split_videos(load_run(runs["rgb"])[1], "test", 3)
    assert doc["classify"]["map_nanmean"] == pytest.approx(
        evaluate(fused, gt)["classify"].map_nanmean)


def test_cli_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    assert _main(["charades", "predict", "--run-dir", str(tmp_path / "empty")],
                 monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fieldlib: error: --run-dir") and \
        "config.json" in err[0]
    assert _main(["charades", "predict", "--run-dir", str(tmp_path / "nowhere")],
                 monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such folder" in err[0]
