import numpy as np
import pytest
from charades_helpers import write_csv
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldlib.models.charades import (
    Annotations,
    Instance,
    Video,
    build_state_space,
    frame_class_table,
    frame_labels,
    frame_numbers,
    frame_times,
    load_labels,
    progress_labels,
    read_annotations,
    time_point_labels,
    time_points,
    training_samples,
)


def test_progress_thirds_by_duration_not_by_end():
    # [10, 13]: thirds by duration are [10, 11), [11, 12), [12, 13]
    t = np.array([10.0, 10.9, 11.0, 11.5, 12.0, 12.9, 13.0])
    np.testing.assert_array_equal(progress_labels(t, 10.0, 13.0), [0, 0, 1, 1, 2, 2, 2])
    # the released code's bug (dividing by e) would call t = 10.9 "end": floor(3 * 10.9/13) = 2
    assert int(np.floor(3 * 10.9 / 13.0)) == 2
    assert progress_labels(5.0, 5.0, 5.0) == 1  # zero length: middle


def test_frame_times_and_test_times():
    np.testing.assert_array_equal(frame_times(1.0, 4), [0.0, 0.25, 0.5, 0.75])
    assert frame_times(16.62, 8).size == 133 and frame_times(0.0, 8).tolist() == [0.0]
    t = time_points(16.62)
    assert t.size == 25 and t[0] == 0.0
    assert all(t[k - 1] == ((k - 1) / 25) * 16.62 for k in range(1, 26))
    np.testing.assert_array_equal(frame_numbers([0.0, 1 / 24, 0.999, 100.0], 24, 50),
                                  [1, 2, 24, 50])


def test_time_points_use_the_official_operation_order(official_test):
    # KA09C (length 30.5): t_11 = (10/25) * 30.5 = 12.200000000000001 > 12.2, so c109
    # (7.0-12.2) is absent at frame 11; 10 * 30.5 / 25 = 12.2 would make it present.
    i = official_test.index["KA09C"]
    labels = time_point_labels(official_test)
    assert (10 / 25) * 30.5 > 12.2 and 10 * 30.5 / 25 == 12.2
    assert not labels[i * 25 + 10, 109] and labels[i * 25 + 9, 109]


def test_time_point_labels_inclusive_against_a_loop(official_test):
    sub = Annotations(official_test.videos[:200])
    got = time_point_labels(sub)
    want = np.zeros_like(got)
    for i, v in enumerate(sub):
        for k in range(1, 26):
            t = ((k - 1) / 25) * v.length
            for a in v.actions:
                if a.start <= t <= a.end:
                    want[i * 25 + k - 1, a.cls] = True
    np.testing.assert_array_equal(got, want)
    # boundary equality occurs in the real data and counts as positive
    v = Video("X", "K", 10.0, (Instance(3, 0.4, 0.8),))
    lab = time_point_labels(Annotations([v]))
    np.testing.assert_array_equal(np.flatnonzero(lab[:, 3]), [1, 2])


def test_frame_labels_all_and_one_per_frame():
    v = Video("V", "K", 2.0, (Instance(5, 0.0, 1.0), Instance(7, 0.5, 2.0),
                               Instance(5, 0.75, 1.5)))
    times = frame_times(2.0, 4)  # 0, .25, ..., 1.75
    active, prog = frame_labels(v, times)
    assert active.shape == (8, 157)
    np.testing.assert_array_equal(active[:, 5], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(active[:, 7], [0, 0, 1, 1, 1, 1, 1, 1])
    assert prog[3, 5] == 2  # t = .75: first-listed instance [0, 1] wins -> end
    assert prog[5, 5] == 2 and prog[0, 7] == -1  # t = 1.25 only in [0.75, 1.5]: its end third
    all_samples = training_samples(v, 4)
    assert all_samples["cls"].size == int(active.sum())
    one = training_samples(v, 4, one_per_frame=True, rng=np.random.default_rng(0))
    assert np.unique(one["frame"]).size == one["frame"].size == 8


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.floats(0, 6), st.floats(0, 3)), max_size=5),
       st.floats(0.1, 6), st.sampled_from([1.0, 3.0, 7.5, 8.0, 24.0]))
def test_vectorised_table_equals_per_video_samples(insts, length, fps):
    videos = [Video("A", "K", length, tuple(Instance(c, s, s + d) for c, s, d in insts)),
              Video("B", "K", length / 2, tuple(Instance(c, s / 2, s / 2 + d)
                                                for c, s, d in insts[::-1]))]
    table = frame_class_table(Annotations(videos), fps, 5)
    for i, v in enumerate(videos):
        ref = training_samples(v, fps, n_classes=5)
        mine = table["video"] == i
        for key in ("frame", "time", "cls", "progress"):
            np.testing.assert_array_equal(table[key][mine], ref[key])


def test_state_space_on_official_train(official_train):
    space = build_state_space(official_train, load_labels(), fps=8)
    assert space.size == 471 and space.n_scenes == 16 and space.joint_size == 471 * 16
    assert (space.states[:, 1:3] == -1).all()
    assert space.class_matrix().sum() == 471 and space.progress_matrix().sum() == 471
    c, p = space.states[10, 0], space.states[10, 3]
    assert space.index(c, p) == 10


def test_state_space_with_mapping(tmp_path):
    (tmp_path / "c.txt").write_text("c000 a\nc001 b\nc002 c\n")
    (tmp_path / "o.txt").write_text("o000 None\no001 cup\n")
    (tmp_path / "v.txt").write_text("v000 hold\nv001 drink\n")
    (tmp_path / "m.txt").write_text("c000 o001 v000\nc001 o001 v001\nc002 o000 v001\n")
    labels = load_labels(tmp_path / "c.txt", tmp_path / "m.txt", tmp_path / "o.txt",
                         tmp_path / "v.txt")
    csv = write_csv(tmp_path / "t.csv", [("V1", "Kitchen", "c000 0 3;c001 1 1.05", "3"),
                                         ("V2", "Garage", "c002 0 0.2", "2")])
    space = build_state_space(read_annotations(csv, n_classes=3), labels, fps=8)
    # c000 over 3 s: all thirds; c001 1.0-1.05: frame 1.0 only (start); c002 0-0.2: 0, .125
    assert space.states.tolist() == [[0, 1, 0, 0], [0, 1, 0, 1], [0, 1, 0, 2],
                                     [1, 1, 1, 0], [2, 0, 1, 0], [2, 0, 1, 1]]
    assert space.scenes.ids == ("Garage", "Kitchen")
    assert space.object_matrix().shape == (2, 6) and space.verb_matrix()[1].sum() == 3
    assert space.index([1, 1], [0, 2]).tolist() == [3, -1]


def test_state_space_without_mapping_refuses_object_matrix():
    v = Annotations([Video("V", "K", 1.0, (Instance(0, 0, 1),))])
    with pytest.raises(Exception, match="category-only"):
        build_state_space(v, load_labels()).object_matrix()


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), 0.0, -8.0, 1e300, "8", True])
def test_bad_fps_is_refused(tmp_path, fps):
    from fieldlib.errors import FieldlibError

    ann = read_annotations(write_csv(tmp_path / "a.csv", [("V1", "K", "c000 0 5", "10")]))
    with pytest.raises(FieldlibError, match="fps"):
        frame_class_table(ann, fps)
    with pytest.raises(FieldlibError, match="fps"):
        frame_times(10.0, fps)
