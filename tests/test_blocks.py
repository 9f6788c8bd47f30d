"""Fused blocks against the reference blocks: numerics, state_dict compatibility, the plan cache
never going stale, train mode, and bad input."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import resfused
from resfused import reference as R

from cases import BLOCK_CASES, ONE_PER_TYPE, parametrize_cases
from harness import assert_matches_reference, compare_modules, randomize_bn
from strategies import block_configs


def _pair(name, args):
    ref = randomize_bn(getattr(R, name)(*args)).eval()
    fused = getattr(resfused, name)(*args).eval()
    fused.load_state_dict(ref.state_dict())  # same keys: loads without remapping
    return fused, ref


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@parametrize_cases()
def test_fused_matches_reference(name, args, dtype, channels_last):
    fused, ref = _pair(name, args)
    fused.to(dtype)
    x = torch.randn(2, args[0], 9, 9).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with resfused.ops.trace_kernels() as ran:
        compare_modules(fused, ref, x, f"{name}{args} {dtype}")
    kernels = {c.kernel for c in ran if c.op == "conv"}
    assert kernels and "reference" not in kernels, f"the fused path did not run: {ran}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_configs())
def test_fused_matches_reference_on_drawn_configs(cfg):
    fused, ref = _pair(cfg.block, cfg.constructor_args())
    compare_modules(fused, ref, cfg.input(), str(cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@parametrize_cases()
def test_non_finite_input_gives_the_reference_result(name, args, value, dtype):
    """oneDNN's ReLU maps NaN to 0 (runtime/finite.py): a corrupted input must not come out as
    plausible numbers. Image 1 holds the bad value; image 0 must be unaffected."""
    fused, ref = _pair(name, args)
    fused.to(dtype)
    x = torch.randn(2, args[0], 9, 9).to(dtype)
    x[1, 0, 4, 4] = value
    y = compare_modules(fused, ref, x, f"{name}{args} with {value} in the input")  # NaN/Inf where ref has them
    assert torch.isfinite(y[0]).all()
    if value != value:  # NaN always reaches the output (an Inf may not: a pre-activation ReLU zeroes -Inf)
        assert y[1].isnan().any()


@parametrize_cases(BLOCK_CASES[:2] + BLOCK_CASES[4:5])
def test_reference_backend_gives_the_same_result(name, args):
    fused, ref = _pair(name, args)
    x = torch.randn(1, args[0], 8, 8)
    with resfused.use_backend("reference"), resfused.ops.trace_kernels() as ran:
        compare_modules(fused, ref, x)
    assert {c.kernel for c in ran if c.op == "conv"} == {"reference"}


def test_from_reference_shares_parameters():
    ref = randomize_bn(R.Bottleneck(32, 8)).eval()
    fused = resfused.Bottleneck.from_reference(ref)
    assert fused.conv1.weight is ref.conv1.weight and not fused.training
    compare_modules(fused, ref, torch.randn(2, 32, 6, 6))


@pytest.mark.parametrize(
    "cls, block",
    [
        (resfused.PreActBasicBlock, R.BasicBlock(16, 16)),  # same children, other math
        (resfused.BasicBlock, R.Bottleneck(64, 16)),
        (resfused.Bottleneck, R.ResNeXtBottleneck(64, 32, 1, 8, 8)),
        (resfused.BasicBlock, torch.nn.Linear(3, 3)),
    ],
)
def test_from_reference_refuses_another_block(cls, block):
    with pytest.raises(
        TypeError,
        match=rf"resfused.{cls.__name__}.from_reference: 'block' must be a "
        rf"resfused.reference.{cls.__name__}, got .*{type(block).__name__}",
    ):
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


class _WeightStandardizedConv(torch.nn.Conv2d):  # like timm's StdConv2d: forward changes the weight
    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (
            self.weight.std((1, 2, 3), keepdim=True) + 1e-5
        )
        return self._conv_forward(x, w, self.bias)


class _BatchNormWithAct(torch.nn.BatchNorm2d):  # like timm's BatchNormAct2d
    def forward(self, x):
        return torch.nn.functional.silu(super().forward(x))


@pytest.mark.parametrize(
    "conv, bn, match",
    [
        (torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(16), "'bn' has 16 features but 'conv' has 8 output channels"),
        (torch.nn.Linear(3, 8), torch.nn.BatchNorm2d(8), "'conv' is Linear, not a plain nn.Conv2d"),
        (torch.nn.Conv2d(3, 8, 3), torch.nn.LayerNorm(8), "'bn' is LayerNorm, not nn.BatchNorm2d"),
        # Accepted before, then computed something else (0.93 and 0.55 relative error): the fused conv
        # neither standardizes the weight nor pads by reflection.
        (_WeightStandardizedConv(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), "'conv' is _WeightStandardizedConv"),
        (torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), torch.nn.BatchNorm2d(8), "'conv' uses padding"),
        (torch.nn.Conv2d(3, 8, 3, padding="same"), torch.nn.BatchNorm2d(8), "'conv' uses padding 'same'"),
        (torch.nn.Conv2d(3, 8, 3), _BatchNormWithAct(8), "'bn' is _BatchNormWithAct, not nn.BatchNorm2d"),
    ],
)
def test_conv_bn_act_checks_its_parts(conv, bn, match):
    with pytest.raises((TypeError, ValueError), match=rf"resfused.ConvBNAct: {match}"):
        resfused.ConvBNAct(conv, bn)


def _bns(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@parametrize_cases(ONE_PER_TYPE)
def test_a_bn_left_in_train_mode_in_an_eval_block_uses_batch_statistics(name, args):
    """BN re-calibration / AdaBN: model.eval(), then some BNs back in train mode. Before, the
    eval block folded the running statistics (0.084 relative error, no running-stat update)."""
    fused, ref = _pair(name, args)
    for model in (fused, ref):
        _bns(model)[0].train()
    x = torch.randn(4, args[0], 8, 8) * 3 + 1
    with torch.no_grad():
        expected, actual = ref(x), fused(x)
    assert_matches_reference(actual.double(), expected.double(), torch.float32, what=f"{name} BN in train mode")
    for a, b in zip(_bns(fused), _bns(ref)):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked)


def test_conv_bn_act_with_a_bn_without_running_statistics():
    conv, bn = torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16, track_running_stats=False)
    ref = torch.nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), torch.nn.ReLU()).eval()
    fused = resfused.ConvBNAct(conv, bn).eval()
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        assert_matches_reference(fused(x).double(), ref(x).double(), torch.float32, what="no running statistics")


def test_parameters_made_under_inference_mode():
    """Inference tensors keep no version counter (the plan key read it and crashed); in-place
    edits to them need refresh(), as .data edits do."""
    with torch.inference_mode():
        fused, ref = _pair("Bottleneck", (32, 16, 2))
        x = torch.randn(2, 32, 8, 8)
        assert_matches_reference(fused(x).double(), ref(x).double(), torch.float32, what="inference tensors")
        fused.conv1.weight.mul_(2)
        ref.conv1.weight.mul_(2)
        assert_matches_reference(
            resfused.refresh(fused)(x).double(),
            ref(x).double(),
            torch.float32,
            what="inference tensors after an in-place edit and refresh()",
        )


@parametrize_cases(ONE_PER_TYPE)
def test_eval_under_autocast_computes_in_autocast_dtype(name, args):
    """In eval mode without autograd, torch.autocast reaches the fused block as it reaches the eager
    convs: bfloat16 weights (folded in float64, rounded once), bfloat16 output, on the fused kernels."""
    fused, ref = _pair(name, args)
    x = torch.randn(2, args[0], 9, 7)
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager = ref(x)
            with resfused.ops.trace_kernels() as ran:
                y = fused(x)
                y_again = fused(x.bfloat16())  # an input autocast already lowered: the same
    assert y.dtype == eager.dtype == torch.bfloat16
    assert_matches_reference(y, expected, torch.bfloat16, eager, what=f"{name} under autocast")
    torch.testing.assert_close(y_again, y, rtol=0, atol=0)
    assert "reference" not in {c.kernel for c in ran if c.op == "conv"}
    with torch.no_grad():  # autocast off again: the float32 fold, float32 output
        assert_matches_reference(fused(x).double(), expected, torch.float32, what=f"{name} after autocast")


@pytest.mark.parametrize("train", [False, True])
def test_autocast_with_autograd_computes_in_the_parameters_dtype(train):
    """With autograd (frozen-BN fine-tuning, or training) a fused module computes in its parameters'
    dtype under torch.autocast, casting a lower-precision input back up. Before, eval with
    autograd crashed (F.conv2d was autocast)."""
    fused, ref = _pair("BasicBlock", (16, 32, 2))
    fused.train(train), ref.train(train)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    ref64 = copy.deepcopy(ref).double()
    x64 = x.detach().double().requires_grad_(True)
    expected = ref64(x64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
        y_from_bf16 = fused(x.detach().bfloat16())
    assert y.dtype == y_from_bf16.dtype == torch.float32
    assert_matches_reference(y.detach().double(), expected.detach(), torch.float32, what="under autocast")
    y.sum().backward()
    expected.sum().backward()
    assert_matches_reference(x.grad, x64.grad, torch.float32, what="input gradient under autocast")


@parametrize_cases([BLOCK_CASES[1], BLOCK_CASES[2], BLOCK_CASES[5]])
def test_an_empty_batch_in_train_mode_is_counted_like_the_reference(name, args):
    ref = getattr(R, name)(*args).train()
    fused = getattr(resfused, name).from_reference(copy.deepcopy(ref)).train()
    x = torch.randn(0, args[0], 8, 8, requires_grad=True)
    a, b = ref(x), fused(x)
    assert a.shape == b.shape
    b.sum().backward()
    assert [int(m.num_batches_tracked) for m in _bns(fused)] == [int(m.num_batches_tracked) for m in _bns(ref)] != []


def test_fx_tracing_says_how_to_keep_fused_modules_whole():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    fused = resfused.fuse(model)
    with pytest.raises(RuntimeError, match="cannot be traced by torch.fx.*leaf_modules"):
        create_feature_extractor(fused, {"layer2": "c3"})
    fused.eval()  # create_feature_extractor traces in train mode first and left it there on the error
    # The workaround the message gives works and matches the original's features.
    leaves = [resfused.blocks.FusedModule, resfused.ResidualStage]
    features = create_feature_extractor(fused, {"layer2": "c3", "layer4": "c5"}, tracer_kwargs={"leaf_modules": leaves})
    expected = create_feature_extractor(model, {"layer2": "c3", "layer4": "c5"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got, want = features(x), expected(x)
    for k in ("c3", "c5"):
        assert_matches_reference(got[k].double(), want[k].double(), torch.float32, what=f"feature {k}")
