"""Training-mode convolution: ATen's convolution forward and backward, with the backward's large
buffers (grad_input, grad_weight) served by the buffer cache (ops/buffer_cache.py).

The fused blocks' training forward runs inside a buffer-cache scope, so the activations it saves
return to the cache when the backward frees them; the backward's own allocations must come from
the same cache to reuse them. ATen's ConvolutionBackward node runs outside any scope, so the
training runner calls this autograd function instead, whose backward enters one. The math is
ATen's: aten.convolution in the forward, aten.convolution_backward in the backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resfused.ops import buffer_cache


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


def conv2d(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) for a zero-padded nn.Conv2d, its backward inside a buffer-cache scope."""
    return _Conv2d.apply(x, conv.weight, conv.bias, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
