"""Training-mode convolution kernels: ATen's convolution, or Winograd F(4x4, 3x3)
(kernels/winograd_f43.py) on the 3x3 shapes where it measured faster for forward + both gradients.

The fused blocks' training forward runs inside a buffer-cache scope (runtime/buffer_cache.py), so
the activations it saves return to the cache when the backward frees them; the backward's own
large buffers (grad_input, grad_weight) must come from the same cache to reuse them. ATen's
ConvolutionBackward node runs outside any scope, hence `ScopedConv2d`: ATen's math
(aten.convolution forward, aten.convolution_backward backward), its backward inside a scope.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resfused.kernels import winograd_f43
from resfused.kernels.base import Kernel
from resfused.runtime import buffer_cache
from resfused.runtime.trace import record_runtime_fallback


class ScopedConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.conv = (stride, padding, dilation, groups, None if bias is None else bias.shape)
        ctx.save_for_backward(x, weight)
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, bias_shape = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_shape is not None and ctx.needs_input_grad[2]]
        with buffer_cache.scope():
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_shape, stride, padding, dilation, False, [0, 0], groups, mask
            )
        return gx, gw, gb, None, None, None, None


class ATenTrainConv(Kernel):
    name = "aten"
    differentiable = True

    def run(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        return ScopedConv2d.apply(
            x, conv.weight, conv.bias, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups
        )


class WinogradTrainConv(Kernel):
    """The weight transform is redone every step, and the 36 x C_in x C_out transformed weights
    are large: F(4x4, 3x3) trains faster only up to 128 channels at >= 28x28 (measured on a 2-core
    Zen 4 at batch 8: 1.42x at 64 ch @56x56, 1.68x at 128 @28x28, 1.01x at 256 @14x14, 0.52x at
    512 @7x7; `python -m benchmarks.winograd_cpu --train --batch 8`, docs/measurements.md)."""

    name = "winograd_f43"
    differentiable = True
    traceable = False  # a non-finite input switches to ATen's conv: a data-dependent branch

    def unsupported_reasons(self, x: torch.Tensor, conv: nn.Conv2d):
        why = next(winograd_f43.unusable_reasons(x, conv.weight.shape, conv.stride, conv.padding, conv.dilation,
                                                 conv.groups), None)  # fmt: skip
        if why is not None:
            yield why
        elif conv.in_channels > 128 or x.shape[2] * x.shape[3] < 28 * 28:
            yield f"ATen measured faster for training at {conv.in_channels} channels, {x.shape[2]}x{x.shape[3]}"

    def run(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        y = winograd_f43.conv3x3_train(x, conv.weight, conv.bias)
        if y is None:  # x is not finite: the direct conv keeps the reference's NaN pattern
            record_runtime_fallback(
                "conv_train", _ATEN.name, "the input holds NaN or Inf (found by the input transform)"
            )
            return _ATEN.run(x, conv)
        return y


_ATEN = ATenTrainConv()
