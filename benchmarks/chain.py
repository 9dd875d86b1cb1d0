"""Linear-chain CRF benchmark: the exact engine against a plain forward algorithm.

    .venv/bin/python benchmarks/chain.py [--batch 32] [--length 512] [--labels 20]
        [--repeats 11] [--threads N] [--dtype float64]

The model is a padded batch of N sequences of up to T positions with d labels, built the way
docs/chains.md tells a user to (three lines: an array with ``lengths``, a ``Table`` of
emissions ``(N, T, d)``, a ``ChainPairwise`` of transitions), with random lengths in 1..T
(one sequence of length T), in two forms: one transition matrix ``(d, d)`` shared by every
step, and one per step ``(N, T-1, d, d)``.

The references are what a user writes by hand (and what pytorch-crf and torch-struct do):

* ``forward``: log Z by the log-space forward algorithm, one ``torch.logsumexp`` over
  ``(N, d, d)`` per step, finished sequences kept by a mask;
* ``forward-backward``: log Z and every position's marginal, as autograd of ``forward``
  with respect to the emissions (torch-struct's trick);
* ``viterbi``: the best path by max-product with back-pointers (``argmax`` per step).

Each is timed against the exact engine doing the same query through the public API:
``engine(graph, marginals=False)``, ``engine(graph)``, ``engine(graph, marginals=False,
map=True)``. ``warm``: one engine object reused (its plan, cached by the graph's structure,
is found once: a training loop whose batches share their shortest length); ``cold``: a new
engine each call, order search included (a batch whose shortest length is new). Graph
building is timed with the engine (a user builds the graph from a network's output every
step). Engine and reference runs alternate, the order swapped every repeat; the table gives
the median seconds and the median of the paired ratios, so load on the machine affects both
alike. The answers are checked against the references (log Z and marginals to 1e-9, the
best path's score to 1e-9).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fieldlib import ChainPairwise, FactorGraph, Table
from fieldlib.inference import get_engine


def build(emissions, transitions, lengths):
    g = FactorGraph()
    y = g.array("y", emissions.shape[1], emissions.shape[2], lengths=lengths)
    g.add(Table(y, emissions), ChainPairwise(y, transitions))
    return g


def _step(transitions, t):
    return transitions if transitions.dim() < 4 else transitions[:, t]


def forward(emissions, transitions, lengths):
    """``(N,)`` log Z: the log-space forward algorithm."""
    alpha = emissions[:, 0]
    for t in range(1, emissions.shape[1]):
        nxt = torch.logsumexp(alpha[:, :, None] + _step(transitions, t - 1), 1) + \
            emissions[:, t]
        alpha = torch.where((t < lengths)[:, None], nxt, alpha)
    return torch.logsumexp(alpha, -1)


def forward_backward(emissions, transitions, lengths):
    """``(log Z (N,), marginals (N, T, d))``: autograd of :func:`forward`."""
    e = emissions.detach().requires_grad_()
    log_z = forward(e, transitions, lengths)
    (marginals,) = torch.autograd.grad(log_z.sum(), e)
    return log_z.detach(), marginals


def viterbi(emissions, transitions, lengths):
    """``(score (N,), path (N, T))``: max-product with back-pointers; -1 on padding."""
    n, t_len, d = emissions.shape
    score = emissions[:, 0]
    pointers = []
    keep = torch.arange(d).expand(n, d)
    for t in range(1, t_len):
        s = score[:, :, None] + _step(transitions, t - 1)
        arg = s.argmax(1)
        best = s.gather(1, arg[:, None]).squeeze(1) + emissions[:, t]
        active = (t < lengths)[:, None]
        score = torch.where(active, best, score)
        pointers.append(torch.where(active, arg, keep))
    last = score.argmax(-1)
    path = [last]
    for arg in reversed(pointers):
        last = arg.gather(1, last[:, None]).squeeze(1)
        path.append(last)
    path = torch.stack(path[::-1], 1)
    path = torch.where(torch.arange(t_len) < lengths[:, None], path, torch.full_like(path, -1))
    return score.amax(-1), path


def _time(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--engines", default="exact,exact[chain=false]",
                    help="engine specs to time, comma-separated")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n, t_len, d = args.batch, args.length, args.labels
    gen = torch.Generator().manual_seed(0)
    emissions = torch.randn(n, t_len, d, generator=gen, dtype=dtype)
    lengths = torch.randint(1, t_len + 1, (n,), generator=gen)
    lengths[0] = t_len
    forms = {"shared (d, d)": torch.randn(d, d, generator=gen, dtype=dtype),
             "per step (N, T-1, d, d)": torch.randn(n, t_len - 1, d, d, generator=gen,
                                                    dtype=dtype)}
    print(f"N = {n}, T = {t_len}, d = {d}, {args.dtype}, lengths {int(lengths.min())}.."
          f"{int(lengths.max())}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    for form, transitions in forms.items():
        for spec in args.engines.split(","):
            rows += _time_engine(spec, form, emissions, transitions, lengths, args.repeats)
    print(f"load average {os.getloadavg()[0]:.2f} at end\n")
    print("| transitions | query | engine | engine s | reference | reference s | ratio "
          "(median) | ratio (max) |")
    print("|---|---|---|---:|---|---:|---:|---:|")
    for form, query, mode, te, ref_name, tr_, ratio, worst in rows:
        print(f"| {form} | {query} | {mode} | {te:.3f} | {ref_name} | {tr_:.3f} | "
              f"{ratio:.2f} | {worst:.2f} |")


def _time_engine(spec, form, emissions, transitions, lengths, repeats):
    """Rows ``(form, query, engine, engine s, reference, reference s, ratio, worst)``."""
    warm = get_engine(spec)
    queries = [
        ("log Z", "forward", lambda: forward(emissions, transitions, lengths),
         dict(marginals=False)),
        ("log Z + marginals", "forward-backward",
         lambda: forward_backward(emissions, transitions, lengths), {}),
        ("MAP", "viterbi", lambda: viterbi(emissions, transitions, lengths),
         dict(marginals=False, map=True)),
    ]
    rows = []
    for query, ref_name, ref, kwargs in queries:
        for mode in ("warm", "cold"):
            def engine_call(kwargs=kwargs, mode=mode):
                engine = warm if mode == "warm" else get_engine(spec)
                return engine(build(emissions, transitions, lengths), **kwargs)

            engine_call()  # warm-up (and, for "warm", the plan)
            ref()
            times_e, times_r, ratios = [], [], []
            for k in range(repeats):
                if k % 2:
                    te, result = _time(engine_call)
                    tr, want = _time(ref)
                else:
                    tr, want = _time(ref)
                    te, result = _time(engine_call)
                times_e.append(te)
                times_r.append(tr)
                ratios.append(te / tr)
            _check(query, result, want)
            rows.append((form, query, f"{spec} {mode}", statistics.median(times_e), ref_name,
                         statistics.median(times_r), statistics.median(ratios), max(ratios)))
    return rows


def _check(query, result, want):
    atol = 1e-9 if result.log_z.dtype == torch.float64 else 1e-3
    if query == "MAP":
        score, path = want
        torch.testing.assert_close(result.map_score, score, rtol=0, atol=atol)
        return
    log_z = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(result.log_z, log_z, rtol=0, atol=atol)
    if isinstance(want, tuple):
        torch.testing.assert_close(result.marginals["y"], want[1], rtol=0, atol=atol)


if __name__ == "__main__":
    main()
