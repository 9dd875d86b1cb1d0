"""Batch normalisation whose statistics span the frames of every process (any backend).

``torch.nn.SyncBatchNorm`` runs on GPUs only; with gloo on CPU a BatchNorm layer in a
data-parallel run would normalise each process's share of the batch by its own statistics,
and K processes would no longer compute what one process computes on the whole batch.
:class:`CrossProcessBatchNorm` computes the statistics of the concatenated batch, so the
forward values, the gradients and the running statistics are those of one BatchNorm over it
(up to the order of floating-point sums). :func:`convert_batchnorm` swaps it in for every
``BatchNorm2d`` of a module (``SyncBatchNorm`` is the better choice on GPUs).

One training forward + backward of a layer is two collectives, whatever the batch:

* forward: each process's (count, mean, variance) per channel, two passes (one
  ``all_gather`` of ``1 + 2C`` numbers), combined as Chan et al.'s parallel variance (no
  Σx² cancellation); then torch's fused ``batch_norm`` with those statistics;
* backward: Σ dy and Σ dy·x̂ per channel (torch's fused ``native_batch_norm_backward``) summed
  over the processes (one ``all_reduce`` of 2C numbers); then
  ``dx = γ σ⁻¹ (dy - Σdy / N - x̂ Σ(dy·x̂) / N)`` in two fused passes. γ's and β's gradients
  are this process's own sums: DDP's gradient all-reduce adds them up.

That is three to four passes over the activation a layer (a hand-written autograd of the
same formula takes about ten).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["CrossProcessBatchNorm", "convert_batchnorm", "cross_process_moments"]


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _bshape(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def cross_process_moments(x: torch.Tensor, group=None) -> tuple[torch.Tensor, ...]:
    """``(mean (C,), biased variance (C,), N)`` over the channel axis 1 of ``x`` on every
    process of ``group`` (one all_gather; N, the elements a channel, is a 0-d tensor).
    A process with an empty batch contributes nothing."""
    c = x.shape[1]
    count = x.numel() // c if c else 0
    if count:  # two passes (mean, then squared deviations): stable, and several times
        # faster on CPU than torch.var_mean over the non-channel axes
        dims = _channel_dims(x)
        mean = x.detach().mean(dims, keepdim=True)
        var = (x.detach() - mean).square_().mean(dims)
        mean = mean.reshape(c)
    else:
        var = mean = x.new_zeros(c)
    mine = torch.cat([mean.new_tensor([float(count)]), mean, var])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered)  # (world, 1 + 2C)
    n, means, variances = table[:, :1], table[:, 1:1 + c], table[:, 1 + c:]
    total = n.sum()
    if float(total) == 0:
        raise ValueError("CrossProcessBatchNorm: every process has an empty batch")
    mean = (n * means).sum(0) / total
    var = (n * (variances + (means - mean) ** 2)).sum(0) / total
    return mean, var, total


class _CrossProcessNorm(torch.autograd.Function):
    """y = BN(x) with the statistics of every process's batch (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, total, eps, group):
        y = torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, var, total)
        ctx.eps, ctx.group = eps, group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, mean, var, total = ctx.saved_tensors
        dy = dy.contiguous()
        _, g_weight, g_bias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [False, True, True])
        c = x.shape[1]
        sums = torch.cat([g_bias, g_weight])  # this process's Σ dy, Σ dy·x̂
        dist.all_reduce(sums, group=ctx.group)
        sum_dy, sum_dy_xhat = sums[:c], sums[c:]
        invstd = torch.rsqrt(var + ctx.eps)
        scale = invstd if weight is None else invstd * weight  # γ σ⁻¹
        # dx = scale (dy - Σdy/N - (x - m) σ⁻¹ Σ(dy x̂)/N) = scale dy + a x + b
        a = -scale * invstd * sum_dy_xhat / total
        b = -scale * sum_dy / total - a * mean
        shape = _bshape(x)
        dx = torch.addcmul(b.reshape(shape), x, a.reshape(shape))
        dx.addcmul_(dy, scale.reshape(shape))
        needs = ctx.needs_input_grad
        return (dx, g_weight if weight is not None and needs[1] else None,
                g_bias if needs[2] else None, None, None, None, None, None)


class CrossProcessBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` with training statistics over the batches of every process of
    ``group`` (module docstring). Evaluation uses the running statistics, as BatchNorm2d;
    without an initialised process group it is a plain BatchNorm2d.

    Args: as ``BatchNorm2d``, plus ``group`` (None: the default process group).
    """

    def __init__(self, num_features: int, *, group=None, **options):
        super().__init__(num_features, **options)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        group = self.group or dist.group.WORLD
        mean, var, total = cross_process_moments(x, group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        weight = self.weight if self.affine else None
        bias = self.bias if self.affine else None
        return _CrossProcessNorm.apply(x, weight, bias, mean, var, total, self.eps, group)


def convert_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` (in place, parameters and running
    statistics copied) by a :class:`CrossProcessBatchNorm` over ``group``; returns it."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CrossProcessBatchNorm):
            new = CrossProcessBatchNorm(child.num_features, group=group, eps=child.eps,
                                        momentum=child.momentum, affine=child.affine,
                                        track_running_stats=child.track_running_stats)
            like = next(child.buffers(), None)
            if like is not None:
                dtype = child.weight.dtype if child.affine else like.dtype
                new.to(device=like.device, dtype=dtype)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert_batchnorm(child, group)
    return module
