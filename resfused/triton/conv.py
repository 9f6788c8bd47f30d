"""Implicit-GEMM 2-D convolution over NHWC activations with a fused prologue and epilogue.

    y[n, oh, ow, g*COg + co] = act( sum_{kh, kw, ci} pro(x)[n, ih, iw, g*CIg + ci] * w[kh, kw, ci, g*COg + co]
                                    + bias[co'] [+ residual[n, co', oh, ow]] )
    ih = oh*SH - PH + kh,  iw = ow*SW - PW + kw,  pro(x) = relu(x*scale[c] + shift[c]) (optional),
    and pro(x) = 0 at padding positions (the zero padding is applied AFTER the prologue).

As a GEMM per group g: M = N*OH*OW output pixels, N = COg output channels of the group,
K = KH*KW*CIg. A program computes a BLOCK_M x BLOCK_N tile of one group; its K loop is ONE flat
loop over (tap, channel chunk) pairs, so that Triton software-pipelines it (num_stages) as it
does a plain GEMM, instead of an outer loop over taps with a short, unpipelined inner loop.
Rows of A are gathered from NHWC x (channels contiguous: each row of a K chunk is one vector
load); B is the weight in HWIO layout (output channels contiguous), so every tile of B is a
dense [BLOCK_K, BLOCK_N] slice. The accumulator is fp32; bias, residual and ReLU are applied to
it before the single store.

1x1 stride-1 unpadded convs whose (N, H, W) collapse to one stride (dense NHWC) run as a plain
GEMM (IS_GEMM): row m of A starts at m * stride_w, with no spatial decode and no bounds masks.

All addresses that scale with N*H*W*C are formed in int64: the input's per-row offsets, the
output tile's base (then int32 offsets inside the tile, < BLOCK_M*C_out) and a strided
residual's offsets; a 256x256x256x256 activation has 2^32 elements. Row indices m < N*OH*OW,
channel offsets and weight offsets stay int32 (the launcher checks their bounds). x must have
contiguous channels (stride 1: vector loads along K), y is dense channels_last.

This file holds only the kernel, its autotune configs and a launcher over tensors; the op layer
(resfused/kernels/conv_triton.py) validates arguments and registers the torch.library op.
"""

from __future__ import annotations

import triton
import triton.language as tl

from resfused.triton.rounding import interpreter_rounds_bf16, round_to_bf16

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Tensor-core configs (fp16, bf16, fp32 with
# TF32). Every one compiles for sm_80 and sm_90 without spills and within shared memory in the
# kernel's register-heaviest variant (tests/test_triton_compile.py). The BLOCK_K = 64 tiles are the
# ones that map to wgmma on sm_90. Four tiles serve 16-bit dtypes only (HALF_ONLY).
# 128x64x64 is not here: under triton 3.6, on sm_80, ptxas held it to 128 registers with 8 warps
# and it spilled 8-16 bytes in 4 of the kernel's 18 variants, in fp16 and bf16 alike (2 stages: 8
# bytes; 4 warps: 255 registers and 24-32 bytes in the 3x3 forms). 128x64x32 covers that tile.
# 128x256x64 and 256x128x64 are not here: with 8 or 16 warps and 2 or 3 stages they spilled
# (52-1784 bytes) on sm_80 or sm_90 in the variants with a prologue or a residual (measured with
# benchmarks/triton_report.py, triton 3.8); they need a leaner gather than this kernel's. The
# small-N configs serve grouped convs (16-64 channels per group), the small-M ones batch-1 late
# stages (7x7). 64x16x32 runs 4 warps: with 2 warps, triton 3.6's fp16/bf16 code for sm_80
# spilled (ptxas capped it at 96 registers); 4 warps need 64, no spill. Register counts sit close to
# where ptxas starts spilling, so num_stages were chosen for 0 spills under triton 3.6 and 3.8 alike.
# 64x128x64 runs 2 stages: with 3, triton 3.8 spilled 24 bytes on sm_80 in the plain 1x1 GEMM form.
CONFIG_TABLE = (
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 3),
    (64, 128, 64, 4, 2),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 64, 4, 4),
    (32, 64, 64, 4, 3),
    (64, 16, 32, 4, 3),
)
# fp16/bf16 only: in fp32 (TF32) 128x128x64 takes 161 KiB of shared memory on sm_80 (the limit is
# 163 KiB) and 225 KiB on sm_90 (227); on sm_80, in fp32, it spills 64 bytes (triton 3.8),
# 64x128x64 48 bytes (triton 3.6), 128x64x32 8 bytes (3.8; 16 with 4 stages in 3.6), and
# 64x128x32 20 bytes in the 1x1 GEMM form (3.6).
HALF_ONLY = frozenset({(128, 128, 64, 8, 3), (64, 128, 64, 4, 2), (128, 64, 32, 8, 3), (64, 128, 32, 4, 4)})
# fp32 with TF32 off: tl.dot becomes FMA, which holds operand slices of the whole K chunk in
# registers; BLOCK_K = 16 keeps it free of spills on sm_80 (K = 32/64 spilled, see
# benchmarks/triton_report.py). 128x64x16 is not here: under triton 3.6 it spilled 16 bytes with
# a strided residual (8 warps, 4 stages, sm_90; 3 stages: 8-16 bytes in 5 variants; 4 warps: 255
# registers, 16-24 bytes).
CONFIG_TABLE_FMA = (
    (64, 64, 16, 4, 3),
    (64, 32, 16, 4, 3),
    (32, 32, 16, 2, 3),
)
# Largest BLOCK_M of both tables: the launcher's int32 bound on in-tile output offsets
# (< BLOCK_M * C_out) uses it.
MAX_BLOCK_M = max(c[0] for c in CONFIG_TABLE + CONFIG_TABLE_FMA)
# M tiles per band of the tile order (see the kernel): programs resident together share input rows.
GROUP_M = 8


def configs_for(element_size: int, fma: bool) -> tuple:
    """The table rows the autotuner may try for a dtype of `element_size` bytes: the FMA table for
    fp32 without TF32, else the tensor-core table less HALF_ONLY for 4-byte elements."""
    if fma:
        return CONFIG_TABLE_FMA
    return tuple(c for c in CONFIG_TABLE if element_size <= 2 or c not in HALF_ONLY)


def _config(bm, bn, bk, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)


CONFIGS_MMA = [_config(*c) for c in CONFIG_TABLE]
CONFIGS_FMA = [_config(*c) for c in CONFIG_TABLE_FMA]


def config_tuple(c: triton.Config) -> tuple:
    """A triton.Config as its table row (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)


# The autotune key: what changes the best config. M enters as M_BUCKET (the next power of two of
# N*OH*OW), so a new batch size or resolution re-tunes only when it crosses a power of two; the
# stride changes the input reuse of a tile. Triton's autotuner adds the dtypes of the tensor
# arguments, so fp16/bf16/fp32 are tuned (and cached) separately.
AUTOTUNE_KEY = [
    "M_BUCKET",
    "CIg",
    "COg",
    "C_out",
    "KH",
    "KW",
    "stride_h",
    "stride_w",
    "IS_GEMM",
    "HAS_RES",
    "RES_NHWC",
    "PROLOGUE",
    "ALLOW_TF32",
]
# Sizes that change with the batch and the resolution are not specialized (Triton would compile
# a new kernel whenever one of them switches between 1, a multiple of 16 and anything else); the
# channel counts and strides keep their divisibility hints (vector loads along channels).
DO_NOT_SPECIALIZE = ["M", "M_BUCKET", "H", "W", "OH", "OW"]


def m_bucket(m: int) -> int:
    """The autotune key's stand-in for M = N*OH*OW: its next power of two (at least 32)."""
    return max(32, triton.next_power_of_2(m))


def uses_fma(is_fp32: bool, allow_tf32: bool) -> bool:
    """Whether tl.dot runs on FMA units (fp32 without TF32) rather than tensor cores."""
    return is_fp32 and not allow_tf32


def _prune_configs(configs, named_args, **kwargs):
    """Keep the dtype's configs (MMA or FMA table, within shared memory), then drop tiles much
    wider than the problem (a 16-channel group does not need BLOCK_N=128). Depends only on the
    autotune key (M through M_BUCKET), as the autotuner caches its result per key."""
    x = named_args["x_ptr"]
    fma = uses_fma(str(x.dtype) == "torch.float32", bool(kwargs.get("ALLOW_TF32", False)))
    allowed = set(configs_for(x.element_size(), fma))
    kept = [c for c in configs if config_tuple(c) in allowed]
    cog, cig, m = named_args["COg"], named_args["CIg"], named_args["M_BUCKET"]
    need_n = max(16, triton.next_power_of_2(cog))
    need_k = max(16, triton.next_power_of_2(cig))
    need_m = max(32, m)
    for key, need in (("BLOCK_N", need_n), ("BLOCK_M", need_m), ("BLOCK_K", need_k)):
        smallest = min(c.kwargs[key] for c in kept)  # never prune to nothing
        kept = [c for c in kept if c.kwargs[key] <= max(need, smallest)]
    return kept


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def conv2d_nhwc_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    scale_ptr,
    shift_ptr,
    y_ptr,
    M,
    M_BUCKET,
    H,
    W,
    OH,
    OW,
    CIg,
    COg,
    C_out,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    sxn,
    sxh,
    sxw,
    srn,
    src,
    srh,
    srw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    IS_GEMM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RES_NHWC: tl.constexpr,
    RELU: tl.constexpr,
    PROLOGUE: tl.constexpr,
    ALLOW_TF32: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Tile order: a 1-D grid walked GROUP_M M-tiles at a time, every (group, N tile) of those
    # rows before the next GROUP_M rows, so the programs resident at once read the same input
    # rows (and the same weight columns) from L2 instead of each streaming its own.
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(COg, BLOCK_N)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_gn = (C_out // COg) * n_blocks
    per_band = GROUP_M * num_pid_gn
    band = pid // per_band
    first_m = band * GROUP_M
    band_m = min(num_pid_m - first_m, GROUP_M)
    in_band = pid - band * per_band
    pid_m = first_m + in_band % band_m
    pid_gn = in_band // band_m
    g = pid_gn // n_blocks
    pid_n = pid_gn - g * n_blocks

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < COg

    # Output pixel of each row: m = (n*OH + oh)*OW + ow.
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    nb = t // OH
    if IS_GEMM:
        # Dense NHWC 1x1/s1/p0: row m of A is pixel m, at m * sxw.
        row_base = offs_m.to(tl.int64) * sxw
    else:
        row_base = nb.to(tl.int64) * sxn
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    c_in0 = g * CIg  # first input channel of the group
    k_chunks = tl.cdiv(CIg, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_cols = g * COg + offs_n  # weight columns (global output channels) of this tile

    # Step i covers tap (kh, kw) and channels c0 .. c0 + BLOCK_K of it; the three are carried
    # from step to step (c0 wraps to the next tap, kw to the next row) instead of decoded from i,
    # which took an integer division by the runtime k_chunks every step.
    c0 = 0
    kh = 0
    kw = 0
    for _ in range(0, KH * KW * k_chunks):
        tap = kh * KW + kw
        ci = c0 + offs_k
        k_mask = ci < CIg
        cin = c_in0 + ci

        if IS_GEMM:
            a_rows = row_base
            a_valid = m_mask
        else:
            ih = ih0 + kh
            iw = iw0 + kw
            a_valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_rows = row_base + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a_mask = a_valid[:, None] & k_mask[None, :]
        a_ptrs = x_ptr + (a_rows[:, None] + cin[None, :])
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        if PROLOGUE:
            s = tl.load(scale_ptr + cin, mask=k_mask, other=0.0).to(tl.float32)
            b = tl.load(shift_ptr + cin, mask=k_mask, other=0.0).to(tl.float32)
            a_act = tl.maximum(a.to(tl.float32) * s[None, :] + b[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
            # Padding (and out-of-range rows/channels) must be 0 after the prologue, not relu(shift).
            a = tl.where(a_mask, a_act, 0.0)
            if UPCAST_DOT:  # the interpreter's bf16 cast truncates: round to nearest first
                a = round_to_bf16(a)
            a = a.to(x_ptr.dtype.element_ty)

        # Weight HWIO: row (kh*KW + kw)*CIg + ci, column = global output channel.
        w_rows = tap * CIg + ci
        w_ptrs = w_ptr + (w_rows[:, None] * C_out + w_cols[None, :])
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST_DOT:
            # Interpreter only (see launch): exact, as a product of two bf16 values fits in fp32.
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif ALLOW_TF32:
            acc = tl.dot(a, w, acc, input_precision="tf32")
        else:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        c0 += BLOCK_K
        next_tap = c0 >= CIg
        c0 = tl.where(next_tap, 0, c0)
        kw = tl.where(next_tap, kw + 1, kw)
        next_row = kw == KW
        kw = tl.where(next_row, 0, kw)
        kh = tl.where(next_row, kh + 1, kh)

    # Epilogue, on the fp32 accumulator, before the single store.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + w_cols, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    # y is dense NHWC: element (m, c) sits at m*C_out + c. Offsets inside the tile, relative to
    # its first row, are < BLOCK_M*C_out and stay int32; the tile base is an int64 scalar.
    m0 = pid_m * BLOCK_M
    tile_base = m0.to(tl.int64) * C_out
    tile_offs = (offs_m - m0)[:, None] * C_out + w_cols[None, :]
    if HAS_RES:
        if RES_NHWC:  # residual laid out like y: share y's offsets
            r_ptrs = res_ptr + tile_base + tile_offs
        else:  # any strides (NCHW...): int64 per element
            r_rows = nb.to(tl.int64) * srn + oh.to(tl.int64) * srh + ow.to(tl.int64) * srw
            r_ptrs = res_ptr + (r_rows[:, None] + (w_cols.to(tl.int64) * src)[None, :])
        acc = acc + tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        # NaN stays NaN, as in torch.relu (the default maximum returns the non-NaN operand, 0).
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if UPCAST_DOT:  # the interpreter's bf16 cast truncates: round to nearest first
        acc = round_to_bf16(acc)
    tl.store(y_ptr + tile_base + tile_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# cache_results: the timings of each key are kept in Triton's cache directory (TRITON_CACHE_DIR),
# so a second process with the same shapes does not time the configs again.
conv2d_nhwc_autotuned = triton.autotune(
    configs=CONFIGS_MMA + CONFIGS_FMA,
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _prune_configs},
    cache_results=True,
)(conv2d_nhwc_kernel)

# Used where autotuning cannot run (the interpreter has no CUDA timer): the smallest tile.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}


def grid(M: int, groups: int, COg: int):
    """Launch grid (1-D; the kernel orders the tiles): M tiles * groups * N tiles of the config."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * groups * triton.cdiv(COg, meta["BLOCK_N"]),)


# The kernel's runtime (not constexpr) parameters, in order: launches pass them positionally (the
# autotuner's pruning reads them by name from the positional arguments).
RUNTIME_ARGS = (
    "x_ptr",
    "w_ptr",
    "bias_ptr",
    "res_ptr",
    "scale_ptr",
    "shift_ptr",
    "y_ptr",
    "M",
    "M_BUCKET",
    "H",
    "W",
    "OH",
    "OW",
    "CIg",
    "COg",
    "C_out",
    "stride_h",
    "stride_w",
    "pad_h",
    "pad_w",
    "sxn",
    "sxh",
    "sxw",
    "srn",
    "src",
    "srh",
    "srw",
)


def arguments(x, w_hwio, bias, residual, scale, shift, y, stride, padding, groups, relu, allow_tf32):
    """The kernel's arguments for a conv: (runtime arguments in RUNTIME_ARGS order, constexprs,
    grid), or None when there is nothing to compute (an empty output). See `launch`."""
    n, c_in, h, w = x.shape
    kh, kw, cig, c_out = w_hwio.shape
    _, _, oh, ow = y.shape
    m = n * oh * ow
    cog = c_out // groups
    sxn, sxc, sxh, sxw = x.stride()
    if sxc != 1 and c_in > 1:  # (a single channel's stride is never used, and torch leaves it free)
        raise ValueError(f"conv2d_nhwc: x needs contiguous channels (channels_last), got strides {x.stride()}")
    dense_nhwc = (oh * ow * c_out, 1, ow * c_out, c_out)
    if tuple(y.stride()) != dense_nhwc and m * c_out > 0:
        raise ValueError(f"conv2d_nhwc: y must be dense channels_last with strides {dense_nhwc}, got {y.stride()}")
    if m == 0 or c_out == 0:
        return None
    # Row indices, weight offsets and in-tile output offsets are int32 (see the module docstring).
    # The program id is int32 too: the most programs any config launches (its smallest tiles).
    programs = triton.cdiv(m, 32) * groups * triton.cdiv(cog, 16)
    if m >= 2**31 or w_hwio.numel() >= 2**31 or MAX_BLOCK_M * c_out >= 2**31 or programs >= 2**31:
        raise ValueError(
            f"conv2d_nhwc: N*OH*OW={m} / weight size {w_hwio.numel()} / C_out={c_out} exceed int32 indexing"
        )
    is_gemm = (
        kh == 1
        and kw == 1
        and tuple(stride) == (1, 1)
        and tuple(padding) == (0, 0)
        and (n == 1 or sxn == h * w * sxw)
        and (h == 1 or sxh == w * sxw)
    )
    # The interpreter (TRITON_INTERPRET=1) multiplies bf16 tiles as their raw uint16 bits in
    # tl.dot (its numpy dot does not decode bfloat16); there the tiles are upcast to fp32 first.
    # bf16 x bf16 products are exact in fp32, so this matches a bf16 MMA with fp32 accumulation.
    # Its fp32 -> bf16 casts truncate; under the same flag the kernel rounds to nearest even first.
    upcast_dot = interpreter_rounds_bf16(x.dtype)
    res_strides = tuple(residual.stride()) if residual is not None else (0, 0, 0, 0)
    res_nhwc = residual is not None and res_strides == dense_nhwc
    # Unused pointer arguments get a real tensor (y) so that the signature is the same for every variant.
    runtime = (
        x,
        w_hwio,
        bias if bias is not None else y,
        residual if residual is not None else y,
        scale if scale is not None else y,
        shift if shift is not None else y,
        y,
        m,
        m_bucket(m),
        h,
        w,
        oh,
        ow,
        cig,
        cog,
        c_out,
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        sxn,
        sxh,
        sxw,
        *res_strides,
    )
    constexprs = dict(
        KH=kh,
        KW=kw,
        IS_GEMM=is_gemm,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        RES_NHWC=res_nhwc,
        RELU=bool(relu),
        PROLOGUE=scale is not None,
        ALLOW_TF32=bool(allow_tf32),
        UPCAST_DOT=upcast_dot,
        GROUP_M=GROUP_M,
    )
    return runtime, constexprs, grid(m, groups, cog)


def autotune_key(runtime: tuple, constexprs: dict) -> tuple:
    """The values of AUTOTUNE_KEY for `arguments`' result (the autotuner adds the dtypes)."""
    named = dict(zip(RUNTIME_ARGS, runtime), **constexprs)
    return tuple(named[k] for k in AUTOTUNE_KEY)


def launch(kernel, x, w_hwio, bias, residual, scale, shift, y, stride, padding, groups, relu, allow_tf32, config=None):
    """Launch `kernel` (conv2d_nhwc_autotuned, conv2d_nhwc_kernel, or their wrap_triton wrappers).

    x: (N, C_in, H, W) with contiguous channels (channels_last; other strides free); w_hwio:
    (KH, KW, CIg, C_out) contiguous; y: (N, C_out, OH, OW) dense channels_last; bias/scale/shift:
    1-D or None; residual: y's shape, any strides, or None. `config` (block sizes, and optionally
    num_warps / num_stages) is required when `kernel` is not the autotuned one. Returns y.
    """
    args = arguments(x, w_hwio, bias, residual, scale, shift, y, stride, padding, groups, relu, allow_tf32)
    if args is not None:
        runtime, constexprs, launch_grid = args
        kernel[launch_grid](*runtime, **constexprs, **(config or {}))
    return y
