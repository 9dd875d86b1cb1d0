"""A message store that every process of a torch.distributed run holds whole (MATH.md §5,
Eq. 10).

:class:`ReplicatedMessageStore` has :class:`~fieldlib.inference.messages.MessageStore`'s
interface and gives, as :class:`~fieldlib.inference.messages_distributed.
DistributedMessageStore` does, exactly what one in-memory store would give for the union of
the ranks' batches, written in rank order. The two place the messages differently:

* ``DistributedMessageStore`` shards the sequences over the ranks (a rank holds 1/world of
  them); a read is 3 collectives (the queries go to the owners, the answers come back).
* ``ReplicatedMessageStore`` keeps every sequence on every rank (:attr:`local`, an ordinary
  ``MessageStore``, the same on every rank). A **write** is one ``all_gather`` of fixed-size
  byte buffers, each a header (status, oldest and newest iteration, rows) and the rank's rows
  (key, frame, iteration, time, every field) padded to a bound every rank knows (the
  largest batch of any rank in the previous write: a training step's batch size); every
  rank then stores all the rows, rank 0's first, in one vectorised write. Only when some
  rank writes more rows than the bound is there a second ``all_gather`` at the new bound
  (decided alike on every rank from the headers). A **read** is local: no collective.
* ``write(..., wait=False)`` posts the all_gather and returns; the write completes (rows
  stored, every rank's errors raised) at the next call of any method of the store, or at
  :meth:`flush`. A training step that posts its frames' messages before its backward finds
  them stored at the next step's read: the exchange overlaps the backward.

What it costs: every rank holds every sequence's ring buffer (``capacity x message_bytes`` a
sequence: 8,000 Charades videos x 50 x 568 B = 217 MiB a rank) and receives every rank's
rows at each write (``world x B`` rows of ``32 + message bytes`` - 24 bytes of the message
are its own frame, iteration and time - about 18 kB a rank for B = 32 at Charades sizes).

Errors: a bad row on one rank (a NaN message, a wrong shape, an iteration that goes back) is
found before anything is exchanged; the header carries it and every rank raises when the
write completes (the faulty rank at once, with its own error; the others a MessageStoreError
naming it), with nothing of that write stored. A read's errors (bad frames or times, a strict
store's unknown sequence) are raised on the rank that read, like any error of that rank's own
step. Works with gloo (CPU, uint8 ``all_gather``) and nccl (the store on ``cuda``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from fieldlib.errors import FieldlibError

from .messages import Incoming, MessageStoreError
from .messages_distributed import _BIG, _ExchangingStore, _pack, _pack_empty, _unpack

__all__ = ["ReplicatedMessageStore"]

_HEADER = 4  # int64s at the front of a gathered buffer: status, oldest, newest, rows


class _Posted:
    """A gathered write in flight: the collective's handle and buffers, and what a second
    round (a larger bound) or this rank's error message would need."""

    def __init__(self, work, bufs, header, rows, error, rows_of):
        self.work, self.bufs, self.header, self.rows = work, bufs, header, rows
        self.error, self.rows_of = error, rows_of


class ReplicatedMessageStore(_ExchangingStore):
    """:class:`~fieldlib.inference.messages.MessageStore` copied on every rank of a group.

    Args:
        fields, temporal, capacity, kernel, discount, scale, normalize, strict, dtype,
            device: as for ``MessageStore`` (the same on every rank). ``device`` must be a
            CUDA device with nccl (each rank its own), may be anything gloo accepts (CPU).
        group: the process group (default: the default group, which must be initialised
            with ``torch.distributed.init_process_group``).

    ``write``, ``write_read`` and ``add_sequences`` are collective: every rank of the group
    calls them, in the same order, each with its own rows (possibly none). ``read`` is not
    (each rank reads its copy; it needs no other rank's call). :attr:`collective_calls`
    counts the collectives made so far; :attr:`iteration` is the largest iteration written
    by any rank.
    """

    def __init__(self, fields: Mapping, *, group=None, **options):
        super().__init__(fields, group=group, **options)
        self._bounds: dict[str, int] = {}  # rows a gathered buffer holds, by kind of call
        self._posted: _Posted | None = None

    def __len__(self) -> int:
        """Number of sequences (every rank holds all of them)."""
        self.flush()
        return len(self.local)

    # -- the gather ------------------------------------------------------------------------
    def _post(self, kind: str, header: list[int], rows: torch.Tensor):
        """All-gather ``header`` (ints) and ``rows (n, bytes)`` padded to the bound of
        ``kind``; returns ``(work, buffers)`` (async)."""
        bound, width = self._bounds.get(kind, 0), rows.shape[1]
        buf = torch.zeros(_HEADER * 8 + bound * width, dtype=torch.uint8, device=self.device)
        buf[:_HEADER * 8] = torch.tensor(header, dtype=torch.int64).view(torch.uint8)
        n = min(rows.shape[0], bound)  # a larger batch goes in the second round
        buf[_HEADER * 8:_HEADER * 8 + n * width] = rows[:n].reshape(-1)
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        work = dist.all_gather(bufs, buf, group=self.group, async_op=True)
        self.collective_calls += 1
        return work, bufs

    def _gathered(self, kind: str, posted: _Posted) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete a gather: ``(headers (world, 4), rows of every rank in rank order)``,
        with a second round when some rank's rows exceeded the bound."""
        posted.work.wait()
        heads = torch.stack([b[:_HEADER * 8].view(torch.int64) for b in posted.bufs]).cpu()
        counts = heads[:, 3]
        largest, bound = int(counts.max()), self._bounds.get(kind, 0)
        self._bounds[kind] = largest  # the next call's bound: every rank decides alike
        if largest > bound:
            work, posted.bufs = self._post(kind, posted.header, posted.rows)
            work.wait()
        width = posted.rows.shape[1]
        parts = [b[_HEADER * 8:_HEADER * 8 + int(c) * width].view(int(c), width)
                 for b, c in zip(posted.bufs, counts.tolist())]
        return heads, torch.cat(parts)

    # -- the store's interface -----------------------------------------------------------------
    def write(self, seq, frame, time, messages: Mapping[str, torch.Tensor], iteration, *,
              wait: bool = True) -> None:
        """Collective :meth:`MessageStore.write` of this rank's B rows (1 all_gather; 2 when
        a rank writes more rows than any rank did in the previous write). ``wait=False``:
        post the exchange and return; the rows are stored by the next call of the store (or
        :meth:`flush`), where the errors of other ranks are raised. This rank's own bad
        input raises at once (after its part of the exchange, so that no rank waits)."""
        self.flush()
        error = rows_of = None
        try:
            keys, frames, times, its, values = self.local._prepare_write(seq, frame, time,
                                                                         messages, iteration)
        except FieldlibError as exc:
            error = exc
        if error is not None:
            header, rows = [1, _BIG, -1, 0], _pack_empty(self._row_spec(), self.device)
        else:
            m = keys.numel()
            header = [0, int(its.min()) if m else _BIG, int(its.max()) if m else -1, m]
            rows = _pack([keys, frames, its, times, *(values[f] for f in self.fields)], m)
            rows_of = (keys, frames, its)
        work, bufs = self._post("write", header, rows)
        self._posted = _Posted(work, bufs, header, rows, error, rows_of)
        if wait or error is not None:
            self.flush()

    def flush(self) -> None:
        """Complete a write posted with ``wait=False`` (store its rows, raise its errors).
        Every other method does it first; call it before reading :attr:`local` directly.
        While a write is in flight this is collective (a batch larger than the last needs
        a second gather): call it, or the method that does it, on every rank."""
        posted, self._posted = self._posted, None
        if posted is None:
            return
        heads, rows = self._gathered("write", posted)
        self._refused(heads, posted.error, "write")
        keys, frames, its = posted.rows_of
        self._check_iterations(heads, keys, frames, its)
        if rows.shape[0]:
            k, fr, it, t, *vals = _unpack(rows, self._row_spec())
            self.local._write_rows(k, fr, t, it, dict(zip(self.fields, vals)))

    def read(self, seq, frame, time, *, kernel=None, return_weights: bool = False) -> Incoming:
        """:meth:`MessageStore.read` of this rank's rows on its own copy (no collective)."""
        self.flush()
        return self.local.read(seq, frame, time, kernel=kernel, return_weights=return_weights)

    def write_read(self, write: tuple, read: tuple, *, kernel=None) -> Incoming:
        """:meth:`write` (collective) then :meth:`read` (local): ``write = (seq, frame,
        time, messages, iteration)``, ``read = (seq, frame, time)``; the read sees the
        write."""
        self.write(*write)
        return self.read(*read, kernel=kernel)

    def add_sequences(self, seq) -> None:
        """Collective :meth:`MessageStore.add_sequences`: every rank learns every rank's
        sequences (1 all_gather; 2 with more ids than any rank gave in the previous call)."""
        self.flush()
        error = None
        try:
            keys = self.local.keys(seq)
        except FieldlibError as exc:
            error, keys = exc, torch.zeros(0, dtype=torch.int64, device=self.device)
        header = [int(error is not None), 0, 0, keys.numel()]
        rows = _pack([keys], keys.numel())
        work, bufs = self._post("sequences", header, rows)
        heads, got = self._gathered("sequences", _Posted(work, bufs, header, rows, error, None))
        self._refused(heads, error, "add_sequences")
        (k,) = _unpack(got, [(torch.int64, ())])
        self.local._create(k)

    def messages(self, seq) -> dict[str, torch.Tensor]:
        """:meth:`MessageStore.messages` of one sequence (this rank's copy)."""
        self.flush()
        return self.local.messages(seq)

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The whole store (a ``MessageStore`` state, with the global :attr:`iteration`):
        the same messages on every rank, so one rank's file is enough (the names of string
        ids are those this rank has seen: they only word error messages). No collective
        once no write is in flight (see :meth:`flush`)."""
        self.flush()
        state = self.local.state_dict()
        state.update(last_iteration=self._iteration, rank=self.rank, world=self.world)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Load a whole store's state (this store's, a ``MessageStore``'s, or shards of a
        ``DistributedMessageStore`` merged with :func:`~fieldlib.inference.messages.
        merge_state_dicts`). No collective; every rank must load the same state."""
        if self._posted is not None:
            raise MessageStoreError("load_state_dict: a write posted with wait=False is in "
                                    "flight; call flush() first")
        self.local.load_state_dict(state)
        self._iteration = int(state["last_iteration"])

    def __repr__(self) -> str:
        return (f"ReplicatedMessageStore(rank={self.rank}, world={self.world}, "
                f"backend={self.backend}, local={self.local!r})")
