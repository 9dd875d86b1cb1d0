import numpy as np
import pytest

from fieldlib.errors import FormatError
from fieldlib.models.charades import (
    read_submission,
    write_classify_submission,
    write_localize_submission,
)

IDS = {"A": 0, "B": 1, "C": 2}


def _row(vid, scores, sep=" ", frame=None):
    head = [vid] if frame is None else [vid, str(frame)]
    return sep.join(head + [repr(float(x)) for x in scores])


def _write(tmp_path, lines, name="sub.txt"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def test_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 157))
    scores[1, 4] = -np.inf
    write_classify_submission(tmp_path / "c.txt", ["A", "B", "C"], scores)
    sub = read_submission(tmp_path / "c.txt", "classify", known_ids=IDS)
    assert sub.ids == ["A", "B", "C"] and not sub.tolerated
    np.testing.assert_array_equal(sub.scores, scores)
    loc = rng.random((2, 25, 157))
    write_localize_submission(tmp_path / "l.txt", ["A", "C"], loc, digits=6)
    sub = read_submission(tmp_path / "l.txt", "localize", known_ids=IDS)
    assert len(sub) == 50 and sub.frames[:3].tolist() == [1, 2, 3] and sub.ids[25] == "C"
    np.testing.assert_allclose(sub.scores.reshape(2, 25, 157), loc, rtol=1e-5)


def test_tab_separated_is_official_and_accepted(tmp_path):
    p = _write(tmp_path, [_row("A", np.arange(157), sep="\t")])
    sub = read_submission(p, "classify", known_ids=IDS)
    assert sub.scores[0, 156] == 156.0


@pytest.mark.parametrize("lines, message", [
    ([_row("A", range(157)), _row("B", range(156))],
     r"sub.txt: line 2: 157 fields separated by single spaces, expected 158"),
    ([_row("A", range(157)) + " "], r"line 1: 159 fields .* trailing separator\? --lenient"),
    ([_row("A", range(157)).replace(" 3.0 ", "  3.0 ")], r"line 1: 159 fields"),
    ([_row("A", range(155)) + "  "], r"line 1: field 157 is empty"),
    ([_row("A", range(157)).replace(" 7.0 ", " nan ")], r"line 1: score field 8 is NaN"),
    ([_row("A", range(157)).replace(" 7.0 ", " 7,5 ")], r"line 1: score field 8: '7,5' is not "
                                                       r"a number"),
    ([_row("A", range(157)), _row("Z", range(157))], r"line 2: field id: unknown video 'Z'"),
    ([_row("A", range(157)), "", _row("A", range(157))], r"line 3: duplicate row for video A "
                                                         r"\(first on line 1"),
])
def test_strict_classification_errors(tmp_path, lines, message):
    with pytest.raises(FormatError, match=message):
        read_submission(_write(tmp_path, lines), "classify", known_ids=IDS)


@pytest.mark.parametrize("lines, message", [
    ([_row("A", range(157), frame=0)], r"line 1: field frame: 0; frames are 1-based"),
    ([_row("A", range(157), frame=26)], r"line 1: field frame: 26 outside 1..25"),
    ([_row("A", range(157), frame="x")], r"line 1: field frame: 'x' is not an integer"),
    ([_row("A", range(157), frame=3), _row("A", range(157), frame=3)],
     r"line 2: duplicate row for video A frame 3"),
])
def test_strict_localization_errors(tmp_path, lines, message):
    with pytest.raises(FormatError, match=message):
        read_submission(_write(tmp_path, lines), "localize", known_ids=IDS)


def test_lenient_accepts_what_the_official_reader_accepts(tmp_path):
    lines = [
        _row("A", range(157)) + " ",                     # 158th (empty) field
        _row("B", range(157), sep="\t") + "\t0.5",       # 158 fields, tabs
        _row("Z", range(157)),                           # unknown id
        _row("A", np.arange(157) + 100),                 # repeated: last wins
        _row("C", range(157)).replace(" 7.0 ", " NaN "),  # NaN
    ]
    sub = read_submission(_write(tmp_path, lines), "classify", known_ids=IDS, lenient=True)
    assert sub.ids == ["B", "A", "C"]
    assert sub.scores[1, 0] == 100.0 and np.isnan(sub.scores[2, 7])
    text = " | ".join(sub.tolerated)
    for what in ("2 rows have 158 score fields", "1 rows with ids not in the ground truth",
                 "1 repeated rows", "1 rows hold NaN"):
        assert what in text


def test_lenient_zero_based_frames(tmp_path):
    lines = [_row("A", range(157), frame=k) for k in range(25)] + [_row("B", range(157),
                                                                       frame=30)]
    sub = read_submission(_write(tmp_path, lines), "localize", known_ids=IDS, lenient=True)
    assert sub.frames.tolist() == list(range(1, 26))
    assert any("0-based" in t for t in sub.tolerated)
    assert any("outside 1..25 ignored" in t for t in sub.tolerated)


def test_wrong_count_is_an_error_even_when_lenient(tmp_path):
    with pytest.raises(FormatError, match="line 1: 156 fields"):
        read_submission(_write(tmp_path, [_row("A", range(155))]), "classify", lenient=True)


def test_writing_into_a_missing_folder_is_a_fieldlib_error(tmp_path):
    from fieldlib.errors import FieldlibError

    target = tmp_path / "absent" / "s.txt"
    with pytest.raises(FieldlibError, match="cannot write"):
        write_classify_submission(target, ["A"], np.zeros((1, 157)))
    with pytest.raises(FieldlibError, match="cannot write"):
        write_localize_submission(target, ["A"], np.zeros((1, 25, 157)))
