"""Bounded memory before anything is allocated (issue 8, part 3).

Tiny files that declare huge sizes are refused by the reader with a TooLargeError naming
the file, the variable or factor and the figure, and the refusal itself stays far below
the size declared: peak resident memory is measured in a fresh process. Torch's own
allocation failures inside an engine become one clear line and exit code 2.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fieldlib.cli import main
from fieldlib.errors import FieldlibError, TooLargeError
from fieldlib.inference import VariableElimination
from fieldlib.io import TableModel, load_model, parse_fg, parse_uai, read_model, write_uai
from fieldlib.io.budget import ENTRY_BYTES, STATE_BYTES, ReadBudget, describe_bytes

#: 22 bytes: one variable of three billion states and no factor (12.2 GB of RSS before).
HUGE_DOMAIN_UAI = "MARKOV\n1\n3000000000\n0\n"
#: one variable of three billion states and a table over it (values never come).
HUGE_TABLE_UAI = "MARKOV\n1\n3000000000\n1\n1 0\n3000000000\n0.5 0.5\n"
#: 18 bytes: one factor over a 2e8-state domain, every entry omitted (2.7 GB before).
HUGE_FG = "1\n1\n0\n200000000\n0\n"

MIB = 2**20


# -- the readers refuse declared sizes past the budget, naming file, item and figure --------
def test_uai_huge_domain_refused_naming_file_line_variable_and_bytes():
    with pytest.raises(TooLargeError) as info:
        parse_uai(HUGE_DOMAIN_UAI, "big.uai", memory_budget=512 * MIB)
    text = str(info.value)
    assert text.startswith("big.uai:3: variable 0 has 3,000,000,000 states")
    assert f"{3_000_000_000 * STATE_BYTES:,} bytes" in text
    assert "memory budget of 536,870,912 bytes" in text


def test_uai_huge_table_refused_before_its_values_are_read():
    """The table's declared size is refused at its scope, before its values are looked for
    (no FormatError about missing values: the size is the problem)."""
    text = "MARKOV\n2\n60000 60000\n1\n2 0 1\n3600000000\n1 2 3\n"
    with pytest.raises(TooLargeError, match=r"m\.uai:5: factor 0's table over variables "
                       r"\(0, 1\) has 3,600,000,000 entries"):
        parse_uai(text, "m.uai", memory_budget=512 * MIB)
    with pytest.raises(TooLargeError, match="variable 0 has 3,000,000,000 states"):
        parse_uai(HUGE_TABLE_UAI, "m.uai", memory_budget=512 * MIB)


def test_fg_huge_domain_refused_naming_factor_and_bytes():
    with pytest.raises(TooLargeError, match=r"big\.fg:4: variable 0 has 200,000,000 states "
                       r"\(factor 0\)"):
        parse_fg(HUGE_FG, "big.fg", memory_budget=512 * MIB)
    # a per-table limit (what the CLI passes for exact engines) refuses the table itself
    with pytest.raises(TooLargeError, match=r"big\.fg:4: factor 0's table over variables "
                       r"\(0,\) has 200,000,000 entries, above the limit of 50,000,000"):
        parse_fg(HUGE_FG, "big.fg", memory_budget=math.inf, max_table_elements=50_000_000)


def test_budget_counts_the_whole_model_and_is_exact_at_the_edge():
    text = "MARKOV\n2\n3 4\n1\n2 0 1\n12\n" + " ".join(["1"] * 12) + "\n"
    need = (3 + 4) * STATE_BYTES + 12 * ENTRY_BYTES
    assert parse_uai(text, memory_budget=need).cards == [3, 4]
    with pytest.raises(TooLargeError, match="factor 0's table"):
        parse_uai(text, memory_budget=need - 1)
    fg = "1\n2\n0 1\n3 4\n1\n0 1\n"
    assert parse_fg(fg, memory_budget=need).cards == [3, 4]
    with pytest.raises(TooLargeError):
        parse_fg(fg, memory_budget=need - 1)


def test_default_budget_is_measured_when_reading(monkeypatch):
    """With no budget the readers take half the memory available at the start of the read."""
    import fieldlib.io.budget as budget

    monkeypatch.setattr(budget, "available_memory", lambda: 2 * 10_000)
    assert ReadBudget().budget == 10_000
    with pytest.raises(TooLargeError, match="memory budget of 10,000 bytes"):
        parse_uai("MARKOV\n1\n400\n0\n")
    assert parse_uai("MARKOV\n1\n300\n0\n").cards == [300]


def test_budget_values_inf_fractions_and_bad_values(tmp_path):
    assert ReadBudget(math.inf).budget == math.inf
    assert ReadBudget(10**400).budget == math.inf     # an int beyond the float range
    assert ReadBudget(0.5).budget == 1                 # fractions round up
    for bad in (0, -1, float("nan"), "lots", -math.inf):
        with pytest.raises(FieldlibError, match="positive number of bytes"):
            ReadBudget(bad)
    path = tmp_path / "big.uai"
    path.write_text(HUGE_DOMAIN_UAI)
    with pytest.raises(TooLargeError):
        read_model(path, memory_budget=MIB)
    with pytest.raises(TooLargeError):
        load_model(path, memory_budget=MIB)
    assert describe_bytes(10**30).startswith("about 1.00e30")


# -- peak memory of a refusal, measured in a fresh process ----------------------------------
_CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path

    import torch  # noqa: F401  (the interpreter's baseline includes torch)
    from fieldlib.cli import main

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise OSError(field)

    try:
        Path("/proc/self/clear_refs").write_text("5")   # reset the high-water mark
        base, field = status("VmRSS"), "hwm"
    except OSError:
        base, field = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "maxrss"
    code = main(sys.argv[1:])
    peak = status("VmHWM") if field == "hwm" else \\
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"code": code, "growth_kib": peak - base}))
""")


def _refusal_in_child(tmp_path, name: str, text: str, *options: str):
    path = tmp_path / name
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-c", _CHILD, "infer", str(path), "--task", "MAR",
                           *options], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("name, text, what", [
    ("big.uai", HUGE_DOMAIN_UAI, "variable 0 has 3,000,000,000 states"),
    ("big_table.uai", HUGE_TABLE_UAI, "variable 0 has 3,000,000,000 states"),
    ("big.fg", HUGE_FG, "200,000,000"),
])
def test_refusal_of_a_tiny_malicious_file_stays_far_below_a_gigabyte(tmp_path, name, text,
                                                                     what):
    report, err = _refusal_in_child(tmp_path, name, text, "--memory-budget", "1G")
    assert report["code"] == 2
    assert len(err) == 1 and err[0].startswith(f"fieldlib: error: {tmp_path / name}:"), err
    assert what in err[0]
    assert report["growth_kib"] * 1024 < 256 * MIB, report


def test_default_budget_refuses_the_22_byte_file_cheaply(tmp_path):
    """No --memory-budget: half the available memory, measured before reading. 3e9 states
    at 32 bytes need 96 GB, more than half of any machine this suite runs on."""
    from fieldlib.io.budget import default_budget

    if default_budget() >= 3_000_000_000 * STATE_BYTES:
        pytest.skip("this machine has more than 192 GB available")
    report, err = _refusal_in_child(tmp_path, "big.uai", HUGE_DOMAIN_UAI)
    assert report["code"] == 2 and "3,000,000,000 states" in err[0] and len(err) == 1
    assert report["growth_kib"] * 1024 < 256 * MIB, report


def test_exact_engine_table_limit_applies_while_reading_fg(tmp_path):
    """The default exact engine refuses the 2e8-entry table while reading, not after
    building 3 GB of it, even when the memory budget would allow that much."""
    report, err = _refusal_in_child(tmp_path, "big.fg", HUGE_FG, "--memory-budget", "inf")
    assert report["code"] == 2 and "above the limit of 50,000,000 entries" in err[0]
    assert report["growth_kib"] * 1024 < 256 * MIB, report


# -- torch allocation failures inside an engine: one clear line, exit 2 ----------------------
@pytest.fixture
def small_model(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "m.uai"
    write_uai(path, TableModel([2, 3], [(0, 1)], [rng.random((2, 3)) + 0.1]))
    return path


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 24000000000 bytes. Error code 12 "
                 "(Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError(),
])
def test_engine_allocation_failure_is_a_clear_refusal(capsys, monkeypatch, small_model,
                                                      error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(VariableElimination, "run", fail)
    code = main(["infer", str(small_model), "--task", "PR"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("fieldlib: error: engine 'exact' ran out of memory")
    assert "enforce fail" not in lines[0] and "Traceback" not in err


def test_a_real_failed_torch_allocation_is_a_clear_refusal(capsys, monkeypatch, small_model):
    """An engine asking torch for 80 TB: the allocator's own error, turned into one line."""
    def huge(*args, **kwargs):
        return torch.empty(10**13, dtype=torch.float64)

    try:  # with unlimited overcommit the allocation may succeed (lazily): nothing to test
        probe = huge()
    except RuntimeError:
        pass
    else:
        del probe
        pytest.skip("this machine lets torch reserve 80 TB")
    monkeypatch.setattr(VariableElimination, "run", huge)
    code = main(["infer", str(small_model), "--task", "MAR"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert "ran out of memory (DefaultCPUAllocator: can't allocate memory" in lines[0]


def test_allocation_failure_is_a_too_large_error_from_solve(monkeypatch, small_model):
    from fieldlib.cli_infer import solve

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 8 bytes")

    monkeypatch.setattr(VariableElimination, "run", fail)
    with pytest.raises(TooLargeError, match="you tried to allocate 8 bytes"):
        solve(small_model, "PR")


def test_other_runtime_errors_are_not_disguised(monkeypatch, small_model):
    def fail(*args, **kwargs):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(VariableElimination, "run", fail)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        main(["infer", str(small_model), "--task", "PR"])


def test_allocation_failure_outside_an_engine_is_one_line(capsys, monkeypatch, small_model):
    """fieldlib.cli.main itself turns an allocator's RuntimeError into exit code 2."""
    import fieldlib.cli_infer as cli_infer

    def fail(args):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate "
                           "10 bytes")

    monkeypatch.setattr(cli_infer, "run", fail)
    code = main(["infer", str(small_model), "--task", "PR"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "out of memory" in err[0]
