"""The CPU grouped 3x3 kernel (csrc/cpu/grouped_conv3x3.cpp) against the float64 reference.

Covers both vector ISAs of this machine and the scalar fallback (the AVX2 and scalar paths run in
subprocesses with ATEN_CPU_CAPABILITY narrowed, the same switch ATen's own kernels honour), the
adapter's selection for a ResNeXt block, the fake kernel, and argument errors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import resfused
from resfused import _native
from resfused.kernels import conv_grouped
from resfused.kernels.base import ConvParams
from tests.harness import assert_matches_reference

pytestmark = pytest.mark.skipif(
    not _native.has_kernel("grouped_conv3x3", "cpu"), reason="resfused._C has no CPU grouped_conv3x3 kernel"
)

DTYPES = [torch.float32, torch.bfloat16]


def _case(n, groups, cpg, h, w, stride, dtype, bias=True, relu=True, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = groups * cpg
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(c, cpg, 3, 3, generator=g) / (3 * cpg**0.5)
    b = torch.randn(c, generator=g) if bias else None
    xd = x.to(dtype)
    if channels_last:
        xd = xd.contiguous(memory_format=torch.channels_last)
    wd, bd = wt.to(dtype), (b.to(dtype) if bias else None)
    # float64 reference on the values the kernel sees (rounded to dtype first).
    ref = F.conv2d(xd.double(), wd.double(), bd.double() if bias else None, stride, 1, 1, groups)
    eager = F.conv2d(xd, wd, bd, stride, 1, 1, groups)
    if relu:
        ref, eager = ref.relu(), eager.relu()
    return xd, wd, bd, ref, eager


def _check(n, groups, cpg, h, w, stride, dtype, **kw):
    x, wt, b, ref, eager = _case(n, groups, cpg, h, w, stride, dtype, **kw)
    y = torch.ops.resfused.grouped_conv3x3(x, wt, b, stride, kw.get("relu", True))
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    what = f"n={n} groups={groups} cpg={cpg} {h}x{w} stride={stride} {dtype} {kw}"
    assert_matches_reference(y, ref, dtype, eager if dtype != torch.float32 else None, what)


# Vector path: C a multiple of 16 (AVX-512) / 8 (AVX2); W 13 gives tiles of 7 and 6 (and 7 / 4
# pixels at stride 2), W 19 three tiles, 1 the single-pixel tile.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cpg,groups", [(4, 8), (8, 4), (16, 2)])
def test_vector_path_matches_reference(cpg, groups, stride, dtype):
    _check(2, groups, cpg, 9, 13, stride, dtype)
    _check(1, groups, cpg, 5, 19, stride, dtype, bias=False, relu=False, channels_last=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (7, 1), (2, 3), (3, 2), (17, 9)])
@pytest.mark.parametrize("stride", [1, 2])
def test_odd_and_tiny_spatial(h, w, stride, dtype):
    _check(1, 4, 4, h, w, stride, dtype)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_batch_sizes(n):
    if n == 0:  # an empty batch gives an empty channels_last output of the right shape
        x, wt, b, ref, _ = _case(0, 8, 4, 6, 5, 1, torch.float32)
        y = torch.ops.resfused.grouped_conv3x3(x, wt, b, 1, True)
        assert y.shape == ref.shape == (0, 32, 6, 5)
        return
    _check(n, 8, 4, 6, 5, 1, torch.float32)
    _check(n, 8, 4, 6, 5, 2, torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bias_relu_layouts(bias, relu, channels_last):
    _check(2, 8, 4, 6, 10, 1, torch.float32, bias=bias, relu=relu, channels_last=channels_last)


# Scalar fallback shapes: 32 and 2 channels per group, a channel count that is not a multiple of
# the vector width, C_out != C_in, stride 3, and float64.
@pytest.mark.parametrize(
    "cpg,groups,stride,dtype",
    [
        (32, 2, 1, torch.float32),
        (2, 5, 2, torch.float32),
        (4, 3, 1, torch.bfloat16),
        (4, 4, 3, torch.float32),
        (8, 2, 2, torch.float64),
    ],
)
def test_fallback_shapes(cpg, groups, stride, dtype):
    _check(2, groups, cpg, 7, 6, stride, dtype)


def test_out_channels_differ_from_in_channels():
    x = torch.randn(2, 16, 5, 6)
    w = torch.randn(32, 4, 3, 3)  # 4 groups, 4 in / 8 out channels per group
    b = torch.randn(32)
    y = torch.ops.resfused.grouped_conv3x3(x, w, b, 1, True)
    ref = F.conv2d(x.double(), w.double(), b.double(), 1, 1, 1, 4).relu()
    assert_matches_reference(y, ref, torch.float32)


def test_nan_propagates_through_relu():
    x, wt, b, _, _ = _case(1, 4, 4, 3, 3, 1, torch.float32)
    x = x.clone()
    x[0, 0, 1, 1] = float("nan")
    y = torch.ops.resfused.grouped_conv3x3(x, wt, b, 1, True)
    assert y[0, :4].isnan().all() and not y[0, 4:].isnan().any()


def test_fake_kernel_and_opcheck():
    x, wt, b, _, _ = _case(2, 4, 4, 5, 7, 2, torch.float32)
    torch.library.opcheck(
        torch.ops.resfused.grouped_conv3x3, (x, wt, b, 2, True), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize(
    "args,match",
    [
        (lambda x, w, b: (x[0], w, b, 1, True), "'x' must have shape"),
        (lambda x, w, b: (x, w[:, :, :2], b, 1, True), "'weight' must have shape"),
        (lambda x, w, b: (x, w[:, :3], b, 1, True), "not a multiple of weight.size\\(1\\)"),
        (lambda x, w, b: (x, w.double(), b, 1, True), "'weight' has dtype"),
        (lambda x, w, b: (x, w, b[:3], 1, True), "'bias' must have shape"),
        (lambda x, w, b: (x, w, b, 0, True), "'stride' must be >= 1"),
        (lambda x, w, b: (x.int(), w, b, 1, True), "'x' must be a floating-point"),
    ],
)
def test_bad_input_names_the_argument(args, match):
    x, w, b = torch.randn(1, 16, 4, 4), torch.randn(16, 4, 3, 3), torch.randn(16)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.resfused.grouped_conv3x3(*args(x, w, b))


def test_adapter_selected_for_resnext_block():
    from resfused import reference

    ref = reference.ResNeXtBottleneck(64, 32, stride=1, groups=16, base_width=8).eval()
    # width = int(32 * 8 / 64) * 16 = 64 channels, 4 per group (the case the adapter selects)
    fused = resfused.ResNeXtBottleneck.from_reference(ref).eval()
    x = torch.randn(2, 64, 9, 9).contiguous(memory_format=torch.channels_last)
    with resfused.use_backend("cpu"), resfused.ops.trace_kernels() as ran, torch.no_grad():
        y = fused(x)
    assert ("conv", "grouped3x3") in [c[:2] for c in ran], ran
    with torch.no_grad():
        expected = ref.double()(x.double())
    assert_matches_reference(y, expected, torch.float32, what="ResNeXtBottleneck")


@pytest.mark.skipif(conv_grouped.cpu_path(8) == "scalar", reason="no vector path for 8/16 channels per group here")
@pytest.mark.parametrize("cpg,stride,min_batch", [(4, 1, 1), (8, 2, 1), (8, 1, 4), (16, 2, None), (16, 1, None)])
def test_adapter_selection_by_batch(cpg, stride, min_batch):
    adapter = conv_grouped.GroupedConv3x3()
    p = ConvParams(torch.empty(256, cpg, 3, 3), None, (stride,) * 2, (1, 1), (1, 1), 256 // cpg)
    for n in (1, 2, 4, 8):
        x = torch.empty(n, 256, 14, 14).contiguous(memory_format=torch.channels_last)
        wanted = min_batch is not None and n >= min_batch and (cpg < 16 or conv_grouped.cpu_path(16) != "scalar")
        assert adapter.supports(x, p, None, False) == wanted, (n, cpg, stride)


# The other two paths of this machine, in fresh processes (the capability is read once).
_SUBPROCESS = r"""
import torch, resfused
import torch.nn.functional as F
path = torch.ops.resfused.grouped_conv3x3_cpu_path
assert (path(4), path(8), path(16)) == EXPECTED, (path(4), path(8), path(16))
g = torch.Generator().manual_seed(0)
worst = 0.0
for cpg, groups, stride, dtype in [(4, 4, 1, torch.float32), (4, 6, 2, torch.bfloat16), (8, 2, 1, torch.bfloat16),
                                   (8, 3, 2, torch.float32), (16, 1, 1, torch.float32)]:
    c = cpg * groups
    x = torch.randn(2, c, 7, 11, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, cpg, 3, 3, generator=g) / 6).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    y = torch.ops.resfused.grouped_conv3x3(x, w, b, stride, True).double()
    ref = F.conv2d(x.double(), w.double(), b.double(), stride, 1, 1, groups).relu()
    eager = F.conv2d(x, w, b, stride, 1, 1, groups).relu().double()
    scale = ref.abs().max().item()
    limit = 1e-4 * scale if dtype == torch.float32 else 2 * (eager - ref).abs().max().item() + 8e-3 * scale
    err = (y - ref).abs().max().item()
    assert err <= limit, (cpg, groups, stride, dtype, err, limit)
print("ok")
"""


@pytest.mark.parametrize(
    "capability,expected",
    [("avx2", ("avx2", "avx2", "scalar")), ("default", ("scalar", "scalar", "scalar"))],
)
def test_narrower_isa_paths(capability, expected):
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    code = _SUBPROCESS.replace("EXPECTED", repr(expected))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


def test_this_machine_uses_its_widest_path():
    cap = torch.backends.cpu.get_cpu_capability()
    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "scalar")
    assert torch.ops.resfused.grouped_conv3x3_cpu_path(4) == expected
    assert torch.ops.resfused.grouped_conv3x3_cpu_path(32) == "scalar"
