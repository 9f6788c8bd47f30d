"""NaN and Inf on the CPU fast path (resfused/runtime/finite.py): oneDNN's ReLU post-op maps NaN to
0, so a ReLU call whose input is not known to be finite must not reach it."""

import pytest
import torch
import torch.nn.functional as F

from resfused import _native
from resfused.ops import ConvParams, conv_bias_act, trace_kernels
from resfused.runtime import finite

from harness import assert_matches_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 24, 160, 160)])  # the second: over a thread's grain
def test_is_finite(dtype, layout, shape):
    x = torch.randn(shape).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # not dense: a strided view
        x = x[:, :, ::2, 1:]
    assert finite.is_finite(x) is True
    # Bad values at the first, a middle and the last element in memory order (vector tails included),
    # and the largest finite values, which are not bad.
    n, c, h, w = x.shape
    for at in [(0, 0, 0, 0), (n - 1, c // 2, h // 2, w - 1), (n - 1, c - 1, h - 1, w - 1), (n - 1, 0, h - 1, w - 1)]:
        for value in (float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[at] = value
            assert finite.is_finite(y) is False, (at, value)
        y = x.clone()
        y[at] = torch.finfo(dtype).max
        assert finite.is_finite(y) is True


@pytest.mark.skipif(not _native.has_kernel("all_finite", "cpu"), reason="needs the compiled bit test")
def test_huge_finite_values_are_finite():
    # (The fallback's sum would overflow here and send the tensor down the exact path; the bit test does not.)
    assert finite.is_finite(torch.full((4, 3, 2, 2), 3e38))


def test_all_finite_reads_every_tensor():
    clean, bad = torch.zeros(3), torch.tensor([0.0, float("nan")])
    assert finite.all_finite(clean, None)
    assert not finite.all_finite(clean, bad)
    assert not finite.all_finite(bad, None)


def test_a_promise_of_finite_inputs_travels_with_the_call():
    # A block that checked its input passes inputs_finite=True: the oneDNN ReLU is then chosen
    # without a second check (here the promise is broken on purpose, to show it is not re-checked).
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad(), trace_kernels() as ran:
        conv_bias_act(x, _conv(1), relu=True, inputs_finite=True)
        conv_bias_act(x, _conv(1), relu=True)
    assert [c.kernel for c in ran] == ["onednn", "library+tail"], ran
    assert ran[1].skipped[-1] == ("onednn", "its ReLU maps NaN to 0, and the input is not known to be finite")


def _conv(k):
    g = torch.Generator().manual_seed(0)
    return ConvParams(
        torch.randn(16, 16, k, k, generator=g), torch.randn(16, generator=g), (1, 1), (k // 2,) * 2, (1, 1), 1
    )


@pytest.mark.parametrize("with_residual", [False, True])
def test_relu_conv_on_nan_input_keeps_nan(with_residual):
    p = _conv(1)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last) if with_residual else None
    (residual if with_residual else x)[1, 4, 2, 3] = float("nan")
    with torch.no_grad(), trace_kernels() as ran:
        y = conv_bias_act(x, p, residual=residual, relu=True)
    assert ran[0][:2] == ("conv", "library+tail")  # (then the add_relu tail, with a residual)
    ref = F.conv2d(x.double(), p.weight.double(), p.bias.double())
    if residual is not None:
        ref = ref + residual.double()
    assert_matches_reference(y, torch.relu(ref), torch.float32, what="NaN input")
    assert y[1].isnan().any() and not y[0].isnan().any()


def test_finite_relu_conv_takes_onednn():
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), trace_kernels() as ran:
        conv_bias_act(x, _conv(1), relu=True)
    assert [c[:2] for c in ran] == [("conv", "onednn")]
