"""Kernel-weighted sums behind the temporal messages: dense, FFT and banded agree."""

from __future__ import annotations

import math

import pytest
import torch

from fieldlib.errors import FieldlibError
from fieldlib.kernels import GaussianKernel, KernelSum, kernel_radius, temporal_sums

F64 = torch.float64


def _naive(kernel, times, values):
    n, t, _ = values.shape
    times = times.expand(n, t)
    past, future = torch.zeros_like(values), torch.zeros_like(values)
    for b in range(n):
        for i in range(t):
            for j in range(t):
                w = kernel(times[b, j] - times[b, i])
                if j > i:
                    future[b, i] += w * values[b, j]
                elif j < i:
                    past[b, i] += w * values[b, j]
    return past, future


@pytest.mark.parametrize("method", ["dense", "fft", "banded"])
def test_methods_equal_the_naive_double_loop(method):
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(2, 17, 3, generator=gen, dtype=F64)
    times = torch.arange(17, dtype=F64) * 0.5
    kernel = GaussianKernel(2.0)
    ref = _naive(kernel, times, values)
    out = temporal_sums(kernel, times, values, method=method)
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-12)


def test_fft_exact_on_long_uniform_sequences_with_batched_steps():
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(2, 300, 4, generator=gen, dtype=F64)
    times = torch.stack([torch.arange(300, dtype=F64), 2.0 * torch.arange(300, dtype=F64)])
    kernel = KernelSum([GaussianKernel(5.0), GaussianKernel(40.0)], torch.tensor([1.0, 0.3]))
    ref = temporal_sums(kernel, times, values, method="dense")
    out = temporal_sums(kernel, times, values, method="fft")
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(FieldlibError):
        temporal_sums(kernel, times ** 1.1, values, method="fft")


def test_banded_error_within_its_bound_on_non_uniform_times():
    gen = torch.Generator().manual_seed(2)
    t = 400
    values = torch.softmax(torch.randn(1, t, 3, generator=gen, dtype=F64), -1)
    times = torch.sort(torch.rand(1, t, generator=gen, dtype=F64) * 300).values
    kernel = GaussianKernel(6.0)
    ref = temporal_sums(kernel, times, values, method="dense")
    for tol in (1e-3, 1e-9):
        out = temporal_sums(kernel, times, values, method="banded", tol=tol)
        for a, b in zip(ref, out):
            assert float((a - b).abs().sum(-1).max()) <= tol
    # the radius is the documented one
    assert kernel_radius(kernel, t, 1e-9) == pytest.approx(6.0 * math.sqrt(2 * math.log(t / 1e-9)))
    assert kernel_radius(lambda d: d, t) is None


def test_auto_on_a_long_float32_sequence_matches_dense_to_rounding():
    values = torch.rand(1, 3000, 2, generator=torch.Generator().manual_seed(3))
    times = torch.arange(3000.0)
    auto = temporal_sums(GaussianKernel(150.0), times, values)
    dense = temporal_sums(GaussianKernel(150.0), times, values, method="dense")
    for a, b in zip(auto, dense):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
