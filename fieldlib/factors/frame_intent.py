"""The frame-intent factor φXI(x_t, I) = ψ_t(o_t, I) (MATH.md §2).

One table over (frame component) x (intent) per frame, predicted by a network. With a block
frame domain the table is gathered onto the frame's states through the chosen component
(the paper: object; the released code: object x progress).
"""

from __future__ import annotations

import torch

from fieldlib.errors import FieldlibError
from fieldlib.factors.base import (
    Factor,
    OnComponent,
    Term,
    check_log_potential,
    register_factor,
)
from fieldlib.factors.beliefs import Beliefs
from fieldlib.variables import BlockDomain, Variable, VariableArray

__all__ = ["FrameIntent", "component_map"]


def component_map(domain, component: str | None) -> tuple[torch.Tensor, int]:
    """``(LongTensor (S,), D)``: each state's value of ``component`` and that component's
    cardinality; the identity map when ``component`` is None."""
    if component is None:
        return torch.arange(domain.size), domain.size
    if not isinstance(domain, BlockDomain):
        raise FieldlibError(
            f"component {component!r} was given but the frame domain is not a BlockDomain"
        )
    return domain.component(component), domain.components[component].size


@register_factor("frame_intent")
class FrameIntent(Factor):
    """φXI: a (component x intent) log-table per frame.

    Args:
        frames: VariableArray of T frames.
        intent: the intent Variable (N_I states).
        table: ``Tensor ([N,] T, D, N_I)``, D the component's cardinality (the frames'
            cardinality when ``component`` is None).
        component: block component the table is over (e.g. ``"o"``), or None.
    """

    def __init__(self, frames: VariableArray, intent: Variable, table,
                 component: str | None = None, name: str | None = None):
        super().__init__([frames, intent], name)
        if not isinstance(frames, VariableArray) or not isinstance(intent, Variable):
            raise FieldlibError(f"{self.label}: expects (VariableArray, Variable)")
        self.frames, self.intent, self.component = frames, intent, component
        self.state_component, self.component_size = component_map(frames.domain, component)
        self.table = check_log_potential(table, self.label)
        core = (frames.size, self.component_size, intent.cardinality)
        self.batched = self._set_batch(self.table, core, "table")

    def tensors(self):
        return [self.table]

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    def state_table(self) -> torch.Tensor:
        """``([N,] T, S, N_I)``: the table on the frames' own states."""
        return self.table.index_select(-2, self.state_component.to(self.table.device))

    def dense_size(self) -> int:
        n = self.table.shape[0] if self.batched else 1
        return n * self.frames.size * self.frames.cardinality * self.intent.cardinality

    def terms(self) -> list[Term]:
        table = self.state_table()
        axis = 1 if self.batched else 0
        return [Term((self.frames[t], self.intent), table.select(axis, t), self.batched, self)
                for t in range(self.frames.size)]

    # -- mean-field (MATH.md §3-4): messages on the component, all frames at once ----------
    def _finite(self) -> bool:
        """Whether φXI has no -inf (checked once per table object)."""
        cached = getattr(self, "_finite_cache", None)
        if cached is None or cached[0] is not self.table:
            cached = (self.table, not bool(torch.isneginf(self.table).any()))
            self._finite_cache = cached
        return cached[1]

    def _eq(self, spec: str) -> str:
        """An einsum spec whose table operand ``ntdi`` drops ``n`` when unbatched."""
        return spec if self.batched else spec.replace("ntdi", "tdi")

    def expected_messages(self, q: Beliefs) -> dict:
        if not self._finite():
            return super().expected_messages(q)
        out: dict = {}
        if q.wants(self.frames):  # Σ_I Q_I(I) φXI(x, I)   (Eq. 5)
            m = torch.einsum(self._eq("ntdi,ni->ntd"), self.table, q.probs(self.intent))
            out[self.frames] = OnComponent(self.component, m)
        if q.wants(self.intent):  # Σ_j H_j(I), H_j(I) = E_{Q_j} φXI(x, I)   (Eq. 6)
            qc = q.component_marginal(self.frames, self.component)
            out[self.intent] = torch.einsum(self._eq("ntd,ntdi->ni"), qc, self.table)
        return out

    def position_energy(self, q: Beliefs) -> dict:
        if not self._finite():
            return super().position_energy(q)
        qc = q.component_marginal(self.frames, self.component)
        e = torch.einsum(self._eq("ntd,ni,ntdi->nt"), qc, q.probs(self.intent), self.table)
        return {self.frames: e}

    def expected_energy(self, q: Beliefs) -> torch.Tensor:
        if not self._finite():
            return super().expected_energy(q)
        return self.position_energy(q)[self.frames].sum(-1)

    def couplings(self) -> list:
        return [(v, self.intent) for v in self.frames]

    # -- closed-form gradient (MATH.md §6, Eq. 8) -------------------------------------------
    def energy_gradient(self, q: Beliefs, form: str = "sequence") -> dict:
        """``{"table": (N, T, D, N_I)}``: ∂ E_Q[log φXI] / ∂ψ_t(u, I) = Q_t(u) Q_I(I), Q_t
        on the component (the same in both forms: each term has one frame)."""
        qc = q.component_marginal(self.frames, self.component)
        return {"table": torch.einsum("ntd,ni->ntdi", qc, q.probs(self.intent))}
