"""A message store shared by the processes of a torch.distributed run (MATH.md §5, Eq. 10).

:class:`DistributedMessageStore` has :class:`~fieldlib.inference.messages.MessageStore`'s
interface; each rank calls it with its own batch (its own sequences and frames, any number
of rows, possibly none) and gets exactly what one in-memory store would give for the union
of the batches, written in rank order:

* sequences are sharded by owner rank, ``owner = key % world`` (``key`` the sequence id for
  integer ids, a stable 62-bit hash for str ids: :func:`~fieldlib.inference.messages.
  sequence_keys`); each rank holds the ring buffers of the sequences it owns, an ordinary
  ``MessageStore`` (:attr:`DistributedMessageStore.local`);
* a ``write`` is 2 collective calls: an ``all_gather`` of a small header (status, oldest and
  newest iteration, rows for each owner), then one ``all_to_all_single`` of the rows, packed
  as bytes (ids, frame, iteration, time, every field), to their owners; each owner stores
  what it received in one vectorised write (rows from rank 0 first, then rank 1, ...);
* a ``read`` is 3: the header, the queries (id, frame, time) to the owners, and the answers
  (Eq. 10's ``past``/``future``/``total`` and the counts) back, each owner answering all its
  queries with one vectorised read; a 4th, a one-flag ``all_gather``, only when the store is
  ``strict`` or its kernel is not a Gaussian or a sum of Gaussians (whose values are always
  finite), so that every rank raises together when one row cannot be answered;
* ``write_read`` (a training step's write, then the next batch's read) is the 3 of a read:
  the written rows travel with the queries.

No call is ever one round trip per message, and every call makes the same collectives on
every rank whatever the data, so no rank waits on another. A bad input on one rank (a NaN
message, a wrong shape) is found before anything is exchanged; the header carries it, and
every rank raises (the faulty rank its own error, the others a MessageStoreError naming it)
with nothing stored. Works with gloo (CPU tensors: ``all_gather`` and ``all_to_all_single``
of uint8 / int64, both supported by gloo) and nccl (the store on ``cuda``); the default
process group or the one passed in (e.g. the group of the user's DDP training).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from fieldlib.errors import FieldlibError
from fieldlib.kernels import GaussianKernel, KernelSum, as_kernel

from .messages import (
    Incoming,
    InvalidMessageError,
    MessageStore,
    MessageStoreError,
    UnknownSequenceError,
)

__all__ = ["DistributedMessageStore"]

_BIG = (1 << 62)


def _pack(parts: list[torch.Tensor], rows: int) -> torch.Tensor:
    """``(rows, bytes) uint8``: the parts ``(rows, ...)`` side by side, bit for bit."""
    cols = [p.reshape(rows, math.prod(p.shape[1:])).clone(memory_format=torch.contiguous_format)
            .view(torch.uint8) for p in parts]
    return torch.cat(cols, 1) if cols else torch.zeros(rows, 0, dtype=torch.uint8)


def _pack_empty(spec, device) -> torch.Tensor:
    """``(0, bytes)``: no rows of the layout ``spec``."""
    width = sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for dt, shape in spec)
    return torch.zeros(0, width, dtype=torch.uint8, device=device)


def _unpack(buf: torch.Tensor, spec: list[tuple[torch.dtype, tuple[int, ...]]]):
    """The parts of :func:`_pack`, from ``(rows, bytes)`` and their (dtype, row shape)."""
    out, at, rows = [], 0, buf.shape[0]
    for dtype, shape in spec:
        width = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        part = buf[:, at:at + width].contiguous().view(dtype).reshape(rows, *shape)
        out.append(part)
        at += width
    return out


def _finite_kernel(kernel) -> bool:
    """Whether a kernel's values are finite at every time difference (Gaussians and sums of
    Gaussians with finite weights are)."""
    if isinstance(kernel, GaussianKernel):
        return True
    return isinstance(kernel, KernelSum) and all(isinstance(k, GaussianKernel)
                                                 for k in kernel.kernels)


class _ExchangingStore:
    """What the stores over a process group share: the group, the in-memory store
    :attr:`local` that holds this rank's messages, its settings read through, the global
    :attr:`iteration`, and the checks every rank decides alike from the gathered headers."""

    def __init__(self, fields: Mapping, *, group=None, **options):
        if not dist.is_available() or not dist.is_initialized():
            raise MessageStoreError(f"{type(self).__name__} needs torch.distributed "
                                    f"initialised (init_process_group, or torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.local = MessageStore(fields, **options)
        if self.backend == "nccl" and self.local.device.type != "cuda":
            raise MessageStoreError(f"the nccl backend exchanges CUDA tensors: create the "
                                    f"store with device='cuda:N' (got {self.local.device})")
        self.collective_calls = 0
        self._iteration = -1

    @classmethod
    def temporal_field(cls, components: int = 38, intents: int = 30, *, group=None,
                       **options):
        """MATH.md §4's four fields, as :meth:`MessageStore.temporal_field`."""
        fields = {"K": (components,), "K_star": (components,),
                  "H": (intents,), "H_star": (intents,)}
        return cls(fields, temporal=("K", "K_star"), group=group, **options)

    # the in-memory store's settings, read through
    fields = property(lambda self: self.local.fields)
    temporal = property(lambda self: self.local.temporal)
    capacity = property(lambda self: self.local.capacity)
    kernel = property(lambda self: self.local.kernel)
    discount = property(lambda self: self.local.discount)
    scale = property(lambda self: self.local.scale)
    normalize = property(lambda self: self.local.normalize)
    strict = property(lambda self: self.local.strict)
    dtype = property(lambda self: self.local.dtype)
    device = property(lambda self: self.local.device)
    message_bytes = property(lambda self: self.local.message_bytes)

    @property
    def iteration(self) -> int:
        """The largest iteration written by any rank (-1 before any write)."""
        return self._iteration

    def _row_spec(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """The layout of a written row: key, frame, iteration, time, every field."""
        return [(torch.int64, ()), (torch.int64, ()), (torch.int64, ()), (torch.float64, ()),
                *((self.dtype, (math.prod(self.fields[f]),)) for f in self.fields)]

    def _refused(self, table: torch.Tensor, error: Exception | None, what: str) -> None:
        bad = table[:, 0].nonzero().flatten().tolist()
        if bad:
            if error is not None:
                raise error
            raise MessageStoreError(f"{what}: rank(s) {bad} refused their rows (see the error "
                                    f"raised there); nothing was exchanged")

    def _check_iterations(self, table, keys, frames, its) -> None:
        """Iterations never go back, over all ranks (decided alike on every rank):
        ``table[:, 1]`` / ``table[:, 2]`` are each rank's oldest / newest iteration."""
        if int(table[:, 1].min()) < self._iteration:
            late = (table[:, 1] < self._iteration).nonzero().flatten().tolist()
            if self.rank in late:
                i = int((its < self._iteration).nonzero()[0, 0])
                raise InvalidMessageError(
                    f"write: {self.local._where(keys, frames, i)}: iteration {int(its[i])} is "
                    f"older than iteration {self._iteration} already written; iterations "
                    f"never go back")
            raise InvalidMessageError(f"write: rank(s) {late} wrote an iteration older than "
                                      f"{self._iteration}; nothing was stored")
        self._iteration = max(self._iteration, int(table[:, 2].max()))


class DistributedMessageStore(_ExchangingStore):
    """:class:`~fieldlib.inference.messages.MessageStore` over the ranks of a process group.

    Args:
        fields, temporal, capacity, kernel, discount, scale, normalize, strict, dtype,
            device: as for ``MessageStore`` (the same on every rank). ``device`` must be a
            CUDA device with nccl (each rank its own), may be anything gloo accepts (CPU).
            ``scale="frames"`` gives the in-memory store's h (the distinct other frames per
            row and set): a sequence's messages all live on its owner, which counts them.
        group: the process group (default: the default group, which must be initialised
            with ``torch.distributed.init_process_group``).

    Every method that exchanges (``write``, ``read``, ``write_read``, ``add_sequences``) is
    collective: every rank of the group calls it, in the same order, each with its own rows
    (possibly none).
    ``read`` and ``write`` take and return what ``MessageStore`` does for the rank's own rows
    (``return_weights`` is not available here). :attr:`collective_calls` counts the
    collectives made so far. :attr:`iteration` is the largest iteration written by any rank.

    Raises:
        MessageStoreError: torch.distributed not initialised; nccl with a non-CUDA device;
        and whatever ``MessageStore`` raises, on every rank together.
    """

    def __len__(self) -> int:
        """Number of sequences this rank owns."""
        return len(self.local)

    # -- collectives -------------------------------------------------------------------------
    def _header(self, values: list[int]) -> torch.Tensor:
        """``(world, L)``: every rank's header (one all_gather)."""
        mine = torch.tensor(values, dtype=torch.int64, device=self.device)
        bufs = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(bufs, mine, group=self.group)
        self.collective_calls += 1
        return torch.stack(bufs).cpu()

    def _exchange(self, blocks: list[tuple[torch.Tensor, list[int]]],
                  recv: list[list[int]]) -> list[torch.Tensor]:
        """One all_to_all_single carrying several kinds of rows at once.

        ``blocks[k] = (rows (N_k, bytes_k) ordered by destination, counts per destination)``;
        ``recv[k][r]``: rows of kind k that rank r sends here. Returns, per kind, the rows
        received, ordered by source rank. (A loop over ranks, never over rows.)"""
        widths = [rows.shape[1] for rows, _ in blocks]
        starts = [[0, *torch.tensor(c).cumsum(0).tolist()] for _, c in blocks]
        chunks, send_bytes = [], []
        for r in range(self.world):
            for (rows, _), st in zip(blocks, starts):
                chunks.append(rows[st[r]:st[r + 1]].reshape(-1))
            send_bytes.append(sum(c[r] * w for (_, c), w in zip(blocks, widths)))
        recv_bytes = [sum(rc[r] * w for rc, w in zip(recv, widths)) for r in range(self.world)]
        out = torch.empty(sum(recv_bytes), dtype=torch.uint8, device=self.device)
        flat = torch.cat(chunks) if chunks else out[:0]
        dist.all_to_all_single(out, flat, recv_bytes, send_bytes, group=self.group)
        self.collective_calls += 1
        got: list[list[torch.Tensor]] = [[] for _ in blocks]
        at = 0
        for r in range(self.world):
            for k, w in enumerate(widths):
                size = recv[k][r] * w
                got[k].append(out[at:at + size].view(recv[k][r], w))
                at += size
        return [torch.cat(g) for g in got]

    def _route(self, keys: torch.Tensor):
        """``(perm, send)``: rows ordered by owner rank (stable), and rows per owner."""
        owners = keys % self.world
        perm = torch.argsort(owners, stable=True)
        send = torch.bincount(owners, minlength=self.world).tolist()
        return perm, send

    def _run(self, write, read, kernel, what: str) -> Incoming | None:
        """Writes (``write``: the arguments of :meth:`write`, or None), then reads (``read``:
        ``(seq, frame, time)`` or None), for every rank at once: a header all_gather, one
        all_to_all_single with the written rows and the queries to their owners, and, when
        reading, one all_to_all_single with the answers back (+ one flag all_gather when
        strict or with a kernel that is not Gaussian)."""
        n, error, kern = self.world, None, None
        try:
            if write is not None:
                wk, wf, wt, wi, values = self.local._prepare_write(*write)
            if read is not None:
                rk = self.local.keys(read[0])
                rf, rt = self.local._rows(rk, read[1], read[2], "read")
                kern = self.kernel if kernel is None else as_kernel(kernel)
        except FieldlibError as exc:
            error = exc
        if error is not None:
            header = [1, _BIG, -1] + [0] * (2 * n)
        else:
            wperm, wsend = self._route(wk) if write is not None else (None, [0] * n)
            rperm, rsend = self._route(rk) if read is not None else (None, [0] * n)
            m = wk.numel() if write is not None else 0
            header = [0, int(wi.min()) if m else _BIG, int(wi.max()) if m else -1,
                      *wsend, *rsend]
        table = self._header(header)
        self._refused(table, error, what)
        if write is not None:
            self._check_iterations(table, wk, wf, wi)
        wrecv = table[:, 3 + self.rank].tolist()
        rrecv = table[:, 3 + n + self.rank].tolist()
        fields = list(self.fields)
        wspec = self._row_spec()
        rspec = [(torch.int64, ()), (torch.int64, ()), (torch.float64, ())]
        wrows = (_pack([wk, wf, wi, wt, *(values[f] for f in fields)], wk.numel())[wperm]
                 if write is not None else _pack_empty(wspec, self.device))
        rrows = (_pack([rk, rf, rt], rk.numel())[rperm] if read is not None
                 else _pack_empty(rspec, self.device))
        got_w, got_r = self._exchange([(wrows, wsend), (rrows, rsend)], [wrecv, rrecv])
        if got_w.shape[0]:
            k, fr, it, t, *vals = _unpack(got_w, wspec)
            self.local._write_rows(k, fr, t, it, dict(zip(fields, vals)))
        if read is None:
            return None
        return self._answer(got_r, rspec, rperm, rsend, rrecv, rk, rf, kern)

    def _answer(self, query, rspec, perm, send, recv, keys, frames, kern) -> Incoming:
        """Answer the queries this rank owns; send the answers back; unsort."""
        qk, qf, qt = _unpack(query, rspec)
        answer_error = None
        try:
            inc = self.local._read_rows(qk, qf, qt, kernel=kern)
        except FieldlibError as exc:  # a kernel that is not finite: answer zeros, agree below
            answer_error = exc
            inc = self.local._read_rows(qk, qf, qt, kernel=lambda d: torch.zeros_like(d))
        outs = [("past", f) for f in self.temporal] + [("future", f) for f in self.temporal]
        outs += [("total", f) for f in self.fields if f not in self.temporal]
        counts = torch.stack([inc.known.to(torch.int64), inc.n_past, inc.n_future,
                              inc.n_total, inc.newest], 1)
        answer = _pack([counts, *(getattr(inc, kind)[f] for kind, f in outs)], qk.numel())
        (back,) = self._exchange([(answer, recv)], [send])
        spec = [(torch.int64, (5,)), *((self.dtype, self.fields[f]) for _, f in outs)]
        parts = []
        for got in _unpack(back, spec):
            part = torch.empty_like(got)
            part[perm] = got  # back to the caller's row order
            parts.append(part)
        counts, *values = parts
        out = Incoming({}, {}, {}, counts[:, 1], counts[:, 2], counts[:, 3], counts[:, 4],
                       counts[:, 0].bool())
        for (kind, f), v in zip(outs, values):
            getattr(out, kind)[f] = v
        if self.strict or not _finite_kernel(kern):
            unknown = self.strict and bool((~out.known).any())
            flags = self._header([int(unknown), int(answer_error is not None)])
            if bool(flags[:, 1].any()):
                if answer_error is not None:
                    raise answer_error
                raise MessageStoreError(f"read: the kernel {kern!r} is not finite at some "
                                        f"stored time differences (see rank(s) "
                                        f"{flags[:, 1].nonzero().flatten().tolist()})")
            if bool(flags[:, 0].any()):
                if unknown:
                    self.local._refuse_unknown(keys, frames, out.known)
                raise UnknownSequenceError(
                    f"read: rank(s) {flags[:, 0].nonzero().flatten().tolist()} read a "
                    f"sequence the strict store does not know")
        return out

    # -- the store's interface -----------------------------------------------------------------
    def write(self, seq, frame, time, messages: Mapping[str, torch.Tensor], iteration) -> None:
        """Collective :meth:`MessageStore.write` of this rank's B rows (2 collectives)."""
        self._run((seq, frame, time, messages, iteration), None, None, "write")

    def read(self, seq, frame, time, *, kernel=None, return_weights: bool = False) -> Incoming:
        """Collective :meth:`MessageStore.read` of this rank's B rows (3 collectives; 4 when
        strict or with a kernel that is not Gaussian). ``kernel`` must be the same on every
        rank (each owner applies its own call's)."""
        if return_weights:
            raise MessageStoreError("return_weights is available from MessageStore.read only")
        return self._run(None, (seq, frame, time), kernel, "read")

    def write_read(self, write: tuple, read: tuple, *, kernel=None) -> Incoming:
        """:meth:`write` then :meth:`read` in the collectives of one read (3; 4 when strict
        or with a kernel that is not Gaussian): ``write = (seq, frame, time, messages,
        iteration)``, ``read = (seq, frame, time)``; the read sees the write. A training
        step writes its frames' messages and fetches the next batch's in one exchange."""
        return self._run(tuple(write), tuple(read), kernel, "write_read")

    def add_sequences(self, seq) -> None:
        """Collective :meth:`MessageStore.add_sequences` (2 collectives)."""
        error = None
        try:
            keys = self.local.keys(seq)
        except FieldlibError as exc:
            error = exc
        if error is None:
            perm, send = self._route(keys)
            header = [0, *send]
        else:
            header = [1] + [0] * self.world
        table = self._header(header)
        self._refused(table, error, "add_sequences")
        recv = table[:, 1 + self.rank].tolist()
        (got,) = self._exchange([(_pack([keys], keys.numel())[perm], send)], [recv])
        (k,) = _unpack(got, [(torch.int64, ())])
        self.local._create(k)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shard (a ``MessageStore`` state of the sequences it owns, with the
        global :attr:`iteration`, ``rank`` and ``world``). Save one file per rank; a single
        process reads them all with
        :func:`~fieldlib.inference.messages.merge_state_dicts`. No collective."""
        state = self.local.state_dict()
        state.update(last_iteration=self._iteration, rank=self.rank, world=self.world)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Load this rank's shard, or any ``MessageStore`` state (e.g. merged shards of a run
        with another number of ranks): the sequences this rank owns are kept. No
        collective; every rank must load a state of the same run (the same iteration)."""
        keys = torch.as_tensor(state["keys"], dtype=torch.int64)
        own = (keys % self.world) == self.rank
        if not bool(own.all()):
            n = keys.numel()
            state = {k: (v[own.to(v.device)] if isinstance(v, torch.Tensor) and v.dim()
                         and v.shape[0] == n else v) for k, v in state.items()}
        self.local.load_state_dict(state)
        self._iteration = int(state["last_iteration"])

    def __repr__(self) -> str:
        return (f"DistributedMessageStore(rank={self.rank}, world={self.world}, "
                f"backend={self.backend}, local={self.local!r})")
