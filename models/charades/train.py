"""Training the Charades Asynchronous Temporal Field (MATH.md §5, §6, §9; docs/charades.md).

Three modes, one loop:

* ``async`` (the paper, Algorithm 2): batches of frames sampled across many videos; each
  frame reads the messages the other frames of its video wrote earlier (a
  :class:`~fieldlib.inference.MessageStore`, or over the processes of a torchrun a
  :class:`~fieldlib.inference.DistributedMessageStore` (``store="sharded"``) or a
  :class:`~fieldlib.inference.ReplicatedMessageStore` (``store="replicated"``)),
  runs ``inner_iterations`` Q_i / Q_I updates and contributes the mean-field loss of Eq. 7-9
  (:func:`~fieldlib.inference.asynchronous_step`), plus the L2 pull on φXI;
* ``sync``: batches of whole videos (their labelled frames), mean-field to convergence
  before each update (:func:`~fieldlib.inference.losses.meanfield_loss`, sequence form);
* ``none``: φX only, the two-stream baseline without structure (cross-entropy of the frame
  state, whose gradient is Eq. 7's Q - 1[x*]).

The Fig. 8 ablations drop φXX (``drop=["temporal"]``), φXI (``["intent"]``), both, or the
progress term (``["progress"]``). SGD with Nesterov momentum, weight decay, the learning
rate times ``lr_gamma`` at each of ``lr_milestones``, gradients accumulated over
``accumulate`` batches. A run directory (models/charades/runs.py) holds the configuration,
a JSON-lines metrics log, checkpoints (every random state, the sampler position, the message
store: a resumed run continues bit for bit on CPU) and the final model. SIGINT / SIGTERM
write a checkpoint at the next step boundary and stop cleanly; NaN or inf in a loss or a
gradient stops the run naming the step, the head and the last good checkpoint.

    python -m fieldlib.models.charades.train --run-dir runs/demo          # or
    fieldlib charades train --run-dir runs/demo
    torchrun --standalone --nproc-per-node=2 -m fieldlib.models.charades.train --run-dir R
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fieldlib.errors import FieldlibError
from fieldlib.inference import (
    DistributedMessageStore,
    MessageStore,
    ReplicatedMessageStore,
    asynchronous_step,
    get_engine,
    merge_state_dicts,
)
from fieldlib.inference.losses import meanfield_loss

from .batchnorm import convert_batchnorm
from .checkpoint import (
    VERSION,
    CheckpointError,
    atomic_save,
    read_checkpoint,
    rng_state,
    set_rng_state,
)
from .config import TrainConfig
from .crf import frame_inputs, frame_layout, video_graph
from .data import TrainingData, load_training_data
from .network import FrameHeads
from .runs import RunPaths, build_network
from .sampler import BatchSampler

__all__ = ["Trainer", "TrainingError", "TrainResult", "train", "main"]


class TrainingError(FieldlibError):
    """A run that cannot go on (NaN or inf in a loss or a gradient, a bad run directory)."""


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns: ``steps`` done, ``frames`` seen, ``status``
    ("finished" or "interrupted"), ``seconds``, the run directory and the last logged loss."""

    steps: int
    frames: int
    status: str
    seconds: float
    run_dir: Path
    last_loss: float | None


def _distributed() -> tuple[int, int]:
    """``(rank, world)``; initialises the default group from torchrun's environment."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FieldlibError("--device cuda: no CUDA device here")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class Trainer:
    """One training run (module docstring).

    Args:
        config: the :class:`TrainConfig`.
        run_dir: the run directory (created; with ``resume`` it must hold a checkpoint).
        resume: continue from ``run_dir/checkpoint.pt`` (the configuration must match but
            for the options of :data:`~fieldlib.models.charades.config.RESUMABLE_CHANGES`).
        data: the :class:`TrainingData` (default: :func:`load_training_data` of ``config``).
    """

    def __init__(self, config: TrainConfig, run_dir, *, resume: bool = False,
                 data: TrainingData | None = None):
        self.config = config
        self.paths = RunPaths(Path(run_dir))
        self.rank, self.world = _distributed()
        self.device = _device(config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.num_threads:
            torch.set_num_threads(int(config.num_threads))
        self.dtype = getattr(torch, config.dtype)
        self.data = data or load_training_data(config)  # bad data: an error before any file
        self._check_run_dir(resume)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        self.net = build_network(config, self.data.space).to(self.device)
        self.layout = frame_layout(self.data.space)  # built once: frame_inputs, video_graph
        self._freeze_unused()
        if self.world > 1:
            convert_batchnorm(self.net)
            # the cross-process BatchNorm keeps every rank's running statistics equal: no
            # buffer broadcast a forward
            with warnings.catch_warnings():  # broadcast_buffers=False is meant: its
                # replacement (forward_sync_buffers) would still sync buffers at set-up
                warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated",
                                        FutureWarning)
                self.model = torch.nn.parallel.DistributedDataParallel(
                    self.net,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    broadcast_buffers=False)
        else:
            self.model = self.net
        heads = self.net.head_parameters()
        slow = {id(p) for p in heads["mu"] + heads["kernel"]}
        groups = [{"params": [p for p in self.net.parameters()
                              if p.requires_grad and id(p) not in slow]},
                  {"params": [p for p in heads["mu"] + heads["kernel"] if p.requires_grad],
                   "lr": config.lr * config.mu_lr_scale}]
        self.optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr,
                                         momentum=config.momentum,
                                         nesterov=config.momentum > 0,
                                         weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
        if config.mode == "sync":
            self.sampler = BatchSampler(self.data.video_items(), config.videos_per_batch,
                                        config.seed)
            self.global_batch = config.videos_per_batch
        else:
            self.sampler = BatchSampler(len(self.data), config.batch_size, config.seed)
            self.global_batch = config.batch_size
        if self.global_batch % self.world:
            raise FieldlibError(f"train: a batch of {self.global_batch} does not split over "
                                f"{self.world} processes; use a multiple of {self.world}")
        self.store = self._make_store() if config.mode == "async" and (
            config.uses_temporal or config.uses_intent) else None
        self.engine = get_engine("meanfield", schedule="sequential", tol=config.sync_tol,
                                 max_iter=config.sync_max_iter)
        self.step, self.frames, self.batches, self.seconds = 0, 0, 0, 0.0
        self.stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        if resume:
            self._load(read_checkpoint(self.paths.checkpoint))

    # -- set-up -----------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> None:
        paths = self.paths
        if resume:
            if not paths.checkpoint.is_file():
                raise TrainingError(f"--resume: no checkpoint in {paths.root}")
            saved = TrainConfig.load(paths.config)
            diff = saved.differences(self.config)
            if diff:
                shown = ", ".join(f"{k}: {getattr(saved, k)!r} there, {getattr(self.config, k)!r}"
                                  f" here" for k in diff[:3])
                raise CheckpointError(f"--resume: {paths.root} was trained with another "
                                      f"configuration ({shown})")
            return
        if paths.checkpoint.is_file() or paths.model.is_file():
            raise TrainingError(f"--run-dir {paths.root} already holds a run; use --resume to "
                                f"continue it or another folder")
        if self.rank == 0:
            paths.root.mkdir(parents=True, exist_ok=True)
            self.config.save(paths.config)
            paths.metrics.write_text("", encoding="utf-8")
        if self.world > 1:
            dist.barrier()

    def _freeze_unused(self) -> None:
        """Parameters the mode never uses get no gradient (and so none is waited for when
        the gradients are all-reduced): µ without φXX, the φXI head without φXI, the kernel
        weights outside ``sync`` (the store applies the kernel at read time)."""
        heads = self.net.head_parameters()
        frozen = []
        if not self.config.uses_temporal:
            frozen += heads["mu"] + heads["kernel"]
        if not self.config.uses_intent:
            frozen += heads["phi_xi"]
        if self.config.mode != "sync":
            frozen += heads["kernel"]
        for p in frozen:
            p.requires_grad_(False)

    def _make_store(self):
        c = self.config
        d = self.layout.component(c.component)[1]  # µ's component size (O or O * P)
        options = {"capacity": c.capacity, "kernel": c.sigma, "discount": c.discount,
                   "scale": c.scale if c.scale in ("count", "frames") else float(c.scale),
                   "dtype": self.dtype, "device": self.device}
        fields = {}
        temporal = []
        if c.uses_temporal:
            fields.update(K=(d,), K_star=(d,))
            temporal = ["K", "K_star"]
        if c.uses_intent:
            fields.update(H=(c.n_intents,), H_star=(c.n_intents,))
        kind = MessageStore if self.world == 1 else (
            ReplicatedMessageStore if c.store == "replicated" else DistributedMessageStore)
        return kind(fields, temporal=temporal, **options)

    # -- steps ------------------------------------------------------------------------------
    def _share(self) -> np.ndarray:
        return BatchSampler.share(self.sampler.next(), self.rank, self.world)

    def _frames_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """async / none: (loss to backward, Σ -log Q_i(x*_i) of this rank, frames)."""
        c = self.config
        images = batch["images"].to(self.device, self.dtype)
        state = batch["state"].to(self.device)
        heads = self.model(images)
        self._check_heads(heads)
        if self.store is None:  # none, or async with both couplings dropped: φX only
            inputs = frame_inputs(heads, self.layout, component=c.component,
                                  use_intent=False)
            logp = torch.log_softmax(inputs["unary"], -1)
            nll = -logp.gather(1, state[:, None]).sum()
            return nll, nll.detach(), state.numel()
        inputs = frame_inputs(heads, self.layout, component=c.component,
                              mu=self.net.mu if c.uses_temporal else None,
                              use_intent=c.uses_intent)
        if not c.uses_intent:
            inputs.pop("phi_xi"), inputs.pop("xi_component")
        seq, frame, time_ = (batch[k].to(self.device) for k in ("seq", "frame", "time"))
        step = asynchronous_step(self.store, seq, frame, time_, label=state,
                                 iteration=self.batches, inner_iterations=c.inner_iterations,
                                 l2_intent=c.l2_intent if c.uses_intent else 0.0,
                                 incoming=self._read_messages(seq, frame, time_), write=False,
                                 **inputs)
        written = (seq, frame, time_, step.messages, step.iteration)
        if isinstance(self.store, ReplicatedMessageStore):  # the exchange overlaps backward
            self.store.write(*written, wait=False)
        else:  # the outgoing messages travel with the next batch's read (one exchange)
            self._pending = written
        q = step.q.gather(1, state[:, None]).clamp_min(torch.finfo(step.q.dtype).tiny)
        return step.loss, -q.log().sum(), state.numel()

    def _read_messages(self, seq, frame, time_):
        """The store's read of a batch, with the previous batch's write held back by
        :meth:`_frames_loss` (``write_read``: 3 collectives in the distributed store instead
        of 5; the same messages as a write then a read)."""
        if self._pending is None:
            return self.store.read(seq, frame, time_)
        pending, self._pending = self._pending, None
        return self.store.write_read(pending, (seq, frame, time_))

    def flush_messages(self) -> None:
        """Write the last batch's outgoing messages, which a step holds to send with the next
        batch's read. A checkpoint (:meth:`state_dict`) does it; call it (on every process)
        before reading ``trainer.store`` between steps."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.store.write(*pending)
        if isinstance(self.store, ReplicatedMessageStore):
            self.store.flush()

    def _videos_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """sync: (loss, Σ -log Q_t(x*_t) over the real frames, real frames)."""
        c = self.config
        mask = batch["mask"].to(self.device)
        n, t = mask.shape
        images = batch["images"].to(self.device, self.dtype)[mask.reshape(-1)]
        real = self.model(images)
        self._check_heads(real)
        heads = _pad(real, mask)
        crf = video_graph(heads, self.layout, mu=self.net.mu, kernel=self.net.kernel(),
                          times=batch["time"].to(self.device, self.dtype), mask=mask,
                          component=c.component, use_temporal=c.uses_temporal,
                          use_intent=c.uses_intent)
        state = batch["state"].to(self.device)
        labels = {"x": torch.where(mask, state, torch.zeros_like(state))}
        out = meanfield_loss(crf.graph, labels, engine=self.engine,
                             l2_intent=c.l2_intent if c.uses_intent else 0.0)
        q = out.free["x"].detach()
        qx = q.gather(-1, labels["x"][..., None])[..., 0].clamp_min(torch.finfo(q.dtype).tiny)
        return out.loss, -(qx.log() * mask).sum(), int(mask.sum())

    def train_step(self) -> dict:
        """One optimiser step over ``accumulate`` batches; returns its metrics line."""
        c = self.config
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = nll_sum = 0.0
        frames = 0
        per_step = c.frames_per_step  # the loss is a mean per frame (sync: padded frames)
        for k in range(c.accumulate):
            index = self._share()
            batch = (self.data.video_batch(index, c.max_frames) if c.mode == "sync"
                     else self.data.frame_batch(index))
            sync_now = k == c.accumulate - 1 or self.world == 1
            with (self.model.no_sync() if not sync_now else contextlib.nullcontext()):
                loss, nll, n = (self._videos_loss(batch) if c.mode == "sync"
                                else self._frames_loss(batch))
                # DDP averages over processes: scale so the step's gradient is the mean
                # over the global batch (per frame; per video in sync)
                scaled = loss * (self.world / per_step)
                if not bool(torch.isfinite(scaled.detach())):
                    self._fail(f"the loss is {float(scaled.detach())}", head=None)
                scaled.backward()
            self.batches += 1
            loss_sum += float(loss.detach())
            nll_sum += float(nll)
            frames += n
        norms = self._grad_norms()
        bad = [h for h, v in norms.items() if not math.isfinite(v)]
        if bad:
            self._fail(f"the gradient of {bad[0]} is {norms[bad[0]]}", head=bad[0])
        # the metrics and the stop flag of every process in one all-reduce, under way while
        # the optimiser steps
        stop = float(self.stop_signal is not None)
        totals = torch.tensor([loss_sum, nll_sum, float(frames), stop], dtype=torch.float64)
        work = dist.all_reduce(totals, async_op=True) if self.world > 1 else None
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if work is not None:
            work.wait()
        self._stop_agreed = bool(totals[3] > 0)
        self.step += 1
        self.frames += int(totals[2])
        self.seconds += time.perf_counter() - start
        return {"step": self.step, "frames": self.frames,
                "loss": float(totals[0]) / per_step, "nll": float(totals[1] / totals[2]),
                "lr": lr, "seconds": round(self.seconds, 4), "grad_norm": norms}

    def _check_heads(self, heads: FrameHeads) -> None:
        """NaN or inf in a head's output stops the run naming the head (one max a head)."""
        for name, value in heads.tensors().items():
            top = value.detach().abs().amax() if value.numel() else None
            if top is not None and not bool(torch.isfinite(top)):
                self._fail(f"the network's {name} output holds {float(top)}", head=name)

    def _grad_norms(self) -> dict:
        """Each head's gradient norm: norms of rows in the gradient's dtype (no float64 copy
        of a 100M-entry fc6 gradient), combined in float64; inf / NaN pass through."""
        out = {}
        for name, params in self.net.head_parameters().items():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                rows = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1) if g.dim() else
                                                 g.reshape(1, 1), dim=1).double()
                        for g in grads]
                out[name] = float(torch.linalg.vector_norm(torch.cat(rows)))
        return out

    def _fail(self, what: str, head) -> None:
        last = self.last_checkpoint or (self.paths.checkpoint
                                        if self.paths.checkpoint.is_file() else None)
        raise TrainingError(f"step {self.step + 1}: {what}; training stopped "
                            f"({'in head ' + head + '; ' if head else ''}last good checkpoint: "
                            f"{last or 'none yet'})")

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs (collective with several processes: it writes the
        held messages, :meth:`flush_messages`)."""
        if self.store is not None:
            self.flush_messages()
        return {"version": VERSION, "config": self.config.to_dict(), "step": self.step,
                "frames": self.frames, "batches": self.batches, "seconds": self.seconds,
                "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": rng_state(),
                "store": None if self.store is None or (
                    self.rank and isinstance(self.store, ReplicatedMessageStore))
                else self.store.state_dict(),  # a replicated store: rank 0's is every rank's
                "store_placement": self._placement(),
                "metrics_lines": self._metrics_lines, "world": self.world, "rank": self.rank}

    def _placement(self) -> str | None:
        if self.store is None:
            return None
        return {MessageStore: "memory", ReplicatedMessageStore: "replicated",
                DistributedMessageStore: "sharded"}[type(self.store)]

    def _store_state(self, state: dict) -> dict:
        """The store state this rank loads: its own shard, rank 0's whole store, or, for a
        replicated store resuming a sharded run, every rank's shard merged (``--store`` may
        change on resume: the messages are the same in both placements)."""
        saved = state.get("store_placement", "sharded" if self.world > 1 else "memory")
        whole, own = state["store"], state.get("own_store", state["store"])
        if saved != "sharded":
            return whole  # one process's store, or a replicated run's (in rank 0's file)
        if isinstance(self.store, DistributedMessageStore):
            return own
        shards = [whole] + [read_checkpoint(self._rank_file(r))["store"]
                            for r in range(1, self.world)]
        return merge_state_dicts(shards)

    def _rank_file(self, rank: int) -> Path:
        return self.paths.checkpoint if rank == 0 else \
            self.paths.root / f"checkpoint_rank{rank}.pt"

    def save_checkpoint(self) -> Path:
        """Write this rank's checkpoint (rank 0 last, after every other rank's is whole)."""
        state = self.state_dict()
        if self.rank:
            atomic_save(state, self._rank_file(self.rank))
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            atomic_save(state, self.paths.checkpoint)
        if self.world > 1:
            dist.barrier()
        self.last_checkpoint = self.paths.checkpoint
        self._last_save = time.monotonic()
        return self.paths.checkpoint

    def _load(self, state: dict) -> None:
        if state.get("world", 1) != self.world:
            raise CheckpointError(f"{self.paths.checkpoint}: written by {state.get('world')} "
                                  f"process(es), resumed with {self.world}")
        if self.rank:
            state_r = read_checkpoint(self._rank_file(self.rank))
            if state_r["step"] != state["step"]:
                raise CheckpointError(f"{self._rank_file(self.rank)}: step {state_r['step']}, "
                                      f"the run's checkpoint is at step {state['step']}")
            state = {**state, "rng": state_r["rng"], "own_store": state_r["store"]}
        try:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{self.paths.checkpoint}: does not fit this run ({first})") \
                from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.store is not None:
            self.store.load_state_dict(self._store_state(state))
        set_rng_state(state["rng"])
        self.step, self.frames = int(state["step"]), int(state["frames"])
        self.batches, self.seconds = int(state["batches"]), float(state["seconds"])
        self._metrics_lines = int(state["metrics_lines"])
        self.last_checkpoint = self.paths.checkpoint
        if self.rank == 0:  # the log continues from the checkpoint's step
            lines = self.paths.metrics.read_text(encoding="utf-8").splitlines(True) \
                if self.paths.metrics.is_file() else []
            self.paths.metrics.write_text("".join(lines[:self._metrics_lines]),
                                          encoding="utf-8")

    _metrics_lines = 0
    _last_save = 0.0
    _pending = None  # the last batch's outgoing messages, not yet written (_frames_loss)
    _stop_agreed = False

    # -- the loop ---------------------------------------------------------------------------
    def _log(self, line: dict) -> None:
        if self.rank == 0:
            with open(self.paths.metrics, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
        self._metrics_lines += 1

    def evaluate(self) -> dict:
        """Official mAP (MATH.md §8) on the first ``eval_videos`` test videos, predicted as
        at test time (models/charades/predict.py); rank 0 predicts, the others wait. Draws
        no random number, so it changes nothing in the run that follows."""
        out = {"step": self.step, "frames": self.frames}
        if self.rank == 0:
            from .predict import evaluate, predict_videos, split_videos

            videos = split_videos(self.data, "test", self.config.eval_videos)
            preds = predict_videos(self.net, self.layout, videos, self.data.source,
                                   config=self.config, passes=self.config.eval_passes,
                                   progress=False)
            for task, res in evaluate(preds, videos).items():
                out[f"{task}_map"] = None if math.isnan(res.map) else float(res.map)
                out[f"{task}_map_nanmean"] = float(res.map_nanmean)
        if self.world > 1:
            dist.barrier()
        return out

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signum

    def _stop_requested(self) -> bool:
        """Whether any process was signalled: as the last step's all-reduce saw it (all
        processes agree; a signal after it is seen a step later)."""
        if self.world == 1:
            return self.stop_signal is not None
        return self._stop_agreed

    def run(self, *, progress: bool | None = None, stop_after: int | None = None) -> TrainResult:
        """Train to ``config.steps`` (or ``stop_after`` more steps: then checkpoint and stop,
        as a signal would). Writes the model to ``model.pt`` when finished."""
        c = self.config
        show = (c.progress_bar if progress is None else progress) and self.rank == 0
        handlers = {}
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self._last_save = time.monotonic()
        status, last = "finished", None
        target = c.steps if stop_after is None else min(c.steps, self.step + stop_after)
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.step, disable=not show, unit="step",
                       desc=f"train {c.mode}", dynamic_ncols=True)
            with bar:
                while self.step < target:
                    line = self.train_step()
                    last = line["loss"]
                    if self.step % c.log_every == 0 or self.step == c.steps:
                        self._log(line)
                    if c.eval_every and (self.step % c.eval_every == 0 or
                                         self.step == c.steps):
                        self._log({"eval": self.evaluate()})
                    bar.update(1)
                    bar.set_postfix(loss=f"{line['loss']:.4g}", nll=f"{line['nll']:.3f}")
                    if self._stop_requested():
                        status = "interrupted"
                        break
                    due = (c.checkpoint_every and self.step % c.checkpoint_every == 0) or \
                        time.monotonic() - self._last_save >= c.checkpoint_seconds
                    if due and self.step < target:
                        self.save_checkpoint()
            if self.step < c.steps and status == "finished":
                status = "interrupted"
            self.save_checkpoint()
            if self.step >= c.steps and self.rank == 0:
                atomic_save(self.net.state_dict(), self.paths.model)
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
        return TrainResult(self.step, self.frames, status, self.seconds, self.paths.root, last)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _pad(real: FrameHeads, mask: torch.Tensor) -> FrameHeads:
    """Heads of the real frames ``(R, ...)`` placed into ``(N, T, ...)`` (zeros on padding:
    the graph masks padded frames out)."""
    n, t = mask.shape
    flat = mask.reshape(-1)

    def place(v):
        out = v.new_zeros(n * t, *v.shape[1:])
        out = out.index_copy(0, flat.nonzero().flatten(), v)
        return out.reshape(n, t, *v.shape[1:])

    return FrameHeads(**{k: place(v) for k, v in real.tensors().items()})


def train(config: TrainConfig, run_dir, *, resume: bool = False, **run) -> TrainResult:
    """Make a :class:`Trainer` and run it."""
    return Trainer(config, run_dir, resume=resume).run(**run)


def main(argv=None) -> int:
    """``python -m fieldlib.models.charades.train`` (the same options as ``fieldlib charades
    train``); errors are one line on stderr and exit code 2."""
    from .cli_train import parse_train, run_train

    try:
        return run_train(parse_train(argv))
    except FieldlibError as exc:
        print(f"fieldlib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
