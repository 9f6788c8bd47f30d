"""BatchNorm(+ReLU) as the blocks need it: training mode fused (batch statistics, normalize,
affine and ReLU in one kernel; a fused backward), eval mode as the scale/shift tail.

    batch_norm_act(x, bn, relu)

Training mode updates bn.running_mean / running_var (unbiased) / num_batches_tracked exactly as
nn.BatchNorm2d does (momentum, or the cumulative average when momentum is None). Kernels, fake
kernel and autograd: resfused/kernels/batchnorm_train.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from resfused import folding
from resfused.kernels.batchnorm_train import CompiledBatchNormTrain, ReferenceBatchNormTrain
from resfused.ops import checks, tails
from resfused.ops.selection import candidates, compiled_on_every_backend, select

KERNELS = compiled_on_every_backend(CompiledBatchNormTrain())
_REFERENCE = ReferenceBatchNormTrain()


def uses_batch_statistics(bn) -> bool:
    """nn.BatchNorm2d uses batch statistics in training, and always when it keeps no running stats."""
    return bn.training or bn.running_mean is None or bn.running_var is None


def _check_batch(x, bn) -> None:
    values_per_channel = x.numel() // max(x.shape[1], 1)
    if values_per_channel <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")


def _update_running_stats(bn, mean, var, count: int) -> None:
    """The update nn.BatchNorm2d makes, with the biased batch variance `var` over `count` values."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        unbiased = var * (count / (count - 1))
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)


def batch_norm_act(x: torch.Tensor, bn: torch.nn.BatchNorm2d, relu: bool) -> torch.Tensor:
    """[relu](bn(x)), fused; in training mode also updates bn's running statistics."""
    checks.activation(x, "x")
    checks.module(bn, "bn", nn.modules.batchnorm._BatchNorm, "a BatchNorm module (nn.BatchNorm2d)")
    if x.shape[1] != bn.num_features:
        raise ValueError(f"resfused: 'x' must have {bn.num_features} channels for this BatchNorm, got {tuple(x.shape)}")
    if not uses_batch_statistics(bn):
        scale, shift = folding.bn_scale_shift(bn, torch.promote_types(x.dtype, torch.float32), differentiable=True)
        return tails.scale_shift_act(x, scale, shift, relu)
    if x.numel() == 0:
        # An empty batch: nn.BatchNorm2d returns it (empty) and counts it; the statistics stay.
        if bn.training and bn.track_running_stats:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
        y = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return torch.relu(y) if relu else y
    _check_batch(x, bn)
    args = (x, bn.weight, bn.bias, bn.eps, bool(relu))
    y, mean, var = select("batch_norm", candidates(KERNELS, x.device), _REFERENCE, args).run(*args)
    _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
    return y
