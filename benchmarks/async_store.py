"""Message store benchmark (issue 10, §4, the store part): writes and reads per second.

    .venv/bin/python benchmarks/async_store.py [--batches 32,256] [--processes 1,2]
        [--sequences 8000] [--repeats 60] [--threads 1] [--placements sharded,replicated]

The store of the paper's temporal field at Charades sizes (``MessageStore.temporal_field``:
K and K* on 38 objects, H and H* on 30 intents, float32, 568 bytes a message), capacity 50,
σ = 150, d = 0.9, every one of ``--sequences`` sequences (Charades has 7,985 training videos)
filled to capacity first. Each step, every process writes the outgoing messages of a batch
of B frames (random sequences, frame 0..24 at time 30 · frame, iteration = the step) and then
reads the incoming messages (Eq. 10: past, future, total) of another batch of B frames.

* 1 process: ``MessageStore``;
* 2 processes over gloo on 127.0.0.1 (torch.multiprocessing spawn), each process with its
  own batch of B frames (as DDP gives each rank its own), so a step handles 2B frames; the
  time of a call is the median over steps, the slower rank's. ``--placements``: sharded
  (``DistributedMessageStore``: a process holds the sequences it owns; a write is 2
  collectives, a read 3) and replicated (``ReplicatedMessageStore``: every process holds
  every sequence; a write is one all_gather, a read is local).

Each step also times ``write_read`` (a write and then a read of B frames each, in one call:
3 collectives instead of 5 in the sharded store, 1 in the replicated one). Writes and reads
per second count the frames of all processes. Each process runs ``--threads`` torch
threads (default 1: the 2-process rows then use the machine's 2 cores as the 1-process row
uses one).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import tempfile
import time

import torch

from fieldlib.inference import DistributedMessageStore, MessageStore, ReplicatedMessageStore

FRAMES, SPACING = 25, 30.0
OPTIONS = dict(capacity=50, kernel=150.0, discount=0.9, scale=1.0)
PLACEMENTS = {"sharded": DistributedMessageStore, "replicated": ReplicatedMessageStore}


def batch(gen, b, sequences, step, store):
    """B rows: sequence ids, frames, times, messages (Charades sizes), iteration."""
    seqs = torch.randint(sequences, (b,), generator=gen)
    frames = torch.randint(FRAMES, (b,), generator=gen)
    times = frames.to(torch.float64) * SPACING
    msgs = {}
    for f, shape in store.fields.items():
        v = torch.rand(b, *shape, generator=gen)
        msgs[f] = v / v.sum(-1, keepdim=True)
    return seqs, frames, times, msgs, step


def prefill(store, sequences, rank=0, world=1):
    """Every sequence filled to capacity, in chunks of one message per sequence (each
    process writes its share of every chunk)."""
    gen = torch.Generator().manual_seed(100 + rank)
    ids = torch.arange(rank, sequences, world)
    for step in range(store.capacity):
        frames = torch.randint(FRAMES, (ids.numel(),), generator=gen)
        msgs = {f: torch.rand(ids.numel(), *s, generator=gen) for f, s in store.fields.items()}
        store.write(ids, frames, frames.double() * SPACING, msgs, step)


def measure(store, b, sequences, repeats, seed):
    """Median seconds of a write, a read, and a write_read (both in one call), and the
    collectives of the three (distributed store)."""
    gen = torch.Generator().manual_seed(seed)
    first = store.iteration + 1
    times_, calls = ([], [], []), [0, 0, 0]
    for step in range(first, first + repeats + 5):
        w = batch(gen, b, sequences, step, store)
        q = batch(gen, b, sequences, step, store)[:3]
        w2 = batch(gen, b, sequences, step, store)
        c0 = getattr(store, "collective_calls", 0)
        t0 = time.perf_counter()
        store.write(*w)
        c1, t1 = getattr(store, "collective_calls", 0), time.perf_counter()
        store.read(*q)
        c2, t2 = getattr(store, "collective_calls", 0), time.perf_counter()
        store.write_read(w2, q)
        c3, t3 = getattr(store, "collective_calls", 0), time.perf_counter()
        if step >= first + 5:  # 5 warm-up steps
            for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                times_[k].append(dt)
            calls = [c1 - c0, c2 - c1, c3 - c2]
    return (*(statistics.median(t) for t in times_), calls)


def _rank(rank, world, port, args, placement, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=120))
    store = PLACEMENTS[placement].temporal_field(38, 30, **OPTIONS)
    prefill(store, args.sequences, rank, world)
    res = {}
    for b in args.batches:
        res[b] = measure(store, b, args.sequences, args.repeats, seed=rank + 10 * b)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def run_distributed(world, args, placement):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_rank, args=(world, port, args, placement, out),
                                    nprocs=world)
        per_rank = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    return {b: (*(max(r[b][k] for r in per_rank) for k in range(3)), per_rank[0][b][3])
            for b in args.batches}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--sequences", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--placements", default="sharded,replicated",
                    help="the 2-process stores: sharded, replicated (comma list)")
    args = ap.parse_args(argv)
    placements = [x.strip() for x in args.placements.split(",") if x.strip()]
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown:
        ap.error(f"--placements: unknown {unknown}; choose from {', '.join(PLACEMENTS)}")
    args.batches = [int(x) for x in args.batches.split(",")]
    processes = [int(x) for x in args.processes.split(",")]
    torch.set_num_threads(args.threads)
    store = MessageStore.temporal_field(38, 30, **OPTIONS)
    mib = args.sequences * store.capacity * store.message_bytes / 2**20
    print(f"MessageStore at Charades sizes: fields {store.fields}, {store.dtype}, "
          f"{store.message_bytes} bytes a message, capacity {store.capacity}, "
          f"{args.sequences} sequences filled ({mib:.0f} MiB); "
          f"torch {torch.__version__}, {args.threads} thread(s) a process, "
          f"median of {args.repeats} steps\n")
    rows = []
    for world in processes:
        if world == 1:
            prefill(store, args.sequences)
            runs = [("-", {b: measure(store, b, args.sequences, args.repeats, seed=b)
                           for b in args.batches})]
        else:
            runs = [(p, run_distributed(world, args, p)) for p in placements]
        for placement, res in runs:
            for b in args.batches:
                w, r, wr, calls = res[b]
                rows.append((world, placement, b, w, r, wr, calls))
    print("| processes | store | batch / process | write ms | read ms | write_read ms "
          "| writes / s | reads / s | steps / s (write_read) "
          "| collectives: write, read, write_read |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for world, placement, b, w, r, wr, calls in rows:
        frames = world * b  # frames of all processes
        print(f"| {world} | {placement} | {b} | {1e3 * w:.2f} | {1e3 * r:.2f} "
              f"| {1e3 * wr:.2f} | {frames / w:,.0f} | {frames / r:,.0f} | {1 / wr:,.0f} "
              f"| {', '.join(map(str, calls)) if world > 1 else '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
