"""Run a test's worker in several spawned processes (gloo on 127.0.0.1) and collect what each
rank saved: the harness the two-process tests share."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def reporting(rank: int, out_dir):
    """A worker's body: yields the dict it fills, then saves it to ``out_dir/rank{r}.pt``,
    with the traceback as "failure" when the body raised (the parent reports it)."""
    result: dict = {}
    try:
        yield result
    except Exception:  # noqa: BLE001 - reported by run_ranks
        result["failure"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(worker, out_dir, world: int, what: str, timeout: float = 120.0) -> list[dict]:
    """Spawn ``worker(rank, port, out_dir)`` on ``world`` processes; each saves a dict to
    ``out_dir/rank{r}.pt`` (with "failure" holding a traceback when it failed). Fails the
    test on a timeout or a rank's failure; returns the ranks' dicts."""
    ctx = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {what} timed out")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "failure" not in res, f"rank {r}:\n{res.get('failure')}"
    return results
