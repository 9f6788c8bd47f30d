"""Fused blocks against the reference blocks: numerics, state_dict compatibility, the plan cache
never going stale, train mode, and bad input."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import resfused
from harness import compare_modules, randomize_bn
from resfused import reference as R
from strategies import block_configs

CASES = [
    ("BasicBlock", (16, 16, 1)),
    ("BasicBlock", (16, 32, 2)),
    ("PreActBasicBlock", (16, 16, 1)),
    ("PreActBasicBlock", (16, 32, 2)),
    ("Bottleneck", (64, 16, 1)),
    ("Bottleneck", (32, 16, 2)),
    ("ResNeXtBottleneck", (64, 32, 1, 8, 8)),
    ("ResNeXtBottleneck", (64, 64, 2, 32, 4)),
]


def _pair(name, args):
    ref = randomize_bn(getattr(R, name)(*args)).eval()
    fused = getattr(resfused, name)(*args).eval()
    fused.load_state_dict(ref.state_dict())  # same keys: loads without remapping
    return fused, ref


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, args", CASES)
def test_fused_matches_reference(name, args, dtype, channels_last):
    fused, ref = _pair(name, args)
    fused.to(dtype)
    x = torch.randn(2, args[0], 9, 9).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with resfused.ops.trace_kernels() as ran:
        compare_modules(fused, ref, x, f"{name}{args} {dtype}")
    kernels = {k for op, k in ran if op == "conv"}
    assert kernels and "reference" not in kernels, f"the fused path did not run: {ran}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_configs())
def test_fused_matches_reference_on_drawn_configs(cfg):
    fused, ref = _pair(cfg.block, cfg.constructor_args())
    compare_modules(fused, ref, cfg.input(), str(cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name, args", CASES)
def test_non_finite_input_gives_the_reference_result(name, args, value, dtype):
    """oneDNN's ReLU maps NaN to 0 (ops/finite.py): a corrupted input must not come out as
    plausible numbers. Image 1 holds the bad value; image 0 must be unaffected."""
    fused, ref = _pair(name, args)
    fused.to(dtype)
    x = torch.randn(2, args[0], 9, 9).to(dtype)
    x[1, 0, 4, 4] = value
    y = compare_modules(fused, ref, x, f"{name}{args} with {value} in the input")  # NaN/Inf where ref has them
    assert torch.isfinite(y[0]).all()
    if value != value:  # NaN always reaches the output (an Inf may not: a pre-activation ReLU zeroes -Inf)
        assert y[1].isnan().any()


@pytest.mark.parametrize("name, args", CASES[:2] + CASES[4:5])
def test_reference_backend_gives_the_same_result(name, args):
    fused, ref = _pair(name, args)
    x = torch.randn(1, args[0], 8, 8)
    with resfused.use_backend("reference"), resfused.ops.trace_kernels() as ran:
        compare_modules(fused, ref, x)
    assert {k for op, k in ran if op == "conv"} == {"reference"}


def test_from_reference_shares_parameters():
    ref = randomize_bn(R.Bottleneck(32, 8)).eval()
    fused = resfused.Bottleneck.from_reference(ref)
    assert fused.conv1.weight is ref.conv1.weight and not fused.training
    compare_modules(fused, ref, torch.randn(2, 32, 6, 6))


@pytest.mark.parametrize("cls, block", [
    (resfused.PreActBasicBlock, R.BasicBlock(16, 16)),  # same children, other math
    (resfused.BasicBlock, R.Bottleneck(64, 16)),
    (resfused.Bottleneck, R.ResNeXtBottleneck(64, 32, 1, 8, 8)),
    (resfused.BasicBlock, torch.nn.Linear(3, 3)),
])
def test_from_reference_refuses_another_block(cls, block):
    with pytest.raises(TypeError, match=rf"resfused.{cls.__name__}.from_reference: 'block' must be a "
                                        rf"resfused.reference.{cls.__name__}, got .*{type(block).__name__}"):
        cls.from_reference(block)
    with pytest.raises(TypeError, match="ConvBNAct has no reference block"):
        resfused.ConvBNAct.from_reference(block)


def _check_fresh(fused, ref, x, what):
    with torch.no_grad():
        compare_modules(fused, ref, x, what)


def test_plan_is_rebuilt_when_parameters_change():
    fused, ref = _pair("BasicBlock", (8, 8, 1))
    x = torch.randn(2, 8, 7, 7)
    _check_fresh(fused, ref, x, "initial")
    # load_state_dict with new values
    other = randomize_bn(R.BasicBlock(8, 8), torch.Generator().manual_seed(5)).eval()
    fused.load_state_dict(other.state_dict())
    _check_fresh(fused, other, x, "after load_state_dict")
    # in-place edits of a weight and of a BN buffer
    with torch.no_grad():
        fused.conv1.weight.mul_(-1.5)
        fused.bn2.running_var.add_(3.0)
        other.load_state_dict(fused.state_dict())
    _check_fresh(fused, other, x, "after in-place edits")
    # BN eps and conv geometry: not tensors, but the folded weights depend on them
    fused.bn1.eps = other.bn1.eps = 0.5
    _check_fresh(fused, other, x, "after a BN eps change")
    fused.conv2.padding = other.conv2.padding = (2, 2)
    fused.conv2.dilation = other.conv2.dilation = (2, 2)
    _check_fresh(fused, other, x, "after a conv padding and dilation change")
    # Edits through .data bypass the version counter: refresh() is the documented way
    fused.conv1.weight.data.mul_(2)
    other.load_state_dict(fused.state_dict())
    _check_fresh(resfused.refresh(fused), other, x, "after a .data edit and refresh()")
    # dtype change
    fused.to(torch.bfloat16)
    _check_fresh(fused, other, x.bfloat16(), "after .to(bfloat16)")


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(2, 7, 8, 8), "expected 16 input channels"),
        (torch.randn(16, 8, 8), "expected a 4-D input"),
        (torch.randn(2, 16, 8, 8, dtype=torch.float64), "input dtype torch.float64 does not match"),
        (torch.randn(2, 16, 8, 8, device="meta"), "input is on meta"),
        (torch.randn(2, 16, 0, 8), "expected a non-empty height and width"),
    ],
)
def test_bad_input_names_the_block(x, match):
    fused, _ = _pair("BasicBlock", (16, 16, 1))
    with torch.no_grad(), pytest.raises((ValueError, TypeError, RuntimeError), match=match) as err:
        fused(x)
    assert "BasicBlock" in str(err.value)


def test_deepcopy_keeps_working():
    fused, ref = _pair("PreActBasicBlock", (8, 16, 2))
    x = torch.randn(2, 8, 6, 6)
    _check_fresh(fused, ref, x, "original")
    _check_fresh(copy.deepcopy(fused), ref, x, "deepcopy")


@pytest.mark.parametrize("conv, bn, match", [
    (torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(16), "'bn' has 16 features but 'conv' has 8 output channels"),
    (torch.nn.Linear(3, 8), torch.nn.BatchNorm2d(8), "'conv' must be an nn.Conv2d, got Linear"),
    (torch.nn.Conv2d(3, 8, 3), torch.nn.LayerNorm(8), "'bn' must be an nn.BatchNorm2d, got LayerNorm"),
])
def test_conv_bn_act_checks_its_parts(conv, bn, match):
    with pytest.raises((TypeError, ValueError), match=rf"resfused.ConvBNAct: {match}"):
        resfused.ConvBNAct(conv, bn)
