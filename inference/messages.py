"""The message store of asynchronous mean-field training (MATH.md §4-5, Eq. 10).

A training batch holds frames drawn from many sequences (videos). Each frame reads the
messages that the other frames of its sequence sent in earlier iterations instead of running
inference over its whole sequence; after its step it writes its own outgoing messages.
:class:`MessageStore` keeps, per sequence, the last ``capacity`` messages (default 50, the
released code's), evicting the oldest, and combines them for a batch of reading frames as
Eq. 10:

    M_i = h / (Σ_{r<n} d^r) · Σ_{r<n} d^r k(t_i, t_{J(r)}) f_{J(r)}            (Eq. 10)

over the n stored messages of the set being formed (below), ranked newest first (J(0) is the
newest: rank r = 0 gets the largest discount weight d^0 = 1; the released code's oldest-first
order is MATH.md §9's bug), with the kernel weight k computed fresh for each pair from the two
frame times and the scale h. Three sets, each ranked and normalised on its own (MATH.md §9:
past and future normalised separately), all excluding every message of the reading frame
itself (same sequence and frame id: the released code's self-count bug, MATH.md §9):

* ``past``  : messages of frames before i (t_j < t_i), kernel-weighted: FB_i's sum;
* ``future``: messages of frames after i (t_j > t_i), kernel-weighted: FA_i's sum;
* ``total`` : every other frame's messages, no kernel weight: the intent's Σ_j H_j (Eq. 6).

A message from another frame with the same time (t_j = t_i) is ordered by frame id, as
KernelTemporal orders equal-time pairs by array position: past when its frame id is smaller,
future when larger, with weight k(0). With frame id = array position and d = 1, h = n
(``scale="count"``), or ``normalize=False`` and h = 1, ``past``/``future`` are exactly
``fieldlib.kernels.temporal_sums`` of the stored values (tested).

The scale h is a number, ``"count"`` (h = n, the messages of the set) or ``"frames"`` (h = the
distinct frames among those n messages: what MATH.md §5's "the number of frames the average
stands for" means when a frame has several stored messages, e.g. capacity 50 > T = 25, where
``"count"`` is about twice it). Both are per read row and per set; with one stored message a
frame they are equal.

What is stored (per message, the fields declared at construction; :meth:`temporal_field`
declares MATH.md §4's four). A field is either ``temporal`` (read as ``past`` and ``future``)
or not (read as ``total``). The point is to store what does not depend on parameters that
change between the write and the read:

* K_j (D floats): Q_j's marginal on the component µ acts on (38 objects), not FA_j / FB_j:
  FA_j(x) = Σ_u K_j(u) µ(x, u) is linear in K_j, so Σ_j w_ij FA_j = µ (Σ_j w_ij K_j). The
  caller applies the CURRENT µ at read time, one (D x D) product after the weighted sum
  (:meth:`Incoming.kernel_messages`), instead of summing µ-products made with a stale µ, and
  it is half the bytes of FA_j + FB_j;
* K*_j (D floats): onehot(x*_j) on the component, for Eq. 9's target;
* H_j(I) = E_{Q_j} φXI_j(U, I) and H*_j(I) = φXI_j(x*_j, I) (N_I floats each): they depend on
  frame j's own predicted φXI_j, which a reading frame does not have.

Bytes per message: 24 of bookkeeping (time float64, frame id int64, iteration int64) plus
Σ_fields numel · itemsize; MATH.md's Charades sizes (D = 38, N_I = 30) in float32:
24 + (38 + 38 + 30 + 30) · 4 = 568 bytes, 28.4 kB a sequence at capacity 50
(:attr:`MessageStore.message_bytes`).

Layout: one slot per sequence; every field a padded tensor (slots, capacity, numel), used as
a ring buffer per slot. Writes and reads of B frames are one vectorised program (searchsorted
for the slots, index_put for the writes, gather + masked weights + one batched matmul per
field for the reads): no Python loop over frames or messages.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.kernels import as_kernel

__all__ = [
    "MessageStore",
    "Incoming",
    "MessageStoreError",
    "UnknownSequenceError",
    "MessageShapeError",
    "InvalidMessageError",
    "sequence_keys",
    "merge_state_dicts",
]

#: Integer sequence ids must lie in [0, KEY_LIMIT); strings map to keys in [KEY_LIMIT, 2^63).
KEY_LIMIT = 1 << 62
_NO_ITERATION = -(1 << 63)
_STATE_FORMAT = "fieldlib.MessageStore/1"
_SCALES = ("count", "frames")  # h = the set's messages, or the distinct frames they come from


class MessageStoreError(FieldlibError):
    """A message store was given something it cannot store or read."""


class UnknownSequenceError(MessageStoreError, KeyError):
    """A strict store was asked for a sequence it never saw (:meth:`MessageStore.add_sequences`
    declares one)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MessageShapeError(MessageStoreError, ShapeError):
    """A message tensor (or a batch of ids, frames, times) has the wrong shape."""


class InvalidMessageError(MessageStoreError):
    """A message of the wrong dtype or device, NaN or inf in a message, a non-finite time,
    or an iteration older than one already written."""


# -- sequence ids -------------------------------------------------------------------------------
def _str_key(name: str) -> int:
    digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & (KEY_LIMIT - 1)) | KEY_LIMIT


def sequence_keys(ids, names: dict | None = None) -> torch.Tensor:
    """``LongTensor (B,)``: the store's key of each sequence id of a batch.

    An id is a non-negative integer below 2^62 (a Python or numpy int, or the entries of an
    integer tensor / array: that key is the id itself, no Python loop), or a ``str`` (a video
    name: a stable 62-bit hash in [2^62, 2^63), the same in every process, so it never meets
    an integer id; two distinct names collide with probability ~2^-62 per pair). ``names``,
    when given, is filled with key -> name for the strings (error messages use it).

    Raises MessageStoreError for anything else (a bool, a float, a negative or too large int,
    a tuple, None), naming the id and its position.
    """
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        ids = torch.from_numpy(ids.astype(np.int64, copy=False))
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise MessageStoreError(f"sequence ids must be integers or strings, got a tensor of "
                                    f"{ids.dtype}")
        if ids.dim() != 1:
            raise MessageShapeError(f"sequence ids: expected a 1-d batch, got shape "
                                    f"{tuple(ids.shape)}")
        keys = ids.to(torch.int64)
        bad = (keys < 0) | (keys >= KEY_LIMIT)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise MessageStoreError(f"sequence id {int(keys[i])} at row {i}: integer ids must "
                                    f"lie in [0, 2^62)")
        return keys
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise MessageShapeError(f"sequence ids: expected a batch (a list or a 1-d tensor), "
                                f"got {ids!r}")
    out = []
    for i, x in enumerate(ids):  # one cheap conversion per row; pass a tensor to avoid it
        if isinstance(x, str):
            key = _str_key(x)
            if names is not None:
                names[key] = x
        elif isinstance(x, bool | np.bool_) or not isinstance(
                x, numbers.Integral | np.integer | torch.Tensor):
            raise MessageStoreError(f"sequence id {x!r} at row {i}: an id is a non-negative "
                                    f"integer or a str")
        else:
            try:
                key = operator.index(x)
            except TypeError:
                raise MessageStoreError(f"sequence id {x!r} at row {i}: an id is a "
                                        f"non-negative integer or a str") from None
            if not 0 <= key < KEY_LIMIT:
                raise MessageStoreError(f"sequence id {key} at row {i}: integer ids must lie "
                                        f"in [0, 2^62)")
        out.append(key)
    return torch.tensor(out, dtype=torch.int64)


# -- what a read returns ------------------------------------------------------------------------
@dataclass
class Incoming:
    """The incoming messages of B reading frames (Eq. 10), rows in the order of the read.

    Attributes:
        past: ``{field: (B, *shape)}`` for each temporal field: h / Σ d^r · Σ d^r k f over
            the stored messages of earlier frames (FB_i's sum before µ).
        future: the same over later frames (FA_i's sum before µ).
        total: ``{field: (B, *shape)}`` for each other field: h / Σ d^r · Σ d^r f over every
            other frame's messages (no kernel weight): the intent's Σ_j H_j.
        n_past, n_future, n_total: ``LongTensor (B,)``: how many stored messages each sum
            combined.
        newest: ``LongTensor (B,)``: the newest iteration stored for the row's sequence (its
            own messages included), -1 when none.
        known: ``BoolTensor (B,)``: whether the store knows the row's sequence.
        weights: with ``read(..., return_weights=True)`` only: ``{"past", "future",
            "total": (B, capacity)}`` the weight each stored message got (normalisation,
            discount, kernel and h folded in), and ``{"frame", "iteration": LongTensor
            (B, capacity), "time": (B, capacity) float64, "stored": BoolTensor (B,
            capacity)}`` describing those messages, newest first along the last axis.
    """

    past: dict[str, torch.Tensor]
    future: dict[str, torch.Tensor]
    total: dict[str, torch.Tensor]
    n_past: torch.Tensor
    n_future: torch.Tensor
    n_total: torch.Tensor
    newest: torch.Tensor
    known: torch.Tensor
    weights: dict[str, torch.Tensor] | None = None

    def kernel_messages(self, mu: torch.Tensor, field: str = "K"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(FA, FB)``, each ``(B, D)``: the kernel factor's messages (MATH.md §3) with the
        CURRENT µ ``([B,] D, D)`` applied after the weighted sums of the stored component
        marginals: FA_i(a) = Σ_b future_i(b) µ(a, b), FB_i(b) = Σ_a past_i(a) µ(a, b), as
        KernelTemporal computes them. Differentiable in µ (the sums are constants)."""
        future, past = self.future[field].to(mu.dtype), self.past[field].to(mu.dtype)
        fa = (future.unsqueeze(-2) @ mu.transpose(-1, -2)).squeeze(-2)
        fb = (past.unsqueeze(-2) @ mu).squeeze(-2)
        return fa, fb


# -- the store ----------------------------------------------------------------------------------
def _shape(name, shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        out = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise MessageStoreError(f"field {name!r}: a shape is a tuple of ints, got "
                                f"{shape!r}") from None
    if any(s < 1 for s in out):
        raise MessageStoreError(f"field {name!r}: sizes must be >= 1, got {out}")
    return out


class MessageStore:
    """In-memory store of the outgoing messages of each sequence's frames (MATH.md §4-5).

    Args:
        fields: ``{name: shape}``: what one message holds, e.g. ``{"K": (38,), "H": (30,)}``
            (a user's coupled factor type adds its own). :meth:`temporal_field` declares
            MATH.md §4's K, K_star, H, H_star.
        temporal: the fields read kernel-weighted as ``past`` / ``future``; the others are
            read as ``total``. None (default): every field.
        capacity: messages kept per sequence (default 50); the oldest written is evicted.
        kernel: k of Eq. 10: a σ (one Gaussian) or any ``fieldlib.kernels`` kernel /
            callable on time differences, evaluated at |t_j - t_i| (later minus earlier, as
            KernelTemporal does). Default σ = 150.
        discount: d in [0, 1] (paper 0.9); d = 0 keeps only the newest message of a set.
        scale: h > 0, ``"count"`` or ``"frames"``, per read row and per set (past, future,
            total separately, as the normalisation). ``"count"``: h = the number of messages
            of the set (with d = 1 the average becomes the plain sum of MATH.md §3).
            ``"frames"``: h = the number of DISTINCT other frames among them, the number of
            frames the average stands for (MATH.md §5). They differ only when a frame has
            several stored messages (a frame written again while its older message is still
            stored, e.g. ``capacity`` above the frames of a sequence): with capacity 50 and
            T = 25 (the released code's setting) ``"count"`` is about twice the frames. They
            agree whenever every frame has at most one stored message (e.g. capacity <= T and
            each frame written once per round, as the async engine does with capacity = T);
            d does not enter h. For Charades training with repeated frames use ``"frames"``.
        normalize: True (Eq. 10): divide by Σ_r d^r; False: h · Σ_r d^r k f.
        strict: reading a sequence never written nor declared (:meth:`add_sequences`)
            raises UnknownSequenceError; False (default): it reads zero messages.
        dtype: the floating dtype of every field (messages must come in it).
        device: where the store lives (messages must come on it).

    Sequence ids: see :func:`sequence_keys` (non-negative ints below 2^62, or str).
    Iterations: an integer counter that never goes back (e.g. the training step): every
    write's iterations must be >= :attr:`iteration`, the largest written so far. Within one
    write rows are ordered by iteration, then by row; that order is the recency of Eq. 10
    and of eviction.

    Raises:
        MessageStoreError: a bad option (capacity < 1, d outside [0, 1], h <= 0, a
        temporal field not declared, a dtype that is not floating).
    """

    def __init__(self, fields: Mapping[str, tuple[int, ...] | int], *,
                 temporal: Iterable[str] | None = None, capacity: int = 50,
                 kernel=150.0, discount: float = 0.9, scale: float | str = 1.0,
                 normalize: bool = True, strict: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if not isinstance(fields, Mapping) or not fields:
            raise MessageStoreError(f"fields: a non-empty {{name: shape}} mapping, got "
                                    f"{fields!r}")
        self.fields = {}
        for name, shape in fields.items():
            if not isinstance(name, str) or not name:
                raise MessageStoreError(f"field names are non-empty strings, got {name!r}")
            self.fields[name] = _shape(name, shape)
        temporal = list(self.fields) if temporal is None else list(temporal)
        unknown = [t for t in temporal if t not in self.fields]
        if unknown:
            raise MessageStoreError(f"temporal fields {unknown} are not among the fields "
                                    f"{list(self.fields)}")
        self.temporal = tuple(f for f in self.fields if f in temporal)
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) \
                or capacity < 1:
            raise MessageStoreError(f"capacity: an integer >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self.kernel = as_kernel(kernel)
        if isinstance(discount, bool) or not isinstance(discount, numbers.Real) \
                or not 0.0 <= float(discount) <= 1.0:
            raise MessageStoreError(f"discount d: a number in [0, 1], got {discount!r}")
        self.discount = float(discount)
        named = isinstance(scale, str) and scale in _SCALES
        if not named and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                          or not (math.isfinite(scale) and scale > 0)):
            raise MessageStoreError(f"scale h: a finite number > 0, 'count' or 'frames', got "
                                    f"{scale!r}")
        self.scale = scale if named else float(scale)
        self.normalize, self.strict = bool(normalize), bool(strict)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise MessageStoreError(f"dtype: a floating torch dtype, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:N"
        self._numel = {f: math.prod(s) for f, s in self.fields.items()}
        # every field side by side in one buffer (temporal ones first): one gather a read
        order = [*self.temporal, *(f for f in self.fields if f not in self.temporal)]
        ends = np.cumsum([self._numel[f] for f in order]).tolist()
        self._columns = {f: (e - self._numel[f], e) for f, e in zip(order, ends)}
        self._width = ends[-1]
        self._split = sum(self._numel[f] for f in self.temporal)
        self._names: dict[int, str] = {}
        self._ages = torch.arange(self.capacity, device=self.device)
        self._powers = torch.tensor(self.discount, dtype=torch.float64,
                                    device=self.device) ** self._ages.double()  # d^r, 0^0 = 1
        self.clear()

    @classmethod
    def temporal_field(cls, components: int = 38, intents: int = 30, **options):
        """The store of the paper's temporal field (MATH.md §4): ``K`` and ``K_star``
        (``(components,)``, temporal: the marginal and the one-hot label on µ's component)
        and ``H`` and ``H_star`` (``(intents,)``, summed over all other frames). Options as
        for the constructor."""
        fields = {"K": (components,), "K_star": (components,),
                  "H": (intents,), "H_star": (intents,)}
        return cls(fields, temporal=("K", "K_star"), **options)

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def message_bytes(self) -> int:
        """Bytes one stored message takes: 24 of bookkeeping (time float64, frame and
        iteration int64) plus every field's numel times the dtype's size."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return 24 + item * sum(self._numel.values())

    @property
    def iteration(self) -> int:
        """The largest iteration written so far (-1 before any write)."""
        return int(self._last_iteration)

    def __len__(self) -> int:
        """Number of sequences the store knows."""
        return self._nseq

    def clear(self) -> None:
        """Forget every sequence and message."""
        self._nseq = 0
        self._sorted_keys = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._sorted_slots = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._slot_keys = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._last_iteration = torch.tensor(-1, dtype=torch.int64)
        self._alloc(0)

    def _alloc(self, slots: int) -> None:
        c, dev, slots = self.capacity, self.device, max(slots, 1)  # slot 0 always exists
        self._count = torch.zeros(slots, dtype=torch.int64, device=dev)
        self._time = torch.zeros(slots, c, dtype=torch.float64, device=dev)
        self._frame = torch.zeros(slots, c, dtype=torch.int64, device=dev)
        self._iter = torch.zeros(slots, c, dtype=torch.int64, device=dev)
        self._data = torch.zeros(slots, c, self._width, dtype=self.dtype, device=dev)

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {"count": self._count, "time": self._time, "frame": self._frame,
                "iteration": self._iter,
                **{"field." + f: self._data[..., a:b] for f, (a, b) in self._columns.items()}}

    def _grow(self, needed: int) -> None:
        have = self._count.shape[0]
        if needed <= have:
            return
        size = max(needed, 2 * have, 16)
        old = self._buffers()
        self._alloc(size)
        for name, new in self._buffers().items():
            new[:have] = old[name]

    def name(self, key: int) -> str:
        """How error messages show the sequence of store key ``key``."""
        if key < KEY_LIMIT:
            return str(key)
        name = self._names.get(key)
        return repr(name) if name is not None else f"<str id with key {key:#x}>"

    def keys(self, seq) -> torch.Tensor:
        """``LongTensor (B,)`` on the store's device: the keys of a batch of sequence ids
        (:func:`sequence_keys`)."""
        return sequence_keys(seq, self._names).to(self.device)

    def _lookup(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots, known)`` of ``keys (B,)``; unknown keys get slot 0 (masked later)."""
        if self._nseq == 0 or keys.numel() == 0:
            return torch.zeros_like(keys), torch.zeros_like(keys, dtype=torch.bool)
        pos = torch.searchsorted(self._sorted_keys, keys).clamp(max=self._nseq - 1)
        known = self._sorted_keys[pos] == keys
        return torch.where(known, self._sorted_slots[pos], 0), known

    def _create(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots of ``keys (B,)``, new slots for the keys not seen before."""
        slots, known = self._lookup(keys)
        new = torch.unique(keys[~known])
        m = new.numel()
        if m:
            first = self._nseq
            self._grow(first + m)
            new_slots = torch.arange(first, first + m, device=self.device)
            self._slot_keys = torch.cat([self._slot_keys, new])
            both = torch.cat([self._sorted_keys, new])
            order = torch.argsort(both)
            self._sorted_keys = both[order]
            self._sorted_slots = torch.cat([self._sorted_slots, new_slots])[order]
            self._nseq = first + m
            slots, _ = self._lookup(keys)
        return slots

    def add_sequences(self, seq) -> None:
        """Declare sequences (ids as for :meth:`write`) without messages: a strict store
        then reads zero messages for them instead of raising."""
        self._create(self.keys(seq))

    # -- input checks ------------------------------------------------------------------------
    def _where(self, keys, frames, row: int) -> str:
        return f"sequence {self.name(int(keys[row]))}, frame {int(frames[row])}"

    def _rows(self, keys: torch.Tensor, frame, time, what: str):
        """Frames ``LongTensor (B,)`` and times ``float64 (B,)`` on the device, checked."""
        b = keys.numel()
        try:
            frames = torch.as_tensor(frame, device=self.device)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise MessageStoreError(f"{what}: frame ids must be integers ({exc})") from None
        if frames.numel() == 0:  # [] reads as float32
            frames = frames.to(torch.int64)
        if frames.dtype == torch.bool or frames.is_floating_point() or frames.is_complex():
            raise MessageStoreError(f"{what}: frame ids must be integers, got {frames.dtype}")
        if frames.shape != (b,):
            raise MessageShapeError(f"{what}: frame ids of shape {tuple(frames.shape)} for "
                                    f"{b} sequence ids; expected ({b},)")
        frames = frames.to(torch.int64)
        try:
            times = torch.as_tensor(time, device=self.device)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise MessageStoreError(f"{what}: frame times must be real numbers ({exc})") \
                from None
        if times.dtype == torch.bool or times.is_complex():
            raise MessageStoreError(f"{what}: frame times must be real numbers, got "
                                    f"{times.dtype}")
        if times.shape != (b,):
            raise MessageShapeError(f"{what}: frame times of shape {tuple(times.shape)} for "
                                    f"{b} sequence ids; expected ({b},)")
        times = times.detach().to(torch.float64)
        bad = ~torch.isfinite(times)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise InvalidMessageError(f"{what}: {self._where(keys, frames, i)}: frame time "
                                      f"{float(times[i])} is not finite")
        return frames, times

    def _prepare_write(self, seq, frame, time, messages, iteration):
        """Checked rows of a write: ``(keys, frames, times, iterations, {field: (B, numel)})``
        (every check of :meth:`write` that does not need the stored state)."""
        keys = self.keys(seq)
        b = keys.numel()
        frames, times = self._rows(keys, frame, time, "write")
        try:
            its = torch.as_tensor(iteration, device=self.device)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise MessageStoreError(f"write: iteration must be an integer ({exc})") from None
        if its.dtype == torch.bool or its.is_floating_point() or its.is_complex():
            raise MessageStoreError(f"write: iteration must be an integer, got {iteration!r}")
        if its.dim() == 0:
            its = its.expand(b)
        if its.shape != (b,):
            raise MessageShapeError(f"write: iterations of shape {tuple(its.shape)} for {b} "
                                    f"sequence ids; expected an int or ({b},)")
        its = its.to(torch.int64)
        if bool((its < 0).any()):
            i = int((its < 0).nonzero()[0, 0])
            raise InvalidMessageError(f"write: {self._where(keys, frames, i)}: iteration "
                                      f"{int(its[i])} is negative")
        if not isinstance(messages, Mapping):
            raise MessageStoreError(f"write: messages must be a {{field: tensor}} mapping, got "
                                    f"{type(messages).__name__}")
        missing = [f for f in self.fields if f not in messages]
        extra = [f for f in messages if f not in self.fields]
        if missing or extra:
            raise MessageStoreError(f"write: the store holds fields {list(self.fields)}; "
                                    f"missing {missing}, unknown {extra}")
        values = {}
        for f, shape in self.fields.items():
            m = messages[f]
            where = self._where(keys, frames, 0) if b else "an empty batch"
            if not isinstance(m, torch.Tensor):
                raise InvalidMessageError(f"write: message {f!r} ({where}, ...) must be a "
                                          f"tensor, got {type(m).__name__}")
            if m.shape != (b, *shape):
                raise MessageShapeError(f"write: message {f!r} ({where}, ...) has shape "
                                        f"{tuple(m.shape)}; expected {(b, *shape)}: "
                                        f"(batch, *{shape})")
            if m.dtype != self.dtype:
                raise InvalidMessageError(f"write: message {f!r} ({where}, ...) is {m.dtype}; "
                                          f"the store holds {self.dtype}")
            if m.device != self.device:
                raise InvalidMessageError(f"write: message {f!r} ({where}, ...) is on "
                                          f"{m.device}; the store is on {self.device}")
            flat = m.detach().reshape(b, self._numel[f])
            bad = ~torch.isfinite(flat)
            if bool(bad.any()):
                i, j = (int(x) for x in bad.nonzero()[0])
                index = tuple(int(x) for x in np.unravel_index(j, shape))
                raise InvalidMessageError(f"write: message {f!r} of {self._where(keys, frames, i)}"
                                          f" (row {i}) holds {float(flat[i, j])} at {index}; "
                                          f"messages must be finite")
            values[f] = flat
        return keys, frames, times, its, values

    # -- write -------------------------------------------------------------------------------
    def write(self, seq, frame, time, messages: Mapping[str, torch.Tensor], iteration) -> None:
        """Store the outgoing messages of B frames (Algorithm 2's last step).

        Args:
            seq: B sequence ids (:func:`sequence_keys`); a sequence may repeat.
            frame: ``(B,)`` integer frame ids (the frame's position in its sequence: a
                reading frame skips every message with its own sequence and frame id).
            time: ``(B,)`` real frame times (the kernel's argument).
            messages: ``{field: (B, *shape)}`` for every declared field, in the store's
                dtype and on its device, finite (detached: messages are constants).
            iteration: an int or ``(B,)`` ints >= :attr:`iteration`: the iteration that
                computed each message.

        A sequence keeps its last ``capacity`` messages (recency: iteration, then row); a
        frame written again keeps its older messages until they are evicted.

        Raises:
            MessageShapeError: a message (or frames, times, iterations) of the wrong shape.
            InvalidMessageError: a message of the wrong dtype or device, NaN or inf in a
                message, a non-finite time, an iteration below :attr:`iteration`.
            MessageStoreError: bad ids, missing or unknown fields.
            The store is unchanged when an error is raised.
        """
        keys, frames, times, its, values = self._prepare_write(seq, frame, time, messages,
                                                               iteration)
        self._check_iterations(keys, frames, its)
        self._write_rows(keys, frames, times, its, values)

    def _check_iterations(self, keys, frames, its) -> None:
        if its.numel() == 0:
            return
        low = int(its.min())
        if low < self.iteration:
            i = int((its < self.iteration).nonzero()[0, 0])
            raise InvalidMessageError(
                f"write: {self._where(keys, frames, i)}: iteration {int(its[i])} is older than "
                f"iteration {self.iteration} already written; iterations never go back "
                f"(use a counter such as the training step; store.iteration resumes it)")

    def _write_rows(self, keys, frames, times, its, values) -> None:
        """Write checked rows (the last ``capacity`` of each sequence, by iteration then
        row) in one index_put per buffer."""
        b = keys.numel()
        if b == 0:
            return
        order = torch.argsort(its, stable=True)  # recency: iteration, then row
        slots = self._create(keys)[order]
        group = torch.argsort(slots, stable=True)  # rows of one sequence together, in order
        rows, s = order[group], slots[group]
        uniq, counts = torch.unique_consecutive(s, return_counts=True)
        starts = counts.cumsum(0) - counts
        k = torch.arange(b, device=self.device) - starts.repeat_interleave(counts, output_size=b)
        n = counts.repeat_interleave(counts, output_size=b)
        keep = k >= n - self.capacity  # earlier rows beyond capacity would be overwritten
        rows, s, k = rows[keep], s[keep], k[keep]
        flat = s * self.capacity + (self._count[s] + k) % self.capacity  # slot-major cells
        self._time.view(-1).index_copy_(0, flat, times[rows])
        self._frame.view(-1).index_copy_(0, flat, frames[rows])
        self._iter.view(-1).index_copy_(0, flat, its[rows])
        data = torch.cat([values[f] for f in self._columns], 1)
        self._data.view(-1, self._width).index_copy_(0, flat, data[rows].to(self.dtype))
        self._count[uniq] += counts
        self._last_iteration = torch.maximum(self._last_iteration, its.max().cpu())

    def write_read(self, write: tuple, read: tuple, *, kernel=None) -> Incoming:
        """:meth:`write` then :meth:`read`: ``write = (seq, frame, time, messages,
        iteration)``, ``read = (seq, frame, time)`` (one exchange in the distributed store)."""
        self.write(*write)
        return self.read(*read, kernel=kernel)

    # -- read --------------------------------------------------------------------------------
    def read(self, seq, frame, time, *, kernel=None, return_weights: bool = False) -> Incoming:
        """The incoming messages of B reading frames, combined by Eq. 10 (module docstring).

        Args:
            seq: B sequence ids (repeats allowed).
            frame: ``(B,)`` integer frame ids: a frame never reads its own messages.
            time: ``(B,)`` real frame times t_i.
            kernel: overrides the store's kernel for this read (any ``fieldlib.kernels``
                kernel or σ).
            return_weights: also return every stored message's weight (:class:`Incoming`).

        Returns an :class:`Incoming`: ``past``/``future`` ``(B, *shape)`` per temporal field,
        ``total`` per other field, in the store's dtype; all zero for a row whose sequence
        has no stored message from another frame (the paper's first pass). Computed without
        gradient (messages are constants of a step; apply µ after, with
        :meth:`Incoming.kernel_messages`).

        Raises:
            UnknownSequenceError: a strict store and a sequence never written nor declared.
            MessageStoreError / MessageShapeError / InvalidMessageError: bad ids, frames
                or times (named by sequence and frame); a kernel that is not finite at the
                stored time differences.
        """
        keys = self.keys(seq)
        frames, times = self._rows(keys, frame, time, "read")
        out = self._read_rows(keys, frames, times, kernel=kernel,
                              return_weights=return_weights)
        if self.strict:
            self._refuse_unknown(keys, frames, out.known)
        return out

    def _refuse_unknown(self, keys, frames, known) -> None:
        if bool((~known).any()):
            i = int((~known).nonzero()[0, 0])
            raise UnknownSequenceError(
                f"read: {self._where(keys, frames, i)} (row {i}): the store knows no sequence "
                f"{self.name(int(keys[i]))} (strict store: write to it or declare it with "
                f"add_sequences first)")

    @staticmethod
    def _frame_runs(fr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, run)``, each ``(B, C)``: the cells of each row sorted by frame id, and
        the index of each sorted cell's run of equal frame ids (0, 1, ... per row)."""
        sorted_fr, order = torch.sort(fr, dim=1, stable=True)
        new = torch.ones_like(sorted_fr, dtype=torch.bool)
        new[:, 1:] = sorted_fr[:, 1:] != sorted_fr[:, :-1]
        return order, new.cumsum(1) - 1

    @staticmethod
    def _distinct(mask: torch.Tensor, runs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``(B,)``: the number of distinct frame ids among each row's cells in ``mask`` (a
        run of equal frame ids counts once when any of its cells is in the mask)."""
        order, run = runs
        hit = torch.zeros(mask.shape, dtype=torch.int64, device=mask.device)
        hit.scatter_add_(1, run, mask.gather(1, order).to(torch.int64))
        return (hit > 0).sum(1)

    def _set_weights(self, mask: torch.Tensor, kw: torch.Tensor | None, runs=None):
        """``(weights (B, C) float64, n (B,))`` of one set of Eq. 10: mask (B, C) the set's
        messages newest first, kw the kernel weights (None: no kernel), runs the cells'
        frame-id runs (:meth:`_frame_runs`, for ``scale="frames"``)."""
        n = mask.sum(1)
        rank = (mask.cumsum(1) - 1).clamp(min=0)  # 0 = the newest message of the set
        disc = torch.where(mask, self._powers[rank], 0.0)  # d^r
        if self.scale == "count":
            h = n.to(torch.float64)
        elif self.scale == "frames":
            h = self._distinct(mask, runs).to(torch.float64)
        else:
            h = self.scale
        if self.normalize:
            denom = disc.sum(1)
            norm = torch.where(denom > 0, h / denom.clamp(min=1e-300), 0.0)
        else:
            norm = torch.as_tensor(h, dtype=torch.float64, device=mask.device).expand(n.shape)
        w = disc * norm[:, None]
        if kw is not None:
            w = w * kw
        return w, n

    @torch.no_grad()
    def _read_rows(self, keys, frames, times, *, kernel=None, return_weights=False):
        """Eq. 10 for checked rows (an :class:`Incoming`); unknown sequences read zeros."""
        b, c = keys.numel(), self.capacity
        kernel = self.kernel if kernel is None else as_kernel(kernel)
        slots, known = self._lookup(keys)
        count = torch.where(known, self._count[slots], 0)
        valid = self._ages[None, :] < count.clamp(max=c)[:, None]  # (B, C), newest first
        pos = (count[:, None] - 1 - self._ages[None, :]) % c
        flat = (slots[:, None] * c + pos).view(-1)  # (B·C,) cells, newest first per row

        def cells(buf):
            return buf.view(-1, *buf.shape[2:]).index_select(0, flat).view(b, c, *buf.shape[2:])

        t, fr, it = cells(self._time), cells(self._frame), cells(self._iter)
        ti, fi = times[:, None], frames[:, None]
        other = valid & (fr != fi)  # never a frame's own message (MATH.md §9)
        past = other & ((t < ti) | ((t == ti) & (fr < fi)))
        future = other & ((t > ti) | ((t == ti) & (fr > fi)))
        kw = None
        if self.temporal:
            kv = torch.as_tensor(kernel((t - ti).abs()), dtype=torch.float64)
            kw = torch.where(past | future, kv, 0.0)
            if not bool(torch.isfinite(kw).all()):
                i, j = (int(x) for x in (~torch.isfinite(kw)).nonzero()[0])
                raise MessageStoreError(
                    f"read: the kernel {kernel!r} is {float(kw[i, j])} at time difference "
                    f"{float((t[i, j] - ti[i, 0]).abs())} ({self._where(keys, frames, i)}); "
                    f"kernel values must be finite")
        runs = self._frame_runs(fr) if self.scale == "frames" else None
        w_past, n_past = self._set_weights(past, kw, runs)
        w_future, n_future = self._set_weights(future, kw, runs)
        w_total, n_total = self._set_weights(other, None, runs)
        out = Incoming({}, {}, {}, n_past, n_future, n_total,
                       it.masked_fill(~valid, -1).amax(1), known)
        both = torch.stack([w_past, w_future], 1).to(self.dtype)  # (B, 2, C)
        alone = w_total[:, None, :].to(self.dtype)  # (B, 1, C)
        values = cells(self._data)  # (B, C, width): every field of every stored message
        split = self._split
        temporal = torch.bmm(both, values[..., :split]) if split else None  # (B, 2, ·)
        total = torch.bmm(alone, values[..., split:]) if split < self._width else None
        for f, (lo, hi) in self._columns.items():
            shape = self.fields[f]
            if f in self.temporal:
                out.past[f] = temporal[:, 0, lo:hi].reshape(b, *shape)
                out.future[f] = temporal[:, 1, lo:hi].reshape(b, *shape)
            else:
                out.total[f] = total[:, 0, lo - split:hi - split].reshape(b, *shape)
        if return_weights:
            out.weights = {"past": w_past.to(self.dtype), "future": w_future.to(self.dtype),
                           "total": w_total.to(self.dtype),
                           "frame": fr.masked_fill(~valid, -1),
                           "iteration": it.masked_fill(~valid, -1),
                           "time": t.masked_fill(~valid, float("nan")), "stored": valid}
        return out

    def messages(self, seq) -> dict[str, torch.Tensor]:
        """The stored messages of one sequence, newest first: ``{"frame", "iteration": (n,),
        "time": (n,), field: (n, *shape)}`` (for inspection and tests)."""
        keys = self.keys([seq] if not isinstance(seq, list | tuple) else seq)
        if keys.numel() != 1:
            raise MessageShapeError(f"messages(): one sequence id, got {seq!r}")
        slots, known = self._lookup(keys)
        s = int(slots[0])
        count = int(self._count[s]) if bool(known[0]) else 0
        pos = (count - 1 - self._ages[:min(count, self.capacity)]) % self.capacity
        n = pos.numel()
        out = {"frame": self._frame[s, pos], "iteration": self._iter[s, pos],
               "time": self._time[s, pos]}
        for f, (lo, hi) in self._columns.items():
            out[f] = self._data[s, pos, lo:hi].reshape(n, *self.fields[f])
        return {k: v.clone() for k, v in out.items()}

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything stored, as plain tensors (copies) and ints: every sequence's key
        (``keys``) and name, its write counter (``count``), its ring buffers (``time``,
        ``frame``, ``iteration``, ``field.<name>``) and ``last_iteration``. ``torch.save``
        it; :meth:`load_state_dict` restores it exactly (loadable with
        ``torch.load(..., weights_only=True)``)."""
        n = self._nseq
        state = {"format": _STATE_FORMAT, "capacity": self.capacity,
                 "fields": {f: list(s) for f, s in self.fields.items()},
                 "dtype": str(self.dtype).removeprefix("torch."),
                 "last_iteration": self.iteration, "keys": self._slot_keys.clone(),
                 "names": {k: v for k, v in self._names.items()}}
        for name, buf in self._buffers().items():
            state[name] = buf[:n].clone()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Replace the store's content by ``state`` (from :meth:`state_dict`, or
        :func:`merge_state_dicts` of a distributed store's shards). The read-time options
        (kernel, discount, scale, normalize, strict) are the store's own, not the state's.

        Raises MessageStoreError when the state is not a store's, or its capacity, fields or
        dtype differ from this store's."""
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT:
            raise MessageStoreError("load_state_dict: not a MessageStore state "
                                    f"(format {_STATE_FORMAT!r} expected)")
        fields = {f: tuple(s) for f, s in state["fields"].items()}
        dtype = str(self.dtype).removeprefix("torch.")
        if state["capacity"] != self.capacity or fields != self.fields \
                or state["dtype"] != dtype:
            raise MessageStoreError(
                f"load_state_dict: the state holds capacity {state['capacity']}, fields "
                f"{fields}, dtype {state['dtype']}; this store has capacity {self.capacity}, "
                f"fields {self.fields}, dtype {dtype}")
        keys = torch.as_tensor(state["keys"], dtype=torch.int64).to(self.device)
        n = keys.numel()
        self.clear()
        self._alloc(n)
        for name, buf in self._buffers().items():
            buf[:n].copy_(state[name])
        self._slot_keys = keys.clone()
        order = torch.argsort(keys)
        self._sorted_keys = keys[order]
        self._sorted_slots = torch.arange(n, device=self.device)[order]
        self._nseq = n
        self._names.update(state.get("names", {}))
        self._last_iteration = torch.tensor(int(state["last_iteration"]), dtype=torch.int64)

    def __repr__(self) -> str:
        return (f"MessageStore(fields={self.fields}, temporal={self.temporal}, "
                f"capacity={self.capacity}, kernel={self.kernel!r}, d={self.discount:g}, "
                f"h={self.scale}, sequences={len(self)}, dtype={self.dtype}, "
                f"device={self.device})")


def merge_state_dicts(states: Iterable[Mapping]) -> dict:
    """One :meth:`MessageStore.state_dict` from several with disjoint sequences (the shards
    of a :class:`~fieldlib.inference.messages_distributed.DistributedMessageStore`), so one
    process can load a distributed run's checkpoint (or re-shard it for another number of
    ranks). Raises MessageStoreError for states of different layouts or a sequence in two."""
    states = list(states)
    if not states:
        raise MessageStoreError("merge_state_dicts: no states")
    head = states[0]
    for s in states:
        if s.get("format") != _STATE_FORMAT or any(
                s[k] != head[k] for k in ("capacity", "fields", "dtype")):
            raise MessageStoreError("merge_state_dicts: states of different stores (format, "
                                    "capacity, fields or dtype differ)")
    merged = {k: head[k] for k in ("format", "capacity", "fields", "dtype")}
    merged["last_iteration"] = max(int(s["last_iteration"]) for s in states)
    merged["names"] = {k: v for s in states for k, v in s.get("names", {}).items()}
    for name in head:
        if isinstance(head[name], torch.Tensor):
            merged[name] = torch.cat([torch.as_tensor(s[name]).cpu() for s in states])
    if torch.unique(merged["keys"]).numel() != merged["keys"].numel():
        raise MessageStoreError("merge_state_dicts: a sequence appears in two states")
    return merged
