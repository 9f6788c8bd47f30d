"""The CUDA kernel sources (csrc/cuda/kernels/*.cuh) run as host C++ against the float64 reference.

csrc/emulation/emulated_ops.cpp compiles the same kernel source and the same host code (checks,
layout, launch configuration: csrc/cuda/*_host.h) under csrc/emulation/cuda_emulation.h, whose
launcher walks the grid, honours the barrier between kernel phases, poisons shared memory with
NaN and bounds-/alignment-checks every global and shared access (docs/design.md). It is a
test-only extension built here with torch.utils.cpp_extension.load (~1 minute the first time,
cached in the build directory afterwards).
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch
import torch.nn.functional as F

from tests.harness import assert_matches_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOWP = (torch.float16, torch.bfloat16)
CL = torch.channels_last


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    build = pathlib.Path(
        os.environ.get("RESFUSED_EMU_BUILD_DIR", f"/tmp/resfused-emulation-{os.getuid()}-{torch.__version__}")
    )
    build.mkdir(parents=True, exist_ok=True)
    load(
        name="resfused_emulation",
        sources=[str(ROOT / "csrc/emulation/emulated_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-std=c++20"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.resfused_emu


@pytest.fixture
def emu_device(emu):
    """emu with the emulated device's SM count / schedule seed restored after the test."""
    old = emu.emulator_configure(132, 0)
    yield emu
    emu.emulator_configure(*old)


# --- the emulator itself: its checks must be able to fail ---


def test_emulator_honours_barrier_and_catches_bad_accesses(emu):
    x = torch.arange(64, dtype=torch.float32)
    out = emu.emulator_selftest(x, 0)  # reverse within each 32-thread block through shared memory
    assert torch.equal(out, torch.cat([x[:32].flip(0), x[32:].flip(0)]))
    with pytest.raises(RuntimeError, match=r"out-of-bounds access to 'in': elements \[64, 65\)"):
        emu.emulator_selftest(x, 1)
    with pytest.raises(RuntimeError, match="misaligned 16-byte vector access"):
        emu.emulator_selftest(x, 2)
    with pytest.raises(RuntimeError, match="out-of-bounds access to 'shared memory'"):
        emu.emulator_selftest(x, 3)
    assert emu.emulator_selftest(x, 4).isnan().all()  # unwritten shared memory reads as NaN


@pytest.mark.parametrize("first", [1, 4, 16])
def test_emulator_warp_shuffles_run_lanes_in_lock_step(emu, first):
    # warp_sum_xor(v, first): each lane ends with the sum over the lanes sharing lane % first.
    # Values chosen so that float addition order matters: the lanes of a group must agree bit for
    # bit (the butterfly's partners add the same two numbers), and match the exact sum closely.
    gen = torch.Generator().manual_seed(first)
    x = torch.randn(128, generator=gen) * torch.logspace(-6, 6, 128)[torch.randperm(128, generator=gen)]
    out = emu.emulator_shuffle_selftest(x, first, 0, 64)
    groups = x.double().view(4, 32 // first, first)  # [warp, lane // first, lane % first]
    expected = groups.sum(1, keepdim=True).expand_as(groups).reshape(-1)
    got = out.view(4, 32 // first, first)
    assert torch.equal(got, got[:, :1].expand_as(got)), "lanes of one group must hold the same bits"
    assert_matches_reference(out, expected, what="warp_sum_xor")


def test_emulator_schedule_seed_changes_the_block_order(emu):
    # mode 5 is a race (every block writes out[0]): in grid order block 7 of 8 writes last; under
    # schedule seeds the last block differs, which is what lets the BN determinism test catch an
    # order-dependent reduction.
    x = torch.zeros(8 * 32)
    old = emu.emulator_configure(132, 0)
    try:
        assert emu.emulator_selftest(x, 5)[0] == 7
        last = set()
        for seed in range(1, 9):
            emu.emulator_configure(132, seed)
            last.add(int(emu.emulator_selftest(x, 5)[0]))
        assert last - {7}, last
    finally:
        emu.emulator_configure(*old)


def test_emulator_rejects_shuffles_the_gpu_leaves_undefined(emu):
    x = torch.randn(64)
    with pytest.raises(RuntimeError, match="lane that has exited"):
        emu.emulator_shuffle_selftest(x, 1, 1, 64)
    with pytest.raises(RuntimeError, match="partial warp"):
        emu.emulator_shuffle_selftest(x[:48], 1, 0, 48)


@pytest.mark.parametrize(
    "stride,width,worst",
    [(1, 1, 1), (0, 1, 1), (2, 1, 2), (32, 1, 32), (33, 1, 1), (4, 4, 1), (8, 4, 2), (2, 2, 1), (36, 4, 1), (32, 4, 8)],
)
def test_emulator_costs_shared_memory_bank_conflicts(emu, stride, width, worst):
    # one warp, lane l accesses `width` floats at float index l * stride: the worst wavefronts of
    # a 128-byte phase is the conflict degree (stride 0: one word, a broadcast)
    requests, wavefronts, ideal, got = emu.emulator_bank_selftest(stride, width)
    assert requests == 1 and ideal == 32 * width * 4 // 128 and got == worst
    assert wavefronts == ideal * worst


# --- grouped 3x3 convolution ---


def _conv_inputs(n, groups, cpg, h, w, dtype, bias=True, layout=CL):
    c = groups * cpg
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=layout)
    wt = (torch.randn(c, cpg, 3, 3) / (3 * cpg**0.5)).to(dtype)
    b = torch.randn(c).to(dtype) if bias else None
    return x, wt, b


def _check_conv(emu, x, wt, b, stride, relu):
    groups = x.size(1) // wt.size(1)
    y = emu.grouped_conv3x3(x, wt, b, stride, relu)
    assert y.is_contiguous(memory_format=CL), "the output must be channels_last"
    ref = F.conv2d(x.double(), wt.double(), None if b is None else b.double(), stride, 1, 1, groups)
    eager = F.conv2d(x, wt, b, stride, 1, 1, groups)
    if relu:
        ref, eager = ref.relu(), eager.relu()
    assert_matches_reference(
        y,
        ref,
        dtype=x.dtype,
        eager=eager if x.dtype in LOWP else None,
        what=f"grouped_conv3x3 {tuple(x.shape)} cpg={wt.size(1)} stride={stride} {x.dtype}",
    )


# (N, groups, H, W): odd sizes, several tiles with partial ones at the right/bottom border,
# 1x1 images, and group counts that leave the last channel slab partly empty.
SHAPES = [(2, 3, 9, 11), (1, 2, 17, 10), (1, 1, 1, 1), (3, 5, 7, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cpg", [4, 8, 16, 32])
def test_grouped_conv3x3_matches_reference(emu, cpg, stride, dtype):
    for i, (n, g, h, w) in enumerate(SHAPES):
        if cpg == 32 and i == 3:
            g = 2  # keep the slowest case small
        x, wt, b = _conv_inputs(n, g, cpg, h, w, dtype, bias=i != 1)
        _check_conv(emu, x, wt, b, stride, relu=i != 2)


@pytest.mark.parametrize("cpg", [4, 16])
def test_grouped_conv3x3_layouts_and_unaligned_inputs(emu, cpg):
    # NCHW input (converted), an input whose storage starts 2 bytes past an aligned address (the
    # scalar, non-vector path), and fp16 with C not a multiple of 8 (16-byte loads not allowed);
    # a weight 2 bytes past an aligned address (scalar weight staging).
    x, wt, b = _conv_inputs(2, 3, cpg, 6, 13, torch.float32, layout=torch.contiguous_format)
    _check_conv(emu, x, wt, b, 1, True)
    x, wt, b = _conv_inputs(2, 3, cpg, 6, 13, torch.float16)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    shifted = buf[1:].as_strided(x.shape, x.stride()).copy_(x)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous(memory_format=CL)
    _check_conv(emu, shifted, wt, b, 2, True)
    wbuf = torch.empty(wt.numel() + 1, dtype=wt.dtype)
    wshift = wbuf[1:].view(wt.shape).copy_(wt)
    assert wshift.data_ptr() % 8 != 0
    _check_conv(emu, x, wshift, b, 1, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cpg", [4, 8, 16, 32])
def test_grouped_conv3x3_shared_memory_is_conflict_free(emu, cpg, dtype):
    # Every shared-memory request of both phases (weight and halo staging, the compute loop) is
    # served in the ideal number of wavefronts. The weight staging used to write with the tap
    # index fastest: 32 lanes on one bank (worst 32), which this catches.
    for stride in (1, 2):
        x, wt, b = _conv_inputs(1, 64 // cpg, cpg, 9, 10, dtype)
        stats = emu.grouped_conv3x3_bank_stats(x, wt, b, stride, True)
        for phase, (requests, wavefronts, ideal, worst) in enumerate((stats[:4], stats[4:])):
            assert requests > 0 and worst == 1 and wavefronts == ideal, (phase, stride, stats)


def test_grouped_conv3x3_propagates_nan(emu):
    x, wt, b = _conv_inputs(1, 2, 8, 5, 5, torch.float32)
    x[0, 3, 2, 2] = float("nan")
    _check_conv(emu, x, wt, b, 1, True)  # relu keeps NaN, as torch.relu does


def test_grouped_conv3x3_empty_batch(emu):
    x, wt, b = _conv_inputs(0, 2, 4, 5, 5, torch.float32)
    assert emu.grouped_conv3x3(x, wt, b, 2, True).shape == (0, 8, 3, 3)


def _selected(backend, cpg, dtype, device="cuda"):
    import resfused
    from resfused.kernels.base import ConvParams
    from resfused.ops import conv_bias_act, trace_kernels

    x = torch.empty(2, 64, 8, 8, device=device, dtype=dtype).contiguous(memory_format=CL)
    w = torch.zeros(64, cpg, 3, 3, device=device, dtype=dtype)
    p = ConvParams(w, torch.zeros(64, device=device, dtype=dtype), (1, 1), (1, 1), (1, 1), 64 // cpg)
    with torch.no_grad(), resfused.use_backend(backend), trace_kernels() as ran:
        conv_bias_act(x, p, relu=True)
    return ran[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_grouped_kernel_selected_only_at_4_and_8_channels_per_group(dtype):
    # On CUDA-like inputs (fake CUDA tensors: no GPU needed, the whole op path and trace run),
    # `auto` takes the CUDA grouped kernel at 4 and 8 channels per group and sends 16 / 32 on,
    # with the reason in resfused.trace_kernels().
    from torch._subclasses.fake_tensor import FakeTensorMode

    from resfused import _native

    if not _native.has_kernel("grouped_conv3x3", "cuda"):
        pytest.skip("resfused._C was built without the CUDA grouped kernel")
    with FakeTensorMode():
        for cpg in (4, 8):
            assert _selected("auto", cpg, dtype).kernel == "grouped3x3", cpg
        for cpg in (16, 32):
            choice = _selected("auto", cpg, dtype)
            assert choice.kernel != "grouped3x3", cpg
            reason = dict(choice.skipped)["grouped3x3"]
            assert "selected only at 4 and 8 channels per group" in reason and "cuDNN" in reason, reason


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_cuda_grouped_kernel_selection_on_a_gpu(backend):
    from resfused import _native

    if not torch.cuda.is_available() or not _native.has_kernel("grouped_conv3x3", "cuda"):
        pytest.skip("needs a GPU and the CUDA grouped kernel")
    assert _selected(backend, 8, torch.float16).kernel == "grouped3x3"
    choice = _selected(backend, 16, torch.float16)
    assert choice.kernel != "grouped3x3" and "selected only at 4 and 8" in dict(choice.skipped)["grouped3x3"]


# The grouped 3x3 of ResNeXt-50 32x4d: (C, input H, stride), cpg = C / 32; the stride-2 ones are
# the first block of stages 2-4.
RESNEXT_STAGES = [(128, 56, 1), (256, 28, 1), (512, 14, 1), (1024, 7, 1), (256, 56, 2), (512, 28, 2), (1024, 14, 2)]


@pytest.mark.parametrize("c,h,stride", RESNEXT_STAGES)
def test_grouped_conv3x3_launch_config_for_resnext_shapes(emu, c, h, stride):
    cpg = c // 32
    tile_h, grid_x, grid_y, block_x, smem, vec = emu.grouped_conv3x3_config(32, c, h, h, cpg, stride)
    oh = (h - 1) // stride + 1
    assert 1 <= tile_h <= 8 and block_x <= 1024 and smem <= 96 * 1024 and vec == 1
    assert block_x % 32 == 0, "whole warps"
    tiles = -(-oh // tile_h) * -(-oh // 8)
    assert grid_x == 32 * tiles and grid_y == -(-c // (64 if cpg == 4 else 32))
    # share of the computed tile positions that are real output pixels (7x7 in one 8x8 tile: 0.77)
    assert oh * oh / (tiles * tile_h * 8) >= 0.75


def test_grouped_conv3x3_launch_limits(emu):
    with pytest.raises(RuntimeError, match="launch limits"):
        emu.grouped_conv3x3_config(2**31, 128, 56, 56, 4, 1)  # grid.x would exceed 2^31 - 1


def test_grouped_conv3x3_bad_arguments(emu):
    x, wt, b = _conv_inputs(1, 2, 4, 5, 5, torch.float32)
    with pytest.raises(RuntimeError, match=r"channels per group .* must be 4, 8, 16 or 32, got 2"):
        emu.grouped_conv3x3(x, wt[:, :2], b, 1, True)
    with pytest.raises(RuntimeError, match="'stride' must be 1 or 2, got 3"):
        emu.grouped_conv3x3(x, wt, b, 3, True)
    with pytest.raises(RuntimeError, match="'weight' has dtype"):
        emu.grouped_conv3x3(x, wt.half(), b, 1, True)
    with pytest.raises(RuntimeError, match=r"'bias' must have shape \[8\]"):
        emu.grouped_conv3x3(x, wt, b[:4], 1, True)
    with pytest.raises(RuntimeError, match="C_out == C_in"):
        emu.grouped_conv3x3(x, wt[:4], None, 1, True)
    with pytest.raises(RuntimeError, match="float64"):
        emu.grouped_conv3x3(x.double(), wt.double(), None, 1, True)
    with pytest.raises(RuntimeError, match=r"'x' must have shape \(N, C, H, W\)"):
        emu.grouped_conv3x3(x[0], wt, b, 1, True)


# --- tails ---

TAIL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (shape, layout): C a multiple of the vector width and not, NCHW and channels_last, odd sizes
TAIL_CASES = [
    ((2, 16, 5, 3), CL),
    ((3, 5, 7, 3), CL),
    ((2, 16, 4, 4), torch.contiguous_format),
    ((2, 3, 5, 7), torch.contiguous_format),
    ((4, 6), torch.contiguous_format),
]


def _eager(fn, *xs):
    """The computation as eager PyTorch does it in the low-precision dtype (float math, one rounding)."""
    return fn(*(t.float() for t in xs)).to(xs[0].dtype)


@pytest.mark.parametrize("dtype", TAIL_DTYPES)
def test_add_relu_and_backward(emu, dtype):
    for shape, layout in TAIL_CASES:
        x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
        r = torch.randn(shape).to(dtype)  # residual in another layout: converted
        out = emu.add_relu(x, r)
        assert out.is_contiguous(memory_format=layout)
        f = lambda a, b: torch.relu(a + b)  # noqa: E731
        assert_matches_reference(out, f(x.double(), r.double()), eager=_eager(f, x, r), what=f"add_relu {shape}")
        g = torch.randn(shape).to(dtype)
        # the mask is exact: 0 where out <= 0, else grad (torch.relu's rule: a NaN lets it through)
        out[..., ::3] = float("nan")
        gi = emu.add_relu_backward(g, out)
        assert torch.equal(gi, torch.where(out <= 0, torch.zeros_like(g), g)), f"add_relu_backward {shape}"


def test_add_relu_grid_stride_and_nan(emu):
    # more vectors than the capped grid has threads (1024 blocks x 256 x 4 floats) -> grid-stride
    x = torch.randn(2, 8, 256, 260)
    r = torch.randn_like(x)
    x[1, 7, 255, 259] = float("nan")
    out = emu.add_relu(x, r)
    assert_matches_reference(out, torch.relu(x.double() + r.double()), what="add_relu large")


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_scale_shift_act_row_stride(emu, layout):
    # more rows than the capped grid covers in one pass: the row loop and (NCHW) the channel
    # stepping c_row += row_step mod C run (NCHW: 16 planes over 15 grid rows, C = 8)
    x = torch.randn(2, 8, 256, 260).contiguous(memory_format=layout)
    s, b = torch.randn(8), torch.randn(8)
    y = emu.scale_shift_act(x, s, b, True)
    ref = (x.double() * s.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)).relu()
    assert_matches_reference(y, ref, what=f"scale_shift_act large {layout}")


@pytest.mark.parametrize("dtype", TAIL_DTYPES)
@pytest.mark.parametrize("relu", [True, False])
def test_scale_shift_act_and_backward(emu, dtype, relu):
    for shape, layout in TAIL_CASES:
        c = shape[1]
        x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
        s, b = torch.randn(c), torch.randn(c)
        view = [1, -1] + [1] * (len(shape) - 2)

        def f(x_, s_=s, b_=b):
            y = x_ * s_.to(x_.dtype).view(view) + b_.to(x_.dtype).view(view)
            return y.relu() if relu else y

        y = emu.scale_shift_act(x, s, b, relu)
        assert y.is_contiguous(memory_format=layout)
        assert_matches_reference(y, f(x.double()), eager=_eager(f, x), what=f"scale_shift_act {shape}")

        g = torch.randn(shape).to(dtype)
        gx, gs, gb = emu.scale_shift_act_backward(g, x, s, b, relu)
        xd, gd = x.double(), g.double()
        mask = (f(xd) > 0) if relu else torch.ones_like(xd, dtype=torch.bool)
        gm = torch.where(mask, gd, torch.zeros_like(gd))
        dims = [0] + list(range(2, len(shape)))
        ref_gx = gm * s.double().view(view)
        assert_matches_reference(
            gx,
            ref_gx,
            eager=_eager(lambda a, m: a * m, g * mask.to(dtype), s.view(view).to(dtype).expand(shape))
            if dtype in LOWP
            else None,
            what=f"grad_x {shape}",
        )
        assert gs.dtype == s.dtype and gb.dtype == b.dtype
        assert_matches_reference(gs, (gm * xd).sum(dims), what=f"grad_scale {shape} {dtype}")
        assert_matches_reference(gb, gm.sum(dims), what=f"grad_shift {shape} {dtype}")


def _scale_shift_inputs(shape, layout, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
    g = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=layout)
    return x, g, torch.randn(c, generator=gen), torch.randn(c, generator=gen)


def _check_scale_shift_backward(op, g, x, s, b, relu, what):
    """grad_x, grad_scale, grad_shift of op (the emulated kernel's module, or the real one's)
    against float64 (tests/harness.py)."""
    gx, gs, gb = op.scale_shift_act_backward(g, x, s, b, relu)
    view = [1, -1] + [1] * (x.dim() - 2)
    # scale and shift are the op's float32 parameters (the kernel computes with them, not with
    # copies rounded to x's dtype): the mask from them in float64, so that no element within a
    # float16 rounding of x * scale + shift = 0 flips it.
    xd, gd = x.double(), g.double()
    sd, bd = s.double().view(view), b.double().view(view)
    mask = (xd * sd + bd > 0) if relu else torch.ones_like(xd, dtype=torch.bool)
    gm = torch.where(mask, gd, torch.zeros_like(gd))
    dims = [0] + list(range(2, x.dim()))
    if x.dim() == 4 and x.is_contiguous(memory_format=CL) and not x.is_contiguous():
        assert gx.is_contiguous(memory_format=CL), f"{what}: grad_x layout"
    eager = None
    if x.dtype in LOWP:  # eager: g' * scale in float math, rounded once to the low-precision dtype
        eager = (g * mask.to(x.dtype)).float().mul(s.float().view(view)).to(x.dtype)
    assert_matches_reference(gx, gm * sd, eager=eager, what=f"{what} grad_x")
    assert gs.dtype == s.dtype and gb.dtype == b.dtype, what
    # per-channel sums are float32 (float64 for float64 input): the float32 rule
    assert_matches_reference(gs, (gm * xd).sum(dims), what=f"{what} grad_scale")
    assert_matches_reference(gb, gm.sum(dims), what=f"{what} grad_shift")
    return gx, gs, gb


# C = 3, 5 (odd: scalar loads), 16 (vectors in every dtype), 65 (channels-last: the last block's
# vector columns partly past C); both layouts; rows / images spread over the slots.
@pytest.mark.parametrize("dtype", TAIL_DTYPES)
@pytest.mark.parametrize("c", [3, 5, 16, 65])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_scale_shift_backward_reduction_over_sm_counts(emu_device, layout, c, dtype):
    # SM counts 1 (one slot), 4 (a few), 132 (as many slots as there are rows / images, each
    # finalize lane adding several): the grid is sized from the SM count.
    # NCHW planes 10x10 and 12x12: blocks of 32 x 8 to 128 x 2 threads whose last warp has
    # elements too (vectors in fp32/fp64 at 10x10, in fp32/fp16/bf16 at 12x12), 9 images.
    shapes = [(9, c, 6, 8)] if layout is CL else [(9, c, 10, 10), (9, c, 12, 12)]
    for shape in shapes:
        x, g, s, b = _scale_shift_inputs(shape, layout, dtype, seed=c)
        for sms in (1, 4, 132):
            emu_device.emulator_configure(sms, 0)
            _check_scale_shift_backward(emu_device, g, x, s, b, True, f"{shape} {layout} {dtype} sms={sms}")


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_scale_shift_backward_many_rows_and_planes(emu_device, layout):
    # channels_last: 1040 rows of 24 channels (fp32: 6 vectors -> blocks of 8 x 32 threads, each
    # thread several rows); NCHW: planes of 260 > 256 threads (each thread several elements of
    # its plane). relu off: every element of g counts.
    x, g, s, b = _scale_shift_inputs((4, 24, 20, 13), layout, torch.float32)
    for sms in (1, 4, 132):
        emu_device.emulator_configure(sms, 0)
        _check_scale_shift_backward(emu_device, g, x, s, b, False, f"many rows {layout} sms={sms}")


def test_scale_shift_backward_empty(emu):
    e = torch.empty(0, 3, 4, 4)
    gx, gs, gb = emu.scale_shift_act_backward(e, e, torch.ones(3), torch.ones(3), True)
    assert gx.shape == e.shape and torch.equal(gs, torch.zeros(3)) and torch.equal(gb, torch.zeros(3))


@pytest.mark.parametrize("dtype", TAIL_DTYPES)
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_scale_shift_backward_is_deterministic(emu_device, layout, dtype):
    # Same bits on a second run and whatever order the blocks, warps and lanes run in (the
    # emulation shuffles the block order and reverses the thread order under a schedule seed):
    # no atomics, every addition order fixed by the shape and the SM count.
    x, g, s, b = _scale_shift_inputs((6, 40, 9, 7), layout, dtype, seed=11)
    runs = []
    for seed in (0, 0, 12345):
        emu_device.emulator_configure(8, seed)
        runs.append(emu_device.scale_shift_act_backward(g, x, s, b, True))
    for other in runs[1:]:
        for name, a, b_ in zip(("grad_x", "grad_scale", "grad_shift"), runs[0], other):
            assert a.shape == b_.shape and a.stride() == b_.stride(), name
            assert torch.equal(a.contiguous().view(torch.uint8), b_.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("dtype", TAIL_DTYPES)
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_scale_shift_backward_unaligned_views(emu, layout, dtype):
    # Storage starting one element past a 16-byte boundary (x, and grad_out separately): scalar
    # loads and stores, where the shape (C = 16, 4x4 planes) would otherwise allow vectors.
    x, g, s, b = _scale_shift_inputs((3, 16, 4, 4), layout, dtype, seed=5)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        v = buf[1:].as_strided(t.shape, t.stride()).copy_(t)
        assert v.data_ptr() % 16 != 0 and v.is_contiguous(memory_format=layout)
        return v

    _check_scale_shift_backward(emu, shifted(g), x, s, b, True, f"unaligned grad {layout} {dtype}")
    _check_scale_shift_backward(emu, g, shifted(x), s, b, True, f"unaligned x {layout} {dtype}")


def test_scale_shift_backward_reduction_launch_shape(emu):
    half, single = 2, 4
    c, n = 2048, 32 * 2048 * 7 * 7  # ResNet-50's last stage at batch 32
    # The same launch as the training BN's reduction (one channel_reduce_config).
    for args in ((n, c, 1, True, 132, single), (n, c, 49, False, 132, half), (n, 64, 3136, True, 4, single)):
        assert emu.scale_shift_backward_reduce_config(*args) == emu.bn_train_reduce_config(*args)
    # channels_last fp32, C = 2048: 512 vectors a row -> 32 x 8 threads, 16 vector columns,
    # ceil(264 / 16) = 17 slots: 17 * 2 * 2048 floats = 272 KiB of partial sums (before: 512
    # slots, 8 MiB).
    gx, gy, bx, by, smem, slots = emu.scale_shift_backward_reduce_config(n, c, 1, True, 132, single)
    assert (gx, gy, bx, by, slots) == (16, 17, 32, 8, 17) and smem == 8 * 2 * 128 * 4
    # fp16: vectors of 8 -> 8 columns, 33 slots (528 KiB)
    *_, slots = emu.scale_shift_backward_reduce_config(n, c, 1, True, 132, half)
    assert slots == 33
    # NCHW: one block per channel (2048 >= 2 * 132 blocks already): one slot, 16 KiB (before:
    # N * 256 = 8192 slots per channel, 128 MiB).
    gx, gy, bx, by, _, slots = emu.scale_shift_backward_reduce_config(n, c, 49, False, 132, single)
    assert (gx, gy, bx, by, slots) == (2048, 1, 64, 4, 1)
    # The buffer is bounded by the SM count, not the batch.
    for n_batch in (1, 32, 1024):
        for cc, inner in ((64, 1), (2048, 1), (64, 3136), (2048, 49)):
            *_, slots = emu.scale_shift_backward_reduce_config(n_batch * cc * inner * 8, cc, inner, True, 132, half)
            assert slots * cc <= 2 * 132 * 256 * 8 + cc and slots <= 2 * 132


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format])
def test_scale_shift_backward_cuda_many_slots_deterministic(dtype, layout):
    # A ResNet stage-1 shape on a real GPU: the reduction grid spans every SM (about 2 blocks per
    # SM, several slots per channel), results vs float64, and the same bits on a second run.
    from resfused import _native

    if not _native.has_kernel("scale_shift_act_backward", "cuda"):
        pytest.skip("resfused._C was built without the CUDA tails kernels")
    x, g, s, b = _scale_shift_inputs((32, 64, 28, 28), layout, dtype, seed=3)
    dev = [t.cuda() for t in (g, x, s, b)]
    runs = [torch.ops.resfused.scale_shift_act_backward(*dev, True) for _ in range(2)]
    for name, a, b_ in zip(("grad_x", "grad_scale", "grad_shift"), *runs):
        assert torch.equal(a.contiguous().view(torch.uint8), b_.contiguous().view(torch.uint8)), name

    class OnCuda:  # the op's results, moved back for the float64 comparison
        @staticmethod
        def scale_shift_act_backward(*args):
            return tuple(t.cpu() for t in runs[0])

    _check_scale_shift_backward(OnCuda, g, x, s, b, True, f"cuda {layout} {dtype}")


def test_tails_bad_arguments(emu):
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="'residual' must have the shape of 'x'"):
        emu.add_relu(x, x[:1])
    with pytest.raises(RuntimeError, match="'residual' has dtype"):
        emu.add_relu(x, x.half())
    with pytest.raises(RuntimeError, match=r"'scale' must have shape \[4\]"):
        emu.scale_shift_act(x, torch.ones(3), torch.ones(4), True)
    with pytest.raises(RuntimeError, match="'grad_out' must have the shape of 'x'"):
        emu.scale_shift_act_backward(x[:1], x, torch.ones(4), torch.ones(4), True)
