"""The production CUDA path on a real GPU: the `auto` backend on every block
type and on fused torchvision ResNet-50 / ResNeXt-50, the CUDA grouped 3x3 kernel over its whole
range, the CUDA tails and training BatchNorm, a training step, CUDA graphs, streams, a second
GPU, torch.compile and torch.autocast. Every result is compared with the float64 reference at
the tolerances of tests/harness.py.

The CUDA instances are marked `gpu` (skipped without a device; `make gpu-check` runs them). Each
test body takes the device as a parameter, and where the same op or path exists on the CPU an
unmarked CPU instance runs it here, so the reference construction, the tolerances and the
comparisons are exercised on every run, not first on the day a GPU appears.

Shapes are small (the whole gpu set is meant to take minutes on an H100, Triton compiles
included) but leave partial tiles: odd spatial sizes, batch 2, channel counts that are not
multiples of a vector or a tile.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resfused
from resfused import _native, ops
from resfused import reference as R
from resfused.ops import trace_kernels

from cases import BLOCK_CASES, parametrize_cases
from harness import (
    LOWP_EPS,
    assert_matches_reference,
    compare_modules,
    forward_backward,
    original_stem_names,
    randomize_bn,
)

CPU = pytest.param("cpu", id="cpu")
CUDA = pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)
DEVICES = [CPU, CUDA]
# Whole models on the CPU take 10-40 s each on a 2-core machine (and the CPU path has its own tests).
DEVICES_CPU_SLOW = [pytest.param("cpu", id="cpu", marks=pytest.mark.slow), CUDA]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
CL = torch.channels_last

# The kernels a conv of the fused CUDA path may run under `auto` (ops/conv.py, KERNELS["auto-cuda"]);
# "reference" is the fallback no supported shape should reach.
CUDA_CONV_KERNELS = {"triton", "grouped3x3", "library+tail"}


@pytest.fixture(autouse=True)
def _ieee_fp32_and_auto_backend():
    """fp32 results must be within 1e-4 of max|ref| (docs/design.md, Numerics), which TF32 (a
    10-bit mantissa) cannot meet: both TF32 flags are off here explicitly, cuDNN's (eager convs,
    and the Triton conv when it follows the convolution flag) and matmul's. The production
    backend `auto` is set explicitly too (conftest restores the previous one)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    resfused.set_backend("auto")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _needs_native(op: str, device: str) -> None:
    if not _native.has_kernel(op, device):
        pytest.skip(f"resfused._C has no {device} kernel for {op}")


def _assert_fused_path(ran, device: str, what: str, dense: bool = False) -> None:
    """Every conv ran a fused kernel of the device's `auto` list, none fell back to the reference;
    `dense`: at least one ran the Triton conv (on CUDA), the production dense conv."""
    convs = [c.kernel.split("(")[0] for c in ran if c.op == "conv"]  # "onednn(into residual)" -> "onednn"
    assert convs, f"{what}: no fused conv ran: {ran}"
    fallbacks = [c for c in ran if c.kernel == "reference"]
    assert not fallbacks, f"{what}: ran the reference kernel: {fallbacks}"
    if device == "cuda":
        assert set(convs) <= CUDA_CONV_KERNELS, f"{what}: {ran}"
        if dense:
            assert "triton" in convs, f"{what}: the Triton conv never ran: {ran}"


def _fused_model(name: str, device: str, dtype: torch.dtype):
    """(fused model in dtype, the original in float32) on `device`, eval mode, random BN statistics."""
    tv = pytest.importorskip("torchvision")
    model = randomize_bn(getattr(tv.models, name)(weights=None)).eval().to(device)
    return resfused.fuse(model).to(dtype), model


# ------------------------------------------------------------------------- the auto backend


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@parametrize_cases(BLOCK_CASES)
def test_auto_backend_blocks(name, args, dtype, device):
    # 5x3 at batch 2: M = 30 (15 at stride 2) output pixels, a partial tile of every config.
    ref = randomize_bn(getattr(R, name)(*args)).eval().to(device)
    fused = getattr(resfused, name).from_reference(copy.deepcopy(ref)).to(dtype)
    x = torch.randn(2, args[0], 5, 3, device=device).to(dtype).contiguous(memory_format=CL)
    with torch.no_grad(), trace_kernels() as ran:
        compare_modules(fused, ref, x, what=f"{name}{args} {dtype} on {device}")
    _assert_fused_path(ran, device, f"{name}{args} {dtype}")


@pytest.mark.parametrize("device", DEVICES_CPU_SLOW)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model_name", ["resnet50", "resnext50_32x4d"])
def test_auto_backend_models(model_name, dtype, device):
    # Batch 2 at 15x15 (NCHW, as a user passes it): stages at 4x4, 2x2, 1x1, 1x1; every conv of
    # the network, stem and projections included, goes through one fused call.
    fused, model = _fused_model(model_name, device, dtype)
    x = torch.randn(2, 3, 15, 15, device=device).to(dtype)
    with torch.no_grad(), trace_kernels() as ran:
        compare_modules(fused, model, x, what=f"fuse({model_name}) {dtype} on {device}")
    _assert_fused_path(ran, device, f"fuse({model_name}) {dtype}", dense=True)
    assert len([c for c in ran if c.op == "conv"]) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


# ----------------------------------------------------------------- the grouped 3x3 kernel


def _unaligned(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """t's values in a view one element into a fresh buffer, dense (channels_last or contiguous),
    so no copy undoes it, with its data pointer off the 16-byte alignment of vector accesses. A
    kernel must not read it with aligned vector loads."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    if channels_last:
        n, c, h, w = t.shape
        view = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        view = buf[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "unaligned", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cpg", [4, 8, 16, 32])
def test_grouped_conv3x3_kernel(cpg, stride, dtype, layout, device):
    """The op itself (selection may send some widths elsewhere; the kernel must still be right).
    3 groups: the channel count is not a multiple of the kernel's channel slab, and at 4 channels
    per group (12) not of a 16-byte fp16 vector either; 9x13 leaves partial row and column tiles."""
    _needs_native("grouped_conv3x3", device)
    g = torch.Generator().manual_seed(cpg * 10 + stride)
    c = 3 * cpg
    x = torch.randn(2, c, 9, 13, generator=g).to(dtype)
    w = (torch.randn(c, cpg, 3, 3, generator=g) / (3 * cpg**0.5)).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    relu = stride == 1
    x, w, b = x.to(device), w.to(device), b.to(device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "unaligned":
        x, w, b = _unaligned(x, channels_last=True), _unaligned(w), _unaligned(b)
        assert x.is_contiguous(memory_format=CL) and w.is_contiguous()
    y = torch.ops.resfused.grouped_conv3x3(x, w, b, stride, relu)
    assert y.is_contiguous(memory_format=CL) and y.device == x.device and y.dtype == dtype

    def conv(x, w, b):
        out = F.conv2d(x, w, b, stride=stride, padding=1, groups=3)
        return torch.relu(out) if relu else out

    expected = conv(x.double(), w.double(), b.double())
    eager = conv(x, w, b) if dtype in LOWP_EPS else None
    assert_matches_reference(y, expected, dtype, eager, f"grouped3x3 cpg {cpg} s{stride} {dtype} {layout} {device}")


# --------------------------------------------------------------------- tails and BatchNorm


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=CL) if layout == "channels_last" else t.contiguous()


def _grads(fn, inputs, grad):
    """fn(*inputs) and the gradients of <fn(*inputs), grad> for every input."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    return y, torch.autograd.grad(y, inputs, grad.to(y.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_relu_forward_backward(dtype, layout, device):
    # 37 channels: 16-byte vectors straddle rows in channels_last.
    _needs_native("add_relu", device)
    shape = (3, 37, 5, 7)
    x, r, g = (_layout(torch.randn(shape, device=device).to(dtype), layout) for _ in range(3))
    with trace_kernels() as ran:
        y, (gx, gr) = _grads(ops.add_relu, (x, r), g)
    assert [(c.op, c.kernel) for c in ran] == [("add_relu", "native")], ran
    y64, (gx64, gr64) = _grads(lambda a, b: torch.relu(a + b), (x.double(), r.double()), g.double())
    eager, (egx, egr) = _grads(lambda a, b: torch.relu(a + b), (x, r), g) if dtype in LOWP_EPS else (None, (None,) * 2)
    what = f"add_relu {dtype} {layout} {device}"
    assert_matches_reference(y, y64, dtype, eager, what)
    assert_matches_reference(gx, gx64, dtype, egx, f"{what} grad x")
    assert_matches_reference(gr, gr64, dtype, egr, f"{what} grad residual")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_shift_act_forward_backward(dtype, layout, relu, device):
    """The eval-BN tail as the fused blocks call it: x in dtype, scale/shift in float32 (what
    folding.bn_scale_shift gives a low-precision input)."""
    _needs_native("scale_shift_act", device)
    shape = (3, 37, 5, 7)
    x, g = (_layout(torch.randn(shape, device=device).to(dtype), layout) for _ in range(2))
    scale, shift = torch.randn(37, device=device), torch.randn(37, device=device)

    def ssa(x, scale, shift):
        # eager: math in float32 (float64 for the reference), one rounding to x's dtype
        acc = x.to(torch.promote_types(x.dtype, torch.float32))
        y = acc * scale.to(acc.dtype).view(1, -1, 1, 1) + shift.to(acc.dtype).view(1, -1, 1, 1)
        return (torch.relu(y) if relu else y).to(x.dtype)

    with trace_kernels() as ran:
        y, (gx, gs, gb) = _grads(lambda *a: ops.scale_shift_act(*a, relu), (x, scale, shift), g)
    assert [(c.op, c.kernel) for c in ran] == [("scale_shift_act", "native")], ran
    y64, (gx64, gs64, gb64) = _grads(ssa, (x.double(), scale.double(), shift.double()), g.double())
    eager, (egx, _, _) = _grads(ssa, (x, scale, shift), g) if dtype in LOWP_EPS else (None, (None,) * 3)
    what = f"scale_shift_act {dtype} {layout} relu={relu} {device}"
    assert_matches_reference(y, y64, dtype, eager, what)
    assert_matches_reference(gx, gx64, dtype, egx, f"{what} grad x")
    # float32 parameters: their gradients are float32 sums over N*H*W (the float32 rule).
    assert_matches_reference(gs, gs64, torch.float32, what=f"{what} grad scale")
    assert_matches_reference(gb, gb64, torch.float32, what=f"{what} grad shift")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape",
    [pytest.param((4, 37, 9, 7), id="small"), pytest.param((32, 64, 28, 28), id="batch32", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_train_forward_backward_and_running_stats(dtype, layout, relu, shape, device):
    """ops.batch_norm_act on a train-mode BatchNorm2d of the input's dtype (a model `.to(dtype)`):
    output, the gradients of x, weight and bias, and the running statistics. 37 channels: rows that
    are no multiple of a vector; batch 32 at 28x28: 25088 values per channel, reduced in many
    partial slots (and NCHW's per-image rows)."""
    _needs_native("bn_train_act", device)
    g = torch.Generator().manual_seed(1)
    c = shape[1]
    x = _layout((torch.randn(shape, generator=g) * 2 + 1).to(device, dtype), layout)
    bn = randomize_bn(nn.BatchNorm2d(c), g).to(device).train()
    grad = _layout(torch.randn(x.shape, generator=g).to(device, dtype), layout)
    if relu:
        # A one-ulp difference next to the ReLU kink decides whether a whole gradient element
        # passes, and each flip moves its channel's BN backward; elements within 5% of the range
        # of zero get no upstream gradient, so the comparison is not of coin flips.
        bn64 = copy.deepcopy(bn).double().to(dtype).double()
        pre = F.batch_norm(x.double(), None, None, bn64.weight, bn64.bias, True, 0.0, bn.eps)
        grad = grad * (pre.abs() > 0.05 * pre.abs().max())

    def run(module, x, fused_op=False):
        x = x.detach().clone().requires_grad_()
        y = ops.batch_norm_act(x, module, relu) if fused_op else _eager_bn(module, x, relu)
        grads = torch.autograd.grad(y, (x, module.weight, module.bias), grad.to(y.dtype))
        return y, grads, (module.running_mean.clone(), module.running_var.clone(), module.num_batches_tracked.clone())

    fused = copy.deepcopy(bn).to(dtype)
    with trace_kernels() as ran:
        ours = run(fused, x, fused_op=True)
    assert ("batch_norm", "native") in [(c.op, c.kernel) for c in ran], ran
    ref = run(copy.deepcopy(bn).to(dtype).double(), x.double())
    eager = run(copy.deepcopy(bn).to(dtype), x) if dtype in LOWP_EPS else (None, (None,) * 3, (None,) * 3)
    what = f"bn_train {dtype} {layout} relu={relu} {device}"
    assert_matches_reference(ours[0], ref[0], dtype, eager[0], what)
    for name, a, e, base in zip(("x", "weight", "bias"), ours[1], ref[1], eager[1]):
        assert_matches_reference(a, e, dtype, base, f"{what} grad {name}")
    for name, a, e, base in zip(("running_mean", "running_var"), ours[2], ref[2], eager[2]):
        assert_matches_reference(a, e, dtype, base, f"{what} {name}")
    assert torch.equal(ours[2][2].cpu(), ref[2][2].cpu())


def _eager_bn(bn: nn.BatchNorm2d, x: torch.Tensor, relu: bool) -> torch.Tensor:
    y = bn(x)
    return torch.relu(y) if relu else y


# -------------------------------------------------------------------------------- training


@pytest.mark.parametrize("device", DEVICES_CPU_SLOW)
def test_training_step_of_fused_resnet18(device):
    """One SGD step of a fused resnet18 in float32 against the same step in float64: the loss,
    every gradient, every updated parameter and running statistic. On CUDA: ATen (cuDNN) convs,
    the CUDA training BatchNorm and the CUDA tails."""
    tv = pytest.importorskip("torchvision")
    model = randomize_bn(tv.models.resnet18(weights=None, num_classes=10)).to(device)
    fused = resfused.fuse(model)
    # 64x64: the last stage is 2x2, so its BN sees 16 values per channel (at 32x32 only 4, where
    # even eager float32 misses float64 by more than the tolerance).
    x = torch.randn(4, 3, 64, 64, device=device)
    target = torch.randint(0, 10, (4,), device=device)

    def sgd_step(m, inp):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        loss = F.cross_entropy(m(inp), target)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        return loss.detach(), grads, m.state_dict()

    ref = sgd_step(copy.deepcopy(model).double(), x.double())
    with trace_kernels() as ran:
        ours = sgd_step(fused, x)
    kinds = {(c.op, c.kernel) for c in ran}
    assert ("batch_norm", "native") in kinds and ("add_relu", "native") in kinds, kinds
    assert_matches_reference(ours[0], ref[0], torch.float32, what=f"loss on {device}")
    for what, actual, expected in (("grad", ours[1], ref[1]), ("state", ours[2], ref[2])):
        actual = original_stem_names(actual)
        assert set(actual) == set(expected), what
        for key, value in expected.items():
            if key.endswith("num_batches_tracked"):
                assert torch.equal(actual[key].cpu(), value.cpu()), key
            else:
                assert_matches_reference(actual[key], value, torch.float32, what=f"{what} {key} on {device}")


# ------------------------------------------------------- how CUDA users run a model (CUDA only)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_after_warm_up():
    """Warm up first (autotuning, folding and the kernel choices happen on the first calls; none
    of them may happen during capture), then capture one forward and replay it on new inputs
    copied into the captured input."""
    fused, model = _fused_model("resnext50_32x4d", "cuda", torch.float16)
    static_x = torch.randn(2, 3, 15, 15, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            fused(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = fused(static_x)
    for replay in range(2):
        x = torch.randn(2, 3, 15, 15, device="cuda", dtype=torch.float16)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        compare_modules(lambda _: static_y.clone(), model, x, what=f"CUDA graph replay {replay}")


@pytest.mark.gpu
def test_a_non_default_stream_orders_every_kernel():
    """The input is written on a side stream behind a ~50 ms sleep; the forward is issued on that
    stream. A kernel launched on another stream would not wait and would read the zeros there.
    Twice: as called after a warm-up (a block may replay calls it recorded), and under
    trace_kernels(), which takes the full selection path at every call."""
    fused, model = _fused_model("resnext50_32x4d", "cuda", torch.float16)
    src = torch.randn(2, 3, 15, 15, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        fused(src)  # warm-up: autotuning and folding happen outside the test stream
    stream = torch.cuda.Stream()
    for path in ("as called", "traced"):
        x = torch.zeros_like(src)
        torch.cuda.synchronize()
        traced = trace_kernels() if path == "traced" else contextlib.nullcontext()
        with torch.no_grad(), torch.cuda.stream(stream), traced:
            torch.cuda._sleep(100_000_000)  # clock cycles
            x.copy_(src)
            y = fused(x)
        stream.synchronize()
        compare_modules(lambda _: y, model, src, what=f"forward on a side stream ({path})")


@pytest.mark.gpu
@pytest.mark.multi_gpu
def test_a_model_on_the_second_gpu():
    """Every launch must go to the tensors' device, whichever device is current (cuda:0 here)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU")
    torch.cuda.set_device(0)
    for dtype in (torch.float16, torch.float32):
        fused, model = _fused_model("resnext50_32x4d", "cuda:1", dtype)
        x = torch.randn(2, 3, 15, 15, device="cuda:1").to(dtype)
        with torch.no_grad(), trace_kernels() as ran:
            y = compare_modules(fused, model, x, what=f"fuse(resnext50_32x4d) {dtype} on cuda:1")
        assert y.device == torch.device("cuda:1")
        _assert_fused_path(ran, "cuda", f"cuda:1 {dtype}", dense=True)
    # Training on cuda:1 (ATen convs, the CUDA BatchNorm and tails): gradients against float64.
    fused, model = _fused_model("resnext50_32x4d", "cuda:1", torch.float32)
    x = torch.randn(4, 3, 64, 64, device="cuda:1")  # the last BN sees 16 values per channel
    y, grads, _ = forward_backward(fused.train(), x, torch.ones(4, 1000, device="cuda:1"))
    y64, grads64, _ = forward_backward(
        copy.deepcopy(model).double().train(), x.double(), torch.ones(4, 1000).double().to("cuda:1")
    )
    assert y.device == torch.device("cuda:1")
    assert_matches_reference(y, y64, torch.float32, what="train forward on cuda:1")
    assert_matches_reference(grads["input"], grads64["input"], torch.float32, what="input gradient on cuda:1")


# ------------------------------------------------------------------------ compile and autocast


@pytest.mark.parametrize(
    "device, dtype",
    [
        pytest.param("cpu", torch.float32, id="cpu", marks=pytest.mark.slow),
        pytest.param("cuda", torch.float16, id="cuda", marks=pytest.mark.gpu),
    ],
)
def test_compile_fullgraph_auto_backend(device, dtype):
    """torch.compile(fullgraph=True) of fused blocks (a dense Bottleneck and a grouped ResNeXt
    block with a projection) under `auto`: no graph break, the float64 reference's result."""
    model = nn.Sequential(R.Bottleneck(32, 8, 1), R.ResNeXtBottleneck(32, 32, 2, 4, 8))
    model = randomize_bn(model).eval().to(device)
    fused = resfused.fuse(model).to(dtype)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(2, 32, 9, 7, device=device).to(dtype).contiguous(memory_format=CL)
    with torch.no_grad():
        compare_modules(compiled, model, x, what=f"compiled fused blocks {dtype} on {device}")


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device, grad):
    """The documented behaviour (FusedModule._autocast_forward): in eval mode without autograd a
    fused block computes in autocast's dtype as the eager convs do (weights folded for it, output
    in it; judged with eager autocast as the comparator); with autograd it computes in its
    parameters' dtype (float32 here) at the float32 tolerance."""
    low = torch.float16 if device == "cuda" else torch.bfloat16
    ref = randomize_bn(R.ResNeXtBottleneck(32, 32, 2, 4, 8)).eval().to(device)
    fused = resfused.ResNeXtBottleneck.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 32, 9, 7, device=device, requires_grad=grad)
    ref64 = copy.deepcopy(ref).double()
    with torch.no_grad():
        expected = ref64(x.detach().double())
    if not grad:
        with torch.no_grad(), torch.autocast(device, dtype=low):
            eager = ref(x)
            with trace_kernels() as ran:
                y = fused(x)
                y_again = fused(x.to(low))  # an input autocast already lowered: the same bits
        assert y.dtype == eager.dtype == low
        assert_matches_reference(y, expected, low, eager, what=f"eval under autocast on {device}")
        assert torch.equal(y_again, y)
        _assert_fused_path(ran, device, f"eval under autocast on {device}")
        return
    with torch.autocast(device, dtype=low):
        y = fused(x)
        y_from_low = fused(x.detach().to(low))
    assert y.dtype == y_from_low.dtype == torch.float32
    assert_matches_reference(y, expected, torch.float32, what=f"autograd under autocast on {device}")
    with torch.no_grad():
        expected_low = ref64(x.detach().to(low).double())
    assert_matches_reference(y_from_low, expected_low, torch.float32, what=f"{low} input, autograd under autocast")
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    ref64(x64).sum().backward()
    assert_matches_reference(x.grad, x64.grad, torch.float32, what=f"input gradient under autocast on {device}")
