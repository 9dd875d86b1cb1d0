import argparse
import json

import numpy as np
import pytest
from charades_helpers import data_file, write_csv

from fieldlib.cli import build_parser, main
from fieldlib.models.charades import write_classify_submission, write_localize_submission

ROWS = [("V1", "Kitchen", "c000 0 5", "10"), ("V2", "Garage", "c000 1 2;c001 0 10", "10"),
        ("V3", "Kitchen", "", "10"), ("V4", "Kitchen", "c001 3 4;c002 0 1", "10")]


@pytest.fixture
def gt(tmp_path):
    return write_csv(tmp_path / "gt.csv", ROWS)


def _scores(n, seed=0):
    return np.random.default_rng(seed).random((n, 157))


def test_eval_classify_prints_and_writes_json(gt, tmp_path, capsys):
    sub = tmp_path / "s.txt"
    scores = _scores(4)
    scores[:, 0] = [0.9, 0.8, 0.1, 0.2]  # class 0 perfect
    write_classify_submission(sub, ["V1", "V2", "V3", "V4"], scores)
    out_json = tmp_path / "r.json"
    assert main(["charades", "eval", "classify", "--gt", str(gt), "--submission", str(sub),
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "mAP          nan" in out and "154 classes have no positives" in out
    assert "best 3 classes:" in out and "worst 3 classes:" in out and "c000  1.0000" in out
    doc = json.loads(out_json.read_text())
    assert doc["map"] is None and doc["wap"] is None and doc["ap"][0] == 1.0
    assert len(doc["ap"]) == 157 and doc["ap"][5] is None and doc["classes"][0] == "c000"
    assert doc["map_nanmean"] == pytest.approx(np.mean([x for x in doc["ap"] if x is not None]))


def test_eval_localize_with_class_names_and_missing_rows(tmp_path, capsys):
    classes = data_file("Charades_v1_classes.txt")
    gt = write_csv(tmp_path / "gt.csv", ROWS)
    sub = tmp_path / "l.txt"
    write_localize_submission(sub, ["V1", "V2"], np.random.default_rng(1).random((2, 25, 157)),
                              digits=5)
    assert main(["charades", "eval", "localize", "--gt", str(gt), "--submission", str(sub),
                 "--classes", str(classes), "--top", "2"]) == 0
    captured = capsys.readouterr()
    assert "100 (video, frame) rows, 50 missing" in captured.out
    assert "Holding some clothes" in captured.out  # class names from --classes
    assert "50 of 100 (video, frame) rows missing" in captured.err


def test_strict_error_is_one_line_exit_2(gt, tmp_path, capsys):
    sub = tmp_path / "bad.txt"
    sub.write_text("V1 " + " ".join(["0.5"] * 157) + "\nV1 " + " ".join(["0.5"] * 157) + "\n")
    assert main(["charades", "eval", "classify", "--gt", str(gt), "--submission",
                 str(sub)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.txt: line 2: duplicate row for video V1" in err[0]
    # lenient accepts it and says what it tolerated on stderr
    assert main(["charades", "eval", "classify", "--gt", str(gt), "--submission", str(sub),
                 "--lenient"]) == 0
    err = capsys.readouterr().err
    assert "lenient: 1 repeated rows: the last line of each key kept" in err


def test_info_prints_state_space_size(tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", ROWS)
    assert main(["charades", "info", "--train", str(train), "--json",
                 str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    # c000: [0,5] and [1,2] all thirds; c001 [0,10], [3,4] all thirds; c002 [0,1] all thirds
    assert "|B| = 9" in out and "|S| = 2" in out and "|B| x |S| = 18" in out
    assert json.loads((tmp_path / "i.json").read_text())["B"] == 9


def test_info_on_official_train(capsys):
    train = data_file("Charades_v1_train.csv")
    assert main(["charades", "info", "--train", str(train)]) == 2  # 7 reversed instances
    assert "line 100 (video 00SL4)" in capsys.readouterr().err
    assert main(["charades", "info", "--train", str(train), "--reversed-intervals",
                 "keep"]) == 0
    captured = capsys.readouterr()
    assert "|B| = 471" in captured.out and "|S| = 16" in captured.out
    assert captured.err.count("tolerated:") == 7


def test_prior_submission_then_eval(tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", ROWS)
    out = tmp_path / "prior.txt"
    assert main(["charades", "prior", "--train", str(train), "--gt", str(train), "--task",
                 "localize", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 100
    assert main(["charades", "eval", "localize", "--gt", str(train), "--submission",
                 str(out)]) == 0
    assert "mAP nan-mean" in capsys.readouterr().out


def test_synth_writes_official_layout(tmp_path, capsys):
    csv = write_csv(tmp_path / "v.csv", ROWS[:2])
    assert main(["charades", "synth", "--csv", str(csv), "--out", str(tmp_path / "f"),
                 "--max-frames", "3", "--size", "16"]) == 0
    assert (tmp_path / "f" / "Charades_v1_rgb" / "V2" / "V2-000003.jpg").is_file()
    assert (tmp_path / "f" / "Charades_v1_flow" / "V1" / "V1-000001y.jpg").is_file()
    assert "wrote 18 JPEG files for 2 synthetic videos" in capsys.readouterr().out


def test_help_without_subcommand(capsys):
    assert main(["charades"]) == 0
    assert "info" in capsys.readouterr().out


# -- bad input: one line on stderr, exit code 2, never a traceback (issue 8) ------------------
def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fieldlib: error: "), captured.err
    return err[0]


@pytest.mark.parametrize("fps", ["nan", "inf", "-inf", "0", "-8", "1e300"])
def test_info_rejects_bad_fps(tmp_path, capsys, fps):
    train = write_csv(tmp_path / "train.csv", ROWS)
    assert main(["charades", "info", "--train", str(train), f"--fps={fps}"]) == 2
    assert "fps" in _one_line_error(capsys)
    assert "frames at" not in capsys.readouterr().out  # no nonsense counts printed


def test_json_into_a_missing_folder(gt, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "r.json"
    assert main(["charades", "info", "--train", str(gt), "--json", str(missing)]) == 2
    assert f"folder {missing.parent} does not exist" in _one_line_error(capsys)
    sub = tmp_path / "s.txt"
    write_classify_submission(sub, ["V1", "V2", "V3", "V4"], _scores(4))
    assert main(["charades", "eval", "classify", "--gt", str(gt), "--submission", str(sub),
                 "--json", str(missing)]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(["charades", "prior", "--train", str(gt), "--gt", str(gt), "--task",
                 "classify", "--out", str(tmp_path / "no" / "p.txt")]) == 2
    assert "--out" in _one_line_error(capsys)


@pytest.mark.parametrize("lenient", [False, True])
@pytest.mark.parametrize("frame, message", [
    ("100000000000000000000", "field frame: 100000000000000000000 outside 1..25"),
    ("-100000000000000000000", "outside 1..25"),
    ("1e20", "field frame: '1e20' is not an integer"),
])
def test_localize_frame_beyond_int64(gt, tmp_path, capsys, lenient, frame, message):
    sub = tmp_path / "l.txt"
    sub.write_text(f"V1 {frame} " + " ".join(["0.5"] * 157) + "\nV1 1 "
                   + " ".join(["0.5"] * 157) + "\n")
    argv = ["charades", "eval", "localize", "--gt", str(gt), "--submission", str(sub)]
    if lenient and "e" not in frame:  # lenient ignores it, as the official scorer
        assert main([*argv, "--lenient"]) == 0
        assert "1 rows with a frame outside 1..25 ignored (line 1)" in capsys.readouterr().err
    else:
        assert main(argv + (["--lenient"] if lenient else [])) == 2
        assert message in _one_line_error(capsys)


def test_csv_naming_a_column_twice(tmp_path, capsys):
    header = ["id", "subject", "scene", "quality", "relevance", "verified", "script",
              "objects", "descriptions", "actions", "length", "scene"]
    row = ["V1", "S1", "Kitchen", "5", "6", "Yes", "s", "o", "d", "c000 0 5", "10", "Garage"]
    csv = write_csv(tmp_path / "dup.csv", [row], header=header)
    assert main(["charades", "info", "--train", str(csv)]) == 2
    assert "line 1: column scene appears twice in the header (fields 3 and 12)" in \
        _one_line_error(capsys)


def test_synth_limit_must_be_positive(tmp_path, capsys):
    csv = write_csv(tmp_path / "v.csv", ROWS[:2])
    assert main(["charades", "synth", "--csv", str(csv), "--out", str(tmp_path / "f"),
                 "--limit", "-1"]) == 2
    assert "--limit must be at least 1" in _one_line_error(capsys)


def _commands(parser, path=()):
    """Every (command path, parser) under ``parser``, itself included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_charades_command_and_option_has_help():
    top = dict(_commands(build_parser()))[("charades",)]
    seen = set()
    for path, parser in _commands(top, ("charades",)):
        seen.add(" ".join(path))
        assert parser.description, f"{' '.join(path)} has no description"
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{' '.join(path)} {action.option_strings[0]} has no help"
    assert {"charades prior", "charades synth", "charades eval",
            "charades eval classify"} <= seen


def test_eval_has_a_description(capsys):
    with pytest.raises(SystemExit):
        main(["charades", "eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "official Charades metrics" in out and "--lenient" in out
