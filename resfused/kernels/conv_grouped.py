"""Grouped 3x3 conv (ResNeXt's small groups) through the direct kernel resfused::grouped_conv3x3.

    y = [relu](conv2d(x, W', b', stride, padding=1, groups))     (then [+ residual, relu] by the tail)

Kernels: csrc/cpu/grouped_conv3x3.cpp (several groups per AVX-512/AVX2 vector, bias + ReLU in the
epilogue) and, where built, csrc/cuda/grouped_conv3x3.cu. The op goes through the dispatcher, so
this one adapter serves whichever device has a kernel. This file also registers its fake kernel.

Where the CPU kernel runs (_CPU_WINS): only where it measured faster than oneDNN's grouped conv
with its ReLU post-op and packed weights (`python -m benchmarks.grouped_cpu`): float32 at 4
channels/group (3.36x oneDNN at 128 channels 56x56, batch 8) and at 8 with stride 2, bfloat16 at
4, and, from batch 4 on, float32 at 8 channels/group stride 1. oneDNN keeps 16 and 32
channels/group at any stride (its GEMM tiles fit there; 16 at stride 2 won 1.19-1.29x from batch 8
on a Zen 4 but lost 0.61x on an Emerald Rapids Xeon, so the table leaves it to oneDNN and tuning
decides per machine), and bf16
beyond 4 channels/group: its bf16 grouped conv uses the AVX512-BF16 dot-product instruction (two
MACs per lane), which this kernel (bf16 loads, fp32 FMAs) does not. Measured, by shape, dtype and
batch: docs/measurements.md, Grouped 3x3 (CPU).
"""

from __future__ import annotations

import torch

from resfused import _native
from resfused.kernels.base import ConvParams, Kernel, measured_rule

# (dtype, channels per group, stride) -> the smallest batch from which the CPU kernel's vector
# path beats oneDNN (module docstring; figures in docs/measurements.md, Grouped 3x3 (CPU)).
_CPU_WINS = {
    (torch.float32, 4, 1): 1,
    (torch.float32, 8, 2): 1,
    (torch.float32, 8, 1): 4,
    (torch.bfloat16, 4, 1): 1,
}

# What the CUDA kernel (csrc/cuda/grouped_conv3x3.cu) covers.
_CUDA_CHANNELS_PER_GROUP = (4, 8, 16, 32)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Where it is selected, until it is measured on a GPU: 4 and 8 channels per group, where its
# design should beat cuDNN. There a group's implicit GEMM (K = 9 * cpg = 36 / 72 deep, cpg wide)
# is far below one tensor-core tile, so cuDNN and Triton waste most of each MMA, while the
# direct kernel keeps a group's outputs in FP32 registers and reuses every staged input for
# 3 taps x 4 channels. From 16 channels per group (K = 144 / 288) the tensor-core convs should
# win: those calls go on to Triton (`auto`) or cuDNN (`cuda`).
_CUDA_SELECTED_CHANNELS_PER_GROUP = (4, 8)


def _query_cpu_paths() -> dict[int, str]:
    if not _native.has_kernel("grouped_conv3x3", "cpu"):
        return {}
    return {cpg: torch.ops.resfused.grouped_conv3x3_cpu_path(cpg) for cpg in (4, 8, 16)}


# Asked once at import (a CPU feature query); a plain dict keeps `supports` traceable by torch.compile.
_CPU_PATHS = _query_cpu_paths()


def cpu_path(channels_per_group: int) -> str:
    """The CPU kernel's path for this group width on this machine: "avx512", "avx2" or "scalar"."""
    return _CPU_PATHS.get(channels_per_group, "scalar")


_VECTOR_WIDTH = {"avx512": 16, "avx2": 8}  # fp32 lanes: the kernel needs C % width == 0


def _geometry_problem(p: ConvParams) -> str | None:
    if p.groups == 1:
        return "not a grouped conv"
    if p.kernel_size != (3, 3) or p.padding != (1, 1) or p.dilation != (1, 1):
        return "not a 3x3 conv with padding 1 and no dilation"
    if p.stride[0] != p.stride[1] or p.stride[0] not in (1, 2):
        return f"stride {p.stride} (the kernel has stride 1 and 2)"
    return None


class GroupedConv3x3(Kernel):
    name = "grouped3x3"

    def unsupported_reasons(self, x, p: ConvParams, residual, prologue):
        if problem := _geometry_problem(p):
            yield problem
            return
        if not _native.has_kernel("grouped_conv3x3", x.device.type):
            yield f"resfused._C has no grouped_conv3x3 kernel for {x.device.type}"
            return
        cpg = p.weight.shape[1]
        if x.device.type == "cuda":
            if cpg not in _CUDA_CHANNELS_PER_GROUP:
                yield f"{cpg} channels per group (the CUDA kernel has {_CUDA_CHANNELS_PER_GROUP})"
            elif cpg not in _CUDA_SELECTED_CHANNELS_PER_GROUP:
                yield (
                    f"{cpg} channels per group: on CUDA this kernel is selected only at 4 and 8 channels "
                    "per group, where its design should beat cuDNN (not yet measured on a GPU); "
                    "cuDNN / Triton take the rest"
                )
            if x.dtype not in _CUDA_DTYPES:
                yield f"dtype {x.dtype}"
            return
        # CPU: only the vector path, and only where it measured faster than oneDNN.
        width = _VECTOR_WIDTH.get(cpu_path(cpg), 0)
        if width == 0:
            yield f"no vector path for {cpg} channels per group on this CPU"
        elif p.out_channels != p.in_channels or p.in_channels % width:
            yield (
                f"channels {p.in_channels} -> {p.out_channels} "
                f"(the vector path needs equal counts, a multiple of {width})"
            )
        elif x.shape[0] < _CPU_WINS.get((x.dtype, cpg, p.stride[0]), float("inf")):
            yield measured_rule(
                f"oneDNN measured faster for {x.dtype}, {cpg} channels per group, "
                f"stride {p.stride[0]}, batch {x.shape[0]}"
            )

    def run(self, x, p: ConvParams, residual, relu, prologue):
        return torch.ops.resfused.grouped_conv3x3(x, p.weight, p.bias, p.stride[0], bool(relu))


def _register_fake() -> None:
    @torch.library.register_fake("resfused::grouped_conv3x3")
    def _(x, weight, bias, stride, relu):
        torch._check(x.dim() == 4, lambda: f"resfused.grouped_conv3x3: 'x' must be 4-D, got {x.dim()}-D")
        torch._check(
            weight.dim() == 4, lambda: "resfused.grouped_conv3x3: 'weight' must be 4-D [C_out, C_in/groups, 3, 3]"
        )
        n, _, h, w = x.shape
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        return torch.empty(
            (n, weight.shape[0], ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )


if _native.has_op("grouped_conv3x3"):
    _register_fake()
