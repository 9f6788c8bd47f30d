"""The CUDA training-mode BatchNorm(+ReLU) kernels (csrc/cuda/kernels/bn_train.cuh) run as host
C++ against the float64 reference.

The kernel source and the host code of the binding (csrc/cuda/bn_train_host.h: checks, layout,
allocation, launch configuration) are compiled under the emulation header into the test-only
module torch.ops.resfused_emu (built by the `emu` fixture of test_cuda_emulation.py), whose
launcher walks the grid, bounds-checks every access and runs each warp's lanes in lock-step for
the shuffles. Forward: batch statistics (2-D block reduction with warp shuffles into about
2 x SM-count slots, then a parallel finalize; shifted sums), then the apply kernel; backward: the
two per-channel sums, the per-channel coefficients and grad_x. Tolerances: docs/design.md,
Numerics, via tests/harness.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.harness import assert_matches_reference
from tests.test_cuda_emulation import emu, emu_device  # noqa: F401  (the shared emulation-module fixtures)

CL = torch.channels_last
LOWP = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
EPS = 1e-5
# (shape, layout): C a multiple of the 16-byte vector width and not, NCHW and channels_last,
# odd spatial sizes, a (N, C) input, a 3-D (N, C, L) input.
CASES = [
    ((2, 16, 5, 3), CL),
    ((3, 5, 7, 3), CL),
    ((2, 65, 3, 3), CL),  # 65 channels: the last block's vector columns partly past C
    ((2, 16, 4, 4), torch.contiguous_format),
    ((2, 3, 5, 7), torch.contiguous_format),
    ((6, 4), torch.contiguous_format),
    ((3, 6, 11), torch.contiguous_format),
]


def _bn(x, w, b, relu):
    y = F.batch_norm(x, None, None, w, b, True, 0.0, EPS)
    return torch.relu(y) if relu else y


def _forward_backward(fn, g, *tensors):
    """(y, grad_x, grad_weight, grad_bias) of fn(x, w, b) with upstream gradient g."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*tensors)
    return (y, *torch.autograd.grad(y, tensors, g.to(y.dtype)))


def _inputs(shape, layout, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    # a per-channel offset, so that the shifted sums and |mean| ~ std are exercised
    offset = torch.randn(c, generator=gen).view([1, -1] + [1] * (len(shape) - 2)) * 3
    x = (torch.randn(shape, generator=gen) * 2 + offset).to(dtype).contiguous(memory_format=layout)
    w = torch.rand(c, generator=gen) + 0.5
    b = torch.randn(c, generator=gen)
    g = torch.randn(shape, generator=gen).to(dtype)
    return x, w, b, g


def _check(emu, x, w, b, g, relu, what):  # noqa: F811  (the fixture, passed on)
    dtype = x.dtype
    y, mean, var = emu.bn_train_act(x, w, b, EPS, relu)
    layout = (
        CL if x.dim() == 4 and x.is_contiguous(memory_format=CL) and not x.is_contiguous() else torch.contiguous_format
    )
    assert y.dtype == dtype and y.is_contiguous(memory_format=layout), f"{what}: y layout/dtype"
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == stats_dtype and var.dtype == stats_dtype, f"{what}: stats dtype {mean.dtype}"
    dims = [0] + list(range(2, x.dim()))
    x64 = x.double()
    assert_matches_reference(mean, x64.mean(dims), torch.float32, what=f"{what} mean")
    assert_matches_reference(var, x64.var(dims, unbiased=False), torch.float32, what=f"{what} var")

    gx, gw, gb = emu.bn_train_act_backward(g, x, w, b, mean, var, EPS, relu)
    assert gx.dtype == dtype and gx.is_contiguous(memory_format=layout) and gw.dtype == w.dtype and gb.dtype == b.dtype
    ref = _forward_backward(lambda *a: _bn(*a, relu), g.double(), x64, w.double(), b.double())
    base = _forward_backward(lambda *a: _bn(*a, relu), g, x, w.to(dtype), b.to(dtype)) if dtype in LOWP else (None,) * 4
    for name, ours, expected, eager in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, gx, gw, gb), ref, base):
        elementwise = name in ("y", "grad_x")
        # per-channel results are float32 (as the reference's float32 parameters): the fp32 rule
        assert_matches_reference(
            ours, expected, dtype if elementwise else torch.float32, eager if elementwise else None, f"{what} {name}"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [True, False])
def test_bn_train_act_and_backward_match_reference(emu, dtype, relu):  # noqa: F811
    for i, (shape, layout) in enumerate(CASES):
        x, w, b, g = _inputs(shape, layout, dtype, seed=i)
        _check(emu, x, w, b, g, relu, f"{shape} {layout} {dtype} relu={relu}")


@pytest.mark.parametrize("sms", [1, 4, 132])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_bn_train_many_rows_and_planes(emu_device, layout, sms):  # noqa: F811
    # channels_last: 1040 rows of 24 channels (fp32: 6 vectors -> blocks of 8 x 32 threads, rows
    # split over up to 33 slots, each thread several rows); NCHW: planes of 260 > 256 threads
    # (each thread several elements of its plane), 9 images. SM counts 1, 4, 132: one slot, a
    # few, and enough slots that every finalize lane adds several.
    emu_device.emulator_configure(sms, 0)
    x, w, b, g = _inputs((9, 24, 20, 13), layout, torch.float32)
    _check(emu_device, x, w, b, g, True, f"many rows {layout} sms={sms}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_bn_train_results_are_deterministic(emu_device, layout, dtype):  # noqa: F811
    # Same bits whatever order the blocks, warps and lanes run in (the emulation shuffles the
    # block order and reverses the thread order under a schedule seed): no atomics, and every
    # addition order is fixed by the shape. And the same bits on a second run.
    x, w, b, g = _inputs((6, 40, 9, 7), layout, dtype, seed=11)
    runs = []
    for seed in (0, 0, 12345):
        emu_device.emulator_configure(8, seed)
        y, mean, var = emu_device.bn_train_act(x, w, b, EPS, True)
        runs.append((y, mean, var, *emu_device.bn_train_act_backward(g, x, w, b, mean, var, EPS, True)))
    for other in runs[1:]:
        for name, a, b_ in zip(("y", "mean", "var", "grad_x", "grad_weight", "grad_bias"), runs[0], other):
            assert a.shape == b_.shape and a.stride() == b_.stride(), name
            assert torch.equal(a.contiguous().view(torch.uint8), b_.contiguous().view(torch.uint8)), name


def test_bn_train_reduction_launch_shape(emu):  # noqa: F811
    half, single = 2, 4
    # channels_last, C = 64 fp32 (16 vectors of 4): 16 x 16 threads, every thread has channels;
    # two blocks per SM.
    gx, gy, bx, by, smem, slots = emu.bn_train_reduce_config(32 * 56 * 56 * 64, 64, 1, True, 132, single)
    assert (bx, by, gx, gy, slots) == (16, 16, 1, 264, 264)
    # C = 64 fp16 (8 vectors of 8): 8 x 32
    gx, gy, bx, by, _, slots = emu.bn_train_reduce_config(32 * 56 * 56 * 64, 64, 1, True, 132, half)
    assert (bx, by, gx * gy) == (8, 32, 264)
    # NCHW, N = 32, C = 2048, 7x7: one block per channel, 49 elements a plane -> 64 x 4 threads;
    # one slot per channel (2 * 132 blocks < C already): the partial buffer is 2 * C floats,
    # where N * 256 slots per channel made it 134 MB.
    gx, gy, bx, by, _, slots = emu.bn_train_reduce_config(32 * 2048 * 49, 2048, 49, False, 132, single)
    assert (gx, gy, bx, by, slots) == (2048, 1, 64, 4, 1)
    # NCHW C = 64, 56x56 fp32 vectors: 784 vectors a plane -> 256 x 1, ceil(264 / 64) = 5 slots
    gx, gy, bx, by, _, slots = emu.bn_train_reduce_config(32 * 64 * 3136, 64, 3136, True, 132, single)
    assert (gx, gy, bx, by, slots) == (64, 5, 256, 1, 5)
    # The buffer is bounded by the SM count, not the batch: slots * C <= 2 * SMs * 256 * VL + C.
    for n_batch in (1, 32, 1024):
        for c, inner in ((64, 1), (2048, 1), (64, 3136), (2048, 49)):
            *_, slots = emu.bn_train_reduce_config(n_batch * c * inner * 8, c, inner, True, 132, half)
            assert slots * c <= 2 * 132 * 256 * 8 + c and slots <= 2 * 132


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_bn_train_backward_apply_row_stride(emu, layout):  # noqa: F811
    # More rows than the capped grid covers in one pass, so the grad_x kernel's row loop (and in
    # NCHW the channel stepping c_row += row_step mod C) runs: CL 133120 rows of 8 > 1024 blocks
    # x 128 rows; NCHW 16 planes over 15 grid rows.
    x, w, b, g = _inputs((2, 8, 256, 260), layout, torch.float32)
    _, mean, var = emu.bn_train_act(x, w, b, EPS, False)
    gx, _, _ = emu.bn_train_act_backward(g, x, w, b, mean, var, EPS, False)
    ref = _forward_backward(lambda *a: _bn(*a, False), g.double(), x.double(), w.double(), b.double())
    assert_matches_reference(gx, ref[1], what=f"grad_x large {layout}")


def test_bn_train_statistics_when_the_mean_dominates(emu):  # noqa: F811
    # Shifted sums: mean and variance stay accurate to float precision with |mean| / std = 1e5
    # (plain sums of x and x^2 in float32 would lose the variance entirely). y is checked at
    # |mean| / std = 1e3: at 1e5 the float32 mean itself (the op returns it, the backward takes
    # it) is off by ~ulp(1000)/2 = 3e-5 = 3e-3 std, and eager float32 batch_norm misses the
    # 1e-4 rule there as well (1.9e-3 of max|y|), so no float32 y can pass it.
    for layout in (CL, torch.contiguous_format):
        x = (torch.randn(4, 3, 8, 8) * 0.01 + 1000.0).contiguous(memory_format=layout)
        w, b = torch.ones(3), torch.zeros(3)
        _, mean, var = emu.bn_train_act(x, w, b, EPS, False)
        x64 = x.double()
        assert_matches_reference(mean, x64.mean((0, 2, 3)), what=f"mean {layout}")
        assert_matches_reference(var, x64.var((0, 2, 3), unbiased=False), what=f"var {layout}")
        x = (torch.randn(4, 3, 8, 8) * 0.01 + 10.0).contiguous(memory_format=layout)
        y, _, _ = emu.bn_train_act(x, w, b, EPS, False)
        assert_matches_reference(
            y, F.batch_norm(x.double(), None, None, None, None, True, 0.0, EPS), what=f"y {layout}"
        )


def test_bn_train_unaligned_and_odd_vector_widths(emu):  # noqa: F811
    # fp16 channels_last whose storage starts 2 bytes past an aligned address: no 16-byte
    # accesses (the element-wise path of the grad_x and y kernels).
    x, w, b, g = _inputs((2, 16, 3, 5), CL, torch.float16, seed=7)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    shifted = buf[1:].as_strided(x.shape, x.stride()).copy_(x)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous(memory_format=CL)
    _check(emu, shifted, w, b, g.contiguous(memory_format=CL), True, "unaligned fp16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_train_unaligned_nchw_views(emu, dtype):  # noqa: F811
    # NCHW storage starting one element past an aligned address: scalar loads in the reduction
    # and the apply kernels; the planes (4x4) would otherwise allow vectors.
    x, w, b, g = _inputs((3, 6, 4, 4), torch.contiguous_format, dtype, seed=5)
    buf = torch.empty(x.numel() + 1, dtype=dtype)
    shifted = buf[1:].view(x.shape).copy_(x)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    _check(emu, shifted, w, b, g, False, f"unaligned NCHW {dtype}")


def test_bn_train_nan_stays_in_its_channel(emu):  # noqa: F811
    x, w, b, g = _inputs((2, 4, 3, 3), CL, torch.float32)
    x[1, 2, 1, 1] = float("nan")
    y, mean, var = emu.bn_train_act(x, w, b, EPS, True)
    assert y[:, 2].isnan().all() and mean[2].isnan() and var[2].isnan(), "NaN must propagate through relu"
    keep = [0, 1, 3]
    ref = _bn(x.double()[:, keep], w.double()[keep], b.double()[keep], True)
    assert_matches_reference(y[:, keep], ref, what="channels without NaN")


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_bn_train_statistics_of_infinite_channels_follow_torch(emu, layout):  # noqa: F811
    """A channel whose first value is +Inf: mean +Inf and variance NaN, as nn.BatchNorm2d computes
    them (a shift by that first value gave Inf - Inf = NaN for the mean); -Inf and +Inf together:
    NaN for both."""
    x, w, b, _ = _inputs((2, 4, 3, 3), layout, torch.float32)
    x[0, 1, 0, 0] = x[1, 1, 2, 2] = float("inf")  # the first value of channel 1 in either layout
    x[0, 3, 0, 0], x[1, 3, 1, 1] = float("inf"), float("-inf")
    _, mean, var = emu.bn_train_act(x, w, b, EPS, True)
    x64 = x.double()
    expected_mean = x64.mean((0, 2, 3))
    expected_var = x64.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, expected_mean.float(), equal_nan=True)
    torch.testing.assert_close(var, expected_var.float(), equal_nan=True)
    assert mean[1] == float("inf") and var[1].isnan() and mean[3].isnan()


def test_bn_train_weight_and_bias_dtypes(emu):  # noqa: F811
    # bf16 activations with bf16 parameters (a model cast with .to(bfloat16)): grads come back bf16.
    x, w, b, g = _inputs((2, 8, 4, 4), CL, torch.bfloat16, seed=3)
    w16, b16 = w.bfloat16(), b.bfloat16()
    y, mean, var = emu.bn_train_act(x, w16, b16, EPS, True)
    gx, gw, gb = emu.bn_train_act_backward(g, x, w16, b16, mean, var, EPS, True)
    assert gw.dtype == torch.bfloat16 and gb.dtype == torch.bfloat16
    ref = _forward_backward(lambda *a: _bn(*a, True), g.double(), x.double(), w16.double(), b16.double())
    base = _forward_backward(lambda *a: _bn(*a, True), g, x, w16, b16)
    for name, ours, expected, eager in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, gx, gw, gb), ref, base):
        assert_matches_reference(ours, expected, torch.bfloat16, eager, name)


def test_bn_train_bad_arguments(emu):  # noqa: F811
    x = torch.randn(2, 4, 3, 3)
    w, b = torch.ones(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"'weight' must have shape \[4\]"):
        emu.bn_train_act(x, torch.ones(3), b, EPS, True)
    with pytest.raises(RuntimeError, match="'eps' must be >= 0"):
        emu.bn_train_act(x, w, b, -1.0, True)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        emu.bn_train_act(torch.randn(1, 4), w, b, EPS, True)
    with pytest.raises(RuntimeError, match="rank >= 2"):
        emu.bn_train_act(torch.randn(4), w, b, EPS, True)
    _, mean, var = emu.bn_train_act(x, w, b, EPS, True)
    with pytest.raises(RuntimeError, match="'grad_out' must have the shape of 'x'"):
        emu.bn_train_act_backward(x[:1], x, w, b, mean, var, EPS, True)
    with pytest.raises(RuntimeError, match="'grad_out' has dtype"):
        emu.bn_train_act_backward(x.double(), x, w, b, mean, var, EPS, True)
    with pytest.raises(RuntimeError, match=r"'var' must have shape \[4\]"):
        emu.bn_train_act_backward(x, x, w, b, mean, var[:2], EPS, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_bn_train_act_cuda_kernel(dtype, layout):
    # The compiled kernels on a real GPU, through torch.ops.resfused (skipped without a GPU).
    from resfused import _native

    if not _native.has_kernel("bn_train_act", "cuda"):
        pytest.skip("resfused._C was built without the CUDA bn_train kernels")
    x, w, b, g = _inputs((4, 32, 9, 7), layout, dtype)
    dev = [t.cuda() for t in (x, w, b, g)]
    y, mean, var = torch.ops.resfused.bn_train_act(*dev[:3], EPS, True)
    gx, gw, gb = torch.ops.resfused.bn_train_act_backward(dev[3], *dev[:3], mean, var, EPS, True)
    ref = _forward_backward(lambda *a: _bn(*a, True), g.double(), x.double(), w.double(), b.double())
    base = _forward_backward(lambda *a: _bn(*a, True), g, x, w.to(dtype), b.to(dtype)) if dtype in LOWP else (None,) * 4
    for name, ours, expected, eager in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, gx, gw, gb), ref, base):
        elementwise = name in ("y", "grad_x")
        assert_matches_reference(
            ours.cpu(), expected, dtype if elementwise else torch.float32, eager if elementwise else None, name
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_bn_train_cuda_reduction_many_slots_deterministic(dtype, layout):
    # A ResNet stage-1 shape on a real GPU: the reduction grid spans every SM (about 2 blocks per
    # SM, many slots per channel), results vs float64, and the same bits on a second run.
    from resfused import _native

    if not _native.has_kernel("bn_train_act", "cuda"):
        pytest.skip("resfused._C was built without the CUDA bn_train kernels")
    x, w, b, g = _inputs((32, 64, 28, 28), layout, dtype, seed=3)
    dev = [t.cuda() for t in (x, w, b, g)]
    runs = []
    for _ in range(2):
        y, mean, var = torch.ops.resfused.bn_train_act(*dev[:3], EPS, True)
        runs.append((y, mean, var, *torch.ops.resfused.bn_train_act_backward(dev[3], *dev[:3], mean, var, EPS, True)))
    for a, b_ in zip(*runs):
        assert torch.equal(a.contiguous().view(torch.uint8), b_.contiguous().view(torch.uint8))
    y, mean, var, gx, gw, gb = runs[0]
    ref = _forward_backward(lambda *a: _bn(*a, True), g.double(), x.double(), w.double(), b.double())
    base = _forward_backward(lambda *a: _bn(*a, True), g, x, w.to(dtype), b.to(dtype)) if dtype in LOWP else (None,) * 4
    for name, ours, expected, eager in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, gx, gw, gb), ref, base):
        elementwise = name in ("y", "grad_x")
        assert_matches_reference(
            ours.cpu(), expected, dtype if elementwise else torch.float32, eager if elementwise else None, name
        )
