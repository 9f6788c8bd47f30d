"""CPU dense/grouped conv through oneDNN post-op fusion (torch.ops.mkldnn._convolution_pointwise).

The folded bias, the residual add (a `binary` post-op) and the ReLU (a `unary` post-op) run in
oneDNN's epilogue, before the single store; weights are reordered once into oneDNN's blocked
layout (for the input shape) and kept in ConvParams.kernel_state. Output is channels_last
whatever the input layout.
"""

from __future__ import annotations

import dataclasses

import torch

from resfused.kernels.base import ConvParams, Kernel
from resfused.kernels.conv_reference import ReferenceConv
from resfused.runtime import packing, trace


def _supported_dtypes() -> frozenset[torch.dtype]:
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.add(torch.float16)
    return frozenset(dtypes)


# Asked once, at import (a CPU feature query): a constant keeps `supports` traceable by torch.compile.
SUPPORTED_DTYPES = _supported_dtypes()


class OneDNNConv(Kernel):
    name = "onednn"
    fuses_residual = True
    # Not traced by torch.compile: the binary post-op has no fake kernel, and Inductor (with
    # freezing) does this same oneDNN fusion itself on the traced ATen conv.
    traceable = False
    relu_keeps_nan = False  # oneDNN's ReLU post-op is max(x, 0) returning 0 for NaN

    def unsupported_reasons(self, x, p: ConvParams, residual, prologue):
        if x.device.type != "cpu":
            yield f"a CPU kernel, got {x.device.type} tensors"
        elif x.dtype not in SUPPORTED_DTYPES:
            yield f"oneDNN on this CPU has no {x.dtype} conv"

    def _packed(self, p: ConvParams, x: torch.Tensor) -> torch.Tensor:
        # oneDNN picks the blocked weight layout for an input shape; without one (input_size=None)
        # it picks a layout that its 1x1 kernels then reorder on every call (measured: a 1x1
        # 1024->512 conv at 14x14, batch 1, took 15.2 ms instead of 1.06; docs/measurements.md,
        # oneDNN weight packing). It can depend on whether the batch is 1 too (runtime/packing.py).
        packed = p.state_for(
            self.name, lambda: packing.onednn_conv_weight(p.weight, p.padding, p.stride, p.dilation, p.groups)
        )
        return packed(packing.conv_layout_shape(tuple(x.shape)))

    def _args(self, x, p: ConvParams) -> tuple:
        return (self._packed(p, x), p.bias, list(p.padding), list(p.stride), list(p.dilation), p.groups)

    def run(self, x, p: ConvParams, residual, relu, prologue):
        return self.bind(x, p, residual is not None, relu, prologue)(x, residual)

    def bind(self, x, p: ConvParams, has_residual: bool, relu: bool, prologue):
        if _bf16_one_column_bug(x, p):
            trace.annotate_last("conv", "in float32")
            return _in_float32(p, relu)
        # The packed weight is looked up for x's shape once: a bound call serves that shape only.
        args = self._args(x, p)
        if not has_residual:
            conv, act = torch.ops.mkldnn._convolution_pointwise, "relu" if relu else "none"
            return lambda x, residual: conv(x, *args, act, [], None)
        act = "relu" if relu else None
        if p.weight.shape[0] == 1 or p.output_hw(*x.shape[-2:]) == (1, 1):
            # torch 2.11's out-of-place binary post-op fails ("could not create a memory") on an
            # output that is both contiguous and channels_last, one channel or 1x1 pixels (torch
            # 2.14's does not); the in-place sum post-op works on both, into a copy of the
            # residual (a small tensor: N*H*W or N*C elements).
            conv_add_ = torch.ops.mkldnn._convolution_pointwise_.binary
            cl = torch.channels_last
            return lambda x, residual: conv_add_(
                residual.to(x.dtype, memory_format=cl, copy=True), x, *args, "add", None, act, [], None
            )
        conv_add = torch.ops.mkldnn._convolution_pointwise.binary
        return lambda x, residual: conv_add(x, residual, *args, "add", None, act, [], None)

    def can_run_into_residual(self, x, residual) -> bool:
        # The destination must already be in the layout oneDNN writes (NHWC), in the output dtype.
        return residual.dtype == x.dtype and residual.is_contiguous(memory_format=torch.channels_last)

    def bind_into_residual(self, x, p: ConvParams, relu: bool, prologue):
        """`bind` for a call whose output is written over `residual` (which the caller no longer
        needs): the in-place op accumulates the conv into the destination (oneDNN's sum post-op)
        instead of reading the residual as a second input of a binary post-op into a new tensor
        (measured: a 64->256 @56x56 1x1 conv + add + ReLU at batch 8, 9.2 ms instead of 11.9;
        docs/measurements.md, In-place residual sum post-op)."""
        if _bf16_one_column_bug(x, p):
            call = _in_float32(p, relu)
            return lambda x, residual: residual.copy_(call(x, residual))
        args, act = self._args(x, p), "relu" if relu else None
        conv_add_ = torch.ops.mkldnn._convolution_pointwise_.binary
        return lambda x, residual: conv_add_(residual, x, *args, "add", None, act, [], None)


def _bf16_one_column_bug(x: torch.Tensor, p: ConvParams) -> bool:
    """torch 2.14.1's oneDNN bfloat16 conv returns garbage (it reads memory it never wrote) when a
    strided, zero-padded conv produces one output column, on an AVX-512 BF16 / AMX Xeon: for a
    3x3, 5x5 or 7x7 stride-2 conv on a width of 1 or 2, eager F.conv2d too, at any channel count
    or layout. Such convs run in float32 instead (see _in_float32); they are tiny."""
    return (
        x.dtype == torch.bfloat16
        and max(p.stride) > 1
        and max(p.padding) > 0
        and p.output_hw(x.shape[-2], x.shape[-1])[1] == 1
    )


def _in_float32(p: ConvParams, relu: bool):
    """A bound call computing the reference conv (bias, residual add, ReLU) in float32 on weights
    upcast once, rounded once to x's dtype, in the channels_last layout this kernel always writes."""
    p32 = dataclasses.replace(
        p, weight=p.weight.float(), bias=None if p.bias is None else p.bias.float(), kernel_state={}
    )
    reference = ReferenceConv()

    def call(x, residual):
        y = reference.run(x.float(), p32, None if residual is None else residual.float(), relu, None)
        return y.to(x.dtype, memory_format=torch.channels_last)

    return call
