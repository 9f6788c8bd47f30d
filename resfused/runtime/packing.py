"""Weights packed into oneDNN's blocked layouts: one copy per input shape, the last few used kept.

oneDNN picks a conv's blocked weight layout from the whole input shape, batch included, and a
copy packed for one shape can run another far slower (measured: a 1x1 conv 256 -> 1024 at
14x14 packed for batch 8 ran batch 1 in 7.95 ms instead of 0.54), while copies packed for
batch 2, 3, 4, 8 or 16 ran every batch from 2 to 16 alike. So a conv keeps a copy for batch 1 and
one for larger batches (`conv_layout_shape`); the Winograd GEMMs key theirs by height
(kernels/winograd_f43.py). Four copies at most are kept per conv, the least recently used
dropped first. Measured: docs/measurements.md, oneDNN weight packing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class PackedByShape:
    """pack(shape) for the shapes asked for, the `keep` most recently used kept. Safe to call
    from several threads (a model served by a thread pool): one lock around the bookkeeping."""

    def __init__(self, pack: Callable[[tuple[int, ...]], torch.Tensor], keep: int = 4):
        self._pack = pack
        self._keep = keep
        self._copies: dict[tuple[int, ...], torch.Tensor] = {}  # in order of use, the most recent last
        self._lock = threading.Lock()

    def __call__(self, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            packed = self._copies.pop(shape, None)
            if packed is None:
                if len(self._copies) >= self._keep:
                    self._copies.pop(next(iter(self._copies)))
                packed = self._pack(shape)
            self._copies[shape] = packed
            return packed

    def shapes(self) -> list[tuple[int, ...]]:
        """The shapes with a packed copy, the most recently used last."""
        with self._lock:
            return list(self._copies)


def conv_layout_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The input shape whose packed copy serves a conv input of `shape`: batch 1 or, standing for
    every larger batch, 2 (see above)."""
    return (min(shape[0], 2),) + tuple(shape[1:])


def onednn_conv_weight(
    weight: torch.Tensor | Callable[[], torch.Tensor], padding, stride, dilation, groups: int
) -> PackedByShape:
    """`weight` (OIHW) packed for oneDNN's conv with these parameters, per input shape. `weight`
    may be a function that derives it, called at each packing (the derived tensor is not kept:
    Winograd's transformed weights would otherwise be held twice)."""
    get = weight if callable(weight) else (lambda: weight)
    return PackedByShape(
        lambda shape: torch.ops.mkldnn._reorder_convolution_weight(
            get(), list(padding), list(stride), list(dilation), groups, list(shape)
        )
    )
