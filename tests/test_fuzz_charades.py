"""Fuzz tests of the Charades readers (issue 8, part 5; models: tests/test_fuzz.py).

Hypothesis writes annotation CSVs and classification/localization submissions: valid ones,
and mutations (missing or extra fields, empty ids, duplicate ids and rows, NaN/inf/1e400
and non-numeric numbers, bad class ids, reversed intervals, frames 0, 26 or beyond int64,
tabs vs spaces, doubled and trailing separators, broken quotes, junk lines and bytes). Every
file is read as written or refused with a FieldlibError; the metrics of what was read equal
the official scripts' loop; ``fieldlib charades eval`` exits 0 or 2 without a traceback.
"""

from __future__ import annotations

import csv
import io
import math
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import entry_point, fuzz, run_cli

from fieldlib import FieldlibError
from fieldlib.models.charades import (
    Annotations,
    Instance,
    Video,
    classify_map,
    localize_map,
    read_annotations,
    read_submission,
)
from fieldlib.models.charades.annotations import COLUMNS
from fieldlib.models.charades.metrics import (
    average_precision_loop,
    classification_arrays,
    localization_arrays,
)

IDS = ["A", "B", "C"]
SCENES = ["Kitchen", "Living room", "Garage, big", 'Say "hi"', ""]
FIELD_JUNK = {
    "id": ["", " ", "V1", "V\n1", "\x00"],
    "length": ["nan", "inf", "-1", "1e400", "abc", "", " 3 ", "1e308", "-0", "1,5"],
    "actions": ["c157 0 1", "c1 0 1", "x001 0 1", "c001 5 2", "c001 -1 2", "c001 a b", "c001 0",
                "c001 0 1;", ";", "c001 nan 1", "c001 0 inf", "c001 0 1 2", "C001 0 1",
                "c001 1e400 1e401", "c001 0 1;c002 3 2"],
}
JUNK_LINES = ['"unterminated, quote', "\x00\x01", "a,b", "\t\t", "\ufeffid,x"]
SCORE_JUNK = ["nan", "NaN", "abc", "1,5", "", "1e400", "-1e400", "0x10", "inf", "-inf", "\u0663"]
FRAME_JUNK = ["0", "26", "-1", "9" * 30, "1.0", "x", "\u0663", "+3", "-0", "25", "1"]


# -- annotation CSVs --------------------------------------------------------------------------
@st.composite
def videos(draw):
    """Valid rows: ``[(fields by column, (id, length, actions))]``."""
    out = []
    for vid in draw(st.lists(st.sampled_from(["V1", "V2", "AB3X9", "00SL4", "x y"]),
                             unique=True, max_size=4)):
        actions = []
        for _ in range(draw(st.integers(0, 3))):
            c = draw(st.integers(0, 156))
            start = draw(st.sampled_from([0.0, 0.5, 1.25, 10.0]))
            end = start + draw(st.sampled_from([0.0, 0.5, 3.0]))
            actions.append((c, start, end))
        length = draw(st.sampled_from([0.0, 5.0, 10.5, 31.0]))
        fields = {name: "x" for name in COLUMNS}
        fields.update(id=vid, scene=draw(st.sampled_from(SCENES)), length=f"{length:.2f}",
                      actions=";".join(f"c{c:03d} {s:.2f} {e:.2f}" for c, s, e in actions))
        out.append((fields, (vid, length, tuple(actions))))
    return out


@st.composite
def csv_texts(draw, edits=(0, 0, 1, 2)):
    """``(text or bytes, expected videos or None)``: a valid CSV or one broken by ``edits``
    row edits (and maybe a text edit)."""
    rows = draw(videos())
    header = list(COLUMNS)
    if draw(st.booleans()):
        header = draw(st.permutations(header))  # any column order is valid
    table = [list(header)] + [[fields[h] for h in header] for fields, _ in rows]
    expected = [want for _, want in rows]
    for _ in range(draw(st.sampled_from(edits))):
        expected = None
        r = draw(st.integers(0, len(table) - 1))
        op = draw(st.sampled_from(["field", "field", "field", "drop", "add", "repeat"]))
        if op == "field" and r > 0:
            column = draw(st.sampled_from(list(FIELD_JUNK)))
            if header.index(column) < len(table[r]):
                table[r][header.index(column)] = draw(st.sampled_from(FIELD_JUNK[column]))
        elif op == "drop" and table[r]:
            del table[r][draw(st.integers(0, len(table[r]) - 1))]
        elif op == "add":
            table[r].append(draw(st.sampled_from(["extra", "", "length", "a\nb"])))
        elif op == "repeat":
            table.insert(r + 1, list(table[r]))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"]))).writerows(table)
    text = buffer.getvalue()
    lines = text.splitlines(keepends=True)
    edit = draw(st.sampled_from([None] * (6 + 10 * (max(edits) == 0))
                                + ["tabs", "junk", "truncate", "empty", "bytes"]))
    if edit is None:
        return text, expected
    if edit == "tabs" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        lines[i] = lines[i].replace(",", "\t")
    elif edit == "junk":
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(JUNK_LINES)) + "\n")
    elif edit == "truncate":
        return text[:draw(st.integers(0, len(text)))], None
    elif edit == "empty":
        return "", None
    else:
        return text.encode() + draw(st.binary(min_size=1, max_size=8)) + b"\xff", None
    return "".join(lines), None


def write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def check_annotations(ann: Annotations, policy: str) -> None:
    ids = [v.id for v in ann]
    assert len(set(ids)) == len(ids) and all(ids)
    for v in ann:
        assert math.isfinite(v.length) and v.length >= 0
        for a in v.actions:
            assert 0 <= a.cls < 157 and math.isfinite(a.start) and math.isfinite(a.end)
            assert a.start >= 0 and a.end >= 0 and (policy == "keep" or a.start <= a.end)
    assert ann.video_labels().shape == (len(ann), 157)


@fuzz(250)
@given(csv_texts(), st.sampled_from(["error", "swap", "keep"]))
def test_annotation_csv_is_read_right_or_refused(case, policy):
    data, expected = case
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "gt.csv", data)
        try:
            ann = read_annotations(path, reversed_intervals=policy)
        except FieldlibError:
            assert expected is None, "a valid CSV was refused"
            return
    check_annotations(ann, policy)
    if expected is not None:
        got = [(v.id, v.length, tuple((a.cls, a.start, a.end) for a in v.actions)) for v in ann]
        assert got == expected


def test_csv_errors_stay_on_one_line(tmp_path):
    """A quoted field holding a line break was echoed raw into the error message, which
    then took two lines on stderr."""
    header = ",".join(COLUMNS)
    bad_header = write(tmp_path, "h.csv", '"i\nd"' + header.removeprefix("id") + "\n")
    bad_row = write(tmp_path, "r.csv", header + '\n"V\n1",s,K,5,6,Yes,x,y,z,,long\n')
    for path, message in ((bad_header, r"column missing .*found 'i\\nd', subject"),
                          (bad_row, r"line 2 \(video 'V\\n1'\): field length")):
        with pytest.raises(FieldlibError, match=message) as info:
            read_annotations(path)
        assert "\n" not in str(info.value)


# -- submissions ------------------------------------------------------------------------------
@st.composite
def submission_texts(draw, task, ids=IDS, n_classes=3):
    """``(text or bytes, expected rows or None)``: rows ``id [frame] s_1 .. s_C``, valid or
    broken. Scores come from a seeded generator (157 of them a row in the CLI test)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    keys = [(vid, None) for vid in ids]
    if task == "localize":
        keys = [(vid, f) for vid in ids for f in draw(st.lists(st.integers(1, 25), unique=True,
                                                              max_size=3))]
    keys = draw(st.lists(st.sampled_from(keys), unique=True, max_size=4)) if keys else []
    special = draw(st.sampled_from([[], [], [-math.inf], [math.inf, 1e300, -1e-300]]))
    rows, expected = [], []
    for vid, frame in keys:
        scores = [repr(float(x)) for x in rng.standard_normal(n_classes)]
        for k, value in zip(rng.integers(0, n_classes, len(special)), special):
            scores[k] = repr(value)
        rows.append([vid] + ([str(frame)] if frame else []) + scores)
        expected.append((vid, frame, [float(x) for x in scores]))
    seps = [draw(st.sampled_from([" ", " ", "\t"])) for _ in rows]
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        expected = None
        if not rows:
            break
        r = draw(st.integers(0, len(rows) - 1))
        op = draw(st.sampled_from(["score", "score", "frame", "id", "drop", "add", "repeat",
                                   "mixed", "double", "trailing"]))
        head = 2 if task == "localize" else 1
        if op == "score":
            rows[r][draw(st.integers(head, len(rows[r]) - 1))] = draw(st.sampled_from(SCORE_JUNK))
        elif op == "frame" and head == 2:
            rows[r][1] = draw(st.sampled_from(FRAME_JUNK))
        elif op == "id":
            rows[r][0] = draw(st.sampled_from(["Z", "", "A B", ids[0]]))
        elif op == "drop":
            del rows[r][draw(st.integers(0, len(rows[r]) - 1))]
        elif op == "add":
            rows[r].append(draw(st.sampled_from(["0.5", ""])))
        elif op == "repeat":
            rows.insert(r, list(rows[r]))
            seps.insert(r, seps[r])
        elif op in ("mixed", "double") and len(rows[r]) > 2:
            k = draw(st.integers(1, len(rows[r]) - 1))
            rows[r][k] = ("\t" if seps[r] == " " else " ") + rows[r][k] if op == "mixed" \
                else seps[r] + rows[r][k]
        elif op == "trailing":
            rows[r].append("")
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    lines = [sep.join(row) + eol for row, sep in zip(rows, seps)]
    edit = draw(st.sampled_from([None] * 6 + ["blank", "junk", "truncate", "bytes"]))
    if edit == "blank":
        lines.insert(draw(st.integers(0, len(lines))), "\n")  # blank lines are skipped
    elif edit == "junk":
        expected = None
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(JUNK_LINES)) + eol)
    elif edit == "truncate":
        text = "".join(lines)
        return text[:draw(st.integers(0, len(text)))], None
    elif edit == "bytes":
        return "".join(lines).encode() + b"\xff\xfe", None
    return "".join(lines), expected


GT = Annotations([Video("A", "Kitchen", 10.0, (Instance(0, 0.0, 5.0), Instance(2, 4.0, 10.0))),
                  Video("B", "Garage", 20.0, (Instance(1, 2.0, 8.0),)),
                  Video("C", "Kitchen", 5.0, ())])


def check_submission(sub, task: str, lenient: bool) -> None:
    """What was read is consistent, and scores as the official scripts' loop scores it."""
    n = len(sub.ids)
    assert sub.scores.shape == (n, 3) and sub.scores.dtype == np.float64
    assert set(sub.ids) <= set(IDS)
    keys = list(zip(sub.ids, sub.frames.tolist())) if task == "localize" else sub.ids
    assert len(set(keys)) == n
    if not lenient:
        assert not np.isnan(sub.scores).any()
    if task == "localize":
        assert sub.frames.shape == (n,) and ((sub.frames >= 1) & (sub.frames <= 25)).all()
        res = localize_map(GT, sub, 3)
        scores, labels, _ = localization_arrays(GT, sub, 3)
    else:
        res = classify_map(GT, sub, 3)
        scores, labels, _ = classification_arrays(GT, sub, 3)
    for c in range(3):
        want = average_precision_loop(scores[:, c], labels[:, c])
        assert res.ap[c] == want or (math.isnan(want) and math.isnan(res.ap[c]))
        assert math.isnan(want) or 0 <= want <= 1
    assert math.isnan(res.map) or 0 <= res.map <= 1


@fuzz(250)
@given(st.sampled_from(["classify", "localize"]).flatmap(
    lambda task: st.tuples(st.just(task), submission_texts(task), st.booleans())))
def test_submission_is_read_right_or_refused(case):
    task, (data, expected), lenient = case
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "sub.txt", data)
        try:
            sub = read_submission(path, task, known_ids=IDS, lenient=lenient, n_classes=3)
        except FieldlibError:
            assert expected is None, "a valid submission was refused"
            return
    check_submission(sub, task, lenient)
    if expected is not None:
        assert sub.ids == [vid for vid, _, _ in expected] and not sub.tolerated
        np.testing.assert_array_equal(sub.scores, np.array([s for *_, s in expected],
                                                           dtype=np.float64).reshape(-1, 3))
        if task == "localize":
            assert sub.frames.tolist() == [f for _, f, _ in expected]


# -- the command line -------------------------------------------------------------------------
@st.composite
def eval_cases(draw):
    task = draw(st.sampled_from(["classify", "localize"]))
    gt, _ = draw(csv_texts(edits=(0,)))
    sub, _ = draw(submission_texts(task, ids=["V1", "V2", "AB3X9"], n_classes=157))
    return task, gt, sub, draw(st.booleans())


@fuzz(50)
@given(eval_cases())
def test_cli_eval_exits_0_or_2_without_traceback(capsys, case):
    task, gt, sub, lenient = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        argv = ["charades", "eval", task, "--gt", write(folder, "gt.csv", gt), "--submission",
                write(folder, "sub.txt", sub), "--json", folder / "r.json"]
        run_cli(capsys, argv + (["--lenient"] if lenient else []))


def test_real_entry_point_eval_exits_2_without_traceback(tmp_path):
    gt = write(tmp_path, "gt.csv", ",".join(COLUMNS) + "\nV1,s,Kitchen,5,6,Yes,x,y,z,c000 0 1,"
               "10\n")
    sub = write(tmp_path, "sub.txt", "V1\t" + "\t".join(["0.5"] * 156) + "\tnan\n")
    proc = subprocess.run([*entry_point(), "charades", "eval", "classify", "--gt", str(gt),
                           "--submission", str(sub)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fieldlib: error: ") and proc.stderr.count("\n") == 1
