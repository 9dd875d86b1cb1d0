"""Charades training step benchmark (issue 11 §5; issue 10 §4's training targets).

    .venv/bin/python benchmarks/charades_step.py [--videos 64,all] [--modes async,none,sync]
        [--small-sizes 32,64] [--repeats 20] [--warmup 3] [--threads 1] [--batch 32]
        [--fps-steps 30] [--processes 1,2] [--fps-modes async,none]
        [--fps-scaling strong,weak,independent] [--fps-norms batch,group]
        [--fps-stores sharded,replicated]
        [--vgg16-device auto] [--vgg16-size 224] [--quick] [--json OUT]

One training step of the Charades model (``models/charades/train.py``) on the synthetic
frames of the real annotation rows (the default data of ``TrainConfig``), batch 32 frames,
the small backbone, float32, on CPU with ``--threads`` torch threads:

1. The step split into its parts, timed one after the other (the code of
   ``Trainer.train_step`` with clocks between the calls, on the Trainer's own network,
   optimiser, store and data): data (rendering the frames; reported, kept out of the step),
   backbone forward (the network with its heads), CRF forward (``frame_inputs``, the
   asynchronous step without its store read and write: Q updates, loss, outgoing messages),
   store read, store write, CRF backward (``torch.autograd.grad`` of the loss on the head
   tensors and µ), backbone backward (``heads.backward(grads)``), optimiser (SGD step and
   scheduler), other (host checks of the heads, the per-head gradient norms, the
   copy to the device). Beside it, ``Trainer.train_step()`` as a user's code calls it (its
   wall time, and the same minus its data rendering). Modes ``async`` (Algorithm 2: batch 32
   frames of 32 videos), ``none`` (φX only) and ``sync`` (3 videos x up to 25 frames,
   mean-field to convergence). ``--videos``: the first 64 training videos (TrainConfig's
   default; |B| = 351 x 14 scenes here) and all of them (``all``: |B| = 471 x 16 = 7,536
   frame states, the Charades size), since the CRF's cost grows with the states. The async
   store (capacity 50) is first filled to capacity for every video of the run (messages at
   the video's own sampled frames), as after the first epochs of training.
2. The same for VGG-16 at ``--vgg16-size`` px, batch 32, on the GPU when
   ``torch.cuda.is_available()`` (``--vgg16-device cpu`` runs it on the CPU, e.g. at 32 px
   to check the code path); otherwise one line says that no GPU was there.
3. Frames per second of ``Trainer.train_step()`` (the first ``--videos`` and
   ``--small-sizes`` settings) with 1 process and with 2 processes over gloo on 127.0.0.1
   (spawned, DDP, cross-process BatchNorm, DistributedMessageStore), each process with one
   torch thread; the slower rank's step time, median over ``--fps-steps`` steps. Scalings:
   strong (a global batch of ``--batch`` frames split over the processes), weak (``--batch``
   frames a process, as DDP is usually grown) and independent (unconnected one-process runs
   side by side: no communication at all, what the machine itself allows). ``--fps-norms``:
   the small backbone's normalisation (``TrainConfig.backbone_norm``): batch (the default;
   across processes its statistics span every process's frames, two collectives a layer)
   or group (GroupNorm, per frame, as VGG-16 which has no normalisation: the network's
   forward makes no collective). ``--fps-stores``: the message store's placement with 2
   processes (``TrainConfig.store``): sharded (``DistributedMessageStore``: 3 collectives a
   step) or replicated (``ReplicatedMessageStore``: one all_gather a step, posted before the
   backward; reads local).

The small backbone is measured at each of ``--small-sizes`` (issue 11: "a few conv layers on
32-64 pixel inputs"; the tests and the demo use 32 px).

Targets (issue 11 §5, issue 10 §4): CRF + store under 10% of the step with the small backbone
on CPU, under 5% with VGG-16 on a GPU; store read + write under 10% of the step; 2 processes
at least 1.6x the frames per second of 1. Medians over ``--repeats`` steps after ``--warmup``
steps, the split and the user's step alternating; the load average is printed beside every
row (the machine is shared).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict

import numpy as np
import torch

from fieldlib.inference import asynchronous_step
from fieldlib.inference.losses import meanfield_loss
from fieldlib.models.charades.config import TrainConfig
from fieldlib.models.charades.crf import frame_inputs, frame_layout, video_graph
from fieldlib.models.charades.sampler import BatchSampler
from fieldlib.models.charades.train import Trainer, _pad  # _pad: the Trainer's own padding

PARTS = ("forward", "crf", "read", "write", "crf_backward", "backward", "optimizer", "other")
HEADERS = {"forward": "backbone forward", "crf": "CRF forward", "read": "store read",
           "write": "store write", "crf_backward": "CRF backward",
           "backward": "backbone backward", "optimizer": "optimiser", "other": "other"}
CRF_PARTS = ("frame_inputs", "setup", "update", "loss", "messages")


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Laps:
    """Seconds between successive calls, summed by name (CUDA synchronised)."""

    def __init__(self, device):
        self.device, self.parts = device, defaultdict(float)
        self.t = self.now()

    def now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def lap(self, name: str) -> float:
        t = self.now()
        dt, self.t = t - self.t, t
        self.parts[name] += dt
        return dt


# -- set-up ------------------------------------------------------------------------------------
def prefill(store, data, rounds: int, rank: int = 0, world: int = 1, seed: int = 0) -> None:
    """Every video of the run filled with ``rounds`` messages (capacity: all of them), each
    at one of the video's own sampled frames; rank r writes videos r, r + world, ... (a
    collective write in the distributed store)."""
    video = data.frames["video"]
    order = np.argsort(video, kind="stable")
    _, starts, counts = np.unique(video[order], return_index=True, return_counts=True)
    mine = np.arange(rank, starts.size, world)
    rng = np.random.default_rng([seed, rank])
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    for r in range(rounds):
        pick = order[starts[mine] + rng.integers(counts[mine])]
        n = pick.size
        msgs = {f: torch.softmax(3 * torch.randn(n, *shape, generator=gen), -1)
                .to(store.dtype).to(store.device) for f, shape in store.fields.items()}
        dev = store.device
        store.write(torch.from_numpy(video[pick]).to(dev),
                    torch.from_numpy(data.frames["frame"][pick]).to(dev),
                    torch.from_numpy(data.frames["time"][pick]).to(dev), msgs, r)


def make_trainer(config: TrainConfig, root: str, name: str, rank: int = 0, world: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # vgg16 without weights: random init
        trainer = Trainer(config, os.path.join(root, name))
    if trainer.store is not None:
        prefill(trainer.store, trainer.data, config.capacity, rank, world)
        trainer.batches = int(trainer.store.iteration) + 1  # iterations never go back
    return trainer


def timed_data(trainer):
    """Wrap the trainer's data so that a user's ``train_step`` reports its rendering time."""
    spent = [0.0]
    data = trainer.data
    for name in ("frame_batch", "video_batch"):
        method = getattr(data, name)

        def wrapped(*a, _m=method, **k):
            t0 = time.perf_counter()
            out = _m(*a, **k)
            spent[0] += time.perf_counter() - t0
            return out

        setattr(data, name, wrapped)
    return spent


# -- the split step ------------------------------------------------------------------------------
def split_step(tr) -> dict:
    """One optimiser step of ``tr`` (accumulate 1, one process) with a clock between its
    parts: the code of ``Trainer.train_step`` / ``_frames_loss`` / ``_videos_loss``."""
    c, net, dev = tr.config, tr.net, tr.device
    laps = Laps(dev)
    index = BatchSampler.share(tr.sampler.next(), tr.rank, tr.world)
    batch = (tr.data.video_batch(index, c.max_frames) if c.mode == "sync"
             else tr.data.frame_batch(index))
    laps.lap("data")
    tr.optimizer.zero_grad(set_to_none=True)
    per_step = c.frames_per_step
    images = batch["images"].to(dev, tr.dtype)
    sub = {}
    if c.mode == "sync":
        mask = batch["mask"].to(dev)
        images = images[mask.reshape(-1)]
        laps.lap("other")
        real = tr.model(images)
        laps.lap("forward")
        tr._check_heads(real)
        laps.lap("other")
        heads = _pad(real, mask)
        crf = video_graph(heads, tr.layout, mu=net.mu, kernel=net.kernel(),
                          times=batch["time"].to(dev, tr.dtype), mask=mask,
                          component=c.component, use_temporal=c.uses_temporal,
                          use_intent=c.uses_intent)
        state = batch["state"].to(dev)
        labels = {"x": torch.where(mask, state, torch.zeros_like(state))}
        out = meanfield_loss(crf.graph, labels, engine=tr.engine,
                             l2_intent=c.l2_intent if c.uses_intent else 0.0)
        loss = out.loss
        q = out.free["x"].detach()
        nll = -(q.gather(-1, labels["x"][..., None])[..., 0]
                .clamp_min(torch.finfo(q.dtype).tiny).log() * mask).sum()
        n = int(mask.sum())
        head_out = real
    else:
        state = batch["state"].to(dev)
        laps.lap("other")
        head_out = tr.model(images)
        laps.lap("forward")
        tr._check_heads(head_out)
        laps.lap("other")
        if tr.store is None:
            inputs = frame_inputs(head_out, tr.layout, component=c.component,
                                  use_intent=False)
            loss = -torch.log_softmax(inputs["unary"], -1).gather(1, state[:, None]).sum()
            nll = loss.detach()
        else:
            inputs = frame_inputs(head_out, tr.layout, component=c.component,
                                  mu=net.mu if c.uses_temporal else None,
                                  use_intent=c.uses_intent)
            if not c.uses_intent:
                inputs.pop("phi_xi"), inputs.pop("xi_component")
            sub["frame_inputs"] = laps.lap("crf")
            seq, frame, time_ = (batch[k].to(dev) for k in ("seq", "frame", "time"))
            step = asynchronous_step(tr.store, seq, frame, time_, label=state,
                                     iteration=tr.batches, inner_iterations=c.inner_iterations,
                                     l2_intent=c.l2_intent if c.uses_intent else 0.0,
                                     write=False, **inputs)
            whole = laps.lap("crf")
            t = step.timings
            laps.parts["crf"] -= t["read"]
            laps.parts["read"] += t["read"]
            sub.update(update=t["update"], loss=t["loss"], messages=t["write"],
                       setup=whole - sum(t.values()))
            loss = step.loss
            q = step.q.gather(1, state[:, None]).clamp_min(torch.finfo(step.q.dtype).tiny)
            nll = -q.log().sum()
            laps.lap("crf")
            tr.store.write(seq, frame, time_, step.messages, tr.batches)
            laps.lap("write")
        n = state.numel()
    scaled = loss * (tr.world / per_step)
    if not bool(torch.isfinite(scaled.detach())):
        raise RuntimeError(f"the loss is {float(scaled.detach())}")
    laps.lap("crf")
    tensors = [v for v in head_out.tensors().values() if v.requires_grad]
    params = [p for p in (net.mu, net.kernel_weights) if p.requires_grad]
    grads = torch.autograd.grad(scaled, tensors + params, allow_unused=True)
    for p, g in zip(params, grads[len(tensors):]):
        if g is not None:
            p.grad = g
    laps.lap("crf_backward")
    pairs = [(t, g) for t, g in zip(tensors, grads) if g is not None]
    torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    laps.lap("backward")
    norms = tr._grad_norms()
    if not all(np.isfinite(v) for v in norms.values()):
        raise RuntimeError(f"a gradient is not finite: {norms}")
    _ = float(loss.detach()), float(nll)  # the metrics line's values (train_step's too)
    laps.lap("other")
    tr.optimizer.step()
    tr.scheduler.step()
    laps.lap("optimizer")
    tr.batches += 1
    tr.step += 1
    parts = dict(laps.parts)
    parts["total"] = sum(parts[k] for k in PARTS if k in parts)
    parts["frames"] = n
    for k, v in sub.items():
        parts["crf:" + k] = v
    return parts


def measure(tr, repeats: int, warmup: int) -> dict:
    """Medians of the split step and of the user's ``train_step()`` (alternating)."""
    spent = timed_data(tr)
    splits, users, users_data, layouts = [], [], [], []
    for r in range(warmup + repeats):
        s = split_step(tr)
        spent[0] = 0.0
        sync(tr.device)
        t0 = time.perf_counter()
        tr.train_step()
        tr.flush_messages()  # its write (held for the next read) before the next split step
        sync(tr.device)
        u = time.perf_counter() - t0
        t1 = time.perf_counter()
        frame_layout(tr.data.space)  # what the Trainer now builds once (tr.layout)
        lay = time.perf_counter() - t1
        if r >= warmup:
            splits.append(s)
            users.append(u)
            users_data.append(u - spent[0])
            layouts.append(lay)
    keys = sorted({k for s in splits for k in s})
    med = {k: statistics.median(s.get(k, 0.0) for s in splits) for k in keys}
    shares = {"crf_store": statistics.median(
                  (s.get("crf", 0) + s.get("read", 0) + s.get("write", 0) +
                   s.get("crf_backward", 0)) / s["total"] for s in splits),
              "store": statistics.median((s.get("read", 0) + s.get("write", 0)) / s["total"]
                                         for s in splits)}
    space = tr.data.space
    return {"mode": tr.config.mode, "backbone": tr.config.backbone,
            "size": tr.config.image_size or (224 if tr.config.backbone == "vgg16" else 32),
            "device": str(tr.device), "videos": len(tr.data.train),
            "states": f"{space.size} x {space.n_scenes} = {space.size * space.n_scenes:,}",
            "frames": int(med["frames"]), "split": med, "share": shares,
            "train_step": statistics.median(users),
            "train_step_no_data": statistics.median(users_data),
            "layout": statistics.median(layouts),
            "load": load()}


# -- frames per second, 1 vs 2 processes -----------------------------------------------------------
def clocked(obj, names, spent: dict, as_name: str | None = None) -> None:
    """Wrap methods of ``obj`` (on the instance) to add their seconds to ``spent[name]`` (or
    all to ``spent[as_name]``); a wrapped method called inside another is not counted twice
    (the in-memory store's ``write_read`` calls its ``write`` and ``read``)."""
    depth = [0]
    for name in names:
        method = getattr(obj, name)

        def wrapped(*a, _m=method, _n=as_name or name, **k):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return _m(*a, **k)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[_n] += time.perf_counter() - t0

        setattr(obj, name, wrapped)


def _fps_rank(rank, world, port, spec, out):
    """One process of an fps run: ``spec["scaling"]`` strong (DDP, the global batch split
    over the processes), weak (DDP, each process a batch of its own) or independent (no
    process group: each process a one-process run of its own, the machine's ceiling)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    scaling = spec["scaling"]
    joint = world > 1 and scaling != "independent"
    if joint:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    config = dict(spec["config"])
    if scaling == "weak":
        config["batch_size"] *= world
    name = f"fps-{config['mode']}-{scaling}-{world}" + (f"-{rank}" if not joint else "")
    tr = make_trainer(TrainConfig(**config), spec["root"], name,
                      rank if joint else 0, world if joint else 1)
    spent = defaultdict(float)
    clocked(tr.data, ("frame_batch",), spent)
    if tr.store is not None:
        clocked(tr.store, ("read", "write", "write_read"), spent, as_name="store")
    start = [0.0]
    tr.net.register_forward_pre_hook(lambda *_: start.__setitem__(0, time.perf_counter()))
    tr.net.register_forward_hook(lambda *_: spent.__setitem__(
        "forward", spent["forward"] + time.perf_counter() - start[0]))
    for _ in range(spec["warmup"]):
        tr.train_step()
    if joint:
        dist.barrier()
    steps = []
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        spent.clear()
        t1 = time.perf_counter()
        tr.train_step()
        steps.append({"step": time.perf_counter() - t1, **spent})
    total = time.perf_counter() - t0
    torch.save({"steps": steps, "total": total, "load": load(),
                "batch": tr.global_batch}, os.path.join(out, f"rank{rank}.pt"))
    if joint:
        dist.destroy_process_group()


FPS_PARTS = ("frame_batch", "forward", "store")


def fps_run(world: int, spec: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_fps_rank, args=(world, port, spec, out), nprocs=world)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    n = spec["steps"]
    if spec["scaling"] == "independent":  # unsynchronised: each process's own median
        rank_steps = [statistics.median(x["step"] for x in r["steps"]) for r in ranks]
        slowest = max(range(world), key=lambda r: rank_steps[r])
        steps = ranks[slowest]["steps"]
        fps = sum(r["batch"] / t for r, t in zip(ranks, rank_steps))
        fps_total = sum(r["batch"] * n / r["total"] for r in ranks)
        per_process = ranks[0]["batch"]
    else:
        slow = [max(range(world), key=lambda r: ranks[r]["steps"][k]["step"])
                for k in range(n)]
        steps = [ranks[slow[k]]["steps"][k] for k in range(n)]  # the slower rank's step
        batch = ranks[0]["batch"]
        fps = batch / statistics.median(x["step"] for x in steps)
        fps_total = batch * n / max(r["total"] for r in ranks)
        per_process = batch // world
    step = statistics.median(x["step"] for x in steps)
    parts = {p: statistics.median(x.get(p, 0.0) for x in steps) for p in FPS_PARTS}
    parts["rest"] = statistics.median(x["step"] - sum(x.get(p, 0.0) for p in FPS_PARTS)
                                      for x in steps)
    return {"mode": spec["config"]["mode"], "processes": world, "scaling": spec["scaling"],
            "batch_per_process": per_process, "step": step, "parts": parts,
            "fps": fps, "fps_total": fps_total, "load": ranks[0]["load"]}


# -- printing ------------------------------------------------------------------------------------
def ms(x: float) -> str:
    return f"{1000 * x:.1f}" if x >= 0.01 else f"{1000 * x:.2f}"


def print_split(rows: list[dict]) -> None:
    print("| backbone, device | videos (frame states) | mode | frames | data (kept out) | "
          + " | ".join(HEADERS[k] for k in PARTS)
          + " | step | CRF + store | store read + write | train_step() | train_step() "
            "without data | frames / s (train_step) | load |")
    print("|" + "---|" * (12 + len(PARTS)))
    for r in rows:
        s = r["split"]
        cells = [f"{ms(s.get(k, 0.0))} ({s.get(k, 0.0) / s['total']:.0%})" for k in PARTS]
        print(f"| {r['backbone']} {r['size']} px, {r['device']} | {r['videos']} "
              f"({r['states']}) | "
              f"{r['mode']} | {r['frames']} | {ms(s['data'])} | " + " | ".join(cells)
              + f" | {ms(s['total'])} | {r['share']['crf_store']:.1%} | "
                f"{r['share']['store']:.1%} | {ms(r['train_step'])} | "
                f"{ms(r['train_step_no_data'])} | {r['frames'] / r['train_step']:,.0f} | "
                f"{r['load']} |")


def print_crf(rows: list[dict]) -> None:
    rows = [r for r in rows if "crf:update" in r["split"]]
    if not rows:
        return
    print("\nCRF forward of the async rows, ms (frame_inputs: φX block tables from the heads; "
          "setup: the step's checks and couplings; outgoing messages: K, K*, H, H* to write), "
          "and what building frame_layout from the StateSpace costs (the Trainer builds it "
          "once; before, frame_inputs rebuilt it every call):\n")
    print("| backbone, device | videos | frame_inputs | setup | Q updates | loss | outgoing "
          "messages | CRF forward | CRF backward | frame_layout rebuild | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["split"]
        print(f"| {r['backbone']} {r['size']} px, {r['device']} | {r['videos']} | "
              + " | ".join(ms(s["crf:" + k]) for k in CRF_PARTS)
              + f" | {ms(s['crf'])} | {ms(s['crf_backward'])} | {ms(r['layout'])} | {r['load']} |")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", default="64,all", help="comma list of counts or 'all'")
    ap.add_argument("--modes", default="async,none,sync")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fps-steps", type=int, default=30)
    ap.add_argument("--processes", default="1,2", help="comma list; empty: skip")
    ap.add_argument("--fps-modes", default="async,none")
    ap.add_argument("--fps-scaling", default="strong,weak,independent",
                    help="strong: the global batch split over the processes; weak: a batch "
                         "each; independent: unconnected one-process runs (the ceiling)")
    ap.add_argument("--fps-norms", default="batch,group",
                    help="comma list of the small backbone's normalisation for the frames-per-"
                         "second runs: batch (cross-process BatchNorm), group (GroupNorm, per "
                         "frame: no collectives in the forward)")
    ap.add_argument("--fps-stores", default="replicated,sharded",
                    help="comma list of the message store's placement for the 2-process runs: "
                         "sharded (DistributedMessageStore), replicated "
                         "(ReplicatedMessageStore)")
    ap.add_argument("--small-sizes", default="32,64",
                    help="image sizes of the small backbone (the first for every --videos "
                         "setting, the others for the first)")
    ap.add_argument("--vgg16-device", default="auto", choices=("auto", "cuda", "cpu", "off"))
    ap.add_argument("--vgg16-size", type=int, default=224)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke check: 64 videos, 3 repeats, 1 warm-up, 5 fps steps")
    ap.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.videos, args.repeats, args.warmup, args.fps_steps = "64", 3, 1, 5
    torch.set_num_threads(args.threads)
    videos = [None if v.strip() == "all" else int(v) for v in args.videos.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    base = dict(batch_size=args.batch, progress_bar=False, checkpoint_seconds=1e9,
                num_threads=args.threads, device="cpu")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs; "
          f"load average at start {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"medians of {args.repeats} steps after {args.warmup} warm-up steps; synthetic "
          f"frames of the annotation rows, float32, batch {args.batch} frames "
          f"(sync: 3 videos x up to 25 frames)\n")
    rows, result = [], {"args": vars(args), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root:
        sizes = [int(x) for x in args.small_sizes.split(",") if x.strip()]
        for k, size in enumerate(sizes):
            for v in videos if k == 0 else videos[:1]:
                for mode in modes:
                    config = TrainConfig(**base, videos=v, mode=mode, image_size=size)
                    tr = make_trainer(config, root, f"{mode}-{v}-{size}")
                    rows.append(measure(tr, args.repeats, args.warmup))
                    del tr
        print("Small backbone on CPU: one step split into its parts, ms (% of the step; "
              "the step is every part but data)\n")
        print_split(rows)
        print_crf(rows)

        gpu = []
        device = args.vgg16_device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "off"
        if device == "cuda" and not torch.cuda.is_available():
            print("\n--vgg16-device cuda: no GPU here")
            device = "off"
        if device == "off":
            print(f"\nVGG-16 at {args.vgg16_size} px: not measured, no GPU was there "
                  f"(torch.cuda.is_available() is False)" if not torch.cuda.is_available()
                  else "\nVGG-16: not measured (--vgg16-device off)")
        else:
            for mode in modes:
                config = TrainConfig(**{**base, "device": device}, videos=videos[0],
                                     mode=mode, backbone="vgg16", image_size=args.vgg16_size)
                tr = make_trainer(config, root, f"vgg-{mode}")
                gpu.append(measure(tr, args.repeats, args.warmup))
                del tr
            name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
            print(f"\nVGG-16 at {args.vgg16_size} px on {name}: one step split into its "
                  f"parts, ms (% of the step)\n")
            print_split(gpu)
            print_crf(gpu)

        fps = []
        worlds = [int(x) for x in args.processes.split(",") if x.strip()]
        fps_modes = [m.strip() for m in args.fps_modes.split(",") if m.strip()]
        scalings = [x.strip() for x in args.fps_scaling.split(",") if x.strip()]
        norms = [x.strip() for x in args.fps_norms.split(",") if x.strip()]
        stores = [x.strip() for x in args.fps_stores.split(",") if x.strip()]
        for mode, norm in itertools.product(fps_modes if worlds else (), norms):
            spec = {"config": {**base, "videos": videos[0], "mode": mode, "num_threads": 1,
                               "image_size": sizes[0], "backbone_norm": norm},
                    "root": root, "warmup": args.warmup, "steps": args.fps_steps}
            fps.append({**fps_run(1, {**spec, "scaling": "strong"}), "norm": norm,
                        "store": "-"})
            for w, scaling, store in itertools.product([w for w in worlds if w > 1],
                                                       scalings, stores):
                if scaling == "independent" and store != stores[0]:
                    continue  # no process group: the store's placement does not apply
                run = {**spec, "config": {**spec["config"], "store": store},
                       "scaling": scaling}
                fps.append({**fps_run(w, run), "norm": norm,
                            "store": "-" if scaling == "independent" else store})
        if fps:
            print(f"\nFrames per second of Trainer.train_step() (small backbone at {sizes[0]} "
                  f"px, CPU, {videos[0] or 'all'} videos, one torch thread a process, gloo on "
                  f"127.0.0.1). strong: a global batch of {args.batch} split over the "
                  f"processes; weak: {args.batch} frames a process; independent: unconnected "
                  f"one-process runs side by side (no communication: what the machine allows). "
                  f"The slower rank's step, median of {args.fps_steps} steps; its parts in ms, "
                  f"medians: rendering the frames, the network's forward (with the "
                  f"cross-process BatchNorm's statistics), the store's exchanges (read, write "
                  f"or write_read), and the rest: CRF, backward with the gradient all-reduce, "
                  f"optimiser, checks)\n")
            print("| mode | backbone norm | store | scaling | processes | frames / process | "
                  "step ms | data | forward | store | rest | frames / s | "
                  "frames / s (whole run) | x of 1 process | load |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for f in fps:
                one = next((g for g in fps if g["mode"] == f["mode"] and g["processes"] == 1
                            and g["norm"] == f["norm"]), None)
                ratio = f"{f['fps'] / one['fps']:.2f}x" if one else "-"
                p = f["parts"]
                label = "-" if f["processes"] == 1 else f["scaling"]
                print(f"| {f['mode']} | {f['norm']} | {f['store']} | {label} | "
                      f"{f['processes']} | {f['batch_per_process']} | "
                      f"{ms(f['step'])} | {ms(p['frame_batch'])} | {ms(p['forward'])} | "
                      f"{ms(p['store'])} | {ms(p['rest'])} | "
                      f"{f['fps']:,.0f} | {f['fps_total']:,.0f} | {ratio} | {f['load']} |")

    print("\nTargets:")
    for r in rows:
        if r["mode"] != "async":
            continue
        print(f"* small backbone at {r['size']} px, CPU, {r['videos']} videos: CRF + store "
              f"{r['share']['crf_store']:.1%} of the step (< 10%): "
              f"{verdict(r['share']['crf_store'] < 0.10)}; store read + write "
              f"{r['share']['store']:.1%} (< 10%): {verdict(r['share']['store'] < 0.10)} "
              f"(load {r['load']})")
    for r in gpu:
        if r["mode"] == "async":
            limit = 0.05 if r["device"].startswith("cuda") else 0.10
            print(f"* VGG-16, {r['device']}: CRF + store {r['share']['crf_store']:.1%} of the "
                  f"step (< {limit:.0%}): {verdict(r['share']['crf_store'] < limit)} "
                  f"(load {r['load']})")
    if not gpu:
        print("* VGG-16 on a GPU, CRF + store < 5%: not measured (no GPU)")
    for two in (f for f in fps if f["processes"] == 2 and f["mode"] == "async"):
        one = next((f for f in fps if f["processes"] == 1 and f["mode"] == "async"
                    and f["norm"] == two["norm"]), None)
        ratio = two["fps"] / one["fps"] if one else float("nan")
        what = ("(the ceiling, no communication)" if two["scaling"] == "independent"
                else f"(>= 1.6x): {verdict(ratio >= 1.6)}")
        store = "" if two["store"] == "-" else f"{two['store']} store, "
        print(f"* 2 processes, {two['norm']} norm, {store}{two['scaling']} scaling: "
              f"{ratio:.2f}x the frames per second of 1 {what} (load {two['load']})")
    print(f"\nload average at end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        result.update(small=rows, vgg16=gpu, fps=fps,
                      load_end=list(os.getloadavg()))
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
