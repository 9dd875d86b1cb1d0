"""Asynchronous step benchmark (issue 10, §4, the step part).

    .venv/bin/python benchmarks/async_step.py [--batches 32,256] [--sequences 8000]
        [--repeats 20] [--threads 1] [--inner 5] [--sync-iterations 10]

The paper's temporal field at Charades sizes: 25 frames a video (times 30 · frame, σ = 150),
471 frame states (a BlockDomain of (object, rest) tuples), µ on 38 objects, φXI on 38
objects x 30 intents, float32. A store (``MessageStore.temporal_field(38, 30)``, capacity 50,
d = 0.9) holds ``--sequences`` sequences filled to capacity.

* Asynchronous step (``fieldlib.inference.asynchronous_step``, Algorithm 2) on a batch of B
  frames, each from a different sequence, with random potentials that require grad: the
  time of its store read, Q updates (``--inner`` alternations of Q_i and Q_I), loss,
  ``loss.backward()`` and store write (median over ``--repeats`` steps).
* Synchronous step over the same frames' whole sequences: a batched FactorGraph of B
  sequences x 25 frames (Component φX, FrameIntent, KernelTemporal), ``meanfield_loss``
  (form="frame") with ``--sync-iterations`` synchronous mean-field iterations for Q and for
  the clamped Q* (tol 0: the paper's 10 test-time passes), then ``backward()``.

Both use the public API as a user calls it; potentials are random (the network that would
produce them is not timed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fieldlib.factors import Component, FrameIntent, KernelTemporal
from fieldlib.graph import FactorGraph
from fieldlib.inference import MessageStore, asynchronous_step, get_engine, meanfield_loss
from fieldlib.variables import BlockDomain

T, S, D, NI, SPACING, SIGMA = 25, 471, 38, 30, 30.0, 150.0
REST = -(-S // D)  # 13: (object, rest) tuples, 471 of the 494


def domain(gen):
    pairs = torch.cartesian_prod(torch.arange(D), torch.arange(REST))
    keep = torch.cat([torch.arange(D) * REST,  # every object at least once
                      torch.randperm(D * REST, generator=gen)])
    keep = torch.unique(keep, sorted=False)
    order = torch.cat([torch.arange(D) * REST,
                       keep[~torch.isin(keep, torch.arange(D) * REST)]])[:S]
    return BlockDomain({"o": D, "r": REST}, pairs[torch.sort(order).values])


def filled_store(sequences, gen):
    store = MessageStore.temporal_field(D, NI, capacity=50, kernel=SIGMA, discount=0.9,
                                        scale="count")
    it = 0
    for _ in range(2):  # 50 messages a sequence: every frame twice
        for f in range(T):
            seq = torch.arange(sequences)
            frame = torch.full((sequences,), f)
            msgs = {k: torch.rand(sequences, *shape, generator=gen)
                    for k, shape in store.fields.items()}
            store.write(seq, frame, frame.double() * SPACING, msgs, it)
            it += 1
    return store


def median_ms(xs):
    return 1000 * statistics.median(xs)


def async_rows(store, dom, b, sequences, repeats, inner, gen):
    obj = dom.component("o")
    mu = (torch.randn(D, D, generator=gen) * 0.1).requires_grad_()
    parts = {k: [] for k in ("read", "update", "loss", "messages", "backward", "write",
                             "total")}
    for _ in range(repeats):
        seq = torch.randperm(sequences, generator=gen)[:b]
        frame = torch.randint(T, (b,), generator=gen)
        unary = torch.randn(b, S, generator=gen).requires_grad_()
        phi_xi = (torch.randn(b, D, NI, generator=gen) * 0.1).requires_grad_()
        label = torch.randint(S, (b,), generator=gen)
        t0 = time.perf_counter()
        step = asynchronous_step(store, seq, frame, frame.double() * SPACING, unary, label,
                                 mu=mu, mu_component=obj, phi_xi=phi_xi, xi_component=obj,
                                 inner_iterations=inner, l2_intent=4e-4, write=False)
        t1 = time.perf_counter()
        step.loss.backward()
        t2 = time.perf_counter()
        store.write(seq, frame, frame.double() * SPACING, step.messages, store.iteration + 1)
        t3 = time.perf_counter()
        for k in ("read", "update", "loss"):
            parts[k].append(step.timings[k])
        parts["messages"].append(step.timings["write"])  # outgoing messages (not written)
        parts["backward"].append(t2 - t1)
        parts["write"].append(t3 - t2)
        parts["total"].append(t3 - t0)
    return {k: median_ms(v) for k, v in parts.items()}


def sync_row(dom, b, repeats, iterations, gen):
    engine = get_engine("meanfield", schedule="synchronous", tol=0.0, max_iter=iterations)
    times = torch.arange(T, dtype=torch.float32) * SPACING
    out = []
    for _ in range(max(repeats // 4, 3)):
        table = torch.randn(b, T, D, REST, generator=gen).requires_grad_()
        phi_xi = (torch.randn(b, T, D, NI, generator=gen) * 0.1).requires_grad_()
        mu = (torch.randn(D, D, generator=gen) * 0.1).requires_grad_()
        labels = torch.randint(S, (b, T), generator=gen)
        t0 = time.perf_counter()
        g = FactorGraph()
        x = g.array("x", T, dom)
        intent = g.variable("I", NI)
        g.add(Component(x, ("o", "r"), table, name="phi_x"),
              FrameIntent(x, intent, phi_xi, component="o", name="phi_xi"),
              KernelTemporal(x, mu, times=times, kernel=SIGMA, component="o", name="mu"))
        loss = meanfield_loss(g, {"x": labels}, engine=engine, form="frame", l2_intent=4e-4)
        loss.loss.backward()
        out.append(time.perf_counter() - t0)
    return median_ms(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,256")
    p.add_argument("--sequences", type=int, default=8000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--sync-iterations", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    dom = domain(gen)
    store = filled_store(args.sequences, gen)
    print("times in ms (medians); frames / s: frames whose loss and gradients a step gives")
    print(f"Charades sizes: {T} frames, {S} states, {D} objects, {NI} intents, float32; store "
          f"capacity 50, d = 0.9, {args.sequences} sequences filled; {args.inner} inner "
          f"iterations; synchronous: {args.sync_iterations} iterations; torch "
          f"{torch.__version__}, {args.threads} thread(s); median of {args.repeats} steps\n")
    print("| batch B | read | Q updates | loss | outgoing messages | other (checks, setup) | "
          "backward | write | async step | read + write share | sync step over the B whole "
          "sequences (25 B frames) | frames / s async | frames / s sync |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        a = async_rows(store, dom, b, args.sequences, args.repeats, args.inner, gen)
        s = sync_row(dom, b, args.repeats, args.sync_iterations, gen)
        share = (a["read"] + a["write"]) / a["total"]
        other = a["total"] - sum(a[k] for k in ("read", "update", "loss", "messages",
                                                "backward", "write"))
        print(f"| {b} | {a['read']:.2f} | {a['update']:.2f} | {a['loss']:.2f} | "
              f"{a['messages']:.2f} | {other:.2f} | {a['backward']:.2f} | {a['write']:.2f} | "
              f"{a['total']:.2f} | {share:.0%} | {s:.1f} | {1000 * b / a['total']:,.0f} | "
              f"{1000 * b * T / s:,.0f} |")


if __name__ == "__main__":
    main()
