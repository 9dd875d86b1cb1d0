"""A pairwise factor along an array's consecutive positions: the transitions of a
linear-chain CRF.

    φ(x_t, x_{t+1}) = A_t[x_t, x_{t+1}]        t = 0 .. T-2

with ``A`` one ``(d, d)`` matrix shared by every step, or one per step ``(T-1, d, d)``, either
optionally per batch element. With a :class:`~fieldlib.factors.Table` of emissions over the
same array, this is the linear-chain CRF of pytorch-crf and torch-struct, built in three
lines (docs/chains.md)::

    g = FactorGraph()
    y = g.array("y", T, d, lengths=lengths)              # a padded batch of N sequences
    g.add(Table(y, emissions), ChainPairwise(y, transitions))

Padding (``lengths``): the graph masks every term touching a padded position to zero, so the
transition *into* position ``lengths[n]`` and beyond is dropped, for every engine; the
mean-field messages below get the same for free, since Q's padded rows are zero.

For the exact engine the factor gives one dense ``(d, d)`` term per step (views, no copy);
the engine eliminates the chain left to right, in time linear in T (benchmarks/chain.py).
Mean-field messages, energies and the closed-form gradient are one tensor program over all
steps (no per-position Python work).
"""

from __future__ import annotations

import torch

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.factors.base import Factor, Term, check_log_potential, register_factor
from fieldlib.factors.beliefs import (
    Beliefs,
    any_neginf,
    labelled_einsum,
    split_impossible,
    with_impossible,
)
from fieldlib.variables import VariableArray

__all__ = ["ChainPairwise"]


@register_factor("chain_pairwise")
class ChainPairwise(Factor):
    """Transition scores between consecutive positions of one array.

    Args:
        frames: a VariableArray of T positions with d states.
        transitions: log-potentials ``A[x_t, x_{t+1}]`` (from-state first), of shape
            ``(d, d)`` (shared by all steps), ``(N, d, d)`` (shared, per batch element),
            ``(T-1, d, d)`` (one per step) or ``(N, T-1, d, d)``.
        per_position: whether a three-axis ``transitions`` is ``(T-1, d, d)`` (True) or
            ``(N, d, d)`` (False). None (the default) decides from the shapes and refuses
            when they cannot tell: a first axis other than T-1 is a batch; a first axis
            T-1 is per step when the array's ``lengths`` give another N.
        name: optional label for error messages.

    Raises:
        FieldlibError: ``frames`` is not a VariableArray.
        ShapeError: a shape that fits none of the four forms, or a three-axis shape whose
            first axis may be either N or T-1 (pass ``per_position``).
        InvalidPotentialError: NaN or +inf in ``transitions``.
    """

    def __init__(self, frames: VariableArray, transitions, per_position: bool | None = None,
                 name: str | None = None):
        super().__init__([frames], name)
        if not isinstance(frames, VariableArray):
            raise FieldlibError(f"{self.label}: expects a VariableArray, got "
                                f"{type(frames).__name__}")
        self.frames = frames
        self.transitions = check_log_potential(transitions, self.label)
        t, d = frames.size, frames.cardinality
        steps = max(t - 1, 0)
        shape = tuple(self.transitions.shape)
        if per_position is None:
            per_position = self._infer_per_position(shape, steps, d)
        self.per_position = bool(per_position)
        core = ((steps,) if self.per_position else ()) + (d, d)
        self.batched = self._set_batch(self.transitions, core, "transitions")

    def _infer_per_position(self, shape, steps: int, d: int) -> bool:
        if len(shape) != 3:
            return len(shape) == 4
        if shape[0] != steps:
            return False
        lengths = self.frames.lengths
        if lengths is not None and len(lengths) != steps:
            return True
        raise ShapeError(
            f"{self.label}: transitions of shape {shape} may be one ({d}, {d}) matrix per "
            f"step (T-1 = {steps}) or one per batch element (N = {shape[0]}); pass "
            f"per_position=True or per_position=False")

    # -- required --------------------------------------------------------------------------
    def tensors(self):
        return [self.transitions]

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"transitions": self.transitions}

    @property
    def steps(self) -> int:
        """T-1: the number of consecutive pairs."""
        return max(self.frames.size - 1, 0)

    def dense_size(self) -> int:
        n = self.transitions.shape[0] if self.batched else 1
        return n * self.steps * self.frames.cardinality ** 2

    def terms(self) -> list[Term]:
        """One ``([N,] d, d)`` term per step over ``(x_t, x_{t+1})``: views of
        ``transitions`` (the same tensor at every step when it is shared)."""
        a, v = self.transitions, self.frames.variables
        if self.per_position:
            tables = a.unbind(1 if self.batched else 0)
        else:
            tables = [a] * self.steps
        return [Term((v[t], v[t + 1]), tables[t], self.batched, self)
                for t in range(self.steps)]

    def couplings(self) -> list[tuple]:
        v = self.frames.variables
        return [(v[t], v[t + 1]) for t in range(self.steps)]

    def coupling_arity(self) -> int:
        return 2 if self.steps else 0

    def has_hard_zeros(self, q: Beliefs) -> bool:
        return any_neginf(self.transitions)

    # -- mean-field (MATH.md §3), every step at once ------------------------------------------
    # Labels: "n" batch, "t" step, "x" the from-state x_t, "y" the to-state x_{t+1}.
    def _split(self, q: Beliefs):
        """The transitions' finite part and -inf indicator, once per run."""
        return q.constant((self, "split"), lambda: split_impossible(self.transitions))

    def _labels(self) -> list:
        return (["n"] if self.batched else []) + (["t"] if self.per_position else []) + \
            ["x", "y"]

    def _expect(self, q: Beliefs, ops, out) -> torch.Tensor:
        """E of the split transitions under ``ops`` ((tensor, labels) pairs) onto ``out``;
        0 · (-inf) = 0, -inf (or the penalty) where Q meets an impossible pair."""
        finite, impossible = self._split(q)
        labels = self._labels()
        args: list = []
        for t, lab in ops:
            args += [t, lab]

        def one(table):
            return labelled_einsum(table, labels, *args, out)

        return with_impossible(one(finite), None if impossible is None else one(impossible),
                               q.options.penalty)

    def expected_messages(self, q: Beliefs) -> dict:
        """``{frames: (N, T, d)}``: Σ_y A_t[x, y] Q_{t+1}(y) + Σ_w Q_{t-1}(w) A_{t-1}[w, x]."""
        if not q.wants(self.frames) or not self.steps:
            return {}
        p = q.probs(self.frames)                         # (N, T, d); padding rows are zero
        ahead = self._expect(q, [(p[:, 1:], ["n", "t", "y"])], ["n", "t", "x"])
        behind = self._expect(q, [(p[:, :-1], ["n", "t", "x"])], ["n", "t", "y"])
        zero = p.new_zeros(q.batch, 1, p.shape[-1])
        return {self.frames: torch.cat([ahead, zero], 1) + torch.cat([zero, behind], 1)}

    def _step_energy(self, q: Beliefs) -> torch.Tensor:
        """``(N, T-1)``: E_Q[A_t[x_t, x_{t+1}]] per step."""
        p = q.probs(self.frames)
        return self._expect(q, [(p[:, :-1], ["n", "t", "x"]), (p[:, 1:], ["n", "t", "y"])],
                            ["n", "t"])

    def expected_energy(self, q: Beliefs) -> torch.Tensor:
        if not self.steps:
            return q.probs(self.frames).new_zeros(q.batch)
        return self._step_energy(q).sum(-1)

    def position_energy(self, q: Beliefs) -> dict:
        """Each step's expected score credited to both of its positions (MATH.md §6)."""
        p = q.probs(self.frames)
        rows = p.new_zeros(q.batch, self.frames.size)
        if self.steps:
            e = self._step_energy(q)
            rows = rows + torch.nn.functional.pad(e, (0, 1)) + \
                torch.nn.functional.pad(e, (1, 0))
        return {self.frames: rows}

    # -- closed-form gradient (MATH.md §6) ----------------------------------------------------
    def energy_gradient(self, q: Beliefs, form: str = "sequence") -> dict:
        """``{"transitions": (N, [T-1,] d, d)}``: ∂ E_Q[log φ] / ∂A_t[x, y] = Q_t(x)
        Q_{t+1}(y), summed over the steps when A is shared; 0 on -inf entries. In
        ``form="frame"`` each step counts at both of its positions: twice that."""
        p = q.probs(self.frames)
        out = ["n", "t", "x", "y"] if self.per_position else ["n", "x", "y"]
        g = labelled_einsum(p[:, :-1], ["n", "t", "x"], p[:, 1:], ["n", "t", "y"], out)
        if form == "frame":
            g = 2 * g
        return {"transitions": g.masked_fill(torch.isneginf(self.transitions).expand_as(g),
                                             0.0)}
