"""Grouped 3x3 conv (ResNeXt's small groups) through the direct kernel resfused::grouped_conv3x3.

    y = [relu](conv2d(x, W', b', stride, padding=1, groups))     (then [+ residual, relu] by the tail)

Kernels: csrc/cpu/grouped_conv3x3.cpp (several groups per AVX-512/AVX2 vector, bias + ReLU in the
epilogue) and, where built, csrc/cuda/grouped_conv3x3.cu. The op goes through the dispatcher, so
this one adapter serves whichever device has a kernel. This file also registers its fake kernel.

Where the CPU kernel wins. Re-measured after the kernels were built with OpenMP (before that,
at::parallel_for in this extension ran on one thread, and every table here was single-threaded
against oneDNN's two), 2 threads, median of 7 interleaved rounds, against oneDNN's grouped conv
with its ReLU post-op and packed weights (`python -m benchmarks.grouped_cpu`; float32 at batch 1
and 8 from one `make bench` run, bfloat16 at batch 8 from another):

    channels/group  stride  shape (ResNeXt-50 32x4d)   float32 b1   float32 b8        bfloat16 b8
    4               1       128ch 56x56                1.98x        3.36x (1.31 ms)   1.36x
    8               1       256ch 28x28                0.77x        1.12x             0.63x
    16              1       512ch 14x14                0.26x        0.58x             0.30x
    8               2       256ch 56x56 -> 28x28       2.19x        2.43x             0.63x
    16              2       512ch 28x28 -> 14x14       0.56x        1.29x             0.24x
    32              any     (oneDNN's GEMM tiles fit)  not used

so float32 at 4 channels/group and at 8 with stride 2, and bfloat16 at 4, use this kernel. Where
it wins only at larger batches, float32 (`python -m benchmarks.grouped_cpu --batch 2 4 8 --dtype
fp32`, one run): 8 channels/group at stride 1 0.92x at batch 2, 1.13x at 4, 1.27x at 8; 16 at
stride 2 0.65x, 0.86x, 1.19x; so those two run here from batch 4 and 8 on. oneDNN's bf16 grouped
conv uses the AVX512-BF16 dot-product instruction (two MACs per lane), which this kernel (bf16
loads, fp32 FMAs) does not.
"""

from __future__ import annotations

import torch

from resfused import _native
from resfused.ops import tails
from resfused.ops.conv import ConvParams

# (dtype, channels per group, stride) -> the smallest batch from which the CPU kernel's vector
# path beats oneDNN (table above).
_CPU_WINS = {
    (torch.float32, 4, 1): 1,
    (torch.float32, 8, 2): 1,
    (torch.float32, 8, 1): 4,
    (torch.float32, 16, 2): 8,
    (torch.bfloat16, 4, 1): 1,
}

# What the CUDA kernel (another helper's csrc/cuda/grouped_conv3x3.cu) is expected to cover.
_CUDA_CHANNELS_PER_GROUP = (4, 8, 16, 32)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def _geometry_ok(p: ConvParams) -> bool:
    return (
        p.kernel_size == (3, 3)
        and p.padding == (1, 1)
        and p.dilation == (1, 1)
        and p.stride[0] == p.stride[1]
        and p.stride[0] in (1, 2)
        and p.groups > 1
    )


class GroupedConv3x3:
    name = "grouped3x3"
    fuses_prologue = False

    def supports(self, x, p: ConvParams, residual, prologue) -> bool:
        if not _geometry_ok(p) or not _native.has_kernel("grouped_conv3x3", x.device.type):
            return False
        cpg = p.weight.shape[1]
        if x.device.type == "cpu":
            # Only the vector path, and only where it measured faster than oneDNN.
            path = cpu_path(cpg)
            width = _VECTOR_WIDTH.get(path, 0)
            return (
                width > 0
                and p.out_channels == p.in_channels
                and p.in_channels % width == 0
                and x.shape[0] >= _CPU_WINS.get((x.dtype, cpg, p.stride[0]), float("inf"))
            )
        if x.device.type == "cuda":
            return cpg in _CUDA_CHANNELS_PER_GROUP and x.dtype in _CUDA_DTYPES
        return False

    def run(self, x, p: ConvParams, residual, relu, prologue):
        # Blocks never pass a residual here; if one comes, it is added by the fused tail.
        y = torch.ops.resfused.grouped_conv3x3(x, p.weight, p.bias, p.stride[0], bool(relu and residual is None))
        if residual is None:
            return y
        return tails.add_relu(y, residual) if relu else y + residual


def _register_fake() -> None:
    @torch.library.register_fake("resfused::grouped_conv3x3")
    def _(x, weight, bias, stride, relu):
        torch._check(x.dim() == 4, lambda: f"resfused.grouped_conv3x3: 'x' must be 4-D, got {x.dim()}-D")
        torch._check(weight.dim() == 4, lambda: "resfused.grouped_conv3x3: 'weight' must be 4-D [C_out, C_in/groups, 3, 3]")
        n, _, h, w = x.shape
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        return torch.empty((n, weight.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)


if _native.has_op("grouped_conv3x3"):
    _register_fake()
