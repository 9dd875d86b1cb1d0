"""The kernelized, fully connected frame-frame factor (MATH.md §2, Eq. 3-4).

    φXX(x_i, x_j) = µ(c(x_i), c(x_j)) · k(t_i, t_j)     for every ordered pair i < j

µ is an asymmetric D x D matrix over a frame component c (the paper: object), µ(a, b) the
affinity of "a, then later b"; k a temporal kernel (default: one Gaussian, σ = 150 frames).
Pairs are ordered by position in the array; frame times must not decrease.
"""

from __future__ import annotations

import torch

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.factors.base import (
    Factor,
    OnComponent,
    Term,
    check_log_potential,
    register_factor,
)
from fieldlib.factors.beliefs import Beliefs
from fieldlib.factors.frame_intent import component_map
from fieldlib.factors.stored import StoredInputs, TemporalCoupling
from fieldlib.kernels import (
    GaussianKernel,
    KernelSum,
    TemporalSums,
    as_kernel,
    pairwise_kernel,
)
from fieldlib.variables import VariableArray

__all__ = ["KernelTemporal"]


@register_factor("kernel_temporal")
class KernelTemporal(Factor):
    """Fully connected temporal factor over the frames of a sequence.

    Args:
        frames: VariableArray of T frames (its ``lengths`` mark padding).
        mu: ``Tensor ([N,] D, D)``: µ(a, b), D the component's cardinality.
        times: ``Tensor ([N,] T)`` frame times (default ``0, 1, ..., T-1``), finite and
            non-decreasing.
        kernel: a σ (one Gaussian) or a kernel object (``GaussianKernel``, ``KernelSum``,
            or any callable on time differences).
        component: block component µ acts on (e.g. ``"o"``), or None for the full state.

    Raises:
        ShapeError: wrong shapes; times that are not finite real numbers or decrease.
        InvalidPotentialError / FieldlibError: µ with NaN or ±inf; a bad σ or kernel
            weights (see :mod:`fieldlib.kernels`); a callable kernel that is not finite at
            the sequence's time differences; µ times the kernel beyond the range of µ's
            dtype (it would make +inf log-potentials).
    """

    def __init__(self, frames: VariableArray, mu, times=None, kernel=150.0,
                 component: str | None = None, name: str | None = None):
        super().__init__(frames, name)
        if not isinstance(frames, VariableArray):
            raise FieldlibError(f"{self.label}: expects a VariableArray of frames")
        self.frames, self.component = frames, component
        self.kernel = as_kernel(kernel)
        self.state_component, self.component_size = component_map(frames.domain, component)
        self.mu = check_log_potential(mu, self.label + " µ")
        if self.mu.isinf().any():
            raise FieldlibError(f"{self.label}: µ must be finite (it is scaled by the kernel)")
        d = self.component_size
        self.mu_batched = self._set_batch(self.mu, (d, d), "mu")
        if times is None:
            times = torch.arange(frames.size, dtype=self.mu.dtype, device=self.mu.device)
        self.times = self._check_times(times)
        self.times_batched = self._set_batch(self.times, (frames.size,), "times")
        if (torch.diff(self.times, dim=-1) < 0).any():
            raise ShapeError(f"{self.label}: frame times must be non-decreasing")
        self._check_kernel()
        self.batched = self.mu_batched or self.times_batched

    def _check_times(self, times) -> torch.Tensor:
        try:
            t = torch.as_tensor(times)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ShapeError(f"{self.label}: frame times must be real numbers ({exc})") from None
        if t.is_complex() or t.dtype == torch.bool:
            raise ShapeError(f"{self.label}: frame times must be real numbers, got {t.dtype}")
        t = t.to(dtype=self.mu.dtype, device=self.mu.device)
        bad = ~torch.isfinite(t)
        if bool(bad.any()):  # inf - inf would be NaN in every kernel value
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ShapeError(f"{self.label}: frame times must be finite and non-decreasing, "
                             f"got {float(t[where])} at index {where}")
        return t

    def _check_kernel(self) -> None:
        """µ·k must be finite in µ's dtype (a +inf log-potential has no meaning, and inf
        times a padded 0 is NaN). A Gaussian is at most 1 and a sum of Gaussians at most
        Σ|w_m|; any other kernel is evaluated at the time differences of consecutive
        frames, 0 and the whole span, which must be finite."""
        kernels = self.kernel.kernels if isinstance(self.kernel, KernelSum) else [self.kernel]
        if all(isinstance(k, GaussianKernel) for k in kernels):
            top = float(self.kernel.weights.detach().abs().double().sum()) \
                if isinstance(self.kernel, KernelSum) else 1.0
        else:
            t = self.times
            probe = torch.cat([t.new_zeros(1), torch.diff(t, dim=-1).flatten(),
                               (t[..., -1] - t[..., 0]).flatten()])
            with torch.no_grad():
                k = torch.as_tensor(self.kernel(probe))
            bad = ~torch.isfinite(k)
            if bool(bad.any()):
                i = int(bad.flatten().nonzero()[0, 0])
                raise FieldlibError(
                    f"{self.label}: the kernel is {float(k.flatten()[i])} at time difference "
                    f"{float(probe[i])}; kernel values must be finite"
                )
            top = float(k.detach().abs().max()) if k.numel() else 0.0
        largest = torch.finfo(self.mu.dtype).max
        mu_top = float(self.mu.detach().abs().max())
        if not (top <= largest and mu_top * top <= largest):
            raise FieldlibError(
                f"{self.label}: µ times the kernel reaches {mu_top:.3g} x {top:.3g}, beyond "
                f"the range of {str(self.mu.dtype).removeprefix('torch.')} ({largest:.3g}); "
                f"rescale µ or the kernel weights, or use a wider dtype")

    def tensors(self):
        return [self.mu, self.times]

    def parameters(self) -> dict[str, torch.Tensor]:
        """``{"mu": µ}`` (the frame times and the kernel are not potentials)."""
        return {"mu": self.mu}

    def kernel_matrix(self) -> torch.Tensor:
        """``([N,] T, T)``: k(t_i, t_j) for i < j, zero on and below the diagonal."""
        k = pairwise_kernel(self.kernel, self.times)
        return torch.triu(k, diagonal=1)

    def state_mu(self) -> torch.Tensor:
        """``([N,] S, S)``: µ on the frames' own states."""
        idx = self.state_component.to(self.mu.device)
        return self.mu.index_select(-2, idx).index_select(-1, idx)

    def dense_size(self) -> int:
        n = self.batch_size or 1
        t, s = self.frames.size, self.frames.cardinality
        return n * t * (t - 1) // 2 * s * s

    def coupling_arity(self) -> int:
        return self.frames.size  # one group: every frame of the sequence

    def has_hard_zeros(self, q: Beliefs) -> bool:
        return False  # µ is finite and so is the kernel (checked at construction)

    def terms(self) -> list[Term]:
        k = self.kernel_matrix()
        mu = self.state_mu()
        out = []
        for i in range(self.frames.size):
            for j in range(i + 1, self.frames.size):
                w = k[..., i, j]
                table = mu * (w[..., None, None] if self.batched and w.dim() else w)
                out.append(Term((self.frames[i], self.frames[j]), table, self.batched, self))
        return out

    # -- mean-field (MATH.md §3): FA_i, FB_i of every frame of the batch at once ------------
    # With K_j the object marginal of Q_j, FA_i = µ (Σ_{j>i} k(i,j) K_j) and
    # FB_i = µᵀ (Σ_{j<i} k(j,i) K_j): two kernel-weighted sums over frames (dense for short
    # sequences, FFT or a bounded window for long ones: fieldlib.kernels.temporal_sums) and
    # two D x D products. Nothing of size T x S or S x S is built. What does not depend on Q
    # (the method, the kernel matrix or its FFT) is built once per run (q.constant).
    def _sums(self, q: Beliefs):
        qc = q.component_marginal(self.frames, self.component)  # (N, T, D)
        method = q.options.kernel_method
        sums = q.constant((self, "kernel sums", method, qc.dtype, qc.device),
                          lambda: TemporalSums(self.kernel, self.times.to(qc.device), method,
                                               dtype=qc.dtype))
        past, future = sums(qc)
        fa = future @ self.mu.transpose(-1, -2)  # FA_i(a) = Σ_b future_i(b) µ(a, b)
        fb = past @ self.mu  # FB_i(b) = Σ_a past_i(a) µ(a, b)
        return qc, fa, fb

    def expected_messages(self, q: Beliefs) -> dict:
        if not q.wants(self.frames):
            return {}
        _, fa, fb = self._sums(q)
        return {self.frames: OnComponent(self.component, fa + fb)}

    def expected_energy(self, q: Beliefs) -> torch.Tensor:
        qc, fa, _ = self._sums(q)  # Σ_{i<j} k(i,j) K_iᵀ µ K_j = Σ_i K_i · FA_i
        return (qc * fa).sum((-1, -2))

    def position_energy(self, q: Beliefs) -> dict:
        qc, fa, fb = self._sums(q)  # each pair counted at both of its frames
        return {self.frames: (qc * (fa + fb)).sum(-1)}

    def couplings(self) -> list:
        return [tuple(self.frames)]

    # -- closed-form gradient (MATH.md §6, Eq. 9) -------------------------------------------
    def _batch_kernel(self, n: int) -> torch.Tensor:
        k = self.kernel_matrix()
        return k.expand(n, *k.shape[-2:])

    def per_frame_gradient(self, q: Beliefs) -> torch.Tensor:
        """``(N, T, D, D)``: Eq. 9's rows of frame i on the component,
        Q_i(a) Σ_{j>i} k(i,j) Q_j(b) + Q_i(b) Σ_{j<i} k(j,i) Q_j(a).
        Their sum over i is twice Σ_{i<j} k(i,j) Q_i(a) Q_j(b) (MATH.md §6, factor-2 note)."""
        qc = q.component_marginal(self.frames, self.component)
        k = self._batch_kernel(q.batch)
        later = torch.einsum("nij,njb->nib", k, qc)  # Σ_{j>i} k(i,j) Q_j
        earlier = torch.einsum("nji,nja->nia", k, qc)  # Σ_{j<i} k(j,i) Q_j
        return (torch.einsum("nia,nib->niab", qc, later)
                + torch.einsum("nib,nia->niab", qc, earlier))

    def energy_gradient(self, q: Beliefs, form: str = "sequence") -> dict:
        """``{"mu": (N, D, D)}``: ∂ E_Q[log φXX] / ∂µ(a, b) = Σ_{i<j} k(i,j) Q_i(a) Q_j(b)
        (``form="sequence"``), or the sum of :meth:`per_frame_gradient`'s rows, twice that
        (``form="frame"``)."""
        if form == "frame":
            return {"mu": self.per_frame_gradient(q).sum(1)}
        qc = q.component_marginal(self.frames, self.component)
        return {"mu": torch.einsum("nij,nia,njb->nab", self._batch_kernel(q.batch), qc, qc)}

    # -- stored messages (asynchronous mean-field, MATH.md §4-5; fieldlib.factors.stored) ----
    def stored_coupling(self) -> TemporalCoupling:
        """What a frame sends (K_j, K*_j on µ's component) and how the incoming ones combine
        (FA_i + FB_i with the current µ): docs/asynchronous.md."""
        return TemporalCoupling(self.state_component, self.component_size)

    def stored_inputs(self, n: int) -> StoredInputs:
        """µ per sequence ``(n, D, D)``, the frame times ``(n, T)`` and the kernel."""
        d, t = self.component_size, self.frames.size
        return StoredInputs(self.frames, sequence={"mu": self.mu.expand(n, d, d)},
                            times=self.times.expand(n, t), kernel=self.kernel)
