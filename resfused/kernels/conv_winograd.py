"""Inference 3x3 convs through Winograd F(4x4, 3x3) (kernels/winograd_f43.py): the transformed weights are
built once (in float64, then rounded), packed for oneDNN and kept in ConvParams.kernel_state; bias,
residual add and ReLU run in the output transform.

Where it is used: the shapes where it measured faster than oneDNN's direct conv with packed
weights, bias and ReLU post-op (`python -m benchmarks.winograd_cpu --batch 1 2 8`): ~2x at 64-256
channels, <1.2x at 512 @7x7 batch 1. At 512 channels the 36 x 512 x 512 transformed weights
(37.7 MB, more than the measuring machine's 32 MB L3) are read once per pass, which a single
image's 4 tiles do not clearly repay (in a model, the other layers' weights evict them between
calls, unlike in the benchmark). So: float32, 3x3, stride 1, padding 1, no dilation or groups,
and either at most 256 input channels at >= 14x14 pixels, or at most 512 with >= 8 tiles of 4x4
(batch >= 2 at 7x7). Measured, per shape and batch: docs/measurements.md, Winograd F(4x4, 3x3),
Inference selection.

An input holding NaN or Inf goes to the ATen conv and the fused tail instead (Winograd would
spread it over whole tiles, see winograd_f43.transform_input; oneDNN's ReLU would turn it into 0,
see runtime/finite.py).

float64 would be exact enough but is left to the reference. bf16 stays with oneDNN: with the
transformed input and weights rounded to bf16 (what a bf16 GEMM needs), F(4x4, 3x3) measured
8-9x the error of eager bf16 against float64, beyond the 2x of docs/design.md, Numerics. The
smaller F(2x2, 3x3) (2.25x fewer multiplies instead of 4x) is no way out: its error measured too
close to that 2x for a tolerance that must hold on every input. Error study:
docs/measurements.md, Winograd F(4x4, 3x3), Error study.
"""

from __future__ import annotations

import torch

from resfused.kernels import winograd_f43
from resfused.kernels.base import ConvParams, Kernel, measured_rule
from resfused.kernels.conv_reference import ReferenceConv
from resfused.runtime.trace import record_runtime_fallback


def faster_than_direct(n: int, c_in: int, h: int, w: int) -> bool:
    """The measured rule above."""
    if c_in <= 256:
        return h * w >= 14 * 14
    return c_in <= 512 and h * w >= 7 * 7 and winograd_f43.tiles(n, h, w) >= 8


class WinogradConv(Kernel):
    name = "winograd_f43"
    fuses_residual = True
    # Not traced by torch.compile: a non-finite input switches to another conv (a data-dependent
    # branch), and Inductor (with freezing) plans its own convs.
    traceable = False

    def unsupported_reasons(self, x, p: ConvParams, residual, prologue):
        why = next(winograd_f43.unusable_reasons(x, p.weight.shape, p.stride, p.padding, p.dilation, p.groups), None)
        if why is not None:
            yield why
        elif not faster_than_direct(x.shape[0], p.in_channels, x.shape[2], x.shape[3]):
            yield measured_rule(
                f"the direct conv measured faster at {p.in_channels} channels, "
                f"{x.shape[2]}x{x.shape[3]}, batch {x.shape[0]}"
            )

    def run(self, x, p: ConvParams, residual, relu, prologue):
        u = p.state_for(self.name, lambda: winograd_f43.TransformedWeight(p.weight, torch.float64))
        y = winograd_f43.conv3x3(x, u, p.bias, residual, relu)
        if y is None:  # x holds a NaN or Inf, which Winograd would spread over whole tiles
            record_runtime_fallback("conv", _EXACT.name, "the input holds NaN or Inf (found by the input transform)")
            return _EXACT.run(x, p, residual, relu, prologue)
        return y


_EXACT = ReferenceConv()  # the direct conv and plain PyTorch tail: the reference's NaN pattern
