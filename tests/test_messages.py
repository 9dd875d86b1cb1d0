"""The message store of asynchronous training (MATH.md §4-5, Eq. 10; issue 10 part 1).

Eq. 10 by hand, against a plain-Python reference store and against the kernel sums of
KernelTemporal; eviction, recency, self-exclusion, checkpoints, every bad input; the same
tests on a one-rank DistributedMessageStore and ReplicatedMessageStore, and two processes
(spawned, gloo on 127.0.0.1) giving exactly what one process gives, with either store.
"""

from __future__ import annotations

import datetime
import io
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from spawned import reporting, run_ranks

from fieldlib.factors import FixedBeliefs, KernelTemporal
from fieldlib.inference import (
    DistributedMessageStore,
    MessageStore,
    ReplicatedMessageStore,
    merge_state_dicts,
)
from fieldlib.inference.messages import (
    InvalidMessageError,
    MessageShapeError,
    MessageStoreError,
    UnknownSequenceError,
    sequence_keys,
)
from fieldlib.kernels import GaussianKernel, KernelSum, temporal_sums
from fieldlib.variables import VariableArray

F64 = torch.float64


# -- a one-rank process group in this process, for the distributed store ----------------------
@pytest.fixture(scope="module")
def one_rank_group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=30))
        yield
        dist.destroy_process_group()
    else:  # pragma: no cover - a group made elsewhere
        yield


@pytest.fixture(params=["memory", "distributed", "replicated"])
def make_store(request):
    """The store classes under the same tests (distributed, replicated: one rank, gloo)."""
    if request.param == "memory":
        return MessageStore
    request.getfixturevalue("one_rank_group")
    return {"distributed": DistributedMessageStore,
            "replicated": ReplicatedMessageStore}[request.param]


# -- the reference: Eq. 10 written out with Python lists and floats -----------------------------
class ReferenceStore:
    def __init__(self, fields, temporal, capacity, sigma, discount, scale, normalize=True):
        self.fields, self.temporal, self.capacity = fields, temporal, capacity
        self.sigma, self.d, self.h, self.normalize = sigma, discount, scale, normalize
        self.seqs: dict = {}

    def write(self, seqs, frames, times, messages, iterations):
        rows = sorted(range(len(seqs)), key=lambda r: iterations[r])  # stable
        for r in rows:
            stored = self.seqs.setdefault(seqs[r], [])
            stored.insert(0, (frames[r], times[r], {f: messages[f][r].tolist()
                                                    for f in self.fields}))
            del stored[self.capacity:]

    def _combine(self, msgs, field, kernel):
        n = len(msgs)
        if n == 0:
            return [0.0] * self.fields[field][0]
        disc = [self.d ** r for r in range(n)]
        h = {"count": n, "frames": len({fj for _, _, fj in msgs})}.get(self.h, self.h)
        norm = h / sum(disc) if self.normalize else h
        out = [0.0] * self.fields[field][0]
        for r, (w_k, values, _) in enumerate(msgs):
            for u, v in enumerate(values[field]):
                out[u] += norm * disc[r] * (w_k if kernel else 1.0) * v
        return out

    def read(self, seq, frame, t):
        stored = self.seqs.get(seq, [])
        k = lambda dt: math.exp(-dt * dt / (2 * self.sigma ** 2))  # noqa: E731
        past = [(k(t - tj), v, fj) for fj, tj, v in stored
                if fj != frame and (tj < t or (tj == t and fj < frame))]
        future = [(k(tj - t), v, fj) for fj, tj, v in stored
                  if fj != frame and (tj > t or (tj == t and fj > frame))]
        total = [(1.0, v, fj) for fj, tj, v in stored if fj != frame]
        out = {}
        for f in self.fields:
            if f in self.temporal:
                out["past", f] = self._combine(past, f, True)
                out["future", f] = self._combine(future, f, True)
            else:
                out["total", f] = self._combine(total, f, False)
        return out, (len(past), len(future), len(total))


def check_against_reference(inc, ref, seqs, frames, times):
    for row, (s, fr, t) in enumerate(zip(seqs, frames, times)):
        want, counts = ref.read(s, fr, t)
        got_counts = (int(inc.n_past[row]), int(inc.n_future[row]), int(inc.n_total[row]))
        assert got_counts == counts, (row, s, fr)
        for (kind, f), values in want.items():
            got = getattr(inc, kind)[f][row]
            torch.testing.assert_close(got, torch.tensor(values, dtype=got.dtype),
                                       rtol=1e-12, atol=1e-12, msg=f"{kind} {f} row {row}")


FIELDS = {"K": (3,), "H": (2,)}


def random_batch(gen, pool, b, step):
    """A batch of b rows over the sequence pool (repeats likely), frames 0..5 at times
    frame // 2 (frames 0 and 1 share a time: ties broken by frame id), mixed iterations."""
    idx = torch.randint(len(pool), (b,), generator=gen).tolist()
    frames = torch.randint(6, (b,), generator=gen)
    times = (frames // 2).to(F64)
    k = torch.rand(b, 3, generator=gen, dtype=F64)
    h = torch.randn(b, 2, generator=gen, dtype=F64)
    its = 2 * step + torch.arange(b) % 2
    return [pool[i] for i in idx], frames, times, {"K": k / k.sum(1, keepdim=True), "H": h}, its


# -- Eq. 10 by hand -----------------------------------------------------------------------------
def hand_store(cls, **options):
    """Sequence 7: five messages written one by one, capacity 4 (the first is evicted)."""
    opts = dict(temporal=("K",), capacity=4, kernel=2.0, discount=0.5, scale=3.0, dtype=F64)
    opts.update(options)
    store = cls({"K": (2,), "H": (1,)}, **opts)
    rows = [(0, 0.0, [1.0, 0.0], 1.0, 1), (4, 4.0, [0.0, 1.0], 2.0, 2),
            (1, 1.0, [0.5, 0.5], 4.0, 3), (3, 3.0, [0.25, 0.75], 8.0, 4),
            (2, 2.0, [1.0, 1.0], 16.0, 5)]
    for frame, t, k, h, it in rows:
        store.write([7], [frame], [t], {"K": torch.tensor([k], dtype=F64),
                                        "H": torch.tensor([[h]], dtype=F64)}, it)
    return store


def k2(dt):
    return math.exp(-dt * dt / 8.0)  # Gaussian, σ = 2


def test_eq10_by_hand(make_store):
    store = hand_store(make_store)
    # stored newest first: frame 2 (it 5), 3 (it 4), 1 (it 3), 4 (it 2); frame 0 evicted
    inc = store.read([7, 7, 7, 7, 8], [2, 5, 9, 0, 1], [2.0, 2.5, 3.0, 3.0, 0.0])
    K = {f: torch.tensor(v, dtype=F64) for f, v in
         {1: [0.5, 0.5], 2: [1.0, 1.0], 3: [0.25, 0.75], 4: [0.0, 1.0]}.items()}
    H = {1: 4.0, 2: 16.0, 3: 8.0, 4: 2.0}
    want = {  # h / Σ_r d^r · Σ_r d^r k f, ranks newest first within each set
        "past": [3 * k2(1) * K[1],  # frame 2 reads: its own message skipped; past {1}
                 3 / 1.5 * (k2(0.5) * K[2] + 0.5 * k2(1.5) * K[1]),  # frame 5 at t 2.5
                 3 / 1.75 * (K[2] * k2(1) + 0.5 * K[3] + 0.25 * k2(2) * K[1]),  # 3 is past
                 3 / 1.5 * (k2(1) * K[2] + 0.5 * k2(2) * K[1]),
                 torch.zeros(2, dtype=F64)],
        "future": [3 / 1.5 * (k2(1) * K[3] + 0.5 * k2(2) * K[4]),
                   3 / 1.5 * (k2(0.5) * K[3] + 0.5 * k2(1.5) * K[4]),
                   3 * k2(1) * K[4],
                   3 / 1.5 * (K[3] + 0.5 * k2(1) * K[4]),  # frame 0 at t 3: frame 3 is later
                   torch.zeros(2, dtype=F64)],
        "total": [3 / 1.75 * (H[3] + 0.5 * H[1] + 0.25 * H[4]),
                  3 / 1.875 * (H[2] + 0.5 * H[3] + 0.25 * H[1] + 0.125 * H[4]),
                  3 / 1.875 * (H[2] + 0.5 * H[3] + 0.25 * H[1] + 0.125 * H[4]),
                  3 / 1.875 * (H[2] + 0.5 * H[3] + 0.25 * H[1] + 0.125 * H[4]), 0.0],
    }
    torch.testing.assert_close(inc.past["K"], torch.stack(want["past"]), rtol=1e-14, atol=0)
    torch.testing.assert_close(inc.future["K"], torch.stack(want["future"]), rtol=1e-14,
                               atol=0)
    torch.testing.assert_close(inc.total["H"][:, 0], torch.tensor(want["total"], dtype=F64),
                               rtol=1e-14, atol=0)
    assert inc.n_past.tolist() == [1, 2, 3, 2, 0]
    assert inc.n_future.tolist() == [2, 2, 1, 2, 0]
    assert inc.n_total.tolist() == [3, 4, 4, 4, 0]
    assert inc.newest.tolist() == [5, 5, 5, 5, -1]
    assert inc.known.tolist() == [True, True, True, True, False]
    assert set(inc.past) == set(inc.future) == {"K"} and set(inc.total) == {"H"}


def test_weights_newest_largest_normalised_and_scaled():
    ones = lambda dt: torch.ones_like(dt)  # noqa: E731  (kernel 1: weights are d^r only)
    for d, h in [(0.9, 1.0), (0.5, 2.5), (1.0, 4.0), (0.0, 1.0)]:
        store = MessageStore({"K": (1,)}, capacity=50, kernel=ones, discount=d, scale=h,
                             dtype=F64)
        for it in range(6):  # frames 0..5 at times 0..5, oldest first
            store.write([1], [it], [float(it)], {"K": torch.ones(1, 1, dtype=F64)}, it)
        inc = store.read([1], [9], [10.0], return_weights=True)
        w = inc.weights["past"][0]
        assert inc.weights["frame"][0, :6].tolist() == [5, 4, 3, 2, 1, 0]  # newest first
        assert inc.weights["iteration"][0, :6].tolist() == [5, 4, 3, 2, 1, 0]
        norm = h / sum(d ** r for r in range(6))
        torch.testing.assert_close(w[:6], torch.tensor([norm * d ** r for r in range(6)],
                                                       dtype=F64), rtol=1e-14, atol=0)
        assert bool((w[6:] == 0).all())
        assert float(w[0]) == float(w.max()) and float(w[0]) > 0  # the newest weighs most
        torch.testing.assert_close(w.sum(), torch.tensor(h, dtype=F64))  # h · normalised
        torch.testing.assert_close(inc.past["K"][0, 0], torch.tensor(h, dtype=F64))
        assert float(inc.future["K"].abs().sum()) == 0.0


def test_scale_count_and_unnormalised_give_the_kernel_sums_of_kerneltemporal():
    """d = 1 with h = n (or the frames, or no normalisation, h = 1) and every frame stored
    once: past and
    future are exactly fieldlib.kernels.temporal_sums, ties in time ordered by frame id as
    KernelTemporal orders them by position; µ applied after gives its FA + FB."""
    gen = torch.Generator().manual_seed(3)
    times = torch.tensor([0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 4.0, 7.5], dtype=F64)
    t_len, d = times.numel(), 3
    q = torch.rand(t_len, d, generator=gen, dtype=F64)
    q = q / q.sum(1, keepdim=True)
    mu = torch.randn(d, d, generator=gen, dtype=F64)
    for kernel in (GaussianKernel(2.0), KernelSum([GaussianKernel(1.0), GaussianKernel(5.0)],
                                                   [0.3, 1.2])):
        past, future = temporal_sums(kernel, times, q[None], method="dense")
        for options in (dict(scale="count"), dict(scale="frames"),
                        dict(normalize=False, scale=1.0)):
            store = MessageStore({"K": (d,)}, capacity=t_len, kernel=kernel, discount=1.0,
                                 dtype=F64, **options)
            order = torch.randperm(t_len, generator=gen)  # written in any order
            store.write([0] * t_len, order, times[order], {"K": q[order]}, 0)
            inc = store.read([0] * t_len, torch.arange(t_len), times)
            torch.testing.assert_close(inc.past["K"], past[0], rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(inc.future["K"], future[0], rtol=1e-13, atol=1e-15)
            frames = VariableArray("x", t_len, d)
            factor = KernelTemporal(frames, mu, times=times, kernel=kernel)
            fa_fb = factor.expected_messages(FixedBeliefs({"x": q}, 1))[frames].message[0]
            fa, fb = inc.kernel_messages(mu)
            torch.testing.assert_close(fa + fb, fa_fb, rtol=1e-12, atol=1e-13)


def repeated_frames_store(cls, scale, **options):
    """Sequence 1: frames 0, 1, 2 at times 0, 1, 2 written twice (iterations 1..6, values
    K = 1..6, H = 10..60), capacity 6 > 3 frames: every frame has two stored messages."""
    store = cls({"K": (1,), "H": (1,)}, temporal=("K",), capacity=6,
                kernel=lambda dt: torch.ones_like(dt), discount=0.5, scale=scale, dtype=F64,
                **options)
    for it in range(1, 7):
        fr = (it - 1) % 3
        store.write([1], [fr], [float(fr)], {"K": torch.tensor([[float(it)]], dtype=F64),
                                             "H": torch.tensor([[10.0 * it]], dtype=F64)}, it)
    return store


def test_scale_frames_counts_distinct_frames_by_hand(make_store):
    """capacity > frames: "count" takes h = the messages averaged, "frames" the distinct
    frames they come from; here every frame is stored twice, so count = 2 x frames."""
    rows = ([1, 1, 1], [1, 7, 0], [1.0, 1.5, 0.0])  # frame 1; a new frame 7; frame 0
    # newest first: (it 6, frame 2), (5, 1), (4, 0), (3, 2), (2, 1), (1, 0); kernel 1, d 0.5
    avg = {  # Σ_r d^r f / Σ_r d^r per set, ranks newest first within the set
        "past": [(4 + 0.5 * 1) / 1.5,  # frame 1: frame 0's messages (it 4, 1)
                 (5 + 0.5 * 4 + 0.25 * 2 + 0.125 * 1) / 1.875,  # frame 7: frames 1, 0
                 0.0],  # frame 0: nothing before
        "future": [(6 + 0.5 * 3) / 1.5,  # frame 1: frame 2's (it 6, 3)
                   (6 + 0.5 * 3) / 1.5,  # frame 7 at 1.5: frame 2's
                   (6 + 0.5 * 5 + 0.25 * 3 + 0.125 * 2) / 1.875],  # frame 0: frames 2, 1
        "total": [(60 + 0.5 * 40 + 0.25 * 30 + 0.125 * 10) / 1.875,
                  sum(0.5 ** r * 10 * v for r, v in enumerate([6, 5, 4, 3, 2, 1])) / 1.96875,
                  (60 + 0.5 * 50 + 0.25 * 30 + 0.125 * 20) / 1.875],
    }
    h = {"count": {"past": [2, 4, 0], "future": [2, 2, 4], "total": [4, 6, 4]},
         "frames": {"past": [1, 2, 0], "future": [1, 1, 2], "total": [2, 3, 2]}}
    for scale in ("count", "frames"):
        inc = repeated_frames_store(make_store, scale).read(*rows)
        for kind, field in (("past", "K"), ("future", "K"), ("total", "H")):
            want = torch.tensor([hh * a for hh, a in zip(h[scale][kind], avg[kind])], dtype=F64)
            torch.testing.assert_close(getattr(inc, kind)[field][:, 0], want, rtol=1e-14,
                                       atol=0, msg=f"{scale} {kind}")
        # n_* count the messages whatever the scale
        assert inc.n_past.tolist() == h["count"]["past"]
        assert inc.n_future.tolist() == h["count"]["future"]
        assert inc.n_total.tolist() == h["count"]["total"]
    unnormalised = repeated_frames_store(make_store, "frames", normalize=False).read(*rows)
    torch.testing.assert_close(unnormalised.total["H"][:, 0],  # h · Σ d^r f, h = frames
                               torch.tensor([2 * 88.75, 3 * 100.3125, 2 * 95.0], dtype=F64),
                               rtol=1e-14, atol=0)


def test_scale_frames_equals_count_with_one_message_a_frame(make_store):
    """Every frame with at most one stored message (written once each; or written in order
    with capacity < frames, so the kept messages are of distinct frames): "frames" and
    "count" give the same reads, bit for bit."""
    gen = torch.Generator().manual_seed(5)
    for capacity, t_len in ((12, 9), (4, 10)):
        frames = torch.randperm(t_len, generator=gen)
        times = torch.rand(t_len, generator=gen, dtype=F64).round() + frames // 2
        msgs = {"K": torch.rand(t_len, 3, generator=gen, dtype=F64),
                "H": torch.randn(t_len, 2, generator=gen, dtype=F64)}
        query = ([0] * (t_len + 2), torch.cat([torch.arange(t_len), torch.tensor([50, 51])]),
                 torch.cat([times[torch.argsort(frames)], torch.tensor([0.5, 99.0], dtype=F64)]))
        reads = []
        for scale in ("count", "frames"):
            store = make_store(FIELDS, temporal=("K",), capacity=capacity, kernel=2.0,
                               discount=0.8, scale=scale, dtype=F64)
            for i in range(t_len):
                store.write([0], frames[i:i + 1], times[i:i + 1],
                            {f: v[i:i + 1] for f, v in msgs.items()}, i)
            reads.append(_flat(store.read(*query)))
        assert all(torch.equal(reads[0][k], reads[1][k]) for k in reads[0]), (capacity, t_len)


def test_scale_frames_matches_the_reference_with_repeated_frames(make_store):
    gen = torch.Generator().manual_seed(2)
    pool = [3, "vid-A", 11]
    options = dict(temporal=("K",), capacity=9, discount=0.7, scale="frames")
    store = make_store(FIELDS, kernel=2.0, dtype=F64, **options)
    ref = ReferenceStore(FIELDS, sigma=2.0, **options)
    for step in range(8):  # frames 0..5, capacity 9: frames repeat among the stored messages
        seqs, frames, times, msgs, its = random_batch(gen, pool, [9, 4, 13][step % 3], step)
        store.write(seqs, frames, times, msgs, its)
        ref.write(seqs, frames.tolist(), times.tolist(), msgs, its.tolist())
        q_seqs, q_frames, q_times, _, _ = random_batch(gen, pool, 12, step)
        inc = store.read(q_seqs, q_frames, q_times)
        check_against_reference(inc, ref, q_seqs, q_frames.tolist(), q_times.tolist())


def test_eviction_order_and_batches_beyond_capacity(make_store):
    store = make_store({"K": (1,)}, capacity=3, dtype=F64)
    val = lambda xs: {"K": torch.tensor(xs, dtype=F64)[:, None]}  # noqa: E731
    store.write([5, 5], [0, 1], [0.0, 1.0], val([0, 1]), 0)
    store.write([5, 6, 5, 5, 5], [2, 0, 3, 4, 5], [2.0, 0, 3, 4, 5], val([2, 60, 3, 4, 5]),
                [1, 1, 2, 1, 3])  # rows ordered by iteration, then row: 2, 4, 3, 5
    local = getattr(store, "local", store)
    kept = local.messages(5)
    assert kept["frame"].tolist() == [5, 3, 4]  # newest first; 0, 1, 2 evicted (oldest)
    assert kept["iteration"].tolist() == [3, 2, 1]
    assert kept["K"][:, 0].tolist() == [5.0, 3.0, 4.0]
    assert local.messages(6)["frame"].tolist() == [0]
    assert local.messages(99)["frame"].numel() == 0
    assert store.iteration == 3
    store.write([5] * 7, list(range(10, 17)), [float(i) for i in range(7)],
                val(list(range(7))), 4)  # 7 rows of one sequence in one batch
    assert local.messages(5)["frame"].tolist() == [16, 15, 14]


def test_many_batches_with_repeated_sequences_match_the_reference(make_store):
    gen = torch.Generator().manual_seed(1)
    pool = [3, "vid-A", 11, "46GP8", 0]
    options = dict(temporal=("K",), capacity=4, discount=0.7, scale=1.5)
    store = make_store(FIELDS, kernel=2.0, dtype=F64, **options)
    ref = ReferenceStore(FIELDS, sigma=2.0, **options)
    for step in range(12):
        seqs, frames, times, msgs, its = random_batch(gen, pool, [9, 1, 0, 20][step % 4], step)
        store.write(seqs, frames, times, msgs, its)
        ref.write(seqs, frames.tolist(), times.tolist(), msgs, its.tolist())
        q_seqs, q_frames, q_times, _, _ = random_batch(gen, pool + ["never"], 16, step)
        q_times = q_times + 0.5 * torch.rand(16, generator=gen, dtype=F64).round()  # ties or not
        inc = store.read(q_seqs, q_frames, q_times)
        check_against_reference(inc, ref, q_seqs, q_frames.tolist(), q_times.tolist())
        assert inc.known.tolist() == [s in ref.seqs for s in q_seqs]


def test_no_stored_messages_read_zero_and_empty_batches(make_store):
    store = make_store(FIELDS, temporal=("K",), dtype=F64)
    inc = store.read(["new", 4], [0, 1], [0.0, 1.0])  # the paper's first pass
    assert float(inc.past["K"].abs().sum() + inc.future["K"].abs().sum()
                 + inc.total["H"].abs().sum()) == 0.0
    assert inc.past["K"].shape == (2, 3) and inc.total["H"].shape == (2, 2)
    store.write([], torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                {"K": torch.zeros(0, 3, dtype=F64), "H": torch.zeros(0, 2, dtype=F64)}, 0)
    inc = store.read(torch.zeros(0, dtype=torch.int64), [], [])
    assert inc.past["K"].shape == (0, 3) and inc.n_total.shape == (0,)
    # a frame alone in its sequence reads nothing, even after writing
    store.write([4], [1], [1.0], {"K": torch.ones(1, 3, dtype=F64),
                                  "H": torch.ones(1, 2, dtype=F64)}, 1)
    inc = store.read([4, 4], [1, 2], [1.0, 1.0])
    assert inc.n_total.tolist() == [0, 1] and float(inc.total["H"][0].abs().sum()) == 0.0


def test_state_dict_round_trip_continues_identically(make_store):
    gen = torch.Generator().manual_seed(2)
    pool = ["a", "b", 7, 8]
    store = make_store(FIELDS, temporal=("K",), capacity=3, kernel=1.0, dtype=F64)
    for step in range(4):
        store.write(*random_batch(gen, pool, 6, step))
    buf = io.BytesIO()
    torch.save(store.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = make_store(FIELDS, temporal=("K",), capacity=3, kernel=1.0, dtype=F64)
    resumed.load_state_dict(state)
    assert resumed.iteration == store.iteration == 7
    for step in range(4, 8):
        batch = random_batch(gen, pool, 5, step)
        store.write(*batch)
        resumed.write(*batch)
        q = random_batch(gen, pool, 8, step)[:3]
        a, b = store.read(*q), resumed.read(*q)
        for kind in ("past", "future", "total"):
            for f, v in getattr(a, kind).items():
                assert torch.equal(v, getattr(b, kind)[f])
        assert torch.equal(a.n_total, b.n_total) and torch.equal(a.newest, b.newest)
    sa, sb = store.state_dict(), resumed.state_dict()
    for k, v in sa.items():
        assert torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k], k
    other = MessageStore(FIELDS, capacity=4, dtype=F64)
    with pytest.raises(MessageStoreError, match="capacity"):
        other.load_state_dict(state)
    with pytest.raises(MessageStoreError, match="not a MessageStore state"):
        other.load_state_dict({"keys": torch.zeros(0)})


def test_bad_inputs_are_clear_errors(make_store):
    store = make_store(FIELDS, temporal=("K",), dtype=F64, strict=True)
    good = {"K": torch.ones(2, 3, dtype=F64), "H": torch.zeros(2, 2, dtype=F64)}
    store.write(["v1", 2], [0, 1], [0.0, 1.0], good, 0)

    def write(msgs=None, seqs=("v1", 2), frames=(3, 4), times=(0.0, 1.0), it=2):
        store.write(list(seqs), list(frames), list(times), msgs or good, it)

    write()

    with pytest.raises(UnknownSequenceError, match="'ghost'.*frame 5"):
        store.read(["v1", "ghost"], [1, 5], [0.0, 1.0])
    store.add_sequences(["ghost"])
    assert float(store.read(["ghost"], [5], [1.0]).past["K"].abs().sum()) == 0.0
    with pytest.raises(MessageShapeError, match="'K'.*'v1', frame 3.*\\(2, 4\\).*\\(2, 3\\)"):
        write({**good, "K": torch.ones(2, 4, dtype=F64)})
    with pytest.raises(InvalidMessageError, match="'H'.*float32.*float64"):
        write({**good, "H": torch.zeros(2, 2)})
    with pytest.raises(InvalidMessageError, match="'K'.*meta"):
        write({**good, "K": torch.ones(2, 3, dtype=F64, device="meta")})
    bad = good["H"].clone()
    bad[1, 1] = float("nan")
    with pytest.raises(InvalidMessageError, match="'H' of sequence 2, frame 4.*nan at \\(1,\\)"):
        write({**good, "H": bad})
    bad = good["K"].clone()
    bad[0, 2] = float("inf")
    with pytest.raises(InvalidMessageError, match="'K' of sequence 'v1', frame 3.*inf"):
        write({**good, "K": bad})
    with pytest.raises(MessageStoreError, match="missing \\['H'\\]"):
        write({"K": good["K"]})
    with pytest.raises(MessageStoreError, match="unknown \\['Q'\\]"):
        write({**good, "Q": good["K"]})
    with pytest.raises(MessageShapeError, match="frame ids of shape"):
        write(frames=(1,))
    with pytest.raises(MessageStoreError, match="frame ids must be integers"):
        write(frames=(1.0, 2.0))
    with pytest.raises(InvalidMessageError, match="'v1', frame 3: frame time nan"):
        write(times=(float("nan"), 1.0))
    with pytest.raises(InvalidMessageError, match="'v1', frame 3: iteration 1 is older than "
                       "iteration 2"):
        write(it=1)
    with pytest.raises(InvalidMessageError, match="iteration -1 is negative"):
        write(it=-1)
    for seq in (True, 1.5, -1, 2**62, ("a", 1), None):
        with pytest.raises(MessageStoreError, match="sequence id"):
            write(seqs=(seq, 2))
    with pytest.raises(MessageShapeError, match="a batch"):
        store.read("v1", [0], [0.0])
    assert store.iteration == 2  # nothing after the good write was stored
    kept = getattr(store, "local", store).messages("v1")
    assert kept["frame"].tolist() == [3, 0]


def test_bad_options():
    for kwargs, match in [(dict(capacity=0), "capacity"), (dict(discount=1.5), "discount"),
                          (dict(scale=0.0), "scale"), (dict(scale="mean"), "scale"),
                          (dict(temporal=("Z",)), "temporal"), (dict(dtype=torch.int64), "dtype"),
                          (dict(kernel=-1.0), "sigma")]:
        with pytest.raises(MessageStoreError if "sigma" not in match else ValueError,
                           match=match):
            MessageStore(FIELDS, **kwargs)
    with pytest.raises(MessageStoreError, match="'K': sizes must be >= 1"):
        MessageStore({"K": (0,)})
    with pytest.raises(MessageStoreError, match="a shape is a tuple of ints"):
        MessageStore({"K": "38"})


def test_sequence_keys_and_message_bytes():
    names = {}
    keys = sequence_keys(["46GP8", 3, "46GP8"], names)
    assert keys[0] == keys[2] and keys[1] == 3 and int(keys[0]) >= 2**62
    assert names[int(keys[0])] == "46GP8"
    assert torch.equal(sequence_keys(torch.tensor([4, 5], dtype=torch.int32)),
                       torch.tensor([4, 5]))
    store = MessageStore.temporal_field(38, 30)
    assert store.message_bytes == 24 + (38 + 38 + 30 + 30) * 4 == 568
    assert store.temporal == ("K", "K_star")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_store_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    stores = [MessageStore(FIELDS, temporal=("K",), capacity=4, kernel=2.0, dtype=F64,
                           device=dev) for dev in ("cpu", "cuda")]
    for step in range(5):
        seqs, frames, times, msgs, its = random_batch(gen, [1, "x", 5], 12, step)
        q = random_batch(gen, [1, "x", 5, 9], 10, step)[:3]
        for st in stores:
            st.write(seqs, frames, times, {f: v.to(st.device) for f, v in msgs.items()}, its)
        a, b = (st.read(*q) for st in stores)
        for kind in ("past", "future", "total"):
            for f, v in getattr(a, kind).items():
                torch.testing.assert_close(getattr(b, kind)[f].cpu(), v, rtol=1e-12, atol=1e-14)
        assert torch.equal(a.n_total, b.n_total.cpu())
    with pytest.raises(InvalidMessageError, match="cuda"):
        stores[1].write([1], [0], [0.0], {"K": torch.ones(1, 3, dtype=F64),
                                          "H": torch.ones(1, 2, dtype=F64)}, 10)


# -- two processes ------------------------------------------------------------------------------
WORLD = 2
POOL = [3, "vid-A", 11, "46GP8", 0, 8]
OPTIONS = dict(temporal=("K",), capacity=4, kernel=2.0, discount=0.7, scale=1.5, dtype=F64)


def schedule(step, rank):
    """Rank ``rank``'s write batch and read queries at ``step`` (the same in every process)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    w = random_batch(gen, POOL, [5, 0, 9, 3][(step + rank) % 4], step)
    q = random_batch(gen, POOL + ["never"], [7, 2, 0, 11][(step + 2 * rank) % 4], step)[:3]
    return w, q


def _cat(batches):
    seqs = sum((b[0] for b in batches), [])
    out = [seqs]
    for i in range(1, len(batches[0])):
        if isinstance(batches[0][i], dict):
            out.append({f: torch.cat([b[i][f] for b in batches]) for f in batches[0][i]})
        else:
            out.append(torch.cat([torch.as_tensor(b[i]) for b in batches]))
    return out


def _flat(inc):
    return {**{("past", f): v for f, v in inc.past.items()},
            **{("future", f): v for f, v in inc.future.items()},
            **{("total", f): v for f, v in inc.total.items()},
            "n": torch.stack([inc.n_past, inc.n_future, inc.n_total, inc.newest]),
            "known": inc.known}


def _nan_on_rank_1(store, rank) -> str:
    """A write whose row holds NaN on rank 1: the error each rank raises (or "")."""
    bad = {"K": torch.ones(1, 3, dtype=F64), "H": torch.zeros(1, 2, dtype=F64)}
    if rank == 1:
        bad["H"][0, 0] = float("nan")
    try:
        store.write([3], [0], [0.0], bad, 100)
    except MessageStoreError as exc:
        return type(exc).__name__ + ": " + str(exc)
    return ""


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = {}
    try:
        try:
            DistributedMessageStore(FIELDS)
        except MessageStoreError as exc:
            result["uninitialised"] = str(exc)
        dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=30))
        store = DistributedMessageStore(FIELDS, **OPTIONS)
        reads, calls = [], []
        for step in range(8):
            (seqs, frames, times, msgs, its), query = schedule(step, rank)
            before = store.collective_calls
            if step % 2:  # a step's write and the next batch's read in one exchange
                reads.append(_flat(store.write_read((seqs, frames, times, msgs, its), query)))
                calls.append((store.collective_calls - before,))
                continue
            store.write(seqs, frames, times, msgs, its)
            middle = store.collective_calls
            reads.append(_flat(store.read(*query)))
            calls.append((middle - before, store.collective_calls - middle))
        result.update(reads=reads, calls=calls, state=store.state_dict(),
                      iteration=store.iteration)
        # h = the distinct frames, counted by each sequence's owner
        frames_store = DistributedMessageStore(FIELDS, **{**OPTIONS, "scale": "frames"})
        result["frames_reads"] = [_flat(frames_store.write_read(*schedule(step, rank)))
                                  for step in range(8)]
        # a one-process state re-sharded: each rank keeps the sequences it owns
        single = MessageStore(FIELDS, **OPTIONS)
        for step in range(8):
            single.write(*_cat([schedule(step, r)[0] for r in range(WORLD)]))
        reshard = DistributedMessageStore(FIELDS, **OPTIONS)
        reshard.load_state_dict(single.state_dict())
        result["reshard_equal"] = len(reshard) == len(store) and all(
            torch.equal(a, b) for seq in POOL
            for a, b in zip(reshard.local.messages(seq).values(),
                            store.local.messages(seq).values()))
        # errors are raised on every rank together, nothing stored, no hang
        errors = [_nan_on_rank_1(store, rank)]
        strict = DistributedMessageStore(FIELDS, strict=True, **OPTIONS)
        strict.load_state_dict(result["state"])
        try:
            strict.read(["never"] if rank == 0 else [], [0] if rank == 0 else [],
                        [0.0] if rank == 0 else [])
        except MessageStoreError as exc:
            errors.append(type(exc).__name__ + ": " + str(exc))
        result["errors"] = errors
        # a resumed shard continues as the original
        result["resumed_equal"] = _continues_alike(store, DistributedMessageStore,
                                                   result["state"], *schedule(8, rank))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # pragma: no cover - reported by the parent
        result["failure"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _assert_rank_rows(got, want, sizes, r, step) -> None:
    """Rank r's read (rows ``sizes[r]``) is its part of one store's read, bit for bit."""
    lo = sum(sizes[:r])
    for key, value in want.items():
        part = value[..., lo:lo + sizes[r]] if key == "n" else value[lo:lo + sizes[r]]
        assert torch.equal(got[key], part), (step, r, key)


def test_two_processes_give_the_messages_of_one(tmp_path):
    results = run_ranks(_worker, tmp_path, WORLD, "two-process store test")
    single = MessageStore(FIELDS, **OPTIONS)
    for step in range(8):
        batches = [schedule(step, r) for r in range(WORLD)]
        single.write(*_cat([b[0] for b in batches]))
        sizes = [len(b[1][0]) for b in batches]
        want = _flat(single.read(*_cat([b[1] for b in batches])))
        for r in range(WORLD):
            _assert_rank_rows(results[r]["reads"][step], want, sizes, r, step)
            # a fixed number of collectives: write 2, read 3, write_read 3
            assert results[r]["calls"][step] == ((3,) if step % 2 else (2, 3))
    assert all(res["iteration"] == single.iteration for res in results)
    frames = MessageStore(FIELDS, **{**OPTIONS, "scale": "frames"})
    for step in range(8):
        batches = [schedule(step, r) for r in range(WORLD)]
        want = _flat(frames.write_read(_cat([b[0] for b in batches]),
                                       _cat([b[1] for b in batches])))
        sizes = [len(b[1][0]) for b in batches]
        for r in range(WORLD):
            lo, got = sum(sizes[:r]), results[r]["frames_reads"][step]
            for key, value in want.items():
                part = value[..., lo:lo + sizes[r]] if key == "n" else value[lo:lo + sizes[r]]
                assert torch.equal(got[key], part), ("frames", step, r, key)
    # the shards together are the single store
    merged = MessageStore(FIELDS, **OPTIONS)
    merged.load_state_dict(merge_state_dicts([res["state"] for res in results]))
    for s in POOL:
        a, b = merged.messages(s), single.messages(s)
        assert all(torch.equal(a[k], b[k]) for k in a), s
    # every rank raised, with its own message or the faulty rank named
    assert "nan" in results[1]["errors"][0] and "rank(s) [1]" in results[0]["errors"][0]
    assert results[0]["errors"][1].startswith("UnknownSequenceError") \
        and "'never'" in results[0]["errors"][1]
    assert results[1]["errors"][1].startswith("UnknownSequenceError")
    assert all(res["resumed_equal"] and res["reshard_equal"] for res in results)
    assert "init_process_group" in results[0]["uninitialised"]


def _continues_alike(store, kind, state, write, query) -> bool:
    """Whether a store of ``kind`` loaded from ``state`` continues as ``store`` does."""
    resumed = kind(FIELDS, **OPTIONS)
    resumed.load_state_dict(state)
    for s in (store, resumed):
        s.write(*write)
    return all(torch.equal(a, b) for a, b in zip(_flat(store.read(*query)).values(),
                                                 _flat(resumed.read(*query)).values()))


def _replicated_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with reporting(rank, out_dir) as result:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=30))
        store = ReplicatedMessageStore(FIELDS, **OPTIONS)
        reads, calls = [], []
        for step in range(8):
            w, query = schedule(step, rank)
            before = store.collective_calls
            if step % 3 == 1:  # posted, completed by the read
                store.write(*w, wait=False)
                reads.append(_flat(store.read(*query)))
            elif step % 3 == 2:
                reads.append(_flat(store.write_read(w, query)))
            else:
                store.write(*w)
                reads.append(_flat(store.read(*query, return_weights=True)))
            calls.append(store.collective_calls - before)
        result.update(reads=reads, calls=calls, state=store.state_dict(),
                      iteration=store.iteration)
        # errors: every rank raises, the faulty one its own error, nothing stored
        errors = [_nan_on_rank_1(store, rank)]
        # a posted write's error reaches the other rank at its next call
        late = {"K": torch.ones(1, 3, dtype=F64), "H": torch.zeros(1, 2, dtype=F64)}
        try:
            store.write([3], [0], [0.0], late, 0 if rank == 0 else 100, wait=False)
            store.read([3], [1], [0.0])
        except MessageStoreError as exc:
            errors.append(type(exc).__name__ + ": " + str(exc))
        result["errors"] = errors
        result["after_errors"] = store.state_dict()
        store.add_sequences(["only-" + str(rank)] * (rank + 1))
        result["sequences"] = len(store)
        # a resumed copy continues as the original
        w, query = schedule(8, rank)
        result["resumed_equal"] = _continues_alike(store, ReplicatedMessageStore,
                                                   result["state"], (*w[:4], 200), query)
        dist.barrier()
        dist.destroy_process_group()


def test_two_processes_replicated_give_the_messages_of_one(tmp_path):
    results = run_ranks(_replicated_worker, tmp_path, WORLD, "two-process replicated test")
    single = MessageStore(FIELDS, **OPTIONS)
    bound = 0
    for step in range(8):
        batches = [schedule(step, r) for r in range(WORLD)]
        single.write(*_cat([b[0] for b in batches]))
        sizes = [len(b[1][0]) for b in batches]
        want = _flat(single.read(*_cat([b[1] for b in batches])))
        written = max(len(b[0][0]) for b in batches)
        for r in range(WORLD):
            _assert_rank_rows(results[r]["reads"][step], want, sizes, r, step)
            # one all_gather a write; a second only when a batch is larger than the largest
            # of the previous write
            assert results[r]["calls"][step] == 1 + (written > bound), (step, r)
        bound = written
    want = single.state_dict()
    for res in results:
        assert res["iteration"] == single.iteration
        for key in ("keys", "count", "time", "frame", "iteration", "field.K", "field.H"):
            assert torch.equal(res["state"][key], want[key]), key
        # neither failed write stored anything
        assert torch.equal(res["after_errors"]["field.K"], want["field.K"])
        assert res["after_errors"]["last_iteration"] == want["last_iteration"]
    errors = [res["errors"] for res in results]
    assert "nan" in errors[1][0] and "rank(s) [1]" in errors[0][0]
    assert "iteration 0 is older" in errors[0][1] and "rank(s) [0]" in errors[1][1]
    # add_sequences: every rank knows both ranks' new sequences
    assert results[0]["sequences"] == results[1]["sequences"] == len(single) + 2
    assert all(res["resumed_equal"] for res in results)
