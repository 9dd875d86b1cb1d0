"""The kernelized, fully connected frame-frame factor (MATH.md §2, Eq. 3-4).

    φXX(x_i, x_j) = µ(c(x_i), c(x_j)) · k(t_i, t_j)     for every ordered pair i < j

µ is an asymmetric D x D matrix over a frame component c (the paper: object), µ(a, b) the
affinity of "a, then later b"; k a temporal kernel (default: one Gaussian, σ = 150 frames).
Pairs are ordered by position in the array; frame times must not decrease.
"""

from __future__ import annotations

import torch

from fieldlib.errors import FieldlibError, ShapeError
from fieldlib.factors.base import Factor, Term, check_log_potential, register_factor
from fieldlib.factors.frame_intent import component_map
from fieldlib.kernels import as_kernel, pairwise_kernel
from fieldlib.variables import VariableArray

__all__ = ["KernelTemporal"]


@register_factor("kernel_temporal")
class KernelTemporal(Factor):
    """Fully connected temporal factor over the frames of a sequence.

    Args:
        frames: VariableArray of T frames (its ``lengths`` mark padding).
        mu: ``Tensor ([N,] D, D)``: µ(a, b), D the component's cardinality.
        times: ``Tensor ([N,] T)`` frame times (default ``0, 1, ..., T-1``), non-decreasing.
        kernel: a σ (one Gaussian) or a kernel object (``GaussianKernel``, ``KernelSum``).
        component: block component µ acts on (e.g. ``"o"``), or None for the full state.
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
        self.times = torch.as_tensor(times, dtype=self.mu.dtype, device=self.mu.device)
        self.times_batched = self._set_batch(self.times, (frames.size,), "times")
        if torch.isnan(self.times).any() or (torch.diff(self.times, dim=-1) < 0).any():
            raise ShapeError(f"{self.label}: frame times must be non-decreasing and not NaN")
        self.batched = self.mu_batched or self.times_batched

    def tensors(self):
        return [self.mu, self.times]

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
