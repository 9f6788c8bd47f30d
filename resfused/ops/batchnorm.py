"""BatchNorm(+ReLU) as the blocks need it: training mode fused (batch statistics, normalize,
affine and ReLU in one kernel; a fused backward), eval mode as the scale/shift tail.

    batch_norm_act(x, bn, relu)

Training mode updates bn.running_mean / running_var (unbiased) / num_batches_tracked exactly as
nn.BatchNorm2d does (momentum, or the cumulative average when momentum is None). Kernel:
csrc/cpu/bn_train.cpp (schema csrc/bn_train.cpp); this file adds its fake kernel and autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from resfused import _native, backend, folding
from resfused.ops import buffer_cache, checks, tails
from resfused.ops.dispatch import record


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
    weight = bn.weight if bn.weight is not None else x.new_ones(bn.num_features, dtype=torch.float32)
    bias = bn.bias if bn.bias is not None else x.new_zeros(bn.num_features, dtype=torch.float32)
    if backend.resolve(x.device) != "reference" and _native.has_kernel("bn_train_act", x.device.type):
        record("batch_norm", f"native-{x.device.type}")
        y, mean, var = torch.ops.resfused.bn_train_act(x, weight, bias, bn.eps, bool(relu))
        _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
        return y
    record("batch_norm", "reference")
    y = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)  # batch statistics, no update
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
    _update_running_stats(bn, mean, var, x.numel() // x.shape[1])
    return torch.relu(y) if relu else y


def _register() -> None:
    @torch.library.register_fake("resfused::bn_train_act")
    def _(x, weight, bias, eps, relu):
        stats = x.new_empty(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
        return torch.empty_like(x, memory_format=suggest_memory_format(x)), stats, torch.empty_like(stats)

    @torch.library.register_fake("resfused::bn_train_act_backward")
    def _(grad_out, x, weight, bias, mean, var, eps, relu):
        return torch.empty_like(x, memory_format=suggest_memory_format(x)), torch.empty_like(weight), torch.empty_like(bias)

    def setup(ctx, inputs, output):
        x, weight, bias, eps, relu = inputs
        _, mean, var = output
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, bias, mean, var)

    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        grad_y = grad_y.contiguous(memory_format=suggest_memory_format(x))
        with buffer_cache.scope():  # see ops/conv_train.py
            grads = torch.ops.resfused.bn_train_act_backward(grad_y, x, weight, bias, mean, var, ctx.eps, ctx.relu)
        return (*grads, None, None)

    torch.library.register_autograd("resfused::bn_train_act", backward, setup_context=setup)


if _native.has_op("bn_train_act"):
    _register()
