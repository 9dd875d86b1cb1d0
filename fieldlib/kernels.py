"""Temporal kernels on frame times (MATH.md §2, Eq. 3-4).

The frame-frame factor weighs the label compatibility µ(x_i, x_j) by a kernel of the two
frames' times: k(i, j) = Σ_m w_m exp(-(t_j - t_i)^2 / (2 σ_m^2)). The paper uses one
Gaussian, σ = 150 frames at 24 fps (6.25 s).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from fieldlib.errors import FieldlibError, ShapeError

__all__ = ["GaussianKernel", "KernelSum", "TemporalSums", "as_kernel", "temporal_sums",
           "kernel_radius"]


class GaussianKernel:
    """k(t_i, t_j) = exp(-(t_j - t_i)^2 / (2 σ^2)).

    Args:
        sigma: bandwidth in the unit of the frame times: a finite number > 0.

    Evaluated as exp(-(Δ/σ)^2 / 2), with σ clipped to the range of Δ's dtype, so no σ
    gives 0/0 or an overflow: a σ below the dtype's smallest normal number is a kernel that
    is 1 at Δ = 0 and 0 elsewhere, one above its largest is 1 everywhere.

    Raises:
        FieldlibError: sigma not a finite number > 0 (0, negative, NaN, inf, a string,
            a boolean).
    """

    def __init__(self, sigma: float):
        value = None
        if not isinstance(sigma, bool | str | bytes):
            try:
                value = float(sigma)
            except (TypeError, ValueError, RuntimeError):
                value = None
        if value is None or not (math.isfinite(value) and value > 0):
            raise FieldlibError(
                f"a Gaussian kernel needs sigma > 0, a finite number, got {sigma!r}")
        self.sigma = value

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        """Kernel value at time differences ``delta`` (any shape)."""
        dtype = delta.dtype if delta.is_floating_point() else torch.get_default_dtype()
        info = torch.finfo(dtype)
        sigma = min(max(self.sigma, info.tiny), info.max)
        z = delta / sigma
        return torch.exp(-0.5 * (z * z))

    def __repr__(self) -> str:
        return f"GaussianKernel(sigma={self.sigma:g})"


class KernelSum:
    """Σ_m w_m k_m (Eq. 3): several kernels with weights (floats or tensors with grad).

    Args:
        kernels: the k_m, each callable on time differences.
        weights: the w_m, finite real numbers; a tensor of shape (M,) may require grad
            (learned weights).

    Raises:
        FieldlibError: no kernels, a kernel that is not callable, weights that are NaN,
            infinite, complex or boolean. ShapeError: weights not of shape (M,).
    """

    def __init__(self, kernels: Sequence, weights=None):
        self.kernels = list(kernels)
        if not self.kernels:
            raise FieldlibError("KernelSum needs at least one kernel")
        for m, k in enumerate(self.kernels):
            if not callable(k):
                raise FieldlibError(f"KernelSum: kernel {m} is not callable: {k!r}")
        if weights is None:
            weights = torch.ones(len(self.kernels))
        try:
            w = torch.as_tensor(weights)
            if w.is_floating_point() and not isinstance(weights, torch.Tensor):
                # Python floats in float64, not torch's default float32: 1e308 stays
                # finite, 0.1 stays 0.1 (a tensor keeps its own dtype)
                w = torch.as_tensor(weights, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise FieldlibError(f"KernelSum: weights must be real numbers ({exc})") from None
        if w.is_complex() or w.dtype == torch.bool:
            raise FieldlibError(f"KernelSum: weights must be real numbers, got {w.dtype}")
        if w.shape != (len(self.kernels),):
            raise ShapeError(
                f"KernelSum: {len(self.kernels)} kernels need weights of shape "
                f"({len(self.kernels)},), got {tuple(w.shape)}"
            )
        if not w.is_floating_point():
            w = w.to(torch.get_default_dtype())
        bad = ~torch.isfinite(w.detach())
        if bool(bad.any()):
            m = int(bad.nonzero()[0, 0])
            raise FieldlibError(
                f"KernelSum: weight {m} is {float(w[m])}; kernel weights must be finite")
        self.weights = w

    def __call__(self, delta: torch.Tensor) -> torch.Tensor:
        w = self.weights.to(delta)
        return sum(w[m] * k(delta) for m, k in enumerate(self.kernels))

    def __repr__(self) -> str:
        return f"KernelSum({self.kernels})"


def as_kernel(kernel) -> GaussianKernel | KernelSum:
    """A number is the σ of one Gaussian; a kernel object (any callable) passes through.

    Raises FieldlibError for anything else (a boolean, a string, a bad σ)."""
    if isinstance(kernel, bool | str | bytes):
        raise FieldlibError(f"expected a kernel or a sigma, got {kernel!r}")
    if isinstance(kernel, numbers.Real):
        return GaussianKernel(kernel)
    if callable(kernel):
        return kernel
    raise FieldlibError(f"expected a kernel or a sigma, got {kernel!r}")


def pairwise_kernel(kernel, times: torch.Tensor) -> torch.Tensor:
    """``(..., T, T)`` matrix K[i, j] = k(t_i, t_j) for times ``(..., T)``."""
    return kernel(times[..., None, :] - times[..., :, None])


# -- fast filtering: the kernel-weighted sums behind the mean-field messages (MATH.md §3) ---
#
#     future_i = Σ_{j>i} k(t_i, t_j) v_j        past_i = Σ_{j<i} k(t_j, t_i) v_j
#
# for values v (N, T, D) (a frame's object marginal), pairs ordered by position. Methods:
#   dense   T x T kernel matrix, exact; memory N·T², used for short sequences.
#   fft     uniformly spaced times: the kernel matrix is Toeplitz, so both sums are linear
#           convolutions done by FFT in O(T log T), exact up to floating-point rounding.
#   banded  non-uniform times and a kernel of known decay (Gaussians): pairs farther apart
#           than the radius R of :func:`kernel_radius` are dropped; the dropped weight of a
#           frame is below ``tol`` (an absolute bound on Σ_d |error(future_i)[d]| when every
#           v_j sums to at most 1). Memory O(N·T·w), w the frames within R.

#: Sequences up to this many frames use the dense T x T kernel matrix (exact, fastest there).
DENSE_MAX_FRAMES = 64
#: Default bound of the banded method on the kernel weight a frame loses (see above).
BANDED_TOL = 1e-9
#: Elements of kernel blocks the banded method materialises at once.
_BANDED_CHUNK = 2**24


def kernel_radius(kernel, frames: int, tol: float = BANDED_TOL) -> float | None:
    """A time radius R such that every pair with |t_j - t_i| > R has |k| < tol / frames.

    Dropping those pairs then loses less than ``tol`` of kernel weight per frame (a frame
    has fewer than ``frames`` partners). Gaussian: R = σ sqrt(2 ln(frames / tol)). A
    :class:`KernelSum` of M kernels bounds each |w_m| k_m by tol / (M frames). None when the
    kernel's decay is unknown (any other callable).
    """
    frames = max(int(frames), 1)
    if isinstance(kernel, GaussianKernel):
        return kernel.sigma * math.sqrt(2.0 * math.log(max(frames / tol, 1.0)))
    if isinstance(kernel, KernelSum):
        weights = kernel.weights.detach().abs().double().tolist()
        radii = [0.0]
        for w, k in zip(weights, kernel.kernels):
            if w > 0.0:
                r = kernel_radius(k, frames, tol / (len(weights) * w))
                if r is None:
                    return None
                radii.append(r)
        return max(radii)
    return None


def _is_uniform(times: torch.Tensor) -> bool:
    """Whether every row of ``times (B, T)`` is t_0 + Δ j (Δ may differ between rows)."""
    t = times.detach().double()
    n = t.shape[-1]
    if n < 3:
        return True
    step = (t[:, -1:] - t[:, :1]) / (n - 1)
    grid = t[:, :1] + step * torch.arange(n, dtype=t.dtype, device=t.device)
    scale = t.abs().amax(-1, keepdim=True).clamp(min=1.0)
    return bool(((t - grid).abs() <= 1e-9 * scale).all())


def _dense_matrix(kernel, times, dtype):
    """``(B, T, T)``: k(t_i, t_j) for i < j, zero on and below the diagonal."""
    return torch.triu(pairwise_kernel(kernel, times).to(dtype), diagonal=1)


def _fft_spectrum(kernel, times, n, dtype):
    """``(spectrum (B, 1, F), size)``: the FFT of the kernel at lags 0..T-1 (0 at lag 0, which
    is no pair), zero-padded to a linear (not circular) convolution."""
    step = (times[:, -1:] - times[:, :1]) / max(n - 1, 1)  # (B, 1)
    lags = torch.arange(n, dtype=times.dtype, device=times.device)
    h = kernel(lags * step).to(dtype)  # (B, T): k at lag d
    h = torch.cat([torch.zeros_like(h[:, :1]), h[:, 1:]], dim=-1)
    size = 1 << (2 * n - 1).bit_length()
    return torch.fft.rfft(h, size)[:, None, :], size


def _sums_fft(spectrum, size, values):
    n = values.shape[-2]
    vf = torch.fft.rfft(values.transpose(-1, -2).contiguous(), size)  # (N, D, F)
    # past: convolution with h; future: correlation with h (conjugate spectrum)
    both = torch.fft.irfft(torch.stack([vf * spectrum, vf * spectrum.conj()]), size)[..., :n]
    return both[0].transpose(-1, -2), both[1].transpose(-1, -2)


def _sums_banded(kernel, times, values, radius):
    nb_, n, d = values.shape
    t64 = times.detach().double()
    reach = torch.searchsorted(t64.contiguous(), (t64 + radius).contiguous(), right=True)
    width = int((reach - 1 - torch.arange(n, device=times.device)).max().clamp(min=1))
    block = min(width, n)
    blocks = -(-n // block)
    pad = blocks * block - n
    if pad:
        values = torch.cat([values, values.new_zeros(nb_, pad, d)], dim=1)
        times = torch.cat([times, times[:, -1:].expand(times.shape[0], pad)], dim=1)
    vb = values.view(nb_, blocks, block, d)
    tb = times.view(times.shape[0], blocks, block)
    past = torch.zeros_like(vb)
    future = torch.zeros_like(vb)
    upper = torch.ones(block, block, dtype=torch.bool, device=values.device).triu(1)
    step = max(1, _BANDED_CHUNK // (nb_ * block * block))
    for b0 in range(0, blocks, step):  # chunks of blocks bound the memory, not frames
        b1 = min(blocks, b0 + step)
        t0 = tb[:, b0:b1]
        k0 = kernel(t0[..., None, :] - t0[..., :, None]).to(values.dtype) * upper
        future[:, b0:b1] += k0 @ vb[:, b0:b1]
        past[:, b0:b1] += k0.transpose(-1, -2) @ vb[:, b0:b1]
        c1 = min(b1, blocks - 1)  # cross pairs: block b with block b + 1
        if c1 > b0:
            ta, tn = tb[:, b0:c1], tb[:, b0 + 1:c1 + 1]
            k1 = kernel(tn[..., None, :] - ta[..., :, None]).to(values.dtype)
            future[:, b0:c1] += k1 @ vb[:, b0 + 1:c1 + 1]
            past[:, b0 + 1:c1 + 1] += k1.transpose(-1, -2) @ vb[:, b0:c1]
    past = past.reshape(nb_, blocks * block, d)[:, :n]
    future = future.reshape(nb_, blocks * block, d)[:, :n]
    return past, future


class TemporalSums:
    """The kernel-weighted sums of :func:`temporal_sums` for fixed frame times, with what does
    not depend on the values computed once: the method, the dense kernel matrix, the FFT
    spectrum of the kernel, the band radius. A mean-field run builds one per factor and
    applies it every pass.

    Args:
        kernel, times ``([N,] T)``, method, tol: as for :func:`temporal_sums`.
        dtype: the dtype of the values it will be applied to (default: the times').

    Calling it on values ``(N, T, D)`` returns ``(past, future)`` as :func:`temporal_sums`.

    Raises:
        FieldlibError: an unknown method, fft on non-uniform times, or banded with a kernel
            whose decay is unknown (use uniform times or a Gaussian kernel).
    """

    def __init__(self, kernel, times: torch.Tensor, method: str = "auto",
                 tol: float = BANDED_TOL, dtype=None):
        times = times if times.dim() == 2 else times.unsqueeze(0)
        n = times.shape[-1]
        dtype = dtype or times.dtype
        self.kernel, self.times, self.frames = kernel, times, n
        if method == "auto":
            if n <= DENSE_MAX_FRAMES:
                method = "dense"
            elif _is_uniform(times):
                method = "fft"
            elif kernel_radius(kernel, n, tol) is not None:
                method = "banded"
            else:
                method = "dense"
        elif method == "fft" and not _is_uniform(times):
            raise FieldlibError("the fft method needs uniformly spaced frame times")
        self.method = method
        if method == "dense":
            self._k = _dense_matrix(kernel, times, dtype)
            self._kt = self._k.transpose(-1, -2)
        elif method == "fft":
            self._spectrum, self._size = _fft_spectrum(kernel, times, n, dtype)
        elif method == "banded":
            self._radius = kernel_radius(kernel, n, tol)
            if self._radius is None:
                raise FieldlibError(
                    f"the banded method needs a kernel of known decay (Gaussian), got "
                    f"{kernel!r}")
        else:
            raise FieldlibError(
                f"unknown kernel-sum method {method!r}; use auto, dense, fft, banded")

    def __call__(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "dense":
            return self._kt @ values, self._k @ values
        if self.method == "fft":
            return _sums_fft(self._spectrum, self._size, values)
        return _sums_banded(self.kernel, self.times, values, self._radius)


def temporal_sums(kernel, times: torch.Tensor, values: torch.Tensor, method: str = "auto",
                  tol: float = BANDED_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """``(past, future)``, each ``(N, T, D)``: the kernel-weighted sums over earlier and later
    frames (see the comment above) for ``values (N, T, D)`` and ``times ([N,] T)``.

    Args:
        method: ``"dense"``, ``"fft"``, ``"banded"`` or ``"auto"`` (dense up to
            ``DENSE_MAX_FRAMES`` frames, then fft for uniformly spaced times, then banded).
        tol: the banded method's bound on the kernel weight dropped per frame.

    Raises:
        FieldlibError: an unknown method, fft on non-uniform times, or banded with a kernel
            whose decay is unknown (use uniform times or a Gaussian kernel).
    """
    return TemporalSums(kernel, times, method, tol, values.dtype)(values)
