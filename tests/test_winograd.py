"""Winograd F(4x4, 3x3) on the CPU (csrc/cpu/winograd_f43.cpp, resfused/kernels/winograd_f43.py) against
the float64 direct conv: the ops, the inference adapter's selection, the training autograd
function (every gradient, gradcheck), non-finite inputs, opcheck and argument errors. float32
runs the AVX-512 instance of the tile code where the machine has it; a subprocess with
ATEN_CPU_CAPABILITY=avx2 checks the baseline instance too."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import resfused
from resfused import _native
from resfused import reference as R
from resfused.kernels import winograd_f43
from resfused.kernels.base import ConvParams
from resfused.kernels.conv_winograd import WinogradConv
from resfused.ops import conv2d_train, conv_bias_act, trace_kernels

from harness import assert_matches_reference, randomize_bn

pytestmark = pytest.mark.skipif(
    not _native.has_kernel("winograd_f43_input", "cpu"), reason="resfused._C has no CPU Winograd kernels"
)


def _data(n, c_in, c_out, h, w, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=torch.float64) / (3 * c_in**0.5)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    r = torch.randn(n, c_out, h, w, generator=g, dtype=torch.float64)
    return x.to(dtype), wt.to(dtype), b.to(dtype), r.to(dtype)


# Ragged tiles (H, W not multiples of 4), channel counts that are not a multiple of the vector
# width, a single tile, and a ResNet stage shape.
SHAPES = [(2, 5, 7, 9, 13), (1, 3, 2, 1, 1), (3, 16, 8, 4, 4), (1, 24, 40, 6, 11), (2, 64, 64, 14, 14)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("epilogue", ["none", "bias_relu", "bias_residual_relu", "residual"])
def test_conv3x3_matches_float64_direct_conv(shape, epilogue):
    x, wt, b, r = _data(*shape)
    bias = b if "bias" in epilogue else None
    residual = r if "residual" in epilogue else None
    relu = "relu" in epilogue
    y = winograd_f43.conv3x3(x, winograd_f43.TransformedWeight(wt, torch.float64), bias, residual, relu)
    ref = F.conv2d(x.double(), wt.double(), None if bias is None else bias.double(), padding=1)
    if residual is not None:
        ref = ref + residual.double()
    if relu:
        ref = ref.relu()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(y, ref, torch.float32, what=f"winograd {shape} {epilogue}")


def test_passes_of_a_few_images_match_one_pass(monkeypatch):
    x, wt, b, r = _data(5, 8, 8, 12, 12)
    u = winograd_f43.TransformedWeight(wt)
    whole = winograd_f43.conv3x3(x, u, b, r, True)
    per_image = 36 * 3 * 3 * 8 * 4
    monkeypatch.setattr(winograd_f43, "_PASS_BYTES", 2 * per_image)  # passes of 2, 2, 1 images
    assert winograd_f43.images_per_pass(x) == 2
    assert torch.equal(winograd_f43.conv3x3(x, u, b, r, True), whole)


def test_weight_transform_round_trip_is_the_adjoint():
    # <transform_weight(w), dU> == <w, weight_grad(dU)>: weight_grad is the exact adjoint.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
    du = torch.randn(36, 3, 4, generator=g, dtype=torch.float64)
    lhs = (winograd_f43.transform_weight(w).view(36, 3, 4) * du).sum()
    rhs = (w * winograd_f43.weight_grad(du)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9, 13), (2, 32, 16, 8, 8)])
@pytest.mark.parametrize("bias", [False, True])
def test_training_gradients_match_float64(shape, bias):
    x, wt, b, _ = _data(*shape)
    g = torch.randn(shape[0], shape[2], shape[3], shape[4], dtype=torch.float64).float()
    xs, ws = x.clone().requires_grad_(), wt.clone().requires_grad_()
    bs = b.clone().requires_grad_() if bias else None
    y = winograd_f43.conv3x3_train(xs, ws, bs)
    y.backward(g)
    x64, w64 = x.double().requires_grad_(), wt.double().requires_grad_()
    b64 = b.double().requires_grad_() if bias else None
    y64 = F.conv2d(x64, w64, b64, padding=1)
    y64.backward(g.double())
    assert_matches_reference(y, y64, what="forward")
    assert_matches_reference(xs.grad, x64.grad, what="grad input")
    assert_matches_reference(ws.grad, w64.grad, what="grad weight")
    if bias:
        assert_matches_reference(bs.grad, b64.grad, what="grad bias")


def test_gradcheck_float64():
    x, wt, b, _ = _data(1, 2, 3, 5, 6, torch.float64)
    args = (x.requires_grad_(), wt.requires_grad_(), b.requires_grad_())
    assert torch.autograd.gradcheck(lambda *a: winograd_f43.conv3x3_train(*a), args)


def test_inputs_without_grad_get_no_gradient_and_no_saved_transform():
    x, wt, _, _ = _data(1, 4, 4, 8, 8)
    w = wt.clone().requires_grad_()
    y = winograd_f43.conv3x3_train(x, w)
    y.sum().backward()
    assert x.grad is None and w.grad is not None
    w.requires_grad_(False)
    xs = x.clone().requires_grad_()
    y = winograd_f43.conv3x3_train(xs, w)
    assert y.grad_fn.saved_tensors[0] is None  # no transformed input kept without a weight gradient
    y.sum().backward()
    assert xs.grad is not None


def test_float32_runs_the_widest_instance_of_the_tile_code():
    expected = "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "baseline"
    assert torch.ops.resfused.winograd_f43_cpu_path() == expected


# The baseline (at::vec) instance in float32: all three transforms with every epilogue, ragged
# tiles and partial vectors, and the finiteness probe at every pixel.
_BASELINE_CHECK = r"""
import torch, torch.nn.functional as F
from resfused.kernels import winograd_f43
assert torch.ops.resfused.winograd_f43_cpu_path() == "baseline", torch.ops.resfused.winograd_f43_cpu_path()
g = torch.Generator().manual_seed(0)
for n, ci, co, h, w in [(2, 5, 7, 9, 13), (1, 24, 40, 6, 11), (2, 64, 64, 14, 14)]:
    x = torch.randn(n, ci, h, w, generator=g)
    wt = torch.randn(co, ci, 3, 3, generator=g) / (3 * ci ** 0.5)
    b, r = torch.randn(co, generator=g), torch.randn(n, co, h, w, generator=g)
    y = winograd_f43.conv3x3(x, winograd_f43.TransformedWeight(wt, torch.float64), b, r, True).double()
    ref = (F.conv2d(x.double(), wt.double(), b.double(), padding=1) + r.double()).relu()
    err = (y - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), (n, ci, co, h, w, err)
    z = torch.ops.resfused.winograd_f43_grad_output(r).double()
    z64 = torch.ops.resfused.winograd_f43_grad_output(r.double())
    assert (z - z64).abs().max().item() <= 1e-5 * z64.abs().max().item()
x = torch.randn(1, 10, 7, 9, generator=g)
for i in range(7):
    for j in range(9):
        bad = x.clone()
        bad[0, (i * 9 + j) % 10, i, j] = float("nan")
        assert not torch.ops.resfused.winograd_f43_input(bad)[1].item(), (i, j)
print("ok")
"""


def test_baseline_instance_under_a_narrower_capability():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _BASELINE_CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_input_transform_finds_a_non_finite_value_at_every_position(bad):
    # Every pixel, ragged tiles and a channel count (10) that leaves a partial vector: the probe
    # must see each loaded value, whichever window position and lane it falls on.
    x, _, _, _ = _data(1, 10, 10, 7, 9)
    assert torch.ops.resfused.winograd_f43_input(x)[1].item()
    for i in range(7):
        for j in range(9):
            y = x.clone()
            y[0, (i * 9 + j) % 10, i, j] = bad
            assert not torch.ops.resfused.winograd_f43_input(y)[1].item(), (i, j)


def test_non_finite_input_is_reported_and_left_to_the_direct_conv():
    x, wt, b, _ = _data(1, 8, 8, 12, 12)
    x[0, 3, 5, 6] = float("nan")
    _, finite = torch.ops.resfused.winograd_f43_input(x)
    assert not finite.item()
    assert winograd_f43.conv3x3(x, winograd_f43.TransformedWeight(wt), b) is None
    x[0, 3, 5, 6] = float("inf")
    assert winograd_f43.transform_input(x) is None
    # The adapter hands the call to the reference conv: the reference's NaN / Inf pattern, exactly,
    # ReLU included, and the trace names the kernel that ran and why Winograd did not finish.
    x, wt, b, _ = _data(1, 8, 8, 16, 16)  # 16x16: large enough for the adapter to take it
    p = ConvParams(wt, b, (1, 1), (1, 1), (1, 1), 1)
    assert WinogradConv().supports(x, p, None, False)
    x[0, 3, 5, 6] = float("nan")
    with trace_kernels() as ran:
        y = conv_bias_act(x, p, relu=True)
    assert [c[:2] for c in ran] == [("conv", "reference")]
    assert ("winograd_f43", "the input holds NaN or Inf (found by the input transform)") in ran[0].skipped
    ref = torch.relu(F.conv2d(x.double(), wt.double(), b.double(), padding=1))
    assert_matches_reference(y, ref, torch.float32, what="NaN input")


def test_adapter_selection():
    adapter = WinogradConv()

    def p(c_in, stride=1, groups=1, dilation=1):
        return ConvParams(
            torch.empty(c_in, c_in // groups, 3, 3), None, (stride,) * 2, (dilation,) * 2, (dilation,) * 2, groups
        )

    x = lambda c, hw, dtype=torch.float32: torch.empty(2, c, hw, hw, dtype=dtype)  # noqa: E731
    assert adapter.supports(x(64, 56), p(64), None, False)
    assert adapter.supports(x(256, 14), p(256), None, False)
    assert adapter.supports(x(512, 7), p(512), None, False)  # batch 2: 8 tiles
    assert not adapter.supports(x(512, 7)[:1], p(512), None, False)  # 36 x 512 x 512 weights for 4 tiles: slower
    assert not adapter.supports(x(1024, 14), p(1024), None, False)  # not measured
    assert not adapter.supports(x(64, 8), p(64), None, False)  # too few tiles
    assert not adapter.supports(x(64, 56, torch.bfloat16), p(64), None, False)
    assert not adapter.supports(x(64, 56), p(64, stride=2), None, False)
    assert not adapter.supports(x(64, 56), p(64, groups=2), None, False)
    assert not adapter.supports(x(64, 56), p(64, dilation=2), None, False)


def test_fused_basic_block_eval_runs_winograd_and_matches():
    ref = randomize_bn(R.BasicBlock(64, 64, 1)).eval()
    fused = resfused.BasicBlock.from_reference(copy.deepcopy(ref)).eval()
    x = torch.randn(2, 64, 14, 14)
    with torch.no_grad(), resfused.ops.trace_kernels() as ran:
        y = fused(x)
    assert [c[:2] for c in ran].count(("conv", "winograd_f43")) == 2, ran
    assert_matches_reference(y, copy.deepcopy(ref).double()(x.double()), torch.float32, what="BasicBlock eval")


def test_fused_basic_block_train_step_through_winograd_matches():
    ref = randomize_bn(R.BasicBlock(32, 32, 1))
    fused = resfused.BasicBlock.from_reference(copy.deepcopy(ref)).train()
    x = torch.randn(2, 32, 28, 28)
    g = torch.randn(2, 32, 28, 28)

    def step(m, inp, grad):
        inp = inp.clone().requires_grad_()
        y = m(inp)
        y.backward(grad)
        return y, {"input": inp.grad, **{n: p.grad for n, p in m.named_parameters()}}, dict(m.named_buffers())

    with resfused.ops.trace_kernels() as ran:
        y, grads, buffers = step(fused, x, g)
    assert [c[:2] for c in ran].count(("conv_train", "winograd_f43")) == 2, ran
    y64, grads64, buffers64 = step(copy.deepcopy(ref).double().train(), x.double(), g.double())
    assert_matches_reference(y, y64, what="output")
    for key, expected in grads64.items():
        assert_matches_reference(grads[key], expected, what=f"grad {key}")
    for key, expected in buffers64.items():
        if not key.endswith("num_batches_tracked"):
            assert_matches_reference(buffers[key], expected, what=f"buffer {key}")


def test_training_conv_with_non_finite_input_keeps_the_reference_nan_pattern():
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
    x = torch.randn(1, 32, 28, 28)
    x[0, 0, 10, 10] = float("nan")
    with resfused.ops.trace_kernels() as ran:
        y = conv2d_train(x, conv)
    assert ("conv_train", "winograd_f43") not in [c[:2] for c in ran]
    assert torch.equal(y.isnan(), conv(x).isnan())


def test_opcheck():
    x, wt, b, r = _data(2, 5, 7, 9, 6)
    v, _ = torch.ops.resfused.winograd_f43_input(x)
    m = winograd_f43.TransformedWeight(wt).gemm(v)
    torch.library.opcheck(torch.ops.resfused.winograd_f43_input, (x,))
    torch.library.opcheck(torch.ops.resfused.winograd_f43_grad_output, (r,))
    torch.library.opcheck(torch.ops.resfused.winograd_f43_output, (m, 2, 9, 6, b, r, True))
    out = torch.empty(3, 7, 9, 6).contiguous(memory_format=torch.channels_last)[1:]  # a batch slice
    torch.library.opcheck(torch.ops.resfused.winograd_f43_output_into, (m, b, r, True, out))
    torch.ops.resfused.winograd_f43_output_into(m, b, r, True, out)
    assert_matches_reference(
        out,
        torch.ops.resfused.winograd_f43_output(m.double(), 2, 9, 6, b.double(), r.double(), True),
        torch.float32,
        what="output_into",
    )


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: torch.ops.resfused.winograd_f43_input(torch.randn(2, 3, 4)), "'x' must be 4-D"),
        (lambda: torch.ops.resfused.winograd_f43_input(torch.randn(1, 2, 4, 4).bfloat16()), "float32 or float64"),
        (
            lambda: torch.ops.resfused.winograd_f43_output(torch.randn(1, 35, 2), 1, 4, 4, None, None, False),
            r"\[T, 36, C\]",
        ),
        (
            lambda: torch.ops.resfused.winograd_f43_output(torch.randn(2, 36, 2), 1, 4, 4, None, None, False),
            "has 2 tiles",
        ),
        (
            lambda: torch.ops.resfused.winograd_f43_output(torch.randn(1, 36, 2), 1, 4, 4, torch.randn(3), None, False),
            "'bias' must have shape",
        ),
        (
            lambda: torch.ops.resfused.winograd_f43_output(
                torch.randn(1, 36, 2), 1, 4, 4, None, torch.randn(1, 2, 4, 5), False
            ),
            "'residual' must have the output's shape",
        ),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
