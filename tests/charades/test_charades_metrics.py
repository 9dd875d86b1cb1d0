import math

import numpy as np
import pytest
from charades_helpers import write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldlib.models.charades import (
    Annotations,
    Instance,
    Video,
    average_precision,
    average_precision_loop,
    classify_map,
    localize_map,
    read_annotations,
    read_submission,
    submission_from_arrays,
    write_classify_submission,
)

# -- hand-computed cases (3 classes; class 2 has no positives) -----------------------------


@pytest.fixture
def tiny(tmp_path):
    rows = [("V1", "K", "c000 0 5", "10"), ("V2", "K", "c000 1 2;c001 0 10", "10"),
            ("V3", "K", "", "10"), ("V4", "K", "c001 3 4", "10"), ("V5", "K", "c000 0 1", "10")]
    return read_annotations(write_csv(tmp_path / "gt.csv", rows), n_classes=3)


def test_ties_keep_ground_truth_order(tiny):
    sub = submission_from_arrays("classify", tiny.ids, np.full((5, 3), 0.5))
    res = classify_map(tiny, sub, n_classes=3)
    # class 0: order V1 V2 V4 V5 (ties, CSV order) then V3 (empty actions: -inf)
    assert res.ap[0] == (1 / 1 + 2 / 2 + 3 / 4) / 3
    assert res.ap[1] == (1 / 2 + 2 / 3) / 2
    assert math.isnan(res.ap[2]) and math.isnan(res.map) and math.isnan(res.wap)
    assert res.map_nanmean == pytest.approx(0.75, abs=1e-15)
    # the same ties in another ground-truth order give another AP
    flipped = Annotations(tiny.videos[::-1])
    assert classify_map(flipped, sub, n_classes=3).ap[0] != res.ap[0]


def test_missing_videos_and_empty_action_quirk(tiny):
    scores = {"V2": [0.9, 0.2, 0.0], "V3": [10.0, 10.0, 10.0], "V4": [0.1, 0.8, 0.0],
              "V5": [0.3, 0.1, 0.0]}  # V1 missing
    sub = submission_from_arrays("classify", list(scores), list(scores.values()))
    res = classify_map(tiny, sub, n_classes=3)
    # class 0: V2 (.9) V5 (.3) V4 (.1), then -inf ties V1, V3 in CSV order; V3's 10 ignored
    assert res.ap[0] == (1 / 1 + 2 / 2 + 3 / 4) / 3
    assert res.ap[1] == 1.0
    assert res.n_missing == 1 and res.n_pos.tolist() == [3, 2, 0]
    assert math.isnan(res.wap)  # class 2 has no positive: NaN * 0 = NaN, as the script


def test_weighted_ap_and_plain_mean_with_all_classes(tmp_path):
    rows = [("A", "K", "c000 0 1", "5"), ("B", "K", "c001 0 1;c000 2 3", "5"),
            ("C", "K", "c000 0 1", "5")]
    gt = read_annotations(write_csv(tmp_path / "g.csv", rows), n_classes=2)
    sub = submission_from_arrays("classify", ["A", "B", "C"], [[0.1, 0.9], [0.3, 0.1],
                                                              [0.2, 0.5]])
    res = classify_map(gt, sub, n_classes=2)
    # class 0 order B C A (all positive) -> 1; class 1 order A C B -> B at rank 3 -> 1/3
    assert res.ap.tolist() == [1.0, 1 / 3]
    assert res.map == (1.0 + 1 / 3) / 2 and res.wap == (1.0 * 3 + (1 / 3) * 1) / 4


def test_localization_hand_case(tmp_path):
    rows = [("W1", "K", "c000 0.4 0.8", "10"), ("W2", "K", "", "10")]
    gt = read_annotations(write_csv(tmp_path / "g.csv", rows), n_classes=1)
    scores = np.full((2, 25, 1), 0.5)
    scores[1] = 0.95          # W2 has no actions: its scores are used (negatives)
    scores[0, 2] = 0.1        # frame 3 (t = 0.8, inclusive end): positive
    sub = submission_from_arrays("localize", ["W1", "W2"], scores)
    keep = ~((np.array(sub.ids) == "W1") & (sub.frames == 2))  # frame 2 (t = 0.4) missing
    sub.ids = [v for v, k in zip(sub.ids, keep) if k]
    sub.frames, sub.scores = sub.frames[keep], sub.scores[keep]
    res = localize_map(gt, sub, n_classes=1)
    # W2 x25 at .95, 23 W1 rows at .5, W1 f3 (.1) rank 49, W1 f2 (-inf) rank 50
    assert res.ap[0] == (1 / 49 + 2 / 50) / 2
    assert res.n_missing == 1 and res.n_rows == 50 and res.n_pos[0] == 2


def test_average_precision_nan_scores_rank_last():
    scores = np.array([np.nan, 0.2, -np.inf, 0.1])
    labels = np.array([True, False, False, True])
    # sort(-conf): 0.2, 0.1, -inf, NaN -> positives at ranks 2 and 4
    assert average_precision(scores, labels) == (1 / 2 + 2 / 4) / 2
    assert average_precision_loop(scores, labels) == (1 / 2 + 2 / 4) / 2
    # NaN ties keep row order too: 0.1 (pos), NaN row 0 (neg), NaN row 1 (pos)
    scores = np.array([[np.nan, np.nan, 0.1]] * 3).T
    labels = np.array([[False, True, True]] * 3).T
    np.testing.assert_array_equal(average_precision(scores, labels), [(1 + 2 / 3) / 2] * 3)


# -- properties -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**32 - 1), st.sampled_from([2, 5, 50, 10**6]),
       st.booleans())
def test_vectorised_ap_equals_the_loop_oracle(n, seed, distinct, with_nan):
    # few distinct values -> tie runs over most rows (one stable sort); many -> few ties
    rng = np.random.default_rng(seed)
    values = np.r_[-np.inf, np.linspace(-1, 1, distinct), np.nan if with_nan else 0.0]
    scores = rng.choice(values, size=(n, 4))
    labels = rng.random((n, 4)) < 0.3
    got = average_precision(scores, labels)
    want = [average_precision_loop(scores[:, c], labels[:, c]) for c in range(4)]
    np.testing.assert_array_equal(got, want)

videos_st = st.lists(st.sets(st.integers(0, 2), max_size=3), min_size=1, max_size=12)


def _gt(label_sets):
    vids = [Video(f"v{i}", "K", 10.0, tuple(Instance(c, 0.0, 1.0) for c in sorted(s)))
            for i, s in enumerate(label_sets)]
    return Annotations(vids)


@settings(max_examples=40, deadline=None)
@given(videos_st, st.randoms(use_true_random=False))
def test_perfect_submission_scores_one(label_sets, rnd):
    gt = _gt(label_sets)
    y = gt.video_labels(3).astype(float)
    scores = y + np.array([[rnd.random() * 0.5 for _ in range(3)] for _ in label_sets])
    res = classify_map(gt, submission_from_arrays("classify", gt.ids, scores), n_classes=3)
    has = y.sum(axis=0) > 0
    assert (res.ap[has] == 1.0).all() and np.isnan(res.ap[~has]).all()
    if has.all():
        assert res.map == 1.0 and res.wap == 1.0
    elif has.any():
        assert math.isnan(res.map) and res.map_nanmean == 1.0


@settings(max_examples=40, deadline=None)
@given(videos_st, st.randoms(use_true_random=False))
def test_permuting_videos_with_distinct_scores_changes_nothing(label_sets, rnd):
    gt = _gt(label_sets)
    n = len(label_sets)
    scores = np.array(rnd.sample(range(10 * n * 3), n * 3), dtype=float).reshape(n, 3)
    sub = submission_from_arrays("classify", gt.ids, scores)
    perm = list(range(n))
    rnd.shuffle(perm)
    a = classify_map(gt, sub, n_classes=3).ap
    b = classify_map(Annotations([gt[i] for i in perm]), sub, n_classes=3).ap
    np.testing.assert_array_equal(a, b)


# -- exact agreement with an independent implementation on the real test CSV ---------------


def _reference_ap(conf: list[float], labels: list[bool]) -> float:
    """Straightforward: rank rows by (NaN last, descending score, row), count precision."""
    rank = sorted(range(len(conf)), key=lambda i: (math.isnan(conf[i]), -conf[i]
                                                    if not math.isnan(conf[i]) else 0.0, i))
    tp = seen = 0
    total = 0.0
    for i in rank:
        seen += 1
        if labels[i]:
            tp += 1
            total += tp / seen
    n_pos = sum(labels)
    return total / n_pos if n_pos else float("nan")


def _parse(path, head, columns):
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split(" ", head + max(columns) + 1)
        out[tuple(parts[:head])] = {c: float(parts[head + c]) for c in columns}
    return out


def _random_scores(rng, shape):
    scores = rng.random(shape)
    tie = rng.random(shape) < 0.3
    scores[tie] = np.round(scores[tie], 1)  # many ties
    scores[rng.random(shape) < 0.02] = -np.inf
    return scores


def test_classification_matches_reference_on_official_csv(official_test, tmp_path):
    rng = np.random.default_rng(7)
    keep = rng.random(len(official_test)) > 0.1  # 10 % of the videos missing
    ids = [v for v, k in zip(official_test.ids, keep) if k]
    path = tmp_path / "cls.txt"
    write_classify_submission(path, ids, _random_scores(rng, (len(ids), 157)))
    res = classify_map(official_test, read_submission(path, "classify",
                                                      known_ids=official_test.index))
    given_scores = _parse(path, 1, range(157))
    ninf = dict.fromkeys(range(157), -math.inf)
    conf = [ninf if not v.actions or (v.id,) not in given_scores else given_scores[(v.id,)]
            for v in official_test]  # the script never records empty-action videos
    present = [{a.cls for a in v.actions} for v in official_test]
    ref = [_reference_ap([row[c] for row in conf], [c in p for p in present])
           for c in range(157)]
    np.testing.assert_array_equal(res.ap, ref)  # exact, NaN where equal
    assert res.map_nanmean == pytest.approx(np.nanmean(ref), rel=1e-13)
    assert math.isnan(res.map) == any(math.isnan(x) for x in ref)


def test_localization_matches_reference_on_official_csv(official_test, tmp_path):
    rng = np.random.default_rng(8)
    table = [f"{x:.3f}" for x in rng.random(400)] + ["-inf", "0.5", "1e-3"]  # many ties
    patterns = [" ".join([table[j] for j in row])
                for row in rng.integers(0, len(table), (997, 157)).tolist()]
    choice = rng.integers(0, len(patterns), len(official_test) * 25).tolist()
    drop = (rng.random(len(choice)) < 0.05).tolist()  # missing rows
    rows = [f"{v.id} {k} {patterns[choice[i * 25 + k - 1]]}"
            for i, v in enumerate(official_test) for k in range(1, 26)
            if not drop[i * 25 + k - 1]]
    path = tmp_path / "loc.txt"
    path.write_text("\n".join(rows) + "\n")
    res = localize_map(official_test, read_submission(path, "localize",
                                                      known_ids=official_test.index))
    classes = [109, 107] + rng.choice(157, 2, replace=False).tolist()
    parsed: dict[str, list[float]] = {}
    given_scores = {}
    for line in path.read_text().splitlines():
        vid, frame, rest = line.split(" ", 2)
        if rest not in parsed:
            parsed[rest] = [float(x) for x in rest.split(" ")]
        given_scores[vid, frame] = parsed[rest]
    conf = {c: [] for c in classes}
    labels = {c: [] for c in classes}
    for v in official_test:  # KA09C is the operation-order boundary case for c107 / c109
        spans = {c: [(a.start, a.end) for a in v.actions if a.cls == c] for c in classes}
        for k in range(1, 26):
            t = ((k - 1) / 25) * v.length
            row = given_scores.get((v.id, str(k)))
            for c in classes:
                conf[c].append(row[c] if row is not None else -math.inf)
                labels[c].append(any(s <= t <= e for s, e in spans[c]))
    for c in classes:
        want = _reference_ap(conf[c], labels[c])
        assert res.ap[c] == want or (math.isnan(want) and math.isnan(res.ap[c])), c
    assert res.n_missing == len(official_test) * 25 - len(rows)


@pytest.mark.parametrize("frames, message", [
    ([1e20], r"frame 1e\+20 is not a 1-based frame number"),
    ([10**20], r"frame 1e\+20 is not"),
    ([2.7], "frame 2.7 is not"),
    ([math.nan], "frame nan is not"),
    ([0], "frame 0 is not"),
    ([True], "not booleans or strings"),
])
def test_submission_from_arrays_refuses_bad_frames(frames, message):
    from fieldlib.errors import FieldlibError

    with pytest.raises(FieldlibError, match=message):
        submission_from_arrays("localize", ["V1"], np.zeros((1, 157)), frames=frames)
    ok = submission_from_arrays("localize", ["V1"], np.zeros((1, 157)), frames=[3.0])
    assert ok.frames.tolist() == [3]
