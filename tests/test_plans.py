"""A fused block's plan: its eval forward's kernel calls bound once per input signature.

The second call of a signature replays the plan (no kernel choice, no checks but the NaN one); every
change that could make the plan wrong sends the call back through the full path, which rebuilds
it. Each test below runs a signature twice first, so that a plan exists when the change happens.
"""

from __future__ import annotations

import pytest
import torch

import resfused
import resfused.ops.conv as conv_op
import resfused.reference as R
from resfused import _native
from resfused.runtime import module_state
from tests.cases import BLOCK_CASES, parametrize_cases
from tests.harness import assert_matches_reference, compare_modules, randomize_bn

# Plans are recorded on the path that checked its input finite, which needs the compiled check.
pytestmark = pytest.mark.skipif(not _native.has_kernel("all_finite", "cpu"), reason="resfused._C not built")


def _pair(name, args, seed=0):
    ref = randomize_bn(getattr(R, name)(*args), torch.Generator().manual_seed(seed)).eval()
    fused = getattr(resfused, name).from_reference(ref)
    return fused, ref


@pytest.fixture
def choices(monkeypatch):
    """How many conv kernel choices the calls since the last reset made."""
    counter = {"n": 0}
    choose = conv_op._choose

    def counting_choose(*args, **kwargs):
        counter["n"] += 1
        return choose(*args, **kwargs)

    monkeypatch.setattr(conv_op, "_choose", counting_choose)
    return counter


def _run_twice(fused, ref, x, what):
    with torch.no_grad():
        first = compare_modules(fused, ref, x, f"{what}, first call")
        second = compare_modules(fused, ref, x, f"{what}, replayed")
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@parametrize_cases(BLOCK_CASES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_replayed_plan_matches_the_reference(name, args, layout, choices):
    fused, ref = _pair(name, args)
    x = torch.randn(2, args[0], 9, 7).contiguous(memory_format=layout)
    _run_twice(fused, ref, x, name)
    assert len(fused._derived.plans) == 1
    choices["n"] = 0
    with torch.no_grad():
        fused(x)
    assert choices["n"] == 0, "the replay chose kernels again"


@parametrize_cases(BLOCK_CASES)
def test_a_plan_with_a_flow_replays_without_the_program(name, args, monkeypatch):
    """These blocks pass tensors only through their conv / pre-activation calls: the plan records
    where each call's inputs come from and replays them in one loop (runners.Plan)."""
    fused, ref = _pair(name, args)
    x = torch.randn(2, args[0], 9, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = fused(x)
    (plan,) = fused._derived.plans.values()
    assert plan.flow is not None and len(plan.flow) == len(plan.calls)

    def no_program(*args):
        raise AssertionError("the replay ran the program")

    monkeypatch.setattr(fused, "_program", no_program)
    with torch.no_grad():
        second = compare_modules(fused, ref, x, f"{name}, replayed from the flow")
    torch.testing.assert_close(second, first, rtol=0, atol=0)


def test_stage_replays_with_its_blocks_overwriting_dead_inputs(choices):
    ref = torch.nn.Sequential(*(randomize_bn(R.Bottleneck(32, 8)).eval() for _ in range(3)))
    fused = resfused.ResidualStage(*(resfused.Bottleneck.from_reference(b) for b in ref))
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    _run_twice(fused, ref, x, "stage")
    choices["n"] = 0
    with torch.no_grad():
        fused(x)
    assert choices["n"] == 0
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # the stage's own input is never written


def _edit_in_place(block):
    with torch.no_grad():
        block.conv1.weight.mul_(-1.5)
        block.bn2.running_var.add_(3.0)


def _load_state_dict(block):
    other = randomize_bn(R.BasicBlock(8, 8), torch.Generator().manual_seed(7))
    block.load_state_dict(other.state_dict())


def _assign_state_dict(block):
    other = randomize_bn(R.BasicBlock(8, 8), torch.Generator().manual_seed(8))
    block.load_state_dict(other.state_dict(), assign=True)


def _replace_data(block):
    block.conv2.weight.data = torch.randn_like(block.conv2.weight)


def _replace_module(block):
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
    block.conv1 = conv


def _replace_parameter(block):
    block.bn1.weight = torch.nn.Parameter(torch.rand(8) + 0.5)


def _change_geometry(block):
    block.conv2.padding, block.conv2.dilation = (2, 2), (2, 2)


def _change_eps(block):
    block.bn1.eps = 0.5


def _bn_to_train(block):
    block.bn2.train()


@pytest.mark.parametrize(
    "change",
    [
        _edit_in_place,
        _load_state_dict,
        _assign_state_dict,
        _replace_data,
        _replace_module,
        _replace_parameter,
        _change_geometry,
        _change_eps,
        _bn_to_train,
    ],
)
@pytest.mark.parametrize("reader", ["compiled", "python"])
def test_a_change_after_the_plan_is_seen(change, reader, monkeypatch):
    if reader == "python":  # what module_state reads without the compiled extension
        monkeypatch.setattr(module_state, "_tensor_state", module_state._tensor_state_py)
    elif module_state._tensor_state is module_state._tensor_state_py:
        pytest.skip("resfused._C has no tensor_state")
    fused, ref = _pair("BasicBlock", (8, 8, 1))
    x = torch.randn(2, 8, 7, 7)
    _run_twice(fused, ref, x, "before")
    change(fused)
    ref.load_state_dict(fused.state_dict())
    for name in ("conv1", "conv2", "bn1", "bn2"):  # what the state_dict does not carry
        a, b = getattr(fused, name), getattr(ref, name)
        for attr in ("padding", "dilation", "eps", "training"):
            if hasattr(a, attr):
                setattr(b, attr, getattr(a, attr))
    with torch.no_grad():
        expected = ref.double()(x.double())
        ref.float()
        for what in ("first call after the change", "replayed after the change"):
            assert_matches_reference(fused(x).double(), expected, torch.float32, what=f"{change.__name__}: {what}")


def test_an_unrelated_registration_keeps_the_folded_weights():
    fused, ref = _pair("Bottleneck", (32, 8))
    x = torch.randn(2, 32, 8, 8)
    _run_twice(fused, ref, x, "before")
    derived = fused._derived
    torch.nn.Conv2d(3, 3, 1)  # registers parameters on another module: the snapshot is taken again
    _run_twice(fused, ref, x, "after")
    assert fused._derived is derived


def test_nan_input_after_a_plan_takes_the_reference():
    fused, ref = _pair("Bottleneck", (32, 8))
    x = torch.randn(2, 32, 8, 8)
    _run_twice(fused, ref, x, "finite")
    x[1, 3, 2, 2] = float("nan")
    with torch.no_grad():
        y = fused(x)
    assert y[1].isnan().any() and not y[0].isnan().any()


def test_trace_kernels_sees_every_call_with_a_plan():
    fused, ref = _pair("Bottleneck", (32, 8))
    x = torch.randn(2, 32, 8, 8)
    _run_twice(fused, ref, x, "before")
    with torch.no_grad(), resfused.ops.trace_kernels() as ran:
        fused(x)
    assert len([c for c in ran if c.op == "conv"]) == 3


def test_backend_switch_is_a_new_signature():
    fused, ref = _pair("Bottleneck", (32, 8))
    x = torch.randn(2, 32, 8, 8)
    _run_twice(fused, ref, x, "cpu")
    with resfused.use_backend("reference"), resfused.ops.trace_kernels() as ran:
        _run_twice(fused, ref, x, "reference backend")
    assert {c.kernel for c in ran if c.op == "conv"} == {"reference"}


def test_autograd_after_a_plan_reaches_the_parameters():
    fused, ref = _pair("BasicBlock", (8, 8, 1))
    x = torch.randn(2, 8, 7, 7)
    _run_twice(fused, ref, x, "no grad")
    fused(x).sum().backward()  # grad mode, parameters requiring grad: the differentiable path
    assert fused.conv1.weight.grad is not None and fused.conv1.weight.grad.abs().sum() > 0


def test_plans_per_block_are_bounded():
    fused, ref = _pair("BasicBlock", (8, 8, 1))
    with torch.no_grad():
        for size in range(5, 5 + resfused.blocks.MAX_PLANS + 3):
            fused(torch.randn(1, 8, size, size))
    assert len(fused._derived.plans) == resfused.blocks.MAX_PLANS


def test_off_the_cpu_a_plan_has_no_nan_check(choices):
    """Off the CPU no kernel's ReLU drops NaN (the CUDA tables have none), so a plan is recorded
    without the input check (which would synchronize with the device). Meta tensors on the
    reference backend stand in for a GPU here: a NaN check on them would raise."""
    fused, _ = _pair("Bottleneck", (32, 8))
    fused.to("meta")
    x = torch.empty(2, 32, 8, 8, device="meta")
    with torch.no_grad(), resfused.use_backend("reference"):
        fused(x)
        (plan,) = fused._derived.plans.values()
        assert not plan.check_finite and len(plan.calls) == 3
        choices["n"] = 0
        assert fused(x).shape == (2, 32, 8, 8)
    assert choices["n"] == 0
