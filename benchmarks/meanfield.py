"""Mean-field benchmark: the general engine on a Charades-sized temporal field.

    .venv/bin/python benchmarks/meanfield.py [--repeats 21] [--lengths 25,1000,10000,100000]
        [--threads N] [--naive-repeats 1] [--parts 1,2]

Part 1: batch of 32 videos x 25 frames, 471 states a frame mapped onto 38 objects, 30
intents, σ = 150 frames (frames 30 apart), 10 synchronous passes (Eq. 5-6), float32, with
φXI in both of its forms:

* ``object``: φXI per object, ``FrameIntent(..., component="o")``, table (N, T, 38, 30);
* ``state``: φXI per frame state, ``FrameIntent(..., component=None)``, table
  (N, T, 471, 30), 43 MiB.

For each form:

* ``engine``: ``get_engine("meanfield", schedule="synchronous", max_iter=10, tol=0,
  track_elbo=False)`` on a FactorGraph built through the public API (unary Table,
  FrameIntent, KernelTemporal): the whole call (set-up, 10 passes, final ELBO, marginals),
  and its 10 passes alone (``info["sweep_seconds"]``);
* ``hand``: the same equations as one single-purpose tensor program (messages on the object
  marginals, dense 25 x 25 kernel, each product laid out for one matmul), from the same
  unary-only start;
* for the object form, ``naive loop``: a Python loop over videos and frames.

Engine and hand runs alternate (paired, the order swapped every repeat) and the medians are
printed, the ratio as the median of the paired ratios with its quartiles, so load on the
machine affects both alike. All must agree (max |ΔQ| printed, asserted < 1e-4).

Then a per-factor breakdown: each factor's ``expected_messages`` (one direction at a time,
from a fixed Q) against the hand program's step that computes the same message. ``Table
(frames, intent)`` is the per-state φXI written as a plain position-wise Table over
(frames, intent) (the generic table path); ``Component`` is a unary φ(o, p) gathered onto the
states; the ``unary Table`` message is the table itself (the hand program has no step).

Part 2: one video of T frames (1 frame per time unit, σ 150): graph building, the first
engine call on the new graph with one synchronous pass (after one untimed call on another
graph: process warm-up) split into set-up (``info["setup_seconds"]``: layout, factor split,
constant messages, initial Q), the pass (``info["sweep_seconds"]``), and the rest (final
ELBO); the median call over repeats; and one pass of frame messages from a fixed Q. The
kernel sums switch from dense to FFT above 64 frames.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fieldlib import BlockDomain, Component, FactorGraph, FrameIntent, KernelTemporal, Table
from fieldlib.inference import get_engine
from fieldlib.inference.meanfield_state import MeanFieldState

N, T, S, D, I = 32, 25, 471, 38, 30
SIGMA, SPACING, PASSES = 150.0, 30.0, 10
FORMS = ("object", "state")


def make_inputs(n=N, t=T, seed=0, dtype=torch.float32, state_table=True):
    gen = torch.Generator().manual_seed(seed)
    obj = torch.cat([torch.arange(D), torch.randint(D, (S - D,), generator=gen)])
    x = {
        "obj": obj,
        "unary": torch.randn(n, t, S, generator=gen).to(dtype),
        "xi": (0.5 * torch.randn(n, t, D, I, generator=gen)).to(dtype),
        "mu": (0.05 * torch.randn(D, D, generator=gen)).to(dtype),
        "times": (torch.arange(t) * SPACING).to(dtype),
        "op": torch.randn(n, t, D, 3, generator=gen).to(dtype),
        "prog": torch.randint(3, (S,), generator=gen),
    }
    if state_table:
        x["xi_state"] = (0.5 * torch.randn(n, t, S, I, generator=gen)).to(dtype)
    return x


def domain(x):
    return BlockDomain({"o": D, "p": 3, "k": S},
                       torch.stack([x["obj"], x["prog"], torch.arange(S)], 1))


def build_graph(x, form="object"):
    """The model through the public API: unary Table, FrameIntent (φXI per object or per
    state), KernelTemporal on the objects."""
    t = x["unary"].shape[1]
    g = FactorGraph()
    frames = g.array("x", t, domain(x))
    intent = g.variable("I", I)
    fi = (FrameIntent(frames, intent, x["xi"], component="o") if form == "object" else
          FrameIntent(frames, intent, x["xi_state"], component=None))
    g.add(Table(frames, x["unary"]), fi,
          KernelTemporal(frames, x["mu"], times=x["times"], kernel=SIGMA, component="o"))
    return g


# -- hand-vectorised references: Eq. 5-6 as one tensor program per φXI form -----------------
def _kernel(x):
    tt = x["times"]
    return torch.exp(-(tt[None, :] - tt[:, None]) ** 2 / (2 * SIGMA**2)).triu(1)


def hand_object(x, passes=PASSES):
    """φXI per object: every message on the 38 object marginals, gathered onto the states."""
    unary, mu, obj = x["unary"], x["mu"], x["obj"]
    n, t, s = unary.shape
    k = _kernel(x)
    xi = x["xi"].reshape(n, t * D, I)
    idx = obj.expand(n, t, s)
    q = torch.softmax(unary, -1)
    qi = torch.full((n, I), 1.0 / I, dtype=unary.dtype)
    qc = unary.new_zeros(n, t, D).index_add_(-1, obj, q)
    for _ in range(passes):
        m = ((k @ qc) @ mu.T + (k.T @ qc) @ mu  # FA + FB (Eq. 5)
             + (qi[:, None] @ xi.transpose(1, 2)).view(n, t, D))  # Σ_I Q_I φXI
        q = torch.softmax(unary + m.gather(-1, idx), -1)
        qc = unary.new_zeros(n, t, D).index_add_(-1, obj, q)
        qi = torch.softmax((qc.view(n, 1, t * D) @ xi).view(n, I), -1)  # Eq. 6
    return q, qi


def hand_state(x, passes=PASSES):
    """φXI per state: the intent messages on the 471 states, FA + FB on the objects."""
    unary, mu, obj = x["unary"], x["mu"], x["obj"]
    n, t, s = unary.shape
    k = _kernel(x)
    xi = x["xi_state"].reshape(n, t * s, I)
    idx = obj.expand(n, t, s)
    q = torch.softmax(unary, -1)
    qi = torch.full((n, I), 1.0 / I, dtype=unary.dtype)
    qc = unary.new_zeros(n, t, D).index_add_(-1, obj, q)
    for _ in range(passes):
        m = (k @ qc) @ mu.T + (k.T @ qc) @ mu
        mx = (qi[:, None] @ xi.transpose(1, 2)).view(n, t, s)
        q = torch.softmax(unary + mx + m.gather(-1, idx), -1)
        qc = unary.new_zeros(n, t, D).index_add_(-1, obj, q)
        qi = torch.softmax((q.view(n, 1, t * s) @ xi).view(n, I), -1)
    return q, qi


HAND = {"object": hand_object, "state": hand_state}


def naive_loop(x, passes=PASSES):
    """The object form with a Python loop over videos and frames (one frame's messages at a
    time, each a kernel-weighted sum over the video's other frames)."""
    unary, xi, mu, obj = x["unary"], x["xi"], x["mu"], x["obj"]
    n, t, _ = unary.shape
    tt = x["times"]
    k = torch.exp(-(tt[None, :] - tt[:, None]) ** 2 / (2 * SIGMA**2))
    q = torch.softmax(unary, -1)
    qi = torch.full((n, I), 1.0 / I, dtype=unary.dtype)
    for _ in range(passes):
        new = torch.empty_like(q)
        for b in range(n):
            qc = unary.new_zeros(t, D).index_add_(-1, obj, q[b])  # object marginals
            for i in range(t):
                fa = (k[i, i + 1:] @ qc[i + 1:]) @ mu.T  # Σ_{j>i} k(i,j) Σ_u Q_j(u) µ(x,u)
                fb = (k[:i, i] @ qc[:i]) @ mu  # Σ_{j<i} k(j,i) Σ_u Q_j(u) µ(u,x)
                m = fa + fb + xi[b, i] @ qi[b]
                new[b, i] = torch.softmax(unary[b, i] + m[obj], -1)
        q = new
        for b in range(n):
            h = torch.zeros(I, dtype=unary.dtype)
            for j in range(t):
                h = h + unary.new_zeros(D).index_add_(0, obj, q[b, j]) @ xi[b, j]
            qi[b] = torch.softmax(h, -1)
    return q, qi


# -- timing ------------------------------------------------------------------------------------
def _clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def paired(fns, repeats):
    """Run the callables of ``fns`` in turn ``repeats`` times, rotating the order each
    repeat; returns per callable the list of times and the last output."""
    times = [[] for _ in fns]
    outs = [None] * len(fns)
    for fn in fns:  # warm-up (allocator, kernels), not timed
        fn()
    for r in range(repeats):
        order = list(range(len(fns)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            dt, outs[i] = _clock(fns[i])
            times[i].append(dt)
    return times, outs


def _quartiles(values):
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def _load():
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


# -- part 1 ------------------------------------------------------------------------------------
def part1(x, repeats, naive_repeats):
    engine = get_engine("meanfield", schedule="synchronous", max_iter=PASSES, tol=0.0,
                        track_elbo=False)
    print(f"Part 1. Charades-sized field: batch {N}, {T} frames, {S} states -> {D} objects, "
          f"{I} intents, sigma {SIGMA:g} frames, {PASSES} synchronous passes, float32, "
          f"{torch.get_num_threads()} threads; engine and hand paired, {repeats} repeats, "
          f"medians")
    print()
    print("| φXI form | engine call ms/pass | engine passes ms/pass | hand ms/pass | "
          "call / hand (q1-q3) | passes / hand (q1-q3) | max abs dQ |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for form in FORMS:
        g = build_graph(x, form)
        hand = HAND[form]
        infos = []

        def call(g=g, infos=infos):
            r = engine(g)
            infos.append(r.info)
            return r

        (te, th), (r, (q_h, qi_h)) = paired([call, lambda hand=hand: hand(x)], repeats)
        infos = infos[1:]  # the warm-up call is not timed
        sweeps = [i["sweep_seconds"] for i in infos] if "sweep_seconds" in r.info else None
        d = max(float((r.marginals["x"] - q_h).abs().max()),
                float((r.marginals["I"] - qi_h).abs().max()))
        assert d < 1e-4, (form, d)
        ratio = [a / b for a, b in zip(te, th)]
        lo, hi = _quartiles(ratio)
        e_ms, h_ms = 1e3 * statistics.median(te) / PASSES, 1e3 * statistics.median(th) / PASSES
        if sweeps is not None:
            # the passes alone: the sweep time of each paired engine call
            sw = [s / h for s, h in zip(sweeps, th)]
            slo, shi = _quartiles(sw)
            s_ms = 1e3 * statistics.median(sweeps) / PASSES
            s_txt = f"{s_ms:.2f}", f"{statistics.median(sw):.2f}x ({slo:.2f}-{shi:.2f})"
        else:
            s_txt = "n/a", "n/a"
        print(f"| {form} | {e_ms:.2f} | {s_txt[0]} | {h_ms:.2f} | "
              f"{statistics.median(ratio):.2f}x ({lo:.2f}-{hi:.2f}) | {s_txt[1]} | {d:.1e} |")
        rows[form] = (r, e_ms, h_ms)
    if naive_repeats:
        tn = []
        for _ in range(naive_repeats):
            dt, (q_n, qi_n) = _clock(lambda: naive_loop(x))
            tn.append(dt)
        r = rows["object"][0]
        d = max(float((r.marginals["x"] - q_n).abs().max()),
                float((r.marginals["I"] - qi_n).abs().max()))
        assert d < 1e-4, d
        n_ms = 1e3 * min(tn) / PASSES
        print(f"| object, naive loop (videos x frames) | | | {n_ms:.2f} (best of "
              f"{naive_repeats}) | {n_ms / rows['object'][2]:.1f}x of hand | | {d:.1e} |")
    print()


# -- per-factor breakdown ----------------------------------------------------------------------
def breakdown(x, repeats):
    """Each factor's messages in one direction from a fixed Q, vs the hand program's step."""
    n, t, s = x["unary"].shape
    gen = torch.Generator().manual_seed(3)
    q = torch.softmax(torch.randn(n, t, s, generator=gen), -1)
    qi = torch.softmax(torch.randn(n, I, generator=gen), -1)
    obj, mu, k = x["obj"], x["mu"], _kernel(x)
    xo = x["xi"].reshape(n, t * D, I)
    xs = x["xi_state"].reshape(n, t * s, I)
    op = x["op"]
    pidx = (x["obj"] * 3 + x["prog"]).expand(n, t, s)

    g = FactorGraph()
    frames = g.array("x", t, domain(x))
    intent = g.variable("I", I)
    unary = Table(frames, x["unary"])
    comp = Component(frames, ("o", "p"), op)
    fio = FrameIntent(frames, intent, x["xi"], component="o")
    fis = FrameIntent(frames, intent, x["xi_state"], component=None)
    tab = Table([frames, intent], x["xi_state"])
    kt = KernelTemporal(frames, mu, times=x["times"], kernel=SIGMA, component="o")
    g.add(unary, comp, fio, fis, tab, kt)
    state = MeanFieldState.from_marginals(g, {"x": q, "I": qi}, n)
    fg, ig = state.layout.locate(frames)[0], state.layout.locate(intent)[0]

    def engine(f, group):
        def run():
            state.set_group(fg, q)  # a fresh Q: no cached component marginal
            state.set_wants({group: None})
            return f.expected_messages(state)
        return run

    def qc_():
        return q.new_zeros(n, t, D).index_add_(-1, obj, q)

    def h_kt():
        c = qc_()
        return (k @ c) @ mu.T + (k.T @ c) @ mu

    rows = [
        ("unary Table -> frames", engine(unary, fg), None),
        ("Component (o, p) -> frames", engine(comp, fg),
         lambda: op.reshape(n, t, -1).gather(-1, pidx)),
        ("FrameIntent object -> frames", engine(fio, fg),
         lambda: (qi[:, None] @ xo.transpose(1, 2)).view(n, t, D)),
        ("FrameIntent object -> intent", engine(fio, ig),
         lambda: (qc_().view(n, 1, t * D) @ xo).view(n, I)),
        ("FrameIntent state -> frames", engine(fis, fg),
         lambda: (qi[:, None] @ xs.transpose(1, 2)).view(n, t, s)),
        ("FrameIntent state -> intent", engine(fis, ig),
         lambda: (q.view(n, 1, t * s) @ xs).view(n, I)),
        ("Table (frames, intent) -> frames", engine(tab, fg),
         lambda: (qi[:, None] @ xs.transpose(1, 2)).view(n, t, s)),
        ("Table (frames, intent) -> intent", engine(tab, ig),
         lambda: (q.view(n, 1, t * s) @ xs).view(n, I)),
        ("KernelTemporal -> frames", engine(kt, fg), h_kt),
    ]
    print(f"Per-factor messages, one direction, from a fixed Q (batch {n}, {t} frames); "
          f"engine = the factor's expected_messages, hand = the step computing the same "
          f"message; paired, {repeats} repeats, medians")
    print()
    print("| factor -> to | engine ms | hand ms | engine / hand (q1-q3) |")
    print("|---|---|---|---|")
    for name, e, h in rows:
        if h is None:
            (te,), _ = paired([e], repeats)
            print(f"| {name} | {1e3 * statistics.median(te):.3f} | (the table) | |")
            continue
        (te, th), (out, ref) = paired([e, h], repeats)
        m = next(iter(out.values()))
        m = getattr(m, "message", m)
        if m.shape != ref.shape:  # a message on the objects vs one on the states
            m = m.gather(-1, obj.expand(n, t, s)) if m.shape[-1] == D else m
        assert torch.allclose(m.reshape(ref.shape), ref, atol=1e-4), name
        ratio = [a / b for a, b in zip(te, th)]
        lo, hi = _quartiles(ratio)
        print(f"| {name} | {1e3 * statistics.median(te):.3f} | "
              f"{1e3 * statistics.median(th):.3f} | {statistics.median(ratio):.2f}x "
              f"({lo:.2f}-{hi:.2f}) |")
    print()


# -- part 2 ------------------------------------------------------------------------------------
def part2(lengths, repeats):
    print("Part 2. One video of T frames (1 frame per time unit, sigma 150), object form, one "
          "synchronous pass: graph building (user side), the first engine call split into "
          "set-up / pass / rest (final ELBO), the median call over repeats, and the frame "
          "messages of one pass (FA + FB + intent) from a fixed Q")
    print()
    print("| frames T | kernel sums | build graph ms | first call ms | set-up ms | pass ms | "
          "rest ms | median call ms | us / frame | messages ms | us / frame |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    one = get_engine("meanfield", schedule="synchronous", max_iter=1, tol=0.0,
                     track_elbo=False)
    warm = make_inputs(1, 25, seed=2, state_table=False)
    one(build_graph(warm, "object"), marginals=False)  # process warm-up, not timed
    for t in lengths:
        y = make_inputs(1, t, seed=1, state_table=False)
        y["times"] = torch.arange(t, dtype=torch.float32)  # one frame per time unit
        tb, gt = _clock(lambda y=y: build_graph(y, "object"))
        tf, r = _clock(lambda gt=gt: one(gt, marginals=False))
        setup = r.info.get("setup_seconds")
        sweep = r.info.get("sweep_seconds")
        reps = max(3, min(repeats, int(2e5 // (t * 10))))
        calls = [_clock(lambda gt=gt: one(gt, marginals=False))[0] for _ in range(reps)]
        q = _fixed_q(gt)
        msgs = [_clock(lambda gt=gt, q=q: frame_messages(gt, q))[0] for _ in range(reps)]
        tc, tm = statistics.median(calls), statistics.median(msgs)
        method = "dense" if t <= 64 else "fft"
        split = ("n/a", "n/a", "n/a") if setup is None else (
            f"{1e3 * setup:.1f}", f"{1e3 * sweep:.1f}", f"{1e3 * (tf - setup - sweep):.1f}")
        print(f"| {t:,} | {method} | {1e3 * tb:.1f} | {1e3 * tf:.1f} | {split[0]} | "
              f"{split[1]} | {split[2]} | {1e3 * tc:.1f} | {1e6 * tc / t:.1f} | "
              f"{1e3 * tm:.2f} | {1e6 * tm / t:.2f} |")
    print()


def _fixed_q(graph):
    frames = graph.arrays["x"]
    gen = torch.Generator().manual_seed(0)
    return {"x": torch.softmax(torch.randn(1, frames.size, S, generator=gen), -1),
            "I": torch.full((1, I), 1.0 / I)}


def frame_messages(graph, q):
    """The messages every frame receives in one pass, from the fixed Q ``q``."""
    state = MeanFieldState.from_marginals(graph, q, 1)
    state.set_wants(None)
    out = {}
    for f in graph.factors[1:]:  # FrameIntent, KernelTemporal (the unary is constant)
        out.update(f.expected_messages(state))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--lengths", default="25,1000,10000,100000")
    p.add_argument("--naive-repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parts", default="1,2")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {int(v) for v in args.parts.split(",")}
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; at start: {_load()}")
    print()
    if 1 in parts:
        x = make_inputs()
        part1(x, args.repeats, args.naive_repeats)
        breakdown(x, args.repeats)
    if 2 in parts:
        part2([int(v) for v in args.lengths.split(",")], args.repeats)
    print(f"at end: {_load()}")


if __name__ == "__main__":
    main()
