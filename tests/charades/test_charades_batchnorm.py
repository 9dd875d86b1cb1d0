"""CrossProcessBatchNorm (models/charades/batchnorm.py): over K processes, the forward values,
the input and parameter gradients and the running statistics of one BatchNorm2d over the
concatenated batch (float64; the two-process training test checks it inside DDP)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

from fieldlib.models.charades.batchnorm import CrossProcessBatchNorm, convert_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spawned import run_ranks  # noqa: E402

C = 5


def _batch(affine: bool):
    """A batch of 7 frames (uneven split: 3 + 4), far from zero mean (the Σx² form would
    cancel), and upstream gradients."""
    g = torch.Generator().manual_seed(3)
    x = 40.0 + 3.0 * torch.randn(7, C, 4, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(7, C, 4, 3, generator=g, dtype=torch.float64)
    ref = nn.BatchNorm2d(C, affine=affine, momentum=0.3).double()
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    return x, dy, ref


def _run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, {k: v.clone() for k, v in layer.state_dict().items()}


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    out = {}
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        for affine in (True, False):
            x, dy, ref = _batch(affine)
            part = slice(0, 3) if rank == 0 else slice(3, 7)
            layer = convert_batchnorm(nn.Sequential(ref))[0]
            y, dx, grads, state = _run(layer, x[part], dy[part])
            # DDP would add the parameter gradients up: do it here
            for g in grads.values():
                dist.all_reduce(g)
            out[affine] = (y, dx, grads, state)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported by the harness
        out["failure"] = traceback.format_exc()
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize("affine", [True, False])
def test_two_processes_equal_one_batchnorm_over_the_whole_batch(tmp_path, affine):
    ranks = run_ranks(_worker, tmp_path / "", 2, "cross-process batch norm", timeout=120)
    x, dy, ref = _batch(affine)
    y, dx, grads, state = _run(ref, x, dy)
    got = [r[affine] for r in ranks]
    torch.testing.assert_close(torch.cat([g[0] for g in got]), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([g[1] for g in got]), dx, rtol=0, atol=1e-12)
    for g in got:
        assert set(g[2]) == set(grads)
        for name, value in grads.items():
            torch.testing.assert_close(g[2][name], value, rtol=0, atol=1e-11)
        for name, value in state.items():
            torch.testing.assert_close(g[3][name], value, rtol=1e-12, atol=1e-12)


def test_without_a_process_group_it_is_batchnorm(tmp_path):
    x, dy, ref = _batch(True)
    layer = CrossProcessBatchNorm(C, momentum=0.3).double()
    layer.load_state_dict(ref.state_dict())
    for a, b in zip(_run(layer, x, dy), _run(ref, x, dy)):
        if isinstance(a, dict):
            for k in a:
                torch.testing.assert_close(a[k], b[k])
        else:
            torch.testing.assert_close(a, b)
