"""Batch normalisation whose statistics span the frames of every process (any backend).

``torch.nn.SyncBatchNorm`` runs on GPUs only; with gloo on CPU a BatchNorm layer in a
data-parallel run would normalise each process's share of the batch by its own statistics,
and K processes would no longer compute what one process computes on the whole batch.
:class:`CrossProcessBatchNorm` all-reduces (Σ x, Σ x², count) over the group with
``torch.distributed.nn.functional.all_reduce``, which is differentiable, so the forward
values, the gradients and the running statistics are those of one BatchNorm over the
concatenated batch (up to the order of floating-point sums). :func:`convert_batchnorm` swaps
it in for every ``BatchNorm2d`` of a module (``SyncBatchNorm`` is the better choice on GPUs).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CrossProcessBatchNorm", "convert_batchnorm"]


class CrossProcessBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` with training statistics over the batches of every process of
    ``group`` (module docstring). Evaluation uses the running statistics, as BatchNorm2d.

    Args: as ``BatchNorm2d``, plus ``group`` (None: the default process group).
    """

    def __init__(self, num_features: int, *, group=None, **options):
        super().__init__(num_features, **options)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1)
        count = torch.tensor([float(flat.shape[1])], dtype=x.dtype, device=x.device)
        packed = torch.cat([flat.sum(1), (flat * flat).sum(1), count])
        group = self.group or dist.group.WORLD
        with warnings.catch_warnings():  # the differentiable all_reduce is "deprecated" in
            warnings.simplefilter("ignore", FutureWarning)  # favour of one without autograd
            packed = all_reduce(packed, group=group)
        total, square, n = packed[:c], packed[c:2 * c], packed[2 * c]
        mean = total / n
        var = (square / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1.0))
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        shape = (1, c, 1, 1)
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


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
