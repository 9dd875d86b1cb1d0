import numpy as np
import pytest
from charades_helpers import data_file

from fieldlib.errors import FieldlibError, FormatError
from fieldlib.models.charades import (
    derived_mapping,
    load_labels,
    read_classes,
    read_mapping,
    read_object_classes,
    read_verb_classes,
)


def test_official_class_file():
    classes = read_classes(data_file("Charades_v1_classes.txt"))
    assert len(classes) == 157
    assert classes.ids[0] == "c000" and classes.names[0] == "Holding some clothes"
    assert classes.ids[156] == "c156" and classes.index("c042") == 42


def test_class_file_errors(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("c000 A\nc002 B\n")
    with pytest.raises(FormatError, match=r"classes.txt: line 2: field class id: expected c001"):
        read_classes(p)
    p.write_text("c000 A\nx001 B\n")
    with pytest.raises(FormatError, match=r"line 2: field class id: 'x001'"):
        read_classes(p)
    p.write_text("c000 A\nc000 B\n")
    with pytest.raises(FormatError, match="duplicate 'c000'"):
        read_classes(p)


def _mapping_files(tmp_path, mapping_lines):
    (tmp_path / "classes.txt").write_text("c000 Holding a cup\nc001 Drinking from a cup\n"
                                          "c002 Opening a door\n")
    (tmp_path / "objects.txt").write_text("o000 None\no001 cup\no002 door\n")
    (tmp_path / "verbs.txt").write_text("v000 hold\nv001 drink\nv002 open\n")
    (tmp_path / "mapping.txt").write_text("".join(x + "\n" for x in mapping_lines))
    return [tmp_path / n for n in ("classes.txt", "mapping.txt", "objects.txt", "verbs.txt")]


def test_mapping_readers(tmp_path):
    files = _mapping_files(tmp_path, ["c000 o001 v000", "c001 o001 v001", "c002 o002 v002"])
    labels = load_labels(*files)
    assert labels.has_mapping and not labels.derived
    assert labels.objects.ids == ("o000", "o001", "o002")
    assert labels.objects.names[0] == "None"
    assert read_verb_classes(files[3]).names == ("hold", "drink", "open")
    np.testing.assert_array_equal(labels.class_object, [1, 1, 2])
    np.testing.assert_array_equal(labels.class_verb, [0, 1, 2])


@pytest.mark.parametrize("lines, message", [
    (["c000 o001 v000", "c001 o009 v001", "c002 o002 v002"], r"line 2: field object: unknown"),
    (["c000 o001 v000", "c001 o001 v077", "c002 o002 v002"], r"line 2: field verb: unknown"),
    (["c000 o001 v000", "c005 o001 v001", "c002 o002 v002"], r"line 2: field class: unknown"),
    (["c000 o001 v000", "c000 o001 v001", "c002 o002 v002"], r"line 2: field class: c000 "
                                                             r"mapped twice"),
    (["c000 o001", "c001 o001 v001", "c002 o002 v002"], r"line 1: expected 3 fields"),
    (["c000 o001 v000", "c002 o002 v002"], r"1 classes have no mapping line \(e.g. c001\)"),
])
def test_mapping_errors(tmp_path, lines, message):
    classes, mapping, objects, verbs = _mapping_files(tmp_path, lines)
    with pytest.raises(FormatError, match=message):
        read_mapping(mapping, read_classes(classes), read_object_classes(objects),
                     read_verb_classes(verbs))


def test_partial_mapping_refused(tmp_path):
    classes, mapping, objects, _ = _mapping_files(tmp_path, ["c000 o001 v000"])
    with pytest.raises(FieldlibError, match="needs all three files"):
        load_labels(classes, mapping, objects, None)


def test_without_mapping_category_only():
    labels = load_labels()
    assert labels.n_classes == 157 and not labels.has_mapping and labels.objects is None


def test_derived_mapping_is_fixed_and_covers_vocabularies():
    obj, verb = derived_mapping()
    obj2, verb2 = derived_mapping()
    np.testing.assert_array_equal(obj, obj2)
    np.testing.assert_array_equal(verb, verb2)
    assert set(obj.tolist()) == set(range(38)) and set(verb.tolist()) == set(range(33))
    derived = load_labels().with_derived_mapping()
    assert derived.derived and len(derived.objects) == 38 and len(derived.verbs) == 33
