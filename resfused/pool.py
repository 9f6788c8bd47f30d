"""The ResNet stem's max pool, nn.MaxPool2d(3, stride=2, padding=1), without indices.

On the CPU, F.max_pool2d always runs max_pool2d_with_indices, which writes an int64 index per
output beside it (twice the bytes of a float32 output) that inference never reads. The kernel
resfused::max_pool3x3s2 (csrc/cpu/max_pool3x3s2.cpp) writes the output only: measured at 2
threads on a 64-channel 112x112 channels_last input, batch 8 1.09-1.18 ms instead of 1.69-2.48,
batch 1 0.11 instead of 0.175. Max is exact, so the result is the same, NaN included. `fuse`
puts this module in place of a converted stem's pool.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from resfused import _native

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class MaxPool3x3S2(nn.MaxPool2d):
    """nn.MaxPool2d(kernel_size=3, stride=2, padding=1) (same attributes and repr, no state) that
    runs the kernel for CPU inputs no gradient must flow through, and nn.MaxPool2d's forward
    otherwise (autograd, other devices, torch.compile). Its output is channels_last."""

    def __init__(self):
        super().__init__(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            isinstance(x, torch.Tensor)  # not an fx.Proxy: FX traces nn.MaxPool2d's forward
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.numel() > 0
            and x.dtype in _DTYPES
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()
            and _native.has_kernel("max_pool3x3s2", "cpu")
        ):
            return torch.ops.resfused.max_pool3x3s2(x)
        return super().forward(x)


def replaceable(pool: nn.Module) -> bool:
    """Whether `pool` computes exactly what MaxPool3x3S2 does."""
    return (
        type(pool) is nn.MaxPool2d
        and pool.kernel_size in (3, (3, 3))
        and pool.stride in (2, (2, 2))
        and pool.padding in (1, (1, 1))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
    )


def _register_fake() -> None:
    @torch.library.register_fake("resfused::max_pool3x3s2")
    def _(x):
        n, c, h, w = x.shape
        return x.new_empty((n, c, (h - 1) // 2 + 1, (w - 1) // 2 + 1)).contiguous(memory_format=torch.channels_last)


if _native.has_op("max_pool3x3s2"):
    _register_fake()
