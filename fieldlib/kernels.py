"""Temporal kernels on frame times (MATH.md §2, Eq. 3-4).

The frame-frame factor weighs the label compatibility µ(x_i, x_j) by a kernel of the two
frames' times: k(i, j) = Σ_m w_m exp(-(t_j - t_i)^2 / (2 σ_m^2)). The paper uses one
Gaussian, σ = 150 frames at 24 fps (6.25 s).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fieldlib.errors import FieldlibError, ShapeError

__all__ = ["GaussianKernel", "KernelSum", "as_kernel"]


class GaussianKernel:
    """k(t_i, t_j) = exp(-(t_j - t_i)^2 / (2 σ^2)).

    Args:
        sigma: bandwidth in the unit of the frame times (> 0).
    """

    def __init__(self, sigma: float):
        if not float(sigma) > 0:
            raise FieldlibError(f"a Gaussian kernel needs sigma > 0, got {sigma!r}")
        self.sigma = float(sigma)

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """Kernel value at time differences ``delta`` (any shape)."""
        return torch.exp(-(delta * delta) / (2.0 * self.sigma**2))

    def __repr__(self) -> str:
        return f"GaussianKernel(sigma={self.sigma:g})"


class KernelSum:
    """Σ_m w_m k_m (Eq. 3): several kernels with weights (floats or tensors with grad).

    Args:
        kernels: the k_m, each callable on time differences.
        weights: the w_m; a tensor of shape (M,) may require grad (learned weights).
    """

    def __init__(self, kernels: Sequence, weights=None):
        self.kernels = list(kernels)
        if not self.kernels:
            raise FieldlibError("KernelSum needs at least one kernel")
        if weights is None:
            weights = torch.ones(len(self.kernels))
        w = torch.as_tensor(weights)
        if w.shape != (len(self.kernels),):
            raise ShapeError(
                f"KernelSum: {len(self.kernels)} kernels need weights of shape "
                f"({len(self.kernels)},), got {tuple(w.shape)}"
            )
        self.weights = w

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        w = self.weights.to(delta)
        return sum(w[m] * k(delta) for m, k in enumerate(self.kernels))

    def __repr__(self) -> str:
        return f"KernelSum({self.kernels})"


def as_kernel(kernel) -> GaussianKernel | KernelSum:
    """A number is the σ of one Gaussian; a kernel object passes through."""
    if isinstance(kernel, int | float):
        return GaussianKernel(kernel)
    if callable(kernel):
        return kernel
    raise FieldlibError(f"expected a kernel or a sigma, got {kernel!r}")


def pairwise_kernel(kernel, times: torch.Tensor) -> torch.Tensor:
    """``(..., T, T)`` matrix K[i, j] = k(t_i, t_j) for times ``(..., T)``."""
    return kernel(times[..., None, :] - times[..., :, None])
