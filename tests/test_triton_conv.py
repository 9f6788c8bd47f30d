"""The Triton implicit-GEMM conv (resfused/triton/conv.py) against the float64 reference.

Runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1) on CPU tensors at small,
odd shapes; every variant of the kernel is covered: kernel size x stride x groups x epilogue x
prologue x dtype x residual layout. The interpreter runs one fixed config (INTERPRETER_CONFIG:
32x16x16 tiles), so these shapes cross tile edges in M, N and K. Every autotune config is run
by test_triton_configs.py, and compiled (spills, shared memory) by test_triton_compile.py.

float16/bfloat16 tolerances (docs/design.md, Numerics) need eager PyTorch's same-dtype result: eager CPU
F.conv2d supports both dtypes in this torch, so "eager" is the same computation done by eager
ops in the low dtype (BN+ReLU prologue in float then rounded, as eager BN does; conv in the low
dtype; residual add and ReLU in the low dtype).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import resfused
from resfused import reference
from resfused.ops import ConvParams, conv_bias_act, trace_kernels
from tests.cases import parametrize_cases
from tests.harness import LOWP_EPS, assert_matches_reference, compare_modules, randomize_bn

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device",
)

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# epilogue: (bias, residual layout or None, relu)
EPILOGUES = {
    "bias": (True, None, False),
    "bias_relu": (True, None, True),
    "res_nhwc_relu": (True, "nhwc", True),
    "res_nchw_nobias": (False, "nchw", False),
}


def _expected(x, weight, bias, residual, prologue, stride, padding, groups, relu, dtype):
    """The fused op's math in `dtype` (float64 for the reference, the low dtype for eager)."""
    x = x.to(dtype)
    if prologue is not None:
        s, b = (v.to(torch.promote_types(dtype, torch.float32)).view(1, -1, 1, 1) for v in prologue)
        x = torch.relu(x.to(s.dtype) * s + b).to(dtype)
    y = F.conv2d(x, weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding, 1, groups)
    if residual is not None:
        y = y + residual.to(dtype)
    return torch.relu(y) if relu else y


def _check_conv(n, c_in, c_out, hw, k, stride, groups, epilogue, prologue, dtype, x_layout="nhwc", nan=False):
    has_bias, res_layout, relu = EPILOGUES[epilogue]
    pad = k // 2
    weight = torch.randn(c_out, c_in // groups, k, k) / (k * (c_in // groups) ** 0.5)
    bias = torch.randn(c_out) if has_bias else None
    p = ConvParams(
        weight.to(dtype), None if bias is None else bias.to(dtype), (stride, stride), (pad, pad), (1, 1), groups
    )
    x = torch.randn(n, c_in, *hw).to(dtype)
    if nan:
        x[0, 0, 1, 2] = float("nan")
    if x_layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    pro = (torch.rand(c_in) + 0.5, torch.randn(c_in) * 0.5) if prologue else None
    oh, ow = p.output_hw(*hw)
    residual = None
    if res_layout is not None:
        residual = torch.randn(n, c_out, oh, ow).to(dtype)
        if res_layout == "nhwc":
            residual = residual.contiguous(memory_format=torch.channels_last)
    args = (bias, residual, pro, (stride, stride), (pad, pad), groups, relu)
    ref = _expected(x.double(), weight.double(), *args, torch.float64)
    eager = _expected(x, weight, *args, dtype) if dtype in LOWP_EPS else None
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    p = ConvParams(dev(p.weight), dev(p.bias), p.stride, p.padding, p.dilation, p.groups)
    pro_dev = None if pro is None else (dev(pro[0].to(dtype)), dev(pro[1].to(dtype)))
    resfused.set_backend("triton")
    with torch.no_grad(), trace_kernels() as ran:
        y = conv_bias_act(dev(x), p, residual=dev(residual), relu=relu, prologue=pro_dev)
    assert [c[:2] for c in ran] == [("conv", "triton")], ran
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    what = f"k={k} s={stride} g={groups} {epilogue} prologue={prologue} {dtype} x={x_layout}"
    assert_matches_reference(y.cpu(), ref, dtype, eager, what)


# float32: the full product of kernel size x stride x groups x epilogue x prologue.
# float16/bfloat16 (which change only loads, the MMA operand type and the store): every kernel
# size x epilogue x prologue, with (stride, groups) cycling through all four pairs per kernel size.
_SG = ((1, 1), (2, 2), (1, 2), (2, 1))
VARIANTS = [
    (k, s, g, e, pro, torch.float32)
    for k, s, g, e, pro in itertools.product((1, 3), (1, 2), (1, 2), EPILOGUES, (False, True))
] + [
    (k, *_SG[i % 4], e, pro, dtype)
    for dtype in (torch.float16, torch.bfloat16)
    for k in (1, 3)
    for i, (e, pro) in enumerate(itertools.product(EPILOGUES, (False, True)))
]


@pytest.mark.parametrize("k,stride,groups,epilogue,prologue,dtype", VARIANTS, ids=str)
def test_every_variant(k, stride, groups, epilogue, prologue, dtype):
    # 18 channels per group: two K chunks of 16 and two N tiles of 16, the second one partial;
    # N*OH*OW = 5*7 = 35 (stride 1): two M tiles of 32, the second one partial.
    _check_conv(1, 18 * groups, 18 * groups, (5, 7), k, stride, groups, epilogue, prologue, dtype)


@pytest.mark.parametrize("c_in,c_out,groups", [(3, 5, 1), (12, 8, 4), (32, 32, 8), (9, 6, 3), (64, 32, 2)])
def test_channels_per_group(c_in, c_out, groups):
    # 1..32 input channels per group, odd ones included: masking of partial K and N tiles.
    _check_conv(1, c_in, c_out, (4, 5), 3, 1, groups, "res_nhwc_relu", True, torch.float32)


@pytest.mark.parametrize("k,stride", [(1, 1), (3, 2)])
def test_nchw_input(k, stride):
    # An NCHW x is made channels_last by the op (the kernel needs unit channel stride).
    _check_conv(2, 16, 24, (6, 5), k, stride, 1, "bias_relu", True, torch.float32, x_layout="nchw")


@pytest.mark.parametrize("epilogue,prologue", [("bias_relu", False), ("res_nhwc_relu", True)])
def test_nan_propagates_through_relu(epilogue, prologue):
    # torch.relu keeps NaN; Triton's default maximum would return the other operand, 0.
    _check_conv(1, 8, 8, (5, 5), 3, 1, 1, epilogue, prologue, torch.float32, nan=True)


def test_one_by_one_gemm_is_taken():
    # 1x1/s1/p0 over dense NHWC runs the IS_GEMM specialization; a sliced (non-dense) x does not.
    from resfused.triton import conv as kernels

    seen = []
    real = kernels.launch

    def spy(kernel, x, *a, **kw):
        h, w = x.shape[2:]
        seen.append(x.stride(0) == h * w * x.stride(3) and x.stride(2) == w * x.stride(3))
        return real(kernel, x, *a, **kw)

    kernels.launch = spy
    try:
        _check_conv(2, 16, 16, (3, 3), 1, 1, 1, "res_nhwc_relu", False, torch.float32)
    finally:
        kernels.launch = real
    assert seen == [True]


def test_empty_batch():
    resfused.set_backend("triton")
    p = ConvParams(torch.randn(8, 4, 3, 3), torch.randn(8), (1, 1), (1, 1), (1, 1), 1)
    x = torch.randn(0, 4, 5, 5, device=DEVICE)
    p = ConvParams(p.weight.to(DEVICE), p.bias.to(DEVICE), p.stride, p.padding, p.dilation, p.groups)
    with trace_kernels() as ran:
        y = conv_bias_act(x, p, relu=True)
    assert y.shape == (0, 8, 5, 5) and [c[:2] for c in ran] == [("conv", "triton")]


def test_unsupported_falls_back():
    # dilation 2 and float64 are not the kernel's: the reference runs, with the right result.
    resfused.set_backend("triton")
    x = torch.randn(1, 8, 9, 9, device=DEVICE)
    w, b = torch.randn(8, 8, 3, 3, device=DEVICE), torch.randn(8, device=DEVICE)
    for p, xx in (
        (ConvParams(w, b, (1, 1), (2, 2), (2, 2), 1), x),
        (ConvParams(w.double(), b.double(), (1, 1), (1, 1), (1, 1), 1), x.double()),
    ):
        with torch.no_grad(), trace_kernels() as ran:
            y = conv_bias_act(xx, p, relu=True)
        assert [c[:2] for c in ran] == [("conv", "reference")]
        ref = torch.relu(F.conv2d(xx.double(), p.weight.double(), p.bias.double(), p.stride, p.padding, p.dilation))
        assert_matches_reference(y.float().cpu(), ref.cpu(), torch.float32, what="fallback")


def test_bad_arguments_name_the_argument():
    op = torch.ops.resfused.conv2d_triton
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    w = torch.randn(3, 3, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="'bias'"):
        op(x, w, torch.randn(15, device=DEVICE), None, None, None, [1, 1], [1, 1], False, False)
    with pytest.raises(ValueError, match="'residual'"):
        op(x, w, None, torch.randn(1, 16, 4, 5, device=DEVICE), None, None, [1, 1], [1, 1], False, False)
    with pytest.raises(ValueError, match="weight_hwio"):
        op(x, torch.randn(3, 3, 3, 16, device=DEVICE), None, None, None, None, [1, 1], [1, 1], False, False)
    with pytest.raises(TypeError, match="dtype"):
        op(x, w.half(), None, None, None, None, [1, 1], [1, 1], False, False)
    with pytest.raises(ValueError, match="'scale' and 'shift'"):
        op(x, w, None, None, torch.ones(8, device=DEVICE), None, [1, 1], [1, 1], False, False)


def test_opcheck():
    # test_aot_dispatch_dynamic is left out here: AOT dispatch decomposes the triton_op into its
    # kernel launch and traces it with fake tensors; the interpreter cannot launch on fake
    # tensors (a GPU build traces the launch instead). test_compile_fullgraph covers it on a GPU.
    x = torch.randn(2, 8, 5, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 3, 4, 6, device=DEVICE)
    r = torch.randn(2, 6, 3, 2, device=DEVICE)
    s, b = torch.rand(8, device=DEVICE), torch.randn(8, device=DEVICE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEVICE == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    for args in (
        (x, w, torch.randn(6, device=DEVICE), r, s, b, [2, 2], [1, 1], True, False),
        (x, w, None, None, None, None, [1, 1], [0, 0], False, False),
    ):
        torch.library.opcheck(torch.ops.resfused.conv2d_triton, args, test_utils=utils)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@parametrize_cases()
def test_fused_blocks(name, args, dtype):
    ref = randomize_bn(getattr(reference, name)(*args)).eval()
    fused = getattr(resfused, name)(*args).eval()
    fused.load_state_dict(ref.state_dict())
    fused.to(DEVICE, dtype)
    x = torch.randn(2, args[0], 7, 6).to(dtype).contiguous(memory_format=torch.channels_last)
    resfused.set_backend("triton")
    with torch.no_grad(), trace_kernels() as ran:
        actual = fused(x.to(DEVICE))
    convs = [c.kernel for c in ran if c.op == "conv"]
    assert convs and set(convs) == {"triton"}, ran
    # compare_modules runs the reference in float64 and in dtype (eager), then asserts §5.
    with torch.no_grad():
        compare_modules(lambda _: actual.cpu(), ref, x, what=f"{name}{args} {dtype}")


@pytest.mark.gpu
def test_compile_fullgraph():
    resfused.set_backend("triton")
    block = resfused.Bottleneck(64, 16).eval().cuda().half()
    x = torch.randn(2, 64, 14, 14, device="cuda").half().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)(x)
    assert_matches_reference(compiled.float(), eager.double(), torch.float32, what="compile vs eager (same kernels)")


@pytest.mark.gpu
def test_int64_addressing():
    # N*H*W*C = 2^31 + 2^21: elements past 2^31 must be read and written at the right place.
    resfused.set_backend("triton")
    x = torch.randn(1, 16, 2**14 + 2**4, 2**13, device="cuda", dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 1, 1, device="cuda", dtype=torch.float16) / 4
    y = conv_bias_act(x, ConvParams(w, None, (1, 1), (0, 0), (1, 1), 1))
    tail = x[:, :, -2:, :]
    ref = F.conv2d(tail.double(), w.double())
    eager = F.conv2d(tail, w)
    assert_matches_reference(y[:, :, -2:, :].cpu(), ref.cpu(), torch.float16, eager.cpu(), "tail past 2^31")


def test_single_channel_input_with_a_free_channel_stride():
    """torch leaves a size-1 dimension's stride free: a channels_last (N, 1, H, 1) tensor may carry
    channel stride H (found by tests/test_fuzz.py: an empty batch, 1 channel, 9x1)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 1, 3, 3, generator=g)
    p = ConvParams(w, torch.randn(6, generator=g), (2, 2), (1, 1), (1, 1), 1)
    for n in (0, 2):
        x = torch.randn(n, 1, 9, 1, generator=g).contiguous(memory_format=torch.channels_last)
        assert x.stride()[1] != 1  # the case under test: torch gave the one channel a non-unit stride
        with resfused.use_backend("triton"), torch.no_grad():
            y = conv_bias_act(x, p, relu=True)
        expected = torch.relu(F.conv2d(x.double(), w.double(), p.bias.double(), stride=2, padding=1))
        assert_matches_reference(y, expected, torch.float32, what=f"1-channel input, batch {n}")


def test_bf16_stores_round_to_nearest_even():
    """Both bf16 roundings of the kernel (the prologue's output, the epilogue's store) round to
    nearest even, as the GPU's cvt.rn does and eager bf16 ops do; the interpreter's own cast
    truncates (found by tests/test_fuzz.py: a PreActBasicBlock at 2.5x eager bf16's error). With
    one input channel, y = x * w is exact in fp32 (a product of two bf16 values), so the stored
    value is one rounding of it; the prologue with w = 1 stores one rounding of relu(x*s + b)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 64, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = (torch.tensor([v], device=DEVICE).to(torch.bfloat16) for v in (1.3, 0.1))
    w = 1.7421875  # 8 significant bits: most products x * w need 16
    for prologue, weight, exact in (
        (False, w, x.float() * w),
        (True, 1.0, torch.relu(x.float() * scale.float() + shift.float())),
    ):
        expected = exact.to(torch.bfloat16)
        assert not torch.equal(expected.float(), exact)  # there is something to round
        y = torch.ops.resfused.conv2d_triton(
            x,
            torch.full((1, 1, 1, 1), weight, dtype=torch.bfloat16, device=DEVICE),
            None,
            None,
            scale if prologue else None,
            shift if prologue else None,
            [1, 1],
            [0, 0],
            False,
            False,
        )
        assert torch.equal(y, expected), f"prologue {prologue}: {int((y != expected).sum())} of {y.numel()} differ"


def test_tiles_in_several_bands():
    # The kernel walks M tiles in bands of GROUP_M (8): 17x18 outputs = 306 rows are 10 M tiles of
    # 32 (a full band, then a band of 2, its last tile partial), times 2 groups x 2 N tiles.
    _check_conv(1, 36, 36, (17, 18), 3, 1, 2, "res_nhwc_relu", True, torch.float32)


def test_the_launch_runs_under_the_input_device(monkeypatch):
    """Triton launches on the current device: the op makes the input's device current first."""
    from resfused.kernels import conv_triton
    from resfused.triton import conv as kernels

    events = []
    real_guard, real_launch = conv_triton.device_guard, kernels.launch

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    monkeypatch.setattr(conv_triton, "device_guard", Guard)
    monkeypatch.setattr(kernels, "launch", lambda *a, **k: events.append(("launch",)) or real_launch(*a, **k))
    _check_conv(1, 8, 8, (5, 5), 3, 1, 1, "bias_relu", False, torch.float32)
    device = torch.device(DEVICE)
    assert events == [("enter", device), ("launch",), ("exit", device)]
    # On CUDA the guard is torch.cuda.device of the tensor's device (built here without a driver).
    guard = real_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize("cudnn_tf32,matmul_tf32", [(True, False), (False, True)])
def test_fp32_tf32_follows_the_cudnn_flag(monkeypatch, cudnn_tf32, matmul_tf32):
    """fp32 uses TF32 exactly when torch.backends.cudnn.allow_tf32 says so (eager convs' flag)."""
    from resfused.triton import conv as kernels

    seen = []
    real = kernels.launch

    def spy(kernel, *args, **kw):
        seen.append(args[11])  # allow_tf32
        return real(kernel, *args, **kw)

    monkeypatch.setattr(kernels, "launch", spy)
    p = ConvParams(torch.randn(8, 8, 3, 3), None, (1, 1), (1, 1), (1, 1), 1)
    x = torch.randn(1, 8, 5, 5)
    resfused.set_backend("triton")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn_tf32, matmul_tf32
    try:
        with torch.no_grad():
            for dtype in (torch.float32, torch.float16):
                pd = ConvParams(p.weight.to(DEVICE, dtype), None, p.stride, p.padding, p.dilation, 1)
                conv_bias_act(x.to(DEVICE, dtype), pd)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert seen == [cudnn_tf32, False]


def test_a_tuned_key_launches_the_kernel_directly(monkeypatch):
    """The CUDA path's logic, run on CPU tensors: the autotuner runs once per autotune key (M
    bucketed to a power of two), then the plain kernel with the remembered config."""
    import triton

    from resfused.kernels import conv_triton
    from resfused.triton import conv as kernels

    monkeypatch.setattr(conv_triton, "_TUNED", {})
    calls = []
    chosen = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=3)

    class Tuner:  # stands in for the Autotuner: launches its choice, sets best_config
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kw):
                calls.append(("tune", args[7]))
                self.best_config = chosen
                kernels.conv2d_nhwc_kernel[grid](*args, **kw, **chosen.kwargs)

            return run

    class Direct:
        def __getitem__(self, grid):
            def run(*args, **kw):
                calls.append(("direct", args[7], kw["BLOCK_M"], kw["num_warps"]))
                kernels.conv2d_nhwc_kernel[grid](*args, **kw)

            return run

    w = torch.randn(16, 16, 3, 3) / 12
    for n, hw in ((1, (6, 6)), (1, (6, 6)), (1, (7, 7)), (1, (5, 6)), (2, (6, 6))):  # M = 36, 36, 49, 30, 72
        x = torch.randn(n, 16, *hw).contiguous(memory_format=torch.channels_last)
        w_hwio = conv_triton.to_hwio(w)
        y = conv_triton._output(x, w_hwio, (1, 1), (1, 1))
        args = (x, w_hwio, None, None, None, None, y, (1, 1), (1, 1), 1, True, False)
        conv_triton._launch_cuda(kernels, args, tuner=Tuner(), direct=Direct())
        expected = torch.relu(F.conv2d(x.double(), w.double(), padding=1))
        assert_matches_reference(y, expected, torch.float32, what=f"M={n * hw[0] * hw[1]}")
    # M = 36 tunes bucket 64; 36 and 49 reuse it; 30 (bucket 32) and 72 (bucket 128) tune their own.
    assert calls == [("tune", 36), ("direct", 36, 64, 4), ("direct", 49, 64, 4), ("tune", 30), ("tune", 72)]


def test_launch_bounds_use_the_largest_tile():
    # In-tile output offsets (< BLOCK_M * C_out) are int32 for every config, the largest BLOCK_M
    # included: C_out = 2^31 / MAX_BLOCK_M is refused (meta tensors: nothing is allocated).
    from resfused.triton import conv as kernels

    x = torch.empty(1, 1, 1, 1, device="meta", memory_format=torch.channels_last)
    for c_out, fits in ((2**31 // kernels.MAX_BLOCK_M, False), (2**31 // kernels.MAX_BLOCK_M - 1, True)):
        w = torch.empty(1, 1, 1, c_out, device="meta")
        y = torch.empty(1, c_out, 1, 1, device="meta", memory_format=torch.channels_last)
        args = (x, w, None, None, None, None, y, (1, 1), (0, 0), 1, False, False)
        if fits:
            assert kernels.arguments(*args) is not None
        else:
            with pytest.raises(ValueError, match="int32"):
                kernels.arguments(*args)


@pytest.mark.gpu
def test_a_model_on_the_second_gpu():
    # Triton launches on the current device: with cuda:0 current, a block on cuda:1 must run there.
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    resfused.set_backend("auto")
    ref = randomize_bn(reference.Bottleneck(64, 16)).eval()
    fused = resfused.Bottleneck(64, 16).eval()
    fused.load_state_dict(ref.state_dict())
    fused.to("cuda:1", torch.float16)
    x = torch.randn(2, 64, 14, 14).half().contiguous(memory_format=torch.channels_last)
    torch.cuda.set_device(0)
    with torch.no_grad(), trace_kernels() as ran:
        actual = fused(x.to("cuda:1"))
        torch.cuda.synchronize("cuda:1")
    assert actual.device == torch.device("cuda", 1)
    assert "triton" in {c.kernel for c in ran if c.op == "conv"}, ran
    with torch.no_grad():
        compare_modules(lambda _: actual.cpu(), ref, x, what="Bottleneck on cuda:1")
