"""Weights packed into oneDNN's blocked layouts: one copy per input shape, the last few used kept.

oneDNN picks a conv's blocked weight layout from the whole input shape, batch included, and a
copy packed for one shape can run another far slower. Measured (2 threads, float32, 1x1 conv
256 -> 1024 at 14x14 with the residual-add and ReLU post-ops): packed for batch 8 and run at
batch 1, 7.8 ms instead of 0.49; packed for batch 1 and run at batch 8, 11.5 ms instead of 3.95.
(Other 1x1 shapes of ResNet-50 ran the same either way.) So copies are keyed by the exact shape;
four are kept per conv, enough for two batch sizes and, in Winograd, their last partial passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PackedByShape:
    """pack(shape) for the shapes asked for, the `keep` most recently used kept."""

    def __init__(self, pack: Callable[[tuple[int, ...]], torch.Tensor], keep: int = 4):
        self._pack = pack
        self._keep = keep
        self._copies: dict[tuple[int, ...], torch.Tensor] = {}  # in order of use, the most recent last

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        packed = self._copies.pop(shape, None)
        if packed is None:
            if len(self._copies) >= self._keep:
                self._copies.pop(next(iter(self._copies)))
            packed = self._pack(shape)
        self._copies[shape] = packed
        return packed

    def shapes(self) -> list[tuple[int, ...]]:
        """The shapes with a packed copy, the most recently used last."""
        return list(self._copies)


def onednn_conv_weight(weight: torch.Tensor, padding, stride, dilation, groups: int) -> PackedByShape:
    """`weight` (OIHW) packed for oneDNN's conv with these parameters, per input shape."""
    return PackedByShape(
        lambda shape: torch.ops.mkldnn._reorder_convolution_weight(
            weight, list(padding), list(stride), list(dilation), groups, list(shape)
        )
    )
