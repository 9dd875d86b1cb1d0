import numpy as np
import pytest
from charades_helpers import HEADER, data_file, write_csv

from fieldlib.errors import FormatError
from fieldlib.models.charades import Instance, read_annotations


def test_official_csvs(official_test, official_train):
    assert len(official_test) == 1863 and len(official_train) == 7985
    n_inst = sum(len(v.actions) for v in official_test) + sum(len(v.actions)
                                                              for v in official_train)
    assert n_inst == 66500  # data/README.md
    first = official_test[0]
    assert first.id == "YSKX3" and first.scene == "Bedroom" and first.length == 16.62
    assert first.actions[0] == Instance(77, 12.10, 18.00)
    # a quoted field with commas stays one field
    assert "," in official_test[1].script and official_test[1].length == 31.29
    assert sum(not v.actions for v in official_test) == 49
    assert len({v.scene for v in official_train}) == 16
    assert official_test.index["T5ECU"] == 1 and official_test[1].line == 3


def test_official_train_reversed_instances_are_reported():
    path = data_file("Charades_v1_train.csv")
    with pytest.raises(FormatError, match=r"Charades_v1_train.csv: line 100 \(video 00SL4\): "
                                          r"field actions instance 1: end 10.00 before start"):
        read_annotations(path)
    kept = read_annotations(path, reversed_intervals="keep")
    assert len(kept.notes) == 7 and all("kept" in n for n in kept.notes)
    assert kept[kept.index["00SL4"]].actions[0] == Instance(71, 18.0, 10.0)
    swapped = read_annotations(path, reversed_intervals="swap")
    assert swapped[swapped.index["00SL4"]].actions[0] == Instance(71, 10.0, 18.0)


def test_empty_and_quoted_fields(tmp_path):
    p = write_csv(tmp_path / "a.csv", [("V1", "Kitchen", "", "3.5"),
                                       ("V2", "Living room, big", "c001 0.00 1.50;c156 1 2", "4")])
    ann = read_annotations(p)
    assert ann[0].actions == () and ann[1].scene == "Living room, big"
    assert ann[1].actions == (Instance(1, 0.0, 1.5), Instance(156, 1.0, 2.0))
    np.testing.assert_array_equal(ann.video_labels()[1].nonzero()[0], [1, 156])


@pytest.mark.parametrize("actions, length, message", [
    ("c157 0 1", "5", r"line 3 \(video BAD\): field actions instance 1: bad class id 'c157'"),
    ("c001 0 1;x12 0 1", "5", r"line 3 \(video BAD\): field actions instance 2: bad class id"),
    ("c001 2.0 1.0", "5", r"line 3 \(video BAD\): field actions instance 1: end 1.0 before "
                          r"start 2.0"),
    ("c001 abc 1.0", "5", r"line 3 \(video BAD\): field actions instance 1 start: 'abc' is "
                          r"not a number"),
    ("c001 0 1.0e", "5", r"line 3 \(video BAD\): field actions instance 1 end: '1.0e' is "
                             r"not a number"),
    ("c001 0", "5", r"line 3 \(video BAD\): field actions instance 1: 'c001 0' is not "
                        r"'cNNN start end'"),
    ("c001 -1 2", "5", r"line 3 \(video BAD\): field actions instance 1 start: '-1' is "
                           r"not a finite time"),
    ("c001 0 1", "long", r"line 3 \(video BAD\): field length: 'long' is not a number"),
])
def test_malformed_rows_name_file_row_field(tmp_path, actions, length, message):
    p = write_csv(tmp_path / "bad.csv", [("OK1", "Kitchen", "c000 0 1", "3"),
                                         ("BAD", "Kitchen", actions, length)])
    with pytest.raises(FormatError, match=r"bad.csv: " + message):
        read_annotations(p)


def test_missing_column_and_field(tmp_path):
    p = write_csv(tmp_path / "h.csv", [], header=[h for h in HEADER if h != "length"])
    with pytest.raises(FormatError, match=r"h.csv: line 1: field length: column missing"):
        read_annotations(p)
    p = tmp_path / "short.csv"
    p.write_text(",".join(HEADER) + "\nV1,S,Kitchen,5,6,Yes,s,o,d,c000 0 1,3\n"
                 "V2,S,Kitchen,5,6,Yes,s,o,d,c000 0 1\n")
    with pytest.raises(FormatError, match=r"short.csv: line 3: field length missing"):
        read_annotations(p)


def test_duplicate_and_empty_id(tmp_path):
    p = write_csv(tmp_path / "d.csv", [("V1", "K", "", "3"), ("V1", "K", "", "3")])
    with pytest.raises(FormatError, match=r"line 3: field id: duplicate video 'V1' "
                                          r"\(first on line 2\)"):
        read_annotations(p)
    p = write_csv(tmp_path / "e.csv", [(" ", "K", "", "3")])
    with pytest.raises(FormatError, match=r"e.csv: line 2: field id: empty"):
        read_annotations(p)
