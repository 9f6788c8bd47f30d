"""The one kernel-selection path (resfused/ops/selection.py): every skipped candidate says why, the
capability flags become reasons, and a fused conv remembers its choice per call signature."""

import pytest
import torch

import resfused
from resfused import _native
from resfused.kernels.base import ConvParams, MeasuredRule
from resfused.ops import conv as conv_op
from resfused.ops import conv_bias_act, selection, trace_kernels

CL = torch.channels_last
needs_native = pytest.mark.skipif(not _native.has_kernel("grouped_conv3x3", "cpu"), reason="needs resfused._C")


def _params(k=1, c_in=64, c_out=64, groups=1):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g)
    return ConvParams(w, torch.randn(c_out, generator=g), (1, 1), (k // 2,) * 2, (1, 1), groups)


@needs_native
def test_trace_names_every_better_ranked_kernel_and_why():
    x = torch.randn(1, 64, 6, 6).contiguous(memory_format=CL)
    with torch.no_grad(), trace_kernels() as ran:
        conv_bias_act(x, _params(k=1), relu=True, inputs_finite=True)
        p3 = _params(k=3)
        p3 = ConvParams(p3.weight.bfloat16(), p3.bias.bfloat16(), (1, 1), (1, 1), (1, 1), 1)
        conv_bias_act(x.bfloat16(), p3)
    one_by_one, bf16_3x3 = ran
    assert one_by_one.kernel == "onednn"
    assert dict(one_by_one.skipped) == {
        "grouped3x3": "not a grouped conv",
        "winograd_f43": "not a 3x3, stride-1, padding-1 conv without groups or dilation",
    }
    assert dict(bf16_3x3.skipped)["winograd_f43"].startswith("float32 only")


@needs_native
def test_capability_flags_become_reasons():
    p = _params(k=1)
    x = torch.randn(1, 64, 6, 6, requires_grad=True)
    with trace_kernels() as ran:
        conv_bias_act(x, p, relu=True)  # autograd records: oneDNN has no backward
    assert ran[0].kernel == "library+tail"
    assert ("onednn", selection.NO_BACKWARD) in ran[0].skipped


@needs_native
def test_a_fused_conv_remembers_its_choice_per_signature(monkeypatch):
    calls = []
    real = conv_op.select
    monkeypatch.setattr(conv_op, "select", lambda *a, **k: calls.append(a[3][0].shape) or real(*a, **k))
    p = _params(k=3, c_in=32, c_out=32, groups=8)  # 4 channels per group
    x1 = torch.randn(1, 32, 14, 14).contiguous(memory_format=CL)
    x8 = torch.randn(8, 32, 14, 14).contiguous(memory_format=CL)
    with torch.no_grad():
        for x in (x1, x1, x8, x8, x1):
            y = conv_bias_act(x, p, relu=True, inputs_finite=True)
            expected = torch.relu(torch.nn.functional.conv2d(x, p.weight, p.bias, padding=1, groups=8))
            torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        assert len(calls) == 2  # once per input shape
        with resfused.use_backend("reference"):
            conv_bias_act(x1, p, relu=True, inputs_finite=True)
        assert len(calls) == 3  # another backend chooses again
        conv_bias_act(x1, p, relu=True)  # ReLU input not known to be finite: always asks
        with trace_kernels() as ran:
            conv_bias_act(x1, p, relu=True, inputs_finite=True)  # traced: always asks, records why
    assert len(calls) == 5
    assert ran[0].kernel == "grouped3x3"


@needs_native
def test_only_speed_rules_are_measured_rules():
    """The reasons that measured selection (tuning) may override are the tables' speed rules;
    without tuning they rule a kernel out like any other reason."""
    with torch.no_grad(), trace_kernels() as ran:
        conv_bias_act(torch.randn(1, 64, 14, 14), _params(k=3, groups=4), relu=True, inputs_finite=True)
        conv_bias_act(torch.randn(1, 64, 7, 7), _params(k=3), relu=True, inputs_finite=True)
    grouped16, small3x3 = ran
    assert grouped16.kernel == small3x3.kernel == "onednn"
    assert grouped16.source == small3x3.source == "table"
    reasons = {**dict(grouped16.skipped), **{f"{k} 7x7": v for k, v in small3x3.skipped}}
    assert isinstance(reasons["grouped3x3"], MeasuredRule) and "measured faster" in reasons["grouped3x3"]
    assert isinstance(reasons["winograd_f43 7x7"], MeasuredRule)
    assert not isinstance(reasons["winograd_f43"], MeasuredRule)  # grouped: not a dense 3x3 at all


@pytest.mark.parametrize("c_in,groups,k", [(3, 1, 3), (32, 4, 1)])
def test_auto_sends_few_channels_per_group_from_triton_to_the_library_conv(c_in, groups, k):
    # A stem conv (3 input channels) or a 1x1 conv with 8 channels per group: under `auto` on CUDA
    # the Triton conv declines (its tensor-core K step would be mostly padding: a speed rule), the
    # library conv (cuDNN) runs and the op applies the tail. The `auto-cuda` list is walked here
    # with CPU tensors, which the Triton adapter takes under TRITON_INTERPRET=1 (conftest sets it).
    p = _params(k=k, c_in=c_in, c_out=64, groups=groups)
    p = ConvParams(p.weight, p.bias, (2, 2), p.padding, (1, 1), groups)
    x = torch.randn(1, c_in, 16, 16).contiguous(memory_format=CL)
    with resfused.use_backend("auto"), trace_kernels() as ran:
        chosen = selection.select("conv", conv_op.KERNELS["auto-cuda"], conv_op.REFERENCE, (x, p, None, None))
    assert chosen.name == "library+tail"
    triton_reasons = [why for name, why in ran[0].skipped if name == "triton"]
    assert len(triton_reasons) == 1 and triton_reasons[0].startswith(f"{c_in // groups} input channels per group")
    assert isinstance(triton_reasons[0], MeasuredRule)
    # 16 channels per group take the Triton conv; the forced `triton` backend takes every count.
    wide = _params(k=3, c_in=16, c_out=64)
    x16 = torch.randn(1, 16, 16, 16).contiguous(memory_format=CL)
    with resfused.use_backend("auto"):
        assert conv_op.KERNELS["auto-cuda"][1].supports(x16, wide, None, None)
    with resfused.use_backend("triton"):
        assert conv_op.KERNELS["triton"][0].supports(x, p, None, None)
