"""Asynchronous steps over a DistributedMessageStore: two spawned processes (gloo on
127.0.0.1), each with its own batch of frames, give the losses, gradients and stored messages
of one process running the ranks' batches concatenated in rank order (issue 10, part 3)."""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
from spawned import run_ranks

from fieldlib.inference import (
    DistributedMessageStore,
    MessageStore,
    asynchronous_step,
    merge_state_dicts,
)

F64 = torch.float64
WORLD, STEPS, B, T, S, D, NI = 2, 6, 4, 5, 6, 3, 2
POOL = ["v0", "v1", 2, 3, "v4"]
OPTIONS = dict(capacity=6, kernel=2.0, discount=0.9, scale="count", dtype=F64)
COMPONENT = torch.arange(S) % D


def _mu():
    return torch.randn(D, D, generator=torch.Generator().manual_seed(99), dtype=F64)


def batch(step, rank):
    """Rank ``rank``'s frames of step ``step``: ids, frames, times, φX, labels, φXI."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    seq = [POOL[int(i)] for i in torch.randint(len(POOL), (B,), generator=gen)]
    frame = torch.randint(T, (B,), generator=gen)
    unary = torch.randn(B, S, generator=gen, dtype=F64)
    label = torch.randint(S, (B,), generator=gen)
    phi_xi = torch.randn(B, D, NI, generator=gen, dtype=F64)
    return seq, frame, frame.to(F64) * 1.5, unary, label, phi_xi


def run_step(store, parts, step, mu):
    seq, frame, times, unary, label, phi_xi = parts
    unary, phi_xi = unary.clone().requires_grad_(), phi_xi.clone().requires_grad_()
    out = asynchronous_step(store, seq, frame, times, unary, label, mu=mu,
                            mu_component=COMPONENT, phi_xi=phi_xi, xi_component=COMPONENT,
                            iteration=step, l2_intent=0.01)
    g_unary, g_xi, g_mu = torch.autograd.grad(out.loss, [unary, phi_xi, mu])
    return out.per_frame.detach(), g_unary, g_xi, g_mu


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=30))
        store = DistributedMessageStore.temporal_field(D, NI, **OPTIONS)
        mu = _mu().requires_grad_()
        result["steps"] = [run_step(store, batch(step, rank), step, mu)
                           for step in range(STEPS)]
        result["state"] = store.state_dict()
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - reported by the parent
        result["failure"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_give_the_steps_of_one(tmp_path):
    results = run_ranks(_worker, tmp_path, WORLD, "two-process step test")
    single = MessageStore.temporal_field(D, NI, **OPTIONS)
    mu = _mu().requires_grad_()
    for step in range(STEPS):
        parts = [batch(step, r) for r in range(WORLD)]
        joined = ([s for p in parts for s in p[0]],
                  *(torch.cat([p[i] for p in parts]) for i in range(1, 6)))
        per_frame, g_unary, g_xi, g_mu = run_step(single, joined, step, mu)
        for r, res in enumerate(results):
            got = res["steps"][step]
            rows = slice(r * B, (r + 1) * B)
            assert torch.allclose(got[0], per_frame[rows], rtol=0, atol=1e-12), (step, r)
            assert torch.allclose(got[1], g_unary[rows], rtol=0, atol=1e-12)
            assert torch.allclose(got[2], g_xi[rows], rtol=0, atol=1e-12)
        # µ is shared: the ranks' gradients summed are the one-process one (DDP averages them)
        total = sum(res["steps"][step][3] for res in results)
        assert torch.allclose(total, g_mu, rtol=0, atol=1e-12), step
    merged = MessageStore.temporal_field(D, NI, **OPTIONS)
    merged.load_state_dict(merge_state_dicts([res["state"] for res in results]))
    for s in POOL:
        a, b = merged.messages(s), single.messages(s)
        assert all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-12)
                   for k in a), s
