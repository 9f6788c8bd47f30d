"""Training-mode convolution: ATen's convolution forward and backward, or Winograd F(4x4, 3x3)
(ops/winograd.py) on the 3x3 shapes where that measured faster, with the backward's large buffers
(grad_input, grad_weight) served by the buffer cache (ops/buffer_cache.py).

The fused blocks' training forward runs inside a buffer-cache scope, so the activations it saves
return to the cache when the backward frees them; the backward's own allocations must come from
the same cache to reuse them. ATen's ConvolutionBackward node runs outside any scope, so the
training runner calls this autograd function instead, whose backward enters one. The math is
ATen's: aten.convolution in the forward, aten.convolution_backward in the backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resfused.ops import buffer_cache, winograd
from resfused.ops.dispatch import record


class _Conv2d(torch.autograd.Function):
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


def _winograd_trains_faster(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Where F(4x4, 3x3) measured faster than ATen for forward + both gradients (batch 8, 2 threads,
    float32, interleaved; `python -m benchmarks.winograd_cpu --train --batch 8`): 64 ch @56x56
    1.20-1.35x, 128 @28x28 1.40-1.42x; 256 @14x14 0.97x and 512 @7x7 0.58x (there the weight
    transforms, redone every step, and the 36 x C_in x C_out transformed weights dominate).
    Again after the forward GEMMs moved to oneDNN: 1.22x, 1.45x, 0.98x, 0.55x; after the tile
    transforms were streamed: 1.42x, 1.68x, 1.01x, 0.52x."""
    return (
        winograd.usable(x, conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups)
        and conv.in_channels <= 128
        and x.shape[2] * x.shape[3] >= 28 * 28
        and not torch.compiler.is_compiling()
    )


def conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) for a zero-padded nn.Conv2d, its backward inside a buffer-cache scope; through
    Winograd F(4x4, 3x3) (ops/winograd.py) where that trains faster."""
    if _winograd_trains_faster(x, conv):
        y = winograd.conv3x3_train(x, conv.weight, conv.bias)
        if y is not None:  # None: x is not finite, the direct conv keeps the reference's NaN pattern
            record("conv", "winograd_f43(train)")
            return y
    return _Conv2d.apply(x, conv.weight, conv.bias, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
