"""Inference 3x3 convs through Winograd F(4x4, 3x3) (ops/winograd.py): the transformed weights are
built once (in float64, then rounded), packed for oneDNN and cached in ConvParams.packed; bias,
residual add and ReLU run in the output transform.

Where it is used: the shapes where it measured faster than oneDNN's direct conv with packed
weights, bias and ReLU post-op (2 threads, float32, median of >= 7 interleaved rounds, one
process, both inside a buffer-cache scope as in a fused module; `python -m
benchmarks.winograd_cpu --batch 1 2 8`, two runs on a noisy machine), with the GEMMs as oneDNN
grouped 1x1 convs:

    C_in -> C_out @ H x W      batch 1          batch 2          batch 8
    64 -> 64 @ 56x56           1.97x - 1.99x    1.95x - 1.97x    1.97x
    128 -> 128 @ 28x28         2.14x - 2.25x    2.33x - 2.37x    2.15x - 2.21x
    256 -> 256 @ 14x14         1.88x - 1.89x    1.98x - 2.01x    1.98x - 2.13x
    512 -> 512 @ 7x7           0.93x - 1.19x    1.49x - 1.65x    1.94x - 2.00x

(Measured after the tile transforms were streamed, csrc/cpu/winograd_f43.cpp; before, with
transforms 1.5-2.2x slower: 1.52x - 2.38x, and 0.78x - 0.95x at 512 @7x7 batch 1.)

At 512 channels the 36 x 512 x 512 transformed weights (37.7 MB, more than this machine's 32 MB
L3) are read once per pass, which a single image's 4 tiles do not clearly repay (in a model,
the other layers' weights evict them between calls, unlike in this benchmark). So: float32,
3x3, stride 1, padding 1, no dilation or groups, and either at most 256 input channels at >= 14x14 pixels, or at most 512 with >= 8
tiles of 4x4 (batch >= 2 at 7x7). An input holding NaN or Inf goes to the ATen conv and the
fused tail instead (Winograd would spread it over whole tiles, see winograd.transform_input;
oneDNN's ReLU would turn it into 0, see ops/finite.py).

float64 would be exact enough but is left to the reference. bf16 stays with oneDNN: with the
transformed input and weights rounded to bf16 (what a bf16 GEMM needs), F(4x4, 3x3) measured
8-9x the error of eager bf16 against float64 (1.75e-2 .. 2.2e-2 of max|y| where eager has
2.2e-3 .. 2.7e-3, at 64 @56x56, 128 @28x28, 256 @14x14), beyond DESIGN.md section 5's 2x.
The smaller F(2x2, 3x3) (2.25x fewer multiplies instead of 4x) is no way out: with M = V U
rounded to bf16, as oneDNN's bf16 GEMM returns it, it measured 1.76x - 2.61x eager bf16's error
(two seeds, 64 @56x56 .. 512 @7x7), and even with M kept in float32 1.45x - 1.92x, too close to
2x for a tolerance that must hold on every input.
"""

from __future__ import annotations

import torch

from resfused.ops import winograd
from resfused.ops.conv import ConvParams
from resfused.ops.conv_library import LibraryConvWithTail
from resfused.ops.dispatch import record_handover


def faster_than_direct(n: int, c_in: int, h: int, w: int) -> bool:
    """The measured rule above."""
    if c_in <= 256:
        return h * w >= 14 * 14
    return c_in <= 512 and h * w >= 7 * 7 and winograd.tiles(n, h, w) >= 8


class WinogradConv:
    name = "winograd_f43"
    fuses_prologue = False

    def supports(self, x, p: ConvParams, residual, prologue) -> bool:
        usable = winograd.usable(x, p.weight.shape, p.stride, p.padding, p.dilation, p.groups)
        return usable and faster_than_direct(x.shape[0], p.in_channels, x.shape[2], x.shape[3])

    # Not traced by torch.compile: a non-finite input switches to the direct conv (a data-dependent
    # branch), and Inductor (with freezing) plans its own convs.
    traceable = False

    def run(self, x, p: ConvParams, residual, relu, prologue):
        u = p.derived(self.name, lambda: winograd.TransformedWeight(p.weight, torch.float64))
        y = winograd.conv3x3(x, u, p.bias, residual, relu)
        if y is None:  # x holds a NaN or Inf: the direct conv gives the reference's NaN pattern
            record_handover("conv", _DIRECT.name)
            return _DIRECT.run(x, p, residual, relu, prologue)
        return y


_DIRECT = LibraryConvWithTail()
