"""The tail ops (add_relu, scale_shift_act): against the float64 reference, every dtype and
layout, odd and non-contiguous shapes, opcheck, gradcheck, torch.compile, bad input."""

import pytest
import torch

import resfused
from resfused import _native, ops

from harness import assert_matches_reference

pytestmark = pytest.mark.skipif(not _native.has_kernel("add_relu", "cpu"), reason="resfused._C is not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(2, 3, 5, 7), (1, 17, 1, 1), (3, 64, 9, 11), (0, 4, 3, 3), (2, 33, 6)]


def _layout(t, layout):
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":  # every other column of a wider tensor
        wide = torch.cat([t, t], dim=-1)
        return wide[..., ::2]
    return t.contiguous()


def _ssa_reference(x, scale, shift, relu):
    view = [1, -1] + [1] * (x.dim() - 2)
    y = x.double() * scale.double().view(view) + shift.double().view(view)
    return torch.relu(y) if relu else y


def _eager(x, scale, shift, relu):
    # What eager PyTorch computes for an eval BN(+ReLU) in the input's dtype: float math, one rounding.
    view = [1, -1] + [1] * (x.dim() - 2)
    y = (x.float() * scale.float().view(view) + shift.float().view(view)).to(x.dtype)
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_relu(dtype, shape, layout):
    x = _layout(torch.randn(shape).to(dtype), layout)
    r = _layout(torch.randn(shape).to(dtype), layout)
    with ops.trace_kernels() as ran:
        y = ops.add_relu(x, r)
    assert [c[:2] for c in ran] == [("add_relu", "native")]
    assert y.dtype == dtype and y.shape == x.shape
    eager = torch.relu(x + r) if dtype in (torch.float16, torch.bfloat16) else None
    assert_matches_reference(y, torch.relu(x.double() + r.double()), dtype, eager, "add_relu")


def test_add_relu_mixed_layouts_and_nan():
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 8, 5, 5)
    x[0, 1, 2, 3] = float("nan")
    y = ops.add_relu(x, r)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(y, torch.relu(x.double() + r.double()), what="add_relu mixed layouts")
    assert torch.isnan(y[0, 1, 2, 3])


def test_relu_backward_lets_nan_through_like_torch_relu():
    """torch.relu's backward zeroes the gradient where its output <= 0, so where the output is NaN
    the gradient passes; the fused tails' backwards do the same (a NaN-free mask would make the
    input gradients of a fused block differ from the reference's next to a NaN)."""
    x = torch.randn(2, 8, 5, 5)
    x[0, 1, 2, 3], x[1, 2, 0, 0] = float("nan"), float("inf")
    r = torch.randn_like(x)
    scale, shift = torch.randn(8), torch.randn(8)
    for fused, eager in (
        (lambda a: ops.add_relu(a, r), lambda a: torch.relu(a + r)),
        (
            lambda a: ops.scale_shift_act(a, scale, shift, True),
            lambda a: torch.relu(a * scale[:, None, None] + shift[:, None, None]),
        ),
    ):
        grads = []
        for fn in (fused, eager):
            leaf = x.clone().requires_grad_(True)
            fn(leaf).backward(torch.ones_like(x))
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0, equal_nan=True)
        assert grads[0][0, 1, 2, 3] != 0


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_shift_act(dtype, shape, layout, relu):
    x = _layout(torch.randn(shape).to(dtype), layout)
    scale, shift = torch.randn(shape[1]), torch.randn(shape[1])
    y = ops.scale_shift_act(x, scale, shift, relu)
    assert y.dtype == dtype and y.shape == x.shape
    eager = _eager(x, scale, shift, relu) if dtype in (torch.float16, torch.bfloat16) else None
    assert_matches_reference(y, _ssa_reference(x, scale, shift, relu), dtype, eager, "scale_shift_act")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [True, False])
def test_gradcheck_float64(layout, relu):
    x = _layout(torch.randn(2, 5, 3, 4, dtype=torch.float64), layout).requires_grad_()
    r = torch.randn(2, 5, 3, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(5, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(5, dtype=torch.float64, requires_grad=True)
    # Keep values away from the ReLU kink, where finite differences are meaningless.
    with torch.no_grad():
        x.add_(torch.sign(x) * 0.1)
    assert torch.autograd.gradcheck(lambda a, b: ops.add_relu(a, b), (x, r))
    assert torch.autograd.gradcheck(lambda a, s, b: ops.scale_shift_act(a, s, b, relu), (x, scale, shift))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_autograd_reference(dtype):
    x = torch.randn(4, 16, 7, 7).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale = torch.randn(16, requires_grad=True)
    shift = torch.randn(16, requires_grad=True)
    g = torch.randn(4, 16, 7, 7).to(dtype)
    gx, gs, gb = torch.autograd.grad(ops.scale_shift_act(x, scale, shift, True), (x, scale, shift), g)
    x64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, scale, shift))
    ex, es, eb = torch.autograd.grad(_ssa_reference(x64, s64, b64, True), (x64, s64, b64), g.double())
    if dtype == torch.float32:
        for a, e, name in ((gx, ex, "grad_x"), (gs, es, "grad_scale"), (gb, eb, "grad_shift")):
            assert_matches_reference(a, e, what=name)
    else:
        xe, se, be = (t.detach().clone().requires_grad_() for t in (x, scale, shift))
        eager = torch.autograd.grad(_eager(xe, se, be, True), (xe, se, be), g)
        assert_matches_reference(gx, ex, dtype, eager[0], "grad_x bf16")
        # grad_scale / grad_shift come out float32 (the dtype of scale/shift): float32 tolerance.
        assert_matches_reference(gs, es, what="grad_scale")
        assert_matches_reference(gb, eb, what="grad_shift")


def test_opcheck():
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    r = torch.randn(2, 6, 5, 5, requires_grad=True)
    s, b = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.resfused.add_relu, (x, r))
    torch.library.opcheck(torch.ops.resfused.add_relu_backward, (torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)))
    torch.library.opcheck(
        torch.ops.resfused.scale_shift_act, (x.contiguous(memory_format=torch.channels_last), s, b, True)
    )
    torch.library.opcheck(
        torch.ops.resfused.scale_shift_act_backward,
        (torch.randn(2, 6, 5, 5), x.detach(), s.detach(), b.detach(), False),
    )


def test_compile_fullgraph():
    def f(x, r, s, b):
        return ops.add_relu(ops.scale_shift_act(x, s, b, True), r)

    args = (torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5), torch.randn(6), torch.randn(6))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), f(*args))


def test_reference_backend_runs_pure_pytorch():
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with resfused.use_backend("reference"), ops.trace_kernels() as ran:
        y = ops.add_relu(x, r)
    assert [c[:2] for c in ran] == [("add_relu", "reference")]
    assert torch.equal(y, torch.relu(x + r))


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: ops.add_relu(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5)),
            "'residual' must have the shape of 'x'",
        ),
        (lambda: ops.add_relu(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).double()), "'residual' has dtype"),
        (
            lambda: ops.add_relu(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32)),
            "'x' must be a floating-point",
        ),
        (lambda: ops.add_relu(torch.randn(3), torch.randn(3)), "rank >= 2"),
        (
            lambda: ops.scale_shift_act(torch.randn(2, 3, 4, 4), torch.randn(4), torch.randn(3)),
            r"'scale' must have shape \[3\]",
        ),
        (
            lambda: ops.scale_shift_act(torch.randn(2, 3, 4, 4), torch.randn(3), torch.randn(3, 1)),
            r"'shift' must have shape \[3\]",
        ),
        (
            lambda: ops.add_relu(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, device="meta")),
            "'residual' is on meta",
        ),
        # The C++ kernels check too, when called directly through torch.ops:
        (lambda: torch.ops.resfused.add_relu(torch.randn(2, 3), torch.randn(3, 2)), "'residual' must have the shape"),
        (
            lambda: torch.ops.resfused.scale_shift_act(torch.randn(2, 3), torch.randn(2), torch.randn(3), True),
            "'scale' must have shape",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call()
