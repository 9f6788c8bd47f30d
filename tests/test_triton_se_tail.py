"""The Triton SE tail (resfused/triton/se_tail.py): relu(y * gate[n, c] + residual) against the
float64 reference, in the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1) or
on a CUDA device; and compiled offline for sm_80 / sm_90 without spills.

float16 / bfloat16 tolerances (docs/design.md, Numerics) take eager PyTorch's same-dtype result:
the reference kernel's y * gate + residual, each op rounded to the low dtype.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import resfused
from resfused.kernels import se_tail_triton
from resfused.ops import trace_kernels
from tests.harness import assert_matches_reference, compare_step, randomize_bn

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device",
)
DEVICE = "cpu" if INTERPRETED else "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Odd channel counts and pixel counts that cross the tiles' edges: 67 channels (channels_last tiles
# of 128), 5x9 = 45 pixels (NCHW tiles of 64), 300 channels over 1x1 (three channels_last tiles,
# eight NCHW channel tiles of 1 pixel x 2048 // 1), one image with 3 x 23 x 31 (713 pixels: two
# NCHW tiles of 512).
SHAPES = [(2, 67, 5, 9), (1, 300, 1, 1), (1, 3, 23, 31), (3, 8, 2, 2)]


def _inputs(dtype, shape, y_layout, r_layout, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    y, r = (torch.randn(shape, generator=g) for _ in range(2))
    gate = torch.rand(shape[:2], generator=g)
    y[0, min(1, shape[1] - 1), 0, 0], r[-1, -1, -1, -1] = float("nan"), float("inf")
    y, r, gate = (t.to(DEVICE, dtype) for t in (y, r, gate))
    if y_layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    if r_layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    return [t.requires_grad_(requires_grad) for t in (y, gate, r)]


def _reference(y, gate, r):
    return torch.relu(y * gate[:, :, None, None] + r)


@needs_triton
@pytest.mark.parametrize("r_layout", ["same", "other"])
@pytest.mark.parametrize("y_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_triton_scale_add_relu_matches_the_reference(dtype, shape, y_layout, r_layout):
    other = {"nchw": "channels_last", "channels_last": "nchw"}[y_layout]
    y, gate, r = _inputs(dtype, shape, y_layout, y_layout if r_layout == "same" else other)
    with resfused.use_backend("triton"), trace_kernels() as ran:
        out = resfused.ops.se.scale_add_relu(y, gate, r)
    assert [c[:2] for c in ran] == [("scale_add_relu", "triton")], ran
    expected = _reference(y.double(), gate.double(), r.double())
    eager = _reference(y, gate, r) if dtype != torch.float32 else None
    assert_matches_reference(out, expected, dtype, eager, what=f"{dtype} {shape} y {y_layout} r {r_layout}")
    # NaN stays NaN (as torch.relu), +Inf stays +Inf; the output keeps y's layout.
    assert out[0, min(1, shape[1] - 1), 0, 0].isnan() and out[-1, -1, -1, -1] == float("inf")
    layout = torch.channels_last if y_layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout) and out.dtype == dtype


def _within_half_a_bf16_step(out: torch.Tensor, exact: torch.Tensor, slack: float = 0.0) -> torch.Tensor:
    """Where bf16 `out` is `exact` (fp32) rounded to nearest: at most half a bf16 step away (a
    truncating cast is up to a whole step off), plus `slack` * |exact| for error made before the
    rounding. Steps are 2^(exponent - 8) for bf16's 8-bit significand (frexp's mantissa in [0.5, 1))."""
    step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8)
    return (out.float() - exact).abs() <= step / 2 + slack * exact.abs()


@needs_triton
@pytest.mark.parametrize("y_layout", ["nchw", "channels_last"])
def test_triton_se_kernels_round_bf16_to_nearest(y_layout):
    """bf16 stores round to nearest as the GPU's cvt.rn does, also in the interpreter, whose own
    cast truncates (resfused/triton/rounding.py): the tail's fp32 value and the channel mean
    each rounded once. Fails on kernels that cast without rounding first."""
    g = torch.Generator().manual_seed(5)
    shape = (2, 40, 6, 7)
    y, r = (torch.randn(shape, generator=g).to(DEVICE, torch.bfloat16) for _ in range(2))
    gate = torch.rand(shape[:2], generator=g).to(DEVICE, torch.bfloat16)
    if y_layout == "channels_last":
        y, r = (t.contiguous(memory_format=torch.channels_last) for t in (y, r))
    with resfused.use_backend("triton"):
        out = resfused.ops.se.scale_add_relu(y, gate, r)
        mean = resfused.ops.se.channel_mean(y)
    exact = torch.relu(y.float() * gate.float()[:, :, None, None] + r.float())
    assert _within_half_a_bf16_step(out, exact).all(), "scale_add_relu: a bf16 store did not round to nearest"
    # The kernel sums 42 values in fp32 in its own order: allow that float32 error on top.
    exact_mean = y.double().mean(dim=(2, 3)).float()
    assert _within_half_a_bf16_step(mean, exact_mean, slack=1e-5).all(), (
        "channel_mean: a bf16 store did not round to nearest"
    )


@needs_triton
@pytest.mark.parametrize("y_layout", ["nchw", "channels_last"])
def test_triton_scale_add_relu_gradients(y_layout):
    # The backward is PyTorch ops around the saved output (kernels/se_tail_triton.py): every
    # gradient against float64 autograd through the reference, and opcheck of the op.
    y, gate, r = _inputs(torch.float32, (2, 13, 5, 3), y_layout, y_layout, requires_grad=True)
    y, r = (t.detach().nan_to_num(0.5, 2.0).requires_grad_(True) for t in (y, r))
    grad = torch.randn(y.shape, device=DEVICE)
    out = torch.ops.resfused.scale_add_relu_triton(y, gate, r)
    out.backward(grad)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (y, gate, r)]
    _reference(*leaves64).backward(grad.double())
    for name, t, t64 in zip(("y", "gate", "residual"), (y, gate, r), leaves64, strict=True):
        assert_matches_reference(t.grad, t64.grad, torch.float32, what=f"grad {name}")
    # Under the interpreter test_aot_dispatch_dynamic is left out, as for conv2d_triton
    # (test_triton_conv.py): it would launch the interpreted kernel on fake tensors.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not INTERPRETED:
        utils += ("test_aot_dispatch_dynamic",)
    args = [t.detach() for t in (y, gate, r)]
    torch.library.opcheck(torch.ops.resfused.scale_add_relu_triton, args, test_utils=utils)
    torch.library.opcheck(
        torch.ops.resfused.scale_add_relu_triton, [t.requires_grad_(True) for t in args], test_utils=utils
    )


@needs_triton
def test_triton_scale_add_relu_bad_input_names_the_argument():
    y, gate, r = _inputs(torch.float32, (2, 8, 3, 3), "nchw", "nchw")
    op = torch.ops.resfused.scale_add_relu_triton
    with pytest.raises(ValueError, match=r"'gate' must have shape \(2, 8\)"):
        op(y, gate[:, :4], r)
    with pytest.raises(ValueError, match="'residual' must have the shape of 'y'"):
        op(y, gate, r[:, :4])
    with pytest.raises(TypeError, match="'gate' has dtype torch.float16"):
        op(y, gate.half(), r)
    with pytest.raises(ValueError, match="'y' must be 4-D"):
        op(y[0], gate, r[0])


def test_triton_scale_add_relu_reasons():
    kernel = se_tail_triton.TritonScaleAddRelu()
    y = torch.empty(2, 8, 3, 3, dtype=torch.float64)
    reasons = list(kernel.unsupported_reasons(y, y[:, :, 0, 0], y))
    assert any("dtype torch.float64" in r for r in reasons), reasons
    if not INTERPRETED:
        assert any("needs CUDA tensors" in r for r in kernel.unsupported_reasons(y.float(), None, None))
    # CPU tensors under the default backend keep the compiled CPU kernel; Triton serves "auto" on CUDA.
    from resfused.ops import se

    assert [k.name for k in se.SCALE_ADD_RELU_KERNELS["cpu"]] == ["native"]
    assert [k.name for k in se.SCALE_ADD_RELU_KERNELS["auto-cuda"]][0] == "triton"


@needs_triton
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_timm_se_block_runs_the_triton_tail(mode):
    # The whole SE block under the Triton backend (convs and tail in the interpreter on the CPU).
    timm_resnet = pytest.importorskip("timm.models.resnet")
    from timm.layers import get_attn

    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
    block = timm_resnet.BasicBlock(16, 32, stride=2, downsample=downsample, attn_layer=get_attn("se"))
    block = randomize_bn(block).to(DEVICE).train(mode == "train")
    fused = resfused.fuse(block)
    assert type(fused) is resfused.SEBasicBlock
    with resfused.use_backend("triton"):
        ran = compare_step(fused, block, torch.randn(2, 16, 9, 7, device=DEVICE), mode, f"SE block {mode}")
    assert [c.kernel for c in ran if c.op == "scale_add_relu"] == ["triton"], ran


@pytest.mark.gpu
def test_triton_se_block_compiles_fullgraph_on_cuda():
    # torch.compile traces the triton_op through wrap_triton: no graph break, the same result.
    timm_resnet = pytest.importorskip("timm.models.resnet")
    from timm.layers import get_attn

    block = timm_resnet.Bottleneck(64, 16, attn_layer=get_attn("se"))
    fused = resfused.fuse(randomize_bn(block)).eval().cuda().half()
    x = torch.randn(2, 64, 14, 14, device="cuda").half().contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), trace_kernels() as ran:
        eager = fused(x)
    assert ("scale_add_relu", "triton") in [c[:2] for c in ran], ran
    with torch.no_grad():
        compiled = torch.compile(fused, fullgraph=True)(x)
    assert_matches_reference(compiled.float(), eager.double(), torch.float32, what="compile vs eager (same kernels)")


@pytest.mark.gpu
def test_triton_scale_add_relu_addresses_past_2_31():
    # N*C*H*W = 2^31 + 2^27 elements: the last image starts past 2^31 (int64 image base).
    y = torch.randn(17, 64, 2**11, 2**10, device="cuda", dtype=torch.float16)
    gate, r = torch.rand(17, 64, device="cuda", dtype=torch.float16), torch.randn_like(y)
    out = torch.ops.resfused.scale_add_relu_triton(y, gate, r)
    tail = (slice(-1, None), slice(None), slice(-2, None))
    expected = _reference(y[tail].double(), gate[-1:].double(), r[tail].double())
    eager = _reference(y[tail], gate[-1:], r[tail])
    assert_matches_reference(out[tail].cpu(), expected.cpu(), torch.float16, eager.cpu(), "last image past 2^31")


# ------------------------------------------------------------------------------ channel mean
# 45 and 713 pixels cross the NCHW tiles (256 pixels per step), 67 and 300 channels the
# channels_last ones (64 channels per program); 1x1 and 2x2 are the late stages at small inputs.
MEAN_SHAPES = [(2, 67, 5, 9), (1, 300, 1, 1), (1, 3, 23, 31), (3, 8, 2, 2), (2, 130, 40, 41)]


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", MEAN_SHAPES, ids=["x".join(map(str, s)) for s in MEAN_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_triton_channel_mean_matches_the_reference(dtype, shape, layout):
    y, _, _ = _inputs(dtype, shape, layout, layout)
    y = y.nan_to_num(0.0) + 0.25  # a non-zero mean; a NaN is checked below
    with resfused.use_backend("triton"), trace_kernels() as ran:
        out = resfused.ops.se.channel_mean(y)
    assert [c[:2] for c in ran] == [("channel_mean", "triton")], ran
    eager = y.mean((2, 3)) if dtype != torch.float32 else None
    assert_matches_reference(out, y.double().mean((2, 3)), dtype, eager, what=f"mean {dtype} {shape} {layout}")
    assert out.shape == shape[:2] and out.dtype == dtype and out.is_contiguous()
    y[0, 0, -1, -1] = float("nan")
    with resfused.use_backend("triton"):
        out = resfused.ops.se.channel_mean(y)
    assert out[0, 0].isnan() and not out[0, 1:].isnan().any() and not out[1:].isnan().any()


@needs_triton
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_channel_mean_gradient_and_opcheck(layout):
    y, _, _ = _inputs(torch.float32, (2, 13, 5, 3), layout, layout)
    y = y.nan_to_num(0.0).requires_grad_(True)
    grad = torch.randn(2, 13, device=DEVICE)
    torch.ops.resfused.channel_mean_triton(y).backward(grad)
    y64 = y.detach().double().requires_grad_(True)
    y64.mean((2, 3)).backward(grad.double())
    assert_matches_reference(y.grad, y64.grad, torch.float32, what="mean grad")
    assert y.grad.is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not INTERPRETED:
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(torch.ops.resfused.channel_mean_triton, (y.detach(),), test_utils=utils)
    torch.library.opcheck(torch.ops.resfused.channel_mean_triton, (y.detach().requires_grad_(True),), test_utils=utils)
    with pytest.raises(ValueError, match="'y' must be 4-D"):
        torch.ops.resfused.channel_mean_triton(y.detach()[0])


def test_channel_mean_is_atens_outside_the_triton_backend():
    # Under "auto" (CPU and CUDA) ATen's mean stays: no GPU measurement says the Triton one is faster.
    y = torch.randn(2, 5, 3, 3)
    with trace_kernels() as ran:
        out = resfused.ops.se.channel_mean(y)
    assert [c[:2] for c in ran] == [("channel_mean", "aten")] and torch.equal(out, y.mean((2, 3)))
    from resfused.ops import se

    assert se.CHANNEL_MEAN_KERNELS["auto-cuda"] == [] and [k.name for k in se.CHANNEL_MEAN_KERNELS["triton"]] == [
        "triton"
    ]


# --------------------------------------------------------------------------- offline compile
PTXAS = os.environ.get("PTXAS", "/usr/local/cuda/bin/ptxas")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs with TRITON_INTERPRET=0 (the interpreter's InterpretedFunction cannot be compiled): both
# kernels, every dtype x layout at the largest tiles the launchers make, for sm_80 and sm_90;
# ptxas -v on the PTX.
_COMPILE = r"""
import itertools, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from resfused.triton import se_tail

ptxas, out = sys.argv[1], []
kernels = ((se_tail.scale_add_relu_kernel, se_tail.tile_for), (se_tail.channel_mean_kernel, se_tail.mean_tile_for))
for (fn, tile), cc, dt, cl in itertools.product(kernels, (80, 90), ("fp32", "fp16", "bf16"), (True, False)):
    block_hw, block_c = tile(4096, 4096, cl)
    signature = {name: ("constexpr" if p.is_constexpr else "*" + dt if name.endswith("_ptr") else "i32")
                 for name, p in zip(fn.arg_names, fn.params)}
    k = triton.compile(
        ASTSource(fn=fn, signature=signature,
                  constexprs=dict(CHANNELS_LAST=cl, BLOCK_HW=block_hw, BLOCK_C=block_c, ROUND_BF16=False)),
        target=GPUTarget("cuda", cc, 32), options=dict(num_warps=se_tail.NUM_WARPS))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        open(path, "w").write(k.asm["ptx"])
        arch = {80: "sm_80", 90: "sm_90a"}[cc]
        log = subprocess.run([ptxas, "-v", f"-arch={arch}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    out.append(dict(kernel=fn.__name__, cc=cc, dtype=dt, channels_last=cl, tile=[block_hw, block_c],
                    registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                    spills=sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))))
print(json.dumps(out))
"""


def test_triton_se_kernels_compile_for_sm80_and_sm90_without_spills():
    ptxas = PTXAS if os.path.exists(PTXAS) else shutil.which("ptxas")
    if ptxas is None:
        pytest.skip(f"ptxas not found at {PTXAS}")
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE, ptxas],
        cwd=ROOT,
        env=dict(os.environ, TRITON_INTERPRET="0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-5000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * 2 * 3 * 2
    assert all(r["spills"] == 0 and 0 < r["registers"] <= 255 for r in results), results
