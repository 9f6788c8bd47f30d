"""Every autotune config of the Triton conv (resfused/triton/conv.py) in the interpreter.

The op runs the interpreter with one small config (INTERPRETER_CONFIG, 32x16x16), so
test_triton_conv.py never runs the big tiles; here `launch(..., config=...)` forces each config
of CONFIG_TABLE (tensor cores) and CONFIG_TABLE_FMA (fp32 without TF32) on shapes sized from
the config so that the last tile is partial in every dimension and every dimension has at least
two tiles at stride 1:

    M = N*OH*OW over 7x5 images, N = BLOCK_M // 35 + 1 (35 -> 32+3, 70 -> 64+6, 140 -> 128+12);
    K per tap: CIg = 1.5 * BLOCK_K channels per group (two chunks, the second half empty);
    N: COg = 1.5 * BLOCK_N channels per group (two tiles, the second half empty); two groups.

The interpreter ignores num_warps / num_stages (compile-only: test_triton_compile.py checks
those per config); what it checks is the tile arithmetic, the masks and the K loop of each
BLOCK_M x BLOCK_N x BLOCK_K. Tolerances are tests/harness.py's, against the float64 reference.

Default suite: every config once in its representative form, the register-heaviest variant
(3x3, stride 1, prologue, NCHW-strided residual, bias, ReLU), in float32 and, for the tensor-core
table, float16 (~25 s on 2 cores). `slow`: every config x 1x1/3x3 x stride 1/2 x three
epilogue/prologue variants (1x1 stride 1 takes the GEMM form), the same dtypes (~90 s).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from resfused.kernels.conv_triton import _output, to_hwio
from tests.harness import LOWP_EPS, assert_matches_reference

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="runs the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors",
)


def _tables():
    from resfused.triton.conv import CONFIG_TABLE, CONFIG_TABLE_FMA

    return [("mma", c) for c in CONFIG_TABLE] + [("fma", c) for c in CONFIG_TABLE_FMA]


CONFIGS = _tables()
# (bias, residual layout or None, relu, prologue)
VARIANTS = {
    "heavy": (True, "nchw", True, True),  # the representative form: most live values
    "bias": (True, None, False, False),
    "res_nhwc_relu_nobias": (False, "nhwc", True, False),
}
GROUPS = 2


def _id(table_config) -> str:
    table, (bm, bn, bk, w, s) = table_config
    return f"{table}-{bm}x{bn}x{bk}-w{w}s{s}"


def _dtypes(table: str, config):
    # fp32 wherever the autotuner may run the config in fp32 (tight tolerance: any misplaced
    # element shows); the tensor-core table also in fp16, the dtype it serves on a GPU (a
    # HALF_ONLY config only in fp16). The FMA table only serves fp32.
    from resfused.triton.conv import configs_for

    if table == "fma":
        return (torch.float32,)
    return ((torch.float32,) if config in configs_for(4, False) else ()) + (torch.float16,)


def _expected(x, weight, bias, residual, prologue, stride, padding, relu, dtype):
    """The fused op's math in `dtype` (float64: the reference; the low dtype: eager)."""
    x = x.to(dtype)
    if prologue is not None:
        s, b = (v.to(torch.promote_types(dtype, torch.float32)).view(1, -1, 1, 1) for v in prologue)
        x = torch.relu(x.to(s.dtype) * s + b).to(dtype)
    y = F.conv2d(x, weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding, 1, GROUPS)
    if residual is not None:
        y = y + residual.to(dtype)
    return torch.relu(y) if relu else y


def _run_config(config, k, stride, variant, dtype):
    from resfused.triton import conv as kernels

    bm, bn, bk, _, _ = config
    has_bias, res_layout, relu, prologue = VARIANTS[variant]
    n, hw = bm // 35 + 1, (7, 5)
    cig, cog = bk + bk // 2, bn + bn // 2
    c_in, c_out, pad = GROUPS * cig, GROUPS * cog, k // 2
    weight = (torch.randn(c_out, cig, k, k) / (k * cig**0.5)).to(dtype)
    bias = torch.randn(c_out).to(dtype) if has_bias else None
    x = torch.randn(n, c_in, *hw).to(dtype).contiguous(memory_format=torch.channels_last)
    pro = (torch.rand(c_in) + 0.5, torch.randn(c_in) * 0.5) if prologue else None
    pro = None if pro is None else tuple(v.to(dtype) for v in pro)
    w_hwio = to_hwio(weight)
    y = _output(x, w_hwio, (stride, stride), (pad, pad))
    residual = None
    if res_layout is not None:
        residual = torch.randn(y.shape).to(dtype)
        if res_layout == "nhwc":
            residual = residual.contiguous(memory_format=torch.channels_last)
    scale, shift = pro if pro is not None else (None, None)
    config_kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    kernels.launch(
        kernels.conv2d_nhwc_kernel,
        *(x, w_hwio, bias, residual, scale, shift, y),
        *((stride, stride), (pad, pad), GROUPS, relu, False),
        config=config_kw,
    )
    args = (bias, residual, pro, (stride, stride), (pad, pad), relu)
    ref = _expected(x.double(), weight.double(), *args, torch.float64)
    eager = _expected(x, weight, *args, dtype) if dtype in LOWP_EPS else None
    m = n * y.shape[2] * y.shape[3]
    assert m > bm or stride != 1, "the shape must cross an M tile edge"
    what = f"config {config} k={k} s={stride} {variant} {dtype} M={m} CIg={cig} COg={cog}"
    assert_matches_reference(y, ref, dtype, eager, what)


@pytest.mark.parametrize("table_config", CONFIGS, ids=_id)
def test_every_config(table_config):
    table, config = table_config
    for dtype in _dtypes(table, config):
        _run_config(config, 3, 1, "heavy", dtype)


@pytest.mark.slow
@pytest.mark.parametrize(
    "table_config,k,stride,variant",
    [
        (tc, k, s, v)
        for tc, k, s, v in itertools.product(CONFIGS, (1, 3), (1, 2), VARIANTS)
        if (k, s, v) != (3, 1, "heavy")  # test_every_config's form
    ],
    ids=lambda v: _id(v) if isinstance(v, tuple) else str(v),
)
def test_every_config_every_variant(table_config, k, stride, variant):
    table, config = table_config
    for dtype in _dtypes(table, config):
        _run_config(config, k, stride, variant, dtype)


def test_the_sweep_covers_both_tables():
    from resfused.triton.conv import CONFIG_TABLE, CONFIG_TABLE_FMA

    assert len(CONFIGS) == len(CONFIG_TABLE) + len(CONFIG_TABLE_FMA) > 0
    # each shape has a partial last tile in M (stride 1), K and N
    for _, (bm, bn, bk, _, _) in CONFIGS:
        m = (bm // 35 + 1) * 35
        assert m > bm and m % bm and (bk + bk // 2) % bk and (bn + bn // 2) % bn
