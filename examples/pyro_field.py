"""A CRF as a pyro likelihood: ``pyro.sample("y", field, obs=labels)`` trained with SVI.

    .venv/bin/python examples/pyro_field.py        # PNG into $FIELDLIB_OUT (default out/)

Labelled sequences of frames (3 activities, padded to 10 frames) with a latent intent per
sequence that no label names. The potentials come from a small network registered with
``pyro.module``: per-frame unaries from features, a transition table, frame-intent tables.
The field over the labelled frames, ``FieldDistribution(graph, variables="x")``, sums the
intent out exactly, so its ``log_prob`` is the marginal likelihood of the labels and
``pyro.infer.SVI`` with ``Trace_ELBO`` (and a guide with no latent site) maximises it.

The labels themselves are exact samples of a "true" field (``FieldDistribution.sample``:
forward filtering, backward sampling). The same network, from the same seed, is trained a
second time with ``fieldlib.inference.exact_nll`` and ``torch.optim.Adam``: the losses and the
parameters of the two runs are equal, step for step (checked below).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402

from fieldlib import FactorGraph, FrameIntent, Table  # noqa: E402
from fieldlib.inference import FieldDistribution, exact_nll, get_engine  # noqa: E402

N, T, S, F, K = 64, 10, 3, 4, 2
STEPS, LR = 150, 0.1
ENGINE = get_engine("exact")          # one engine: its elimination order is searched once
D = torch.float64


class Potentials(torch.nn.Module):
    """Features (N, T, F) -> the field's factors (unary, transition, frame-intent)."""

    def __init__(self):
        super().__init__()
        self.unary = torch.nn.Linear(F, S).double()
        self.trans = torch.nn.Parameter(torch.zeros(S, S, dtype=D))
        self.psi = torch.nn.Parameter(torch.zeros(S, K, dtype=D))

    def forward(self, feats, lengths) -> FactorGraph:
        g = FactorGraph()
        x = g.array("x", T, S, lengths=lengths)
        intent = g.variable("intent", K)
        g.add(Table(x, self.unary(feats)), FrameIntent(x, intent, self.psi.expand(T, S, K)))
        for t in range(T - 1):
            g.add(Table([x[t], x[t + 1]], self.trans))
        return g


def make_data():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(N, T, F, generator=gen, dtype=D)
    lengths = torch.randint(4, T + 1, (N,), generator=gen)
    torch.manual_seed(0)
    truth = Potentials()
    with torch.no_grad():
        truth.unary.weight.copy_(2.0 * torch.randn(S, F, generator=gen, dtype=D))
        truth.trans.copy_(torch.tensor([[1.5, -1.0, -1.0], [-1.0, 1.5, -1.0],
                                        [0.5, -1.0, 1.5]], dtype=D))
        truth.psi.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]], dtype=D))
        labels = FieldDistribution(truth(feats, lengths), variables="x").sample()
    return feats, lengths, labels, truth          # labels: (N, T), -1 on padding


def train_with_pyro(feats, lengths, labels):
    torch.manual_seed(1)
    net = Potentials()

    def model(feats, lengths, labels):
        crf = pyro.module("crf", net)
        field = FieldDistribution(crf(feats, lengths), engine=ENGINE, variables="x")
        with pyro.plate("sequences", N):
            pyro.sample("y", field, obs=labels)

    def guide(feats, lengths, labels):     # nothing latent for SVI: the intent is summed out
        pass

    pyro.clear_param_store()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
    losses = [svi.step(feats, lengths, labels) for _ in range(STEPS)]
    return net, losses


def train_directly(feats, lengths, labels):
    torch.manual_seed(1)
    net = Potentials()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = exact_nll(net(feats, lengths), {"x": labels}, engine=ENGINE).sum()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return net, losses


def main():
    pyro.enable_validation(True)
    feats, lengths, labels, truth = make_data()
    net_pyro, loss_pyro = train_with_pyro(feats, lengths, labels)
    net_direct, loss_direct = train_directly(feats, lengths, labels)
    gap = max(abs(a - b) / abs(b) for a, b in zip(loss_pyro, loss_direct))
    param_gap = max(float((a - b).abs().max().detach()) for a, b in
                    zip(net_pyro.parameters(), net_direct.parameters()))
    print(f"SVI loss {loss_pyro[0]:.3f} -> {loss_pyro[-1]:.3f} over {STEPS} steps; "
          f"exact NLL {loss_direct[0]:.3f} -> {loss_direct[-1]:.3f}")
    print(f"largest relative loss difference {gap:.1e}, largest parameter difference "
          f"{param_gap:.1e}")
    assert gap < 1e-10 and param_gap < 1e-10, "SVI and exact-NLL training disagree"
    with torch.no_grad():
        truth_nll = float(exact_nll(truth(feats, lengths), {"x": labels}, engine=ENGINE).sum())
    print(f"NLL of the labels under the true field: {truth_nll:.3f}")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].plot(loss_direct, lw=4, alpha=0.4, label="exact_nll + torch Adam")
    axes[0].plot(loss_pyro, "k--", lw=1.2, label="pyro SVI (Trace_ELBO)")
    axes[0].axhline(truth_nll, color="grey", lw=0.8, ls=":", label="true field")
    axes[0].set(xlabel="step", ylabel="-log p(labels)", title="training: the same curve")
    axes[0].legend(fontsize=8)
    for ax, mat, title in ((axes[1], truth.trans, "true transition"),
                           (axes[2], net_pyro.trans, f"learned ({STEPS} SVI steps)")):
        m = mat.detach()             # double-centred: row / column offsets trade with unaries
        m = m - m.mean(0) - m.mean(1, keepdim=True) + m.mean()
        im = ax.imshow(m, cmap="RdBu_r", vmin=-2, vmax=2)
        ax.set(title=title + " (centred)", xlabel="next activity", ylabel="activity",
               xticks=range(S), yticks=range(S))
    fig.colorbar(im, ax=axes[1:], shrink=0.8)
    out = Path(os.environ.get("FIELDLIB_OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "pyro_field.png", dpi=110, bbox_inches="tight")
    print("plot written to", out / "pyro_field.png")


if __name__ == "__main__":
    main()
