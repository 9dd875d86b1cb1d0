"""Component's block plans (fieldlib/factors/component.py): built once per (domain,
components, configs) and reused, rebuilt when the configs change in place; and
``block_table_sum``, which gathers run-constant tables once a run, equals the plain sum of the
block tables bit for bit, gradients included."""

from __future__ import annotations

import itertools

import pytest
import torch

from fieldlib.errors import FieldlibError
from fieldlib.factors import Component
from fieldlib.factors.component import block_plan, block_table_sum
from fieldlib.variables import BlockDomain, Variable, VariableArray, run_length


def _frame_domain(n_b=7, n_s=3, sparse_rows=None):
    """Frame-like states b * S + s over (c, o, p, s): b's (c, o, p) fixed, scene fastest."""
    g = torch.Generator().manual_seed(0)
    combos = torch.tensor(list(itertools.product(range(4), range(3), range(2))))
    rows = combos[torch.randperm(len(combos), generator=g)[:n_b]]
    b = rows.repeat_interleave(n_s, 0)
    s = torch.arange(n_s).repeat(n_b)
    return BlockDomain({"c": 4, "o": 3, "p": 2, "s": n_s}, torch.cat([b, s[:, None]], 1)), rows


def _factors(target, rows, lead, g, drop_config=False):
    def t(*shape):
        return (50 * torch.randn(*lead, *shape, generator=g, dtype=torch.float64)
                ).requires_grad_(True)
    configs = rows[1:] if drop_config else rows  # a missing row: those states get -inf
    return [Component(target, ("o", "p"), t(3, 2)), Component(target, ("o", "s"), t(3, 3)),
            Component(target, ("c", "o", "p"), t(len(configs)), configs=configs),
            Component(target, "p", t(2))]


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (1, 0, 3, 2), (0, 2, 3, 1), (0, 2, 3)])
@pytest.mark.parametrize("lead", [(), (5,)])
@pytest.mark.parametrize("drop_config", [False, True])
def test_block_table_sum_is_the_plain_sum_bit_for_bit(order, lead, drop_config):
    domain, rows = _frame_domain()
    g = torch.Generator().manual_seed(1)
    factors = _factors(Variable("x", domain), rows, lead, g, drop_config)
    chosen = [factors[k] for k in order]
    want = chosen[0].block_table()
    for f in chosen[1:]:
        want = want + f.block_table()
    got = block_table_sum(chosen)
    assert got.shape == want.shape
    assert torch.equal(got, want)
    if drop_config:
        assert bool(torch.isinf(got).any())
    tables = [f.table for f in chosen]
    w = torch.randn(want.shape, generator=g, dtype=torch.float64)
    finite = torch.isfinite(want)
    ga = torch.autograd.grad((want.where(finite, 0) * w).sum(), tables)
    gb = torch.autograd.grad((got.where(finite, 0) * w).sum(), tables)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_block_table_sum_over_a_frames_array_and_without_runs():
    domain, rows = _frame_domain()
    g = torch.Generator().manual_seed(2)
    frames = VariableArray("x", 4, domain)
    factors = _factors(frames, rows, (2, 4), g)
    order = factors[1:] + factors[:1]
    want = order[0].block_table()
    for f in order[1:]:
        want = want + f.block_table()
    assert want.shape == (2, 4, 21) and torch.equal(block_table_sum(order), want)
    # scene slowest: no factor is constant on runs, the sum is the plain one
    states = domain.tuples[torch.argsort(domain.tuples[:, 3], stable=True)]
    other = BlockDomain(dict(domain.components), states)
    fs = _factors(Variable("y", other), rows, (), g)
    assert [f._plan.run for f in fs] == [1, 1, 1, 1]
    want = fs[0].block_table()
    for f in fs[1:]:
        want = want + f.block_table()
    assert torch.equal(block_table_sum(fs), want)
    with pytest.raises(FieldlibError, match="no factors"):
        block_table_sum([])


def test_runs_of_the_frame_layout():
    domain, rows = _frame_domain(n_b=7, n_s=3)
    assert run_length(domain.component("o")) in (3, 21)
    assert run_length(domain.component("s")) == 1
    assert run_length(torch.tensor([5, 5, 5, 5])) == 4 and run_length(torch.tensor([1])) == 1
    assert run_length(torch.tensor([0, 0, 1, 1, 1, 1])) == 2


def test_plans_are_built_once_and_rebuilt_after_an_in_place_change():
    domain, rows = _frame_domain()
    x = Variable("x", domain)
    configs = rows.clone()
    a = Component(x, ("c", "o", "p"), torch.zeros(len(rows)), configs=configs)
    b = Component(x, ("c", "o", "p"), torch.ones(len(rows)), configs=configs)
    assert a._plan is b._plan  # the same tensor: no second check, sort or search
    assert Component(x, ("o", "p"), torch.zeros(3, 2))._plan is \
        Component(x, ("o", "p"), torch.ones(3, 2))._plan
    assert block_plan(domain, ("c", "o", "p"), rows.clone()) is not a._plan  # another tensor
    configs[0] = configs[1]  # now a repeated row: the change is seen
    with pytest.raises(FieldlibError, match="distinct"):
        Component(x, ("c", "o", "p"), torch.zeros(len(rows)), configs=configs)
    configs.copy_(rows.flip(0))
    c = Component(x, ("c", "o", "p"), torch.arange(len(rows), dtype=torch.float64),
                  configs=configs)
    assert c._plan is not a._plan
    # state b * S + s takes the value of its row of configs (flipped: rows[k] is row K-1-k)
    k = len(rows)
    assert torch.equal(c.block_table()[::3], torch.arange(k - 1, -1, -1, dtype=torch.float64))
    for _ in range(100):  # a bounded cache
        block_plan(domain, ("c", "o", "p"), rows.clone())
    assert len(domain.plans) <= 64
