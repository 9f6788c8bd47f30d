"""Inference 3x3 convs through Winograd F(4x4, 3x3) (ops/winograd.py): the transformed weights are
built once (in float64, then rounded) and cached in ConvParams.packed; bias, residual add and ReLU
run in the output transform.

Where it is used: the shapes where it measured faster than oneDNN's direct conv with packed
weights, bias and ReLU post-op (2 threads, float32, median of 7 interleaved rounds, one process;
`python -m benchmarks.winograd_cpu --batch 1 2 4 8`, ranges over 3-4 runs on a noisy machine):

    C_in -> C_out @ H x W      batch 1          batch 8
    64 -> 64 @ 56x56           1.36x - 1.63x    1.19x - 1.40x
    128 -> 128 @ 28x28         2.07x - 2.13x    1.41x - 1.91x
    256 -> 256 @ 14x14         1.04x - 1.51x    1.21x - 1.64x
    512 -> 512 @ 7x7           0.29x - 0.48x    1.15x - 1.48x   (36 x 512 x 512 transformed weights,
                                                                 37.7 MB, dominate at small batch:
                                                                 not used)

so: float32, 3x3, stride 1, padding 1, no dilation or groups, at most 256 input channels and at
least 14x14 pixels. An input holding NaN or Inf goes to oneDNN's direct conv instead (Winograd
would spread it over whole tiles; see winograd.transform_input). float64 would be exact enough
but is left to the reference; bf16 / fp16 would need the transforms in float32 and stay with
oneDNN.
"""

from __future__ import annotations

import torch

from resfused import _native
from resfused.ops import winograd
from resfused.ops.conv import ConvParams
from resfused.ops.conv_onednn import OneDNNConv

MAX_IN_CHANNELS = 256
MIN_PIXELS = 14 * 14


class WinogradConv:
    name = "winograd_f43"
    fuses_prologue = False

    def supports(self, x, p: ConvParams, residual, prologue) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and winograd.geometry_ok(p.weight.shape, p.stride, p.padding, p.dilation, p.groups)
            and p.in_channels <= MAX_IN_CHANNELS
            and x.shape[2] * x.shape[3] >= MIN_PIXELS
            and _native.has_kernel("winograd_f43_input", "cpu")
        )

    # Not traced by torch.compile: a non-finite input switches to the direct conv (a data-dependent
    # branch), and Inductor (with freezing) plans its own convs.
    traceable = False

    def run(self, x, p: ConvParams, residual, relu, prologue):
        u = p.packed.get(self.name)
        if u is None:
            u = p.packed[self.name] = winograd.transform_weight(p.weight, torch.float64)
        y = winograd.conv3x3(x, u, p.bias, residual, relu)
        if y is None:  # x holds a NaN or Inf: the direct conv gives the reference's NaN pattern
            return _DIRECT.run(x, p, residual, relu, prologue)
        return y


_DIRECT = OneDNNConv()
