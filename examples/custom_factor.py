"""Adding a factor type: a Potts smoothness factor in one class, with its parameters, its
vectorised mean-field messages and its closed-form gradient, checked against the library.

    φ(x_t, x_{t+1}) = strength · 1[x_t = x_{t+1}]      for consecutive frames of an array

What a factor type provides (docs/design.md, "Adding a factor type"):

* ``terms()``: dense log-tables, enough for the exact engines and for mean-field's generic
  messages; ``tensors()`` and ``dense_size()`` for checks;
* ``parameters()``: what losses, checks and closed forms differentiate (here ``strength``);
* optional, for speed: ``expected_messages`` / ``expected_energy`` / ``position_energy``
  computed for all frames at once from the beliefs ``q`` (a ``fieldlib.factors.Beliefs``);
* optional: ``energy_gradient(q, form)``, the closed form that ``fieldlib gradcheck`` and
  ``compare_closed_form`` check against autograd;
* optional, to take part in asynchronous mean-field (the ``async`` engine and
  ``asynchronous_step``): ``stored_coupling()`` (what a frame sends, how the incoming
  messages combine: :class:`PottsMessages` below) and ``stored_inputs(n)`` (its tensors per
  sequence, its kernel; fieldlib.factors.stored, docs/asynchronous.md).

The script checks that the vectorised messages give the same mean-field result as the
generic ones, that the closed form equals autograd, that the ``async`` engine reaches the
mean-field fixed point with this factor beside a KernelTemporal and a FrameIntent, and
plots exact against mean-field marginals.

    python examples/custom_factor.py          # writes out/custom_factor.png
"""

import os

import matplotlib.pyplot as plt
import torch

from fieldlib import Factor, FactorGraph, Table, Term, register_factor
from fieldlib.factors.stored import StoredInputs
from fieldlib.inference import get_engine
from fieldlib.inference.check import compare_closed_form, toy_temporal_field
from fieldlib.viz import plot_marginal_timeline, save


def adjacent(delta):
    """The chain's "kernel" on frame-time differences: 1 for neighbours, else 0."""
    return (delta.abs() == 1).to(delta.dtype)


class PottsMessages:
    """PottsChain's stored messages (MATH.md §4-5): a frame sends its Q (``P``) and the
    onehot of its label (``P_star``), both read kernel-weighted with :func:`adjacent`, so
    past + future is Q_{t-1} + Q_{t+1}: the factor's Eq. 5 message over ``strength``."""

    latent_size = None  # no latent variable of its own

    def __init__(self, states):
        self.states = states

    def fields(self):
        return {"P": ((self.states,), True), "P_star": ((self.states,), True)}

    def send(self, q, label=None, **params):
        star = torch.zeros_like(q) if label is None else \
            torch.nn.functional.one_hot(label, self.states).to(q.dtype)
        return {"P": q, "P_star": star}

    def frame_message(self, incoming, latent=None, *, strength):
        """``(B, S)``: strength · (Q_{t-1} + Q_{t+1})."""
        return strength[:, None] * (incoming.past["P"] + incoming.future["P"])

    def frame_energy(self, q, label, incoming, latent=None, target=None, *, strength):
        """``(B,)``: the per-frame surrogate; its gradient in ``strength`` is the frame's
        row of the factor's form="frame" closed form (Q held fixed)."""
        star = torch.nn.functional.one_hot(label, self.states).to(q.dtype)
        free = (q * (incoming.past["P"] + incoming.future["P"])).sum(-1)
        clamped = (star * (incoming.past["P_star"] + incoming.future["P_star"])).sum(-1)
        return strength * (free - clamped)


@register_factor("potts_chain")
class PottsChain(Factor):
    """``strength · 1[x_t = x_{t+1}]`` on consecutive positions of ``frames``.

    Args:
        frames: a VariableArray of T positions with d states.
        strength: a scalar tensor (the factor's one parameter).
    """

    def __init__(self, frames, strength, name=None):
        super().__init__([frames], name)
        self.frames, self.strength = frames, torch.as_tensor(strength)

    # -- required ------------------------------------------------------------------------
    def tensors(self):
        return [self.strength]

    def _pair_table(self):
        d = self.frames.cardinality
        return self.strength * torch.eye(d, dtype=self.strength.dtype)

    def terms(self):
        table = self._pair_table()
        return [Term((self.frames[t], self.frames[t + 1]), table, False, self)
                for t in range(self.frames.size - 1)]

    def dense_size(self):
        return (self.frames.size - 1) * self.frames.cardinality ** 2

    def couplings(self):
        return [(self.frames[t], self.frames[t + 1]) for t in range(self.frames.size - 1)]

    # -- declared ------------------------------------------------------------------------
    def parameters(self):
        return {"strength": self.strength}

    # -- vectorised mean-field (MATH.md §3): every frame at once ---------------------------
    def _agreement(self, q):
        """``(N, T-1)``: Σ_x Q_t(x) Q_{t+1}(x), the chance consecutive frames agree."""
        p = q.probs(self.frames)                       # (N, T, d); padding rows are zero
        return (p[:, :-1] * p[:, 1:]).sum(-1)

    def expected_messages(self, q):
        if not q.wants(self.frames):
            return {}
        p = q.probs(self.frames)
        neighbours = torch.zeros_like(p)
        neighbours[:, 1:] += p[:, :-1]                 # from the frame before
        neighbours[:, :-1] += p[:, 1:]                 # from the frame after
        return {self.frames: self.strength * neighbours}

    def expected_energy(self, q):
        return self.strength * self._agreement(q).sum(-1)

    def position_energy(self, q):
        a = self.strength * self._agreement(q)         # each pair counts at both frames
        rows = torch.zeros(q.batch, self.frames.size, dtype=a.dtype, device=a.device)
        rows[:, :-1] += a
        rows[:, 1:] += a
        return {self.frames: rows}

    # -- closed-form gradient (MATH.md §6) -------------------------------------------------
    def energy_gradient(self, q, form="sequence"):
        g = self._agreement(q).sum(-1)                  # ∂ E_Q[log φ] / ∂ strength, (N,)
        return {"strength": 2 * g if form == "frame" else g}

    # -- stored messages (asynchronous mean-field) -------------------------------------------
    def stored_coupling(self):
        return PottsMessages(self.frames.cardinality)

    def stored_inputs(self, n):
        """``strength`` per sequence; frame times are positions, the kernel :func:`adjacent`."""
        return StoredInputs(self.frames, sequence={"strength": self.strength.expand(n)},
                            kernel=adjacent)


class GenericPotts(PottsChain):
    """The same factor with the library's generic messages (from ``terms()``): a reference."""

    expected_messages = Factor.expected_messages
    expected_energy = Factor.expected_energy
    position_energy = Factor.position_energy


def build(kind=PottsChain, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph()
    x = g.array("x", 8, ["walk", "sit", "drink", "read"])
    unary = torch.randn(8, 4, generator=gen, dtype=torch.float64).requires_grad_()
    strength = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    g.add(Table(x, unary, name="unary"), kind(x, strength, name="potts"))
    labels = {"x": torch.randint(4, (8,), generator=gen)}
    return g, {"unary.log_potential": unary, "potts.strength": strength}, labels


def main():
    meanfield = get_engine("meanfield[schedule=sequential,tol=1e-12,max_iter=500]")
    fast, generic = meanfield(build()[0]), meanfield(build(GenericPotts)[0])
    gap = float((fast.marginals["x"] - generic.marginals["x"]).abs().max())
    print(f"vectorised vs generic messages: max |ΔQ| = {gap:.1e}, "
          f"ELBO {float(fast.elbo.detach()):.9f} vs {float(generic.elbo.detach()):.9f}")
    assert gap < 1e-10

    g, params, labels = build()
    report = compare_closed_form(g, labels, params=params)
    print(report.table())
    assert report.ok, "the closed form must equal autograd of the surrogate"

    # the same factor in asynchronous mean-field, beside the paper's two coupled factors
    field, weights, _ = toy_temporal_field(0, frames=5)
    with torch.no_grad():  # weakly coupled: one fixed point, which both engines must reach
        weights["mu.mu"].mul_(0.3)
        weights["phi_xi.table"].mul_(0.3)
    frames = field.arrays["x"]
    field.add(PottsChain(frames, torch.tensor(0.5, dtype=torch.float64), name="potts"))
    asynchronous = get_engine("async[tol=1e-12]")(field)
    synchronous = get_engine("meanfield[schedule=sequential,tol=1e-14,max_iter=5000]")(field)
    gap = float((asynchronous.marginals["x"] - synchronous.marginals["x"]).abs().max())
    print(f"async engine with PottsChain vs meanfield: max |ΔQ| = {gap:.1e} after "
          f"{asynchronous.info['passes']} passes")
    assert gap < 1e-10

    exact = get_engine("exact")(g)
    print(f"log Z {float(exact.log_z.detach()):.6f} >= ELBO {float(fast.elbo.detach()):.6f}")
    states = ["walk", "sit", "drink", "read"]
    _, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, layout="constrained")
    plot_marginal_timeline(exact.marginals["x"].detach(), states, ax=top,
                           title="exact marginals")
    top.set_xlabel("")
    plot_marginal_timeline(fast.marginals["x"].detach(), states, ax=bottom,
                           title="mean-field with the PottsChain factor")
    path = save(top, os.path.join(os.environ.get("FIELDLIB_OUT", "out"), "custom_factor.png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
