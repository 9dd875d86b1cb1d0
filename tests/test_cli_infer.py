"""`fieldlib infer`: UAI competition output for PR, MAR, MAP on .uai and .fg models, -o,
--help, and exit code 2 with one clear stderr line on bad input or a refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fieldlib.cli import main
from fieldlib.inference import get_engine
from fieldlib.io import TableModel, read_uai, write_fg, write_uai


@pytest.fixture
def model_path(tmp_path):
    rng = np.random.default_rng(0)
    cards = [2, 3, 2, 2]
    scopes = [(0,), (0, 1), (1, 2), (2, 3), (3, 0)]
    tables = [rng.random(tuple(cards[v] for v in s)) + 0.1 for s in scopes]
    path = tmp_path / "m.uai"
    write_uai(path, TableModel(cards, scopes, tables))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_pr_prints_log10_z(capsys, model_path):
    code, out, err = run(capsys, "infer", model_path, "--task", "PR")
    assert code == 0 and err == ""
    head, value = out.split("\n")[:2]
    assert head == "PR"
    log_z = float(get_engine("bruteforce")(read_uai(model_path).to_graph()).log_z)
    assert float(value) == pytest.approx(log_z / math.log(10), rel=1e-9)


def test_mar_prints_one_line_of_marginals(capsys, model_path, tmp_path):
    evid = tmp_path / "e.evid"
    evid.write_text("1 1 2\n")
    code, out, _ = run(capsys, "infer", model_path, "--evid", evid, "--task", "MAR")
    assert code == 0
    lines = out.strip().split("\n")
    assert lines[0] == "MAR" and len(lines) == 2
    fields = lines[1].split()
    assert int(fields[0]) == 4
    graph = read_uai(model_path).to_graph()
    exact = get_engine("bruteforce")(graph, {"v1": 2})
    pos = 1
    for name, d in zip(["v0", "v1", "v2", "v3"], [2, 3, 2, 2]):
        assert int(fields[pos]) == d
        p = [float(x) for x in fields[pos + 1: pos + 1 + d]]
        np.testing.assert_allclose(p, exact.marginal(name).numpy(), atol=1e-9)
        pos += 1 + d
    assert pos == len(fields)
    assert fields[4:8] == ["3", "0", "0", "1"]  # the evidence variable shows a delta


def test_map_matches_bruteforce_and_fg_input(capsys, model_path, tmp_path):
    graph = read_uai(model_path).to_graph()
    best = get_engine("bruteforce")(graph, marginals=False, map=True).map
    expected = ["4"] + [str(int(best[f"v{i}"])) for i in range(4)]
    code, out, _ = run(capsys, "infer", model_path, "--task", "map")
    assert code == 0 and out.split("\n")[:2] == ["MAP", " ".join(expected)]
    fg = tmp_path / "m.fg"
    write_fg(fg, graph)
    code, out_fg, _ = run(capsys, "infer", fg, "--task", "MAP", "--engine", "bruteforce")
    assert code == 0 and out_fg == out


def test_output_file_gets_the_same_text(capsys, model_path, tmp_path):
    target = tmp_path / "result.MAR"
    code, out, _ = run(capsys, "infer", model_path, "--task", "MAR", "-o", target)
    assert code == 0 and target.read_text() == out


def _fails(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("fieldlib: error: "), err
    return lines[0]


def test_malformed_model_exit_2_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.uai"
    bad.write_text("MARKOV\n2\n2 2\n1\n2 0 1\n4\n1 1 -1 1\n")
    line = _fails(capsys, "infer", bad, "--task", "PR")
    assert f"{bad}:7:" in line and "negative" in line


def test_bad_evidence_and_missing_files_exit_2(capsys, model_path, tmp_path):
    evid = tmp_path / "e.evid"
    evid.write_text("1 0 5\n")
    assert "in 0..1, got 5" in _fails(capsys, "infer", model_path, "--evid", evid,
                                      "--task", "MAR")
    assert "cannot read" in _fails(capsys, "infer", tmp_path / "none.uai", "--task", "PR")
    other = tmp_path / "m.txt"
    other.write_text("")
    assert "expected a .uai or .fg file" in _fails(capsys, "infer", other, "--task", "PR")
    assert "unknown engine" in _fails(capsys, "infer", model_path, "--task", "PR",
                                      "--engine", "nope")


def test_zero_probability_evidence_exit_2(capsys, tmp_path):
    path = tmp_path / "z.uai"
    path.write_text("MARKOV\n1\n2\n1\n1 0\n2\n1 0\n")
    evid = tmp_path / "z.evid"
    evid.write_text("1 0 1\n")
    assert "probability zero" in _fails(capsys, "infer", path, "--evid", evid, "--task", "PR")


def test_refusals_exit_2_with_the_engines_message(capsys, tmp_path):
    n = 30  # 2**30 joint states: brute force refuses, exact with a tiny budget refuses
    cards = [2] * n
    scopes = [(i, i + 1) for i in range(n - 1)]
    tables = [np.full((2, 2), 0.5) for _ in scopes]
    path = tmp_path / "chain.uai"
    write_uai(path, TableModel(cards, scopes, tables))
    line = _fails(capsys, "infer", path, "--task", "PR", "--engine", "bruteforce")
    assert "brute force would enumerate 1,073,741,824 joint states" in line
    # 1K: the model itself (about 3.7 KB declared) is refused while reading, naming the file
    line = _fails(capsys, "infer", path, "--task", "MAR", "--memory-budget", "1K")
    assert f"{path}:3: variable" in line and "memory budget of 1,024 bytes" in line
    # 1M: the model fits, its contraction does not (the engine's own figure)
    line = _fails(capsys, "infer", path, "--task", "MAR", "--memory-budget", "1M")
    assert "memory budget is 1,048,576 bytes" in line
    code, out, _ = run(capsys, "infer", path, "--task", "PR", "--memory-budget", "64M")
    assert code == 0 and float(out.split()[1]) == pytest.approx(
        (n * math.log(2) + (n - 1) * math.log(0.5)) / math.log(10))


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    top = capsys.readouterr().out
    assert "infer" in top
    with pytest.raises(SystemExit) as info:
        main(["infer", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("MODEL", "--evid", "--task", "PR", "MAR", "MAP", "--engine", "exact",
                   "bruteforce", "meanfield", "-o", "--memory-budget", "--option",
                   "--list-options"):
        assert option in text, option


def test_bad_option_values_exit_2(capsys, model_path):
    with pytest.raises(SystemExit) as info:
        main(["infer", str(model_path), "--task", "XYZ"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["infer", str(model_path), "--task", "PR", "--memory-budget", "lots"])
    assert info.value.code == 2
    capsys.readouterr()


def test_meanfield_engine_from_the_command_line(capsys, model_path):
    """PR prints the ELBO (said on stderr), below exact log10 Z; MAR rows sum to one."""
    code, exact_out, _ = run(capsys, "infer", model_path, "--task", "PR")
    code, out, err = run(capsys, "infer", model_path, "--task", "PR", "--engine", "meanfield",
                         "-O", "schedule=sequential", "-O", "damping=0.2")
    assert code == 0 and "lower bound" in err
    assert float(out.split()[1]) <= float(exact_out.split()[1]) + 1e-9
    code, out, _ = run(capsys, "infer", model_path, "--task", "MAR", "--engine",
                       "meanfield[schedule=synchronous,max_iter=50]")
    fields = out.split("\n")[1].split()
    n, k, sums = int(fields[0]), 1, []
    for _ in range(n):
        d = int(fields[k])
        sums.append(sum(float(x) for x in fields[k + 1:k + 1 + d]))
        k += 1 + d
    assert code == 0 and np.allclose(sums, 1.0)
    line = _fails(capsys, "infer", model_path, "--task", "MAP", "--engine", "meanfield")
    assert "cannot give map" in line


def _infer_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["infer", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_states_every_default_explicitly(capsys):
    """No "(default: None)": required options say so, optional ones say what happens."""
    text = _infer_help(capsys)
    assert "None" not in text
    assert "required unless --list-options. PR" in text
    for phrase in ("default: no evidence", "default: exact", "default: print only",
                   "default: half the memory available", "default: the engine's defaults",
                   "'inf' (or a number too large for a float, like 1e400) means no limit",
                   "fractions rounded up to whole bytes"):
        assert phrase in text, phrase


@pytest.mark.parametrize("value", ["inf", "Infinity", "1e400", "1e400G"])
def test_memory_budget_inf_means_no_limit(capsys, model_path, value):
    code, out, err = run(capsys, "infer", model_path, "--task", "PR", "--memory-budget", value)
    assert code == 0 and out.startswith("PR\n") and err == ""


def test_memory_budget_fractions_round_up(capsys, model_path):
    """0.5 bytes is 1 byte (not "got 0"): the model does not fit, said with the figure."""
    line = _fails(capsys, "infer", model_path, "--task", "PR", "--memory-budget", "0.5")
    assert "memory budget of 1 byte;" in line
    code, out, _ = run(capsys, "infer", model_path, "--task", "PR", "--memory-budget", "0.5G")
    assert code == 0 and out.startswith("PR")


@pytest.mark.parametrize("value", ["0", "-5", "nan", "-inf", "lots", "1Q"])
def test_memory_budget_bad_values_are_usage_errors(capsys, model_path, value):
    with pytest.raises(SystemExit) as info:
        main(["infer", str(model_path), "--task", "PR", f"--memory-budget={value}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --memory-budget" in err and "Traceback" not in err


def test_budget_is_measured_before_reading_and_given_to_the_engine(capsys, monkeypatch,
                                                                   model_path):
    """The default budget is read once, before the model, and the exact engine uses it."""
    import fieldlib.io.budget as budget
    from fieldlib.inference import VariableElimination

    calls = []
    monkeypatch.setattr(budget, "available_memory", lambda: calls.append(1) or 2**31)
    seen = {}
    original = VariableElimination.run

    def spy(self, *args, **kwargs):
        seen["budget"] = self.memory_budget
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VariableElimination, "run", spy)
    code, out, _ = run(capsys, "infer", model_path, "--task", "PR")
    assert code == 0 and calls == [1] and seen["budget"] == 2**30


def test_engine_options_come_from_the_engine_not_the_cli(capsys, model_path):
    code, out, err = run(capsys, "infer", model_path, "--task", "PR", "-O", "search_effort=0")
    assert code == 0 and err == ""
    code, again, err = run(capsys, "infer", model_path, "--task", "PR", "--engine",
                           "exact[search_effort=0]")
    assert code == 0 and again == out
    # a wrong option: exit 2, one line naming the engine's options
    code, out, err = run(capsys, "infer", model_path, "--task", "PR", "-O", "schedule=x")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "engine 'exact' has no option 'schedule'" in err and "search_effort" in err
    code, out, err = run(capsys, "infer", model_path, "--task", "PR", "-O", "search_effort=-1")
    assert code == 2 and "search_effort must be >= 0" in err
    code, out, err = run(capsys, "infer", model_path, "--task", "PR", "-O", "max_iter")
    assert code == 2 and "expected KEY=VALUE" in err


def test_list_options_prints_what_an_engine_declares(capsys):
    code, out, err = run(capsys, "infer", "--engine", "meanfield", "--list-options")
    assert code == 0
    for name in ("schedule", "damping", "max_iter", "tol"):
        assert f"  {name} (" in out


def test_model_without_factors_prints_float64_marginals(capsys, tmp_path):
    path = tmp_path / "free.uai"
    path.write_text("MARKOV\n1\n3\n0\n")
    code, out, _ = run(capsys, "infer", path, "--task", "MAR")
    assert code == 0 and out.split("\n")[1] == "1 3 0.3333333333 0.3333333333 0.3333333333"
    code, out, _ = run(capsys, "infer", path, "--task", "PR")
    assert out.split()[1] == f"{math.log10(3):.10g}"
