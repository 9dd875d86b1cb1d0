"""fieldlib.inference.check and the ``fieldlib gradcheck`` command."""

from __future__ import annotations

import torch

from fieldlib.cli import main
from fieldlib.inference.check import (
    CheckReport,
    CheckRow,
    compare,
    compare_closed_form,
    gradient_error,
    marginal_error,
    toy_temporal_field,
)


def test_gradient_error_and_marginal_error():
    a = torch.tensor([1.0, 0.0, 2.0])
    err, cos = gradient_error(a, a)
    assert err == 0.0 and abs(cos - 1.0) < 1e-12
    err, cos = gradient_error(a, -a)
    assert err == 4.0 and abs(cos + 1.0) < 1e-12
    assert gradient_error(torch.zeros(2), torch.zeros(2)) == (0.0, 1.0)
    p = {"v": torch.tensor([0.5, 0.5]), "w": torch.tensor([[1.0, 0.0]])}
    q = {"v": torch.tensor([0.25, 0.75]), "w": torch.tensor([[0.0, 1.0]])}
    assert marginal_error(p, q) == 1.0


def test_report_fails_when_a_must_hold_row_fails():
    r = CheckReport([CheckRow("a", "x", 0.0, 1.0, must_hold=True, ok=True),
                     CheckRow("b", "y", 1.0, 0.5, must_hold=False, ok=False)])
    assert r.ok
    r.rows.append(CheckRow("c", "z", 1.0, 0.0, must_hold=True, ok=False))
    assert not r.ok and "FAIL" in r.table()


def test_compare_flags_coupling_and_passes_without():
    g, params, labels = toy_temporal_field(0, coupling=False)
    off = compare(g, labels, expect_exact=True)
    assert off.ok and all(r.must_hold for r in off.rows)
    g, params, labels = toy_temporal_field(0)
    on = compare(g, labels, expect_exact=True)  # claiming exactness must now fail
    assert not on.ok
    assert compare(g, labels).ok  # the bound still holds
    closed = compare_closed_form(g, labels)
    assert closed.ok and len(closed.rows) == 2 * len(params)


def test_cli_gradcheck_exit_code_and_table(capsys):
    assert main(["gradcheck", "--seed", "5", "--trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "closed form vs autograd (sequence)" in out
    assert "coupling off" in out and "coupling on" in out
    assert "must-hold checks hold" in out


def test_cli_gradcheck_fails_when_a_closed_form_is_wrong(monkeypatch, capsys):
    import fieldlib.inference.check as check

    real = check.closed_form_gradients

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out["mu.mu"] = out["mu.mu"] * 0.5  # forget the factor 2 note, say
        return out

    monkeypatch.setattr(check, "closed_form_gradients", broken)
    assert main(["gradcheck", "--trials", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out
