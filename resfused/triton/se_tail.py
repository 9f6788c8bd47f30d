"""The squeeze-excitation tail as one Triton pass over a dense NCHW or channels_last activation.

    out[n, c, h, w] = relu(y[n, c, h, w] * gate[n, c] + residual[n, c, h, w])

A program takes a BLOCK_HW x BLOCK_C tile of one image: the gate slice is one vector load per
tile, y and the residual are read once and the output written once (the pass is memory bound:
3 reads + 1 write of the activation, the gate's N*C is noise). The math runs in fp32 whatever the
storage dtype, rounded once at the store. The ReLU is where(v < 0, 0, v): NaN < 0 is false, so a
NaN stays NaN as in torch.relu (max(v, 0) would return 0 on the GPU).

Offsets: an image's base n*C*HW in int64 (a batch may hold 2^31+ elements); inside one image in
int32 (the launcher checks C*HW < 2^31). The layout is a constexpr so that the contiguous axis
(c for channels_last, hw for NCHW) is known to the compiler, which vectorizes the loads along it;
the launcher shapes the tile so that the contiguous axis is the long one.

This file holds only the kernel and its launcher; kernels/se_tail_triton.py registers the op.
"""

from __future__ import annotations

import triton
import triton.language as tl

from resfused.triton.rounding import interpreter_rounds_bf16, round_to_bf16

# Elements per program: 2048 (4 warps x 32 threads x 16 elements, 4 vector loads of 16 bytes in
# fp32 per tensor per thread). Memory-bound passes need a few KiB in flight per program, no more.
TILE_ELEMENTS = 2048
NUM_WARPS = 4
# The longest run along the contiguous axis: 128 channels (channels_last) or 512 pixels (NCHW).
MAX_CONTIGUOUS = {True: 128, False: 512}


@triton.jit
def scale_add_relu_kernel(
    y_ptr,
    gate_ptr,
    r_ptr,
    out_ptr,
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid_hw = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2)
    hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mask = (hw[:, None] < HW) & c_ok[None, :]
    base = n.to(tl.int64) * C * HW
    if CHANNELS_LAST:
        offs = hw[:, None] * C + c[None, :]
    else:
        offs = c[None, :] * HW + hw[:, None]
    g = tl.load(gate_ptr + n.to(tl.int64) * C + c, mask=c_ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    v = y * g[None, :] + r
    v = tl.where(v < 0.0, 0.0, v)
    if ROUND_BF16:  # the interpreter's bf16 cast truncates: round to nearest first (rounding.py)
        v = round_to_bf16(v)
    tl.store(out_ptr + base + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def tile_for(c: int, hw: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_HW, BLOCK_C): the contiguous axis as long as the tensor allows (up to
    MAX_CONTIGUOUS), the other filling TILE_ELEMENTS; powers of two (tl.arange needs them)."""
    if channels_last:
        block_c = min(MAX_CONTIGUOUS[True], triton.next_power_of_2(c))
        block_hw = min(max(1, TILE_ELEMENTS // block_c), triton.next_power_of_2(hw))
    else:
        block_hw = min(MAX_CONTIGUOUS[False], triton.next_power_of_2(hw))
        block_c = min(max(1, TILE_ELEMENTS // block_hw), triton.next_power_of_2(c))
    return block_hw, block_c


# CUDA's grid limit on its y and z dimensions (channel tiles and images).
MAX_GRID_YZ = 65535


def launch(kernel, y, gate, residual, out, channels_last: bool) -> None:
    """Launch `kernel` (the jitted function, or it wrapped for tracing) over dense y / residual /
    out of one layout, gate [N, C] contiguous."""
    n, c, h, w = y.shape
    hw = h * w
    if y.numel() == 0:
        return  # a grid with a zero dimension is not a launch CUDA accepts
    if c * hw >= 2**31:
        raise ValueError(f"scale_add_relu_triton: one image of 'y' holds {c * hw} elements; the kernel takes < 2^31")
    block_hw, block_c = tile_for(c, hw, channels_last)
    grid = (triton.cdiv(hw, block_hw), triton.cdiv(c, block_c), n)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"scale_add_relu_triton: 'y' of shape {tuple(y.shape)} needs a grid {grid} beyond CUDA's")
    kernel[grid](y, gate, residual, out, c, hw, **_constexprs(channels_last, block_hw, block_c, out))


def _constexprs(channels_last: bool, block_hw: int, block_c: int, out) -> dict:
    """The compile-time arguments both kernels take: layout, tile, rounding for the interpreter
    (rounding.py) and the warps."""
    return dict(
        CHANNELS_LAST=channels_last,
        BLOCK_HW=block_hw,
        BLOCK_C=block_c,
        ROUND_BF16=interpreter_rounds_bf16(out.dtype),
        num_warps=NUM_WARPS,
    )


# ------------------------------------------------------------------------------ channel mean
# mean[n, c] = sum over H, W of y[n, c, h, w] / (H * W), the pooled vector of an SE / ECA gate.
# A program owns BLOCK_C channels of one image and walks its pixels BLOCK_HW at a time, summing a
# [BLOCK_HW, BLOCK_C] fp32 tile, reduced to the channels at the end (one rounding, at the store).
# Fewer channels per program than the tail (64 / 2048 // 256) so that a batch-1 late stage still
# spreads over several programs.
MEAN_MAX_CONTIGUOUS = {True: 64, False: 256}


@triton.jit
def channel_mean_kernel(
    y_ptr,
    out_ptr,
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    pid_c = tl.program_id(0)
    n = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = n.to(tl.int64) * C * HW
    acc = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = (hw[:, None] < HW) & c_ok[None, :]
        if CHANNELS_LAST:
            offs = hw[:, None] * C + c[None, :]
        else:
            offs = c[None, :] * HW + hw[:, None]
        acc += tl.load(y_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / HW
    if ROUND_BF16:
        mean = round_to_bf16(mean)
    tl.store(out_ptr + n.to(tl.int64) * C + c, mean.to(out_ptr.dtype.element_ty), mask=c_ok)


def mean_tile_for(c: int, hw: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_HW, BLOCK_C) of the channel mean, shaped as tile_for's with MEAN_MAX_CONTIGUOUS."""
    if channels_last:
        block_c = min(MEAN_MAX_CONTIGUOUS[True], triton.next_power_of_2(c))
        block_hw = min(max(1, TILE_ELEMENTS // block_c), triton.next_power_of_2(hw))
    else:
        block_hw = min(MEAN_MAX_CONTIGUOUS[False], triton.next_power_of_2(hw))
        block_c = min(max(1, TILE_ELEMENTS // block_hw), triton.next_power_of_2(c))
    return block_hw, block_c


def launch_mean(kernel, y, out, channels_last: bool) -> None:
    """Launch the channel mean over dense y of one layout into out [N, C] contiguous. H*W = 0 gives
    0 / 0 = NaN, as torch.mean over an empty dimension does."""
    n, c, h, w = y.shape
    hw = h * w
    if n == 0 or c == 0:
        return
    if c * hw >= 2**31:
        raise ValueError(f"channel_mean_triton: one image of 'y' holds {c * hw} elements; the kernel takes < 2^31")
    if n > MAX_GRID_YZ:
        raise ValueError(f"channel_mean_triton: batch {n} is above CUDA's grid limit of {MAX_GRID_YZ}")
    block_hw, block_c = mean_tile_for(c, hw, channels_last)
    kernel[(triton.cdiv(c, block_c), n)](y, out, c, hw, **_constexprs(channels_last, block_hw, block_c, out))
