"""Mean-field benchmark: the general engine on a Charades-sized temporal field.

    .venv/bin/python benchmarks/meanfield.py [--repeats 5] [--lengths 25,1000,10000,100000]

Part 1: batch of 32 videos x 25 frames, 471 states a frame mapped onto 38 objects, 30
intents, σ = 150 frames (frames 30 apart), 10 synchronous passes (Eq. 5-6), float32:

* ``engine``: ``get_engine("meanfield", schedule="synchronous", max_iter=10, tol=0)`` on a
  FactorGraph (unary Table, FrameIntent, KernelTemporal), ELBO not tracked per pass (the
  final ELBO, one energy pass, is included in its time);
* ``hand-vectorised``: the same equations as one single-purpose tensor program (object
  space messages, dense 25 x 25 kernel);
* ``naive loop``: a Python loop over videos and frames of the same equations.

All three start from the unary-only Q (zero messages) and must agree (max |ΔQ| printed).

Part 2: one synchronous pass of the engine on one video of T frames (all messages and
updates), time per frame: the kernel sums switch from dense to FFT above 64 frames, so the
growth is T log T.
"""

from __future__ import annotations

import argparse
import time

import torch

from fieldlib import BlockDomain, FactorGraph, FrameIntent, KernelTemporal, Table
from fieldlib.inference import get_engine

N, T, S, D, I = 32, 25, 471, 38, 30
SIGMA, SPACING = 150.0, 30.0


def make_inputs(n=N, t=T, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    obj = torch.cat([torch.arange(D), torch.randint(D, (S - D,), generator=gen)])
    return {
        "obj": obj,
        "unary": torch.randn(n, t, S, generator=gen).to(dtype),
        "xi": (0.5 * torch.randn(n, t, D, I, generator=gen)).to(dtype),
        "mu": (0.05 * torch.randn(D, D, generator=gen)).to(dtype),
        "times": (torch.arange(t) * SPACING).to(dtype),
    }


def build_graph(x):
    n, t, _ = x["unary"].shape
    dom = BlockDomain({"o": D, "k": S}, torch.stack([x["obj"], torch.arange(S)], 1))
    g = FactorGraph()
    frames = g.array("x", t, dom)
    intent = g.variable("I", I)
    g.add(Table(frames, x["unary"]),
          FrameIntent(frames, intent, x["xi"], component="o"),
          KernelTemporal(frames, x["mu"], times=x["times"], kernel=SIGMA, component="o"))
    return g


def hand_vectorised(x, passes=10):
    """Eq. 5-6, synchronous, one tensor program; messages on the object marginals."""
    unary, xi, mu, obj = x["unary"], x["xi"], x["mu"], x["obj"]
    n = unary.shape[0]
    tt = x["times"]
    k = torch.exp(-(tt[None, :] - tt[:, None]) ** 2 / (2 * SIGMA**2)).triu(1)
    q = torch.softmax(unary, -1)
    qi = torch.full((n, I), 1.0 / I, dtype=unary.dtype)
    for _ in range(passes):
        qc = unary.new_zeros(n, unary.shape[1], D).index_add_(-1, obj, q)
        m = (k @ qc) @ mu.T + (k.T @ qc) @ mu + torch.einsum("ntdi,ni->ntd", xi, qi)
        q = torch.softmax(unary + m.gather(-1, obj.expand(*m.shape[:-1], S)), -1)
        qc = unary.new_zeros(n, unary.shape[1], D).index_add_(-1, obj, q)
        qi = torch.softmax(torch.einsum("ntd,ntdi->ni", qc, xi), -1)
    return q, qi


def naive_loop(x, passes=10):
    """The same equations with a Python loop over videos and frames (one frame's messages
    at a time, each a kernel-weighted sum over the video's other frames)."""
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


def best_of(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lengths", default="25,1000,10000,100000")
    p.add_argument("--naive-repeats", type=int, default=1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    x = make_inputs()
    g = build_graph(x)
    engine = get_engine("meanfield", schedule="synchronous", max_iter=10, tol=0.0,
                        track_elbo=False)
    passes = 10
    t_engine, r = best_of(lambda: engine(g), args.repeats)
    t_hand, (q_hand, qi_hand) = best_of(lambda: hand_vectorised(x, passes), args.repeats)
    t_naive, (q_naive, qi_naive) = best_of(lambda: naive_loop(x, passes), args.naive_repeats)
    d_hand = max(float((r.marginals["x"] - q_hand).abs().max()),
                 float((r.marginals["I"] - qi_hand).abs().max()))
    d_naive = max(float((r.marginals["x"] - q_naive).abs().max()),
                  float((r.marginals["I"] - qi_naive).abs().max()))
    assert d_hand < 1e-4 and d_naive < 1e-4, (d_hand, d_naive)
    print(f"Charades-sized field: batch {N}, {T} frames, {S} states -> {D} objects, {I} "
          f"intents, sigma {SIGMA:g} frames, {passes} synchronous passes, float32, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print()
    print(f"| {'implementation':<28} | {'ms / pass':>9} | {'total ms':>9} | {'vs hand':>7} |"
          f" {'max |dQ| vs engine':>18} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 11}|{'-' * 9}|{'-' * 20}|")
    for name, t, d in [("engine (meanfield)", t_engine, 0.0),
                       ("hand-vectorised", t_hand, d_hand),
                       ("naive loop (videos x frames)", t_naive, d_naive)]:
        print(f"| {name:<28} | {1e3 * t / passes:9.2f} | {1e3 * t:9.1f} | "
              f"{t / t_hand:6.2f}x | {d:18.1e} |")
    print()
    print("One video of T frames (1 frame per time unit, sigma 150): the frame messages of "
          "one pass (FA + FB + intent, on the object marginals) and a whole engine call "
          "with one synchronous pass (set-up, messages, updates, final ELBO):")
    print()
    print(f"| {'frames T':>9} | {'kernel sums':>11} | {'messages ms':>11} | "
          f"{'us / frame':>10} | {'engine call ms':>14} | {'us / frame':>10} |")
    print(f"|{'-' * 11}|{'-' * 13}|{'-' * 13}|{'-' * 12}|{'-' * 16}|{'-' * 12}|")
    one = get_engine("meanfield", schedule="synchronous", max_iter=1, tol=0.0,
                     track_elbo=False)
    for t in [int(v) for v in args.lengths.split(",")]:
        y = make_inputs(1, t, seed=1)
        y["times"] = torch.arange(t, dtype=torch.float32)  # one frame per time unit
        gt = build_graph(y)
        reps = max(1, min(args.repeats, int(2e5 // (t * 10)) or 1))
        tm, _ = best_of(lambda gt=gt: frame_messages(gt), reps)
        tt, _ = best_of(lambda gt=gt: one(gt, marginals=False), reps)
        method = "dense" if t <= 64 else "fft"
        print(f"| {t:>9,} | {method:>11} | {1e3 * tm:11.2f} | {1e6 * tm / t:10.2f} | "
              f"{1e3 * tt:14.2f} | {1e6 * tt / t:10.2f} |")


def frame_messages(graph):
    """The messages every frame receives in one pass, from a fixed random Q."""
    from fieldlib.inference.meanfield_state import MeanFieldState

    frames = graph.arrays["x"]
    if not hasattr(graph, "_bench_q"):
        gen = torch.Generator().manual_seed(0)
        q = torch.softmax(torch.randn(1, frames.size, S, generator=gen), -1)
        graph._bench_q = {"x": q, "I": torch.full((1, I), 1.0 / I)}
    state = MeanFieldState.from_marginals(graph, graph._bench_q, 1)
    state.set_wants(None)
    out = {}
    for f in graph.factors[1:]:  # FrameIntent, KernelTemporal (the unary is constant)
        out.update(f.expected_messages(state))
    return out

if __name__ == "__main__":
    main()
