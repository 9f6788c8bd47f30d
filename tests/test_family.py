"""The rest of the residual family: SyncBatchNorm models, ResNet-D avg-down shortcuts and
the pre-activation bottleneck, each against its original in float64 (docs/design.md, Numerics)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import resfused
from resfused import reference
from resfused.ops import trace_kernels
from tests.harness import assert_matches_reference, compare_step, forward_backward, randomize_bn

torchvision = pytest.importorskip("torchvision")


def _expected64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def _bn_states(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in (m.running_mean, m.running_var, m.num_batches_tracked)
    ]


# --------------------------------------------------------------------------------- SyncBatchNorm
def _sync_resnet18() -> nn.Module:
    model = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(weights=None))
    assert any(type(m) is nn.SyncBatchNorm for m in model.modules())
    return randomize_bn(model)


def test_sync_batchnorm_resnet18_folds_in_eval_mode():
    model = _sync_resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    expected = _expected64(model, x)
    fused = resfused.fuse(model)
    report = fused.resfused_report
    assert report.skipped == [] and len(report.converted) == 9, str(report)  # 8 blocks + the stem
    assert [e.detail for e in report.converted if "stem" not in e.source] == ["resfused.BasicBlock"] * 8
    assert any("SyncBatchNorm" in n and "reference forward" in n for n in report.notes), str(report)
    with torch.no_grad(), trace_kernels() as ran, torch.profiler.profile() as prof:
        actual = fused(x)
    assert_matches_reference(actual, expected, torch.float32, what="SyncBatchNorm resnet18, eval")
    # Folded: every conv ran a fused kernel, and no batch norm ran at all (ours or ATen's).
    assert len([c for c in ran if c.op == "conv"]) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert all(c.kernel != "reference" and c.op != "batch_norm" for c in ran), ran
    assert not [e.name for e in prof.events() if "batch_norm" in e.name]

    # Frozen-BN fine-tuning (eval mode with autograd): the differentiable fold, same result.
    x.requires_grad_(True)
    assert_matches_reference(fused(x), expected, torch.float32, what="SyncBatchNorm resnet18, eval with autograd")


def test_sync_batchnorm_resnet18_trains_through_its_own_forward():
    # Without a process group torch's SyncBatchNorm normalizes with local batch statistics
    # (F.batch_norm); the fused modules run their reference forward, which calls it: the same
    # outputs, gradients and running statistics as the original, bit for bit.
    model = _sync_resnet18().train()
    fused = resfused.fuse(model)
    assert len(fused.resfused_report.converted) == 9
    x = torch.randn(2, 3, 64, 64)
    x_ref, x_fused = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected = model(x_ref)
    with trace_kernels() as ran:
        actual = fused(x_fused)
    assert ran == [], ran  # no fused op: every module took its reference forward
    assert torch.equal(actual, expected)
    expected.square().sum().backward()
    actual.square().sum().backward()
    assert torch.equal(x_fused.grad, x_ref.grad)
    for a, b in zip(_bn_states(fused), _bn_states(model), strict=True):
        assert torch.equal(a, b)
    # After training, the same model folds in eval mode.
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_matches_reference(fused.eval()(x), _expected64(model.eval(), x), torch.float32, what="eval after train")


def test_sync_batchnorm_in_train_mode_synchronizes_through_torch(tmp_path):
    # With a process group initialized, torch's SyncBatchNorm takes its synchronizing path, which
    # refuses CPU tensors: the fused block reaches that same forward and raises the same error, and
    # in eval mode (no synchronization in torch either) it folds as before.
    import torch.distributed as dist

    block = randomize_bn(nn.SyncBatchNorm.convert_sync_batchnorm(reference.BasicBlock(8, 16, stride=2)))
    fused = resfused.fuse(block)
    assert type(fused) is resfused.BasicBlock and type(fused.bn1) is nn.SyncBatchNorm
    x = torch.randn(2, 8, 8, 8)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU") as original:
            block.train()(x)
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU") as ours:
            fused.train()(x)
        assert str(ours.value) == str(original.value)
        with torch.no_grad(), trace_kernels() as ran:
            actual = fused.eval()(x)
        assert ran and all(c.op == "conv" and c.kernel != "reference" for c in ran), ran
        assert_matches_reference(actual, _expected64(block.eval(), x), torch.float32, what="eval, group initialized")
    finally:
        dist.destroy_process_group()


def test_conv_bn_act_takes_a_sync_batchnorm_and_rejects_its_subclasses():
    conv, bn = nn.Conv2d(8, 16, 3, padding=1), randomize_bn(nn.SyncBatchNorm(16))
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU())
    fused = resfused.ConvBNAct(conv, bn)
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        assert_matches_reference(fused.eval()(x), _expected64(ref.eval(), x), torch.float32, what="ConvBNAct eval")
    y_ref, y = ref.train()(x), fused.train()(x)
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(_bn_states(fused), _bn_states(ref), strict=True))

    class _SyncBatchNormSubclass(nn.SyncBatchNorm):
        pass

    with pytest.raises(TypeError, match="'bn' is _SyncBatchNormSubclass, not nn.BatchNorm2d or nn.SyncBatchNorm"):
        resfused.ConvBNAct(nn.Conv2d(8, 16, 3), _SyncBatchNormSubclass(16))


# ---------------------------------------------------------------------- ResNet-D avg-down shortcut
def _timm_d_block(kind: str, stride: int) -> nn.Module:
    """A small timm ResNet block with the 'd' variants' shortcut: Sequential(AvgPool2d(2, stride,
    ceil_mode=True, count_include_pad=False) or Identity at stride 1, conv1x1, BN)."""
    timm_resnet = pytest.importorskip("timm.models.resnet")
    in_ch = 16
    cls, planes, kwargs = {
        "basic": (timm_resnet.BasicBlock, 32, {}),
        "bottleneck": (timm_resnet.Bottleneck, 8, {}),
        "resnext": (timm_resnet.Bottleneck, 16, {"cardinality": 4, "base_width": 16}),  # 4 channels per group
    }[kind]
    downsample = timm_resnet.downsample_avg(in_ch, planes * cls.expansion, 1, stride=stride)
    return randomize_bn(cls(in_ch, planes, stride=stride, downsample=downsample, **kwargs))


D_BLOCKS = [("bottleneck", 2), ("bottleneck", 1), ("basic", 2), ("resnext", 2)]


@pytest.mark.parametrize("mode", ["eval", "eval+autograd", "train"])
@pytest.mark.parametrize("hw", [(64, 64), (65, 63)], ids=["even", "odd"])
@pytest.mark.parametrize("kind, stride", D_BLOCKS, ids=[f"{k}-s{s}" for k, s in D_BLOCKS])
def test_avg_down_shortcut_block_matches_timm(kind, stride, hw, mode):
    # Odd sizes: ceil_mode's border windows hold 2 or 1 pixels and count_include_pad=False divides
    # by that count, which the fused shortcut gets by running the pool module itself.
    block = _timm_d_block(kind, stride).train(mode == "train")
    fused = resfused.fuse(block)
    expected_cls = {
        "basic": resfused.BasicBlock,
        "bottleneck": resfused.Bottleneck,
        "resnext": resfused.ResNeXtBottleneck,
    }
    assert type(fused) is expected_cls[kind]
    assert type(fused.downsample[0]) is nn.Conv2d and type(fused.downsample[1]) is nn.BatchNorm2d
    assert type(fused.downsample.pre_pool) is (nn.AvgPool2d if stride == 2 else type(None))  # Identity: no pool
    assert set(fused.state_dict()) == set(block.state_dict())  # downsample.0 (pool), .1 (conv), .2 (BN)
    x = torch.randn(2, 16, *hw)
    what = f"{kind} stride {stride} {hw} {mode}"
    ran = compare_step(fused, block, x, mode, what)
    convs = [c.kernel for c in ran if c.op in ("conv", "conv_train")]
    assert len(convs) == (3 if kind == "basic" else 4), ran  # the shortcut in one conv call, too
    if mode == "eval":
        assert "reference" not in convs and "library+tail" not in convs, ran
    if mode == "train":
        assert ("batch_norm", "native") in [c[:2] for c in ran], ran


def test_shortcuts_that_pool_otherwise_are_left_alone():
    timm_resnet = pytest.importorskip("timm.models.resnet")
    for downsample, reason in [
        (nn.Sequential(nn.MaxPool2d(2, 2), nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)), "0 is MaxPool2d"),
        (nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.AvgPool2d(2), nn.BatchNorm2d(32)), "1 is AvgPool2d"),
    ]:
        block = timm_resnet.BasicBlock(16, 32, stride=2, downsample=downsample)
        report = resfused.fuse(block).resfused_report
        assert report.converted == [] and reason in report.skipped[0].detail, str(report)
        assert "a fused shortcut pools only with an nn.AvgPool2d, first" in report.skipped[0].detail


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_shortcut_pool_with_other_parameters_runs_as_it_is(mode):
    # Not ResNet-D's 2x2 ceil-mode pool: a 3x3 stride-2 pool with padding that counts the padding.
    # The fused shortcut runs the pool module itself (never folds it into the conv), so this
    # converts and computes exactly what the original does, odd size included.
    timm_resnet = pytest.importorskip("timm.models.resnet")
    pool = nn.AvgPool2d(3, 2, padding=1, count_include_pad=True)
    downsample = nn.Sequential(pool, nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32))
    block = randomize_bn(timm_resnet.BasicBlock(16, 32, stride=2, downsample=downsample)).train(mode == "train")
    fused = resfused.fuse(block)
    assert type(fused) is resfused.BasicBlock and repr(fused.downsample.pre_pool) == repr(pool)  # a deep copy
    ran = compare_step(fused, block, torch.randn(2, 16, 15, 13), mode, f"3x3 pool shortcut {mode}")
    assert len([c for c in ran if c.op in ("conv", "conv_train")]) == 3, ran


# ---------------------------------------------------------------------- pre-activation bottleneck
def test_reference_preact_bottleneck_shapes_and_math():
    m = randomize_bn(reference.PreActBottleneck(32, 16, stride=2, groups=4)).eval()
    assert (m.conv1.kernel_size, m.conv2.kernel_size, m.conv3.kernel_size) == ((1, 1), (3, 3), (1, 1))
    assert m.conv2.stride == (2, 2) and m.conv2.groups == 4 and m.conv3.out_channels == 64
    assert [n for n, _ in m.named_children()] == ["bn1", "conv1", "bn2", "conv2", "bn3", "conv3", "downsample"]
    x = torch.randn(2, 32, 9, 9)
    with torch.no_grad():
        y = m(x)
        pre = torch.relu(m.bn1(x))  # the projection reads the pre-activated input
        out = m.conv3(torch.relu(m.bn3(m.conv2(torch.relu(m.bn2(m.conv1(pre)))))))
        assert y.shape == (2, 64, 5, 5) and torch.allclose(y, out + m.downsample(pre), atol=1e-5)
        assert (y < 0).any()  # no ReLU after the add
    identity = reference.PreActBottleneck(64, 16)
    assert identity.downsample is None and identity(x.new_ones(1, 64, 4, 4)).shape == (1, 64, 4, 4)


@pytest.mark.parametrize("args", [(64, 16, 1), (32, 16, 2, 4)], ids=["identity", "projection"])
def test_preact_bottleneck_eval_mode_gradients(args):
    # Frozen-BN fine-tuning: eval mode with autograd, gradients to the input, the convs and the BN
    # affine parameters (bn1 as a prologue, bn2 / bn3 folded) against float64.
    ref = randomize_bn(reference.PreActBottleneck(*args)).eval()
    fused = resfused.PreActBottleneck.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, args[0], 9, 9)
    g = torch.randn(_expected64(ref, x).shape)
    with trace_kernels() as ran:
        y, grads, buffers = forward_backward(fused, x, g)
    assert {c.kernel for c in ran if c.op == "conv"} == {"library+tail"}, ran
    y64, grads64, _ = forward_backward(copy.deepcopy(ref).double(), x.double(), g.double())
    assert_matches_reference(y, y64, torch.float32, what="eval output")
    for key, expected in grads64.items():
        assert_matches_reference(grads[key], expected, torch.float32, what=f"eval grad {key}")
    assert all(torch.equal(b, ref.state_dict()[k]) for k, b in buffers.items())  # running stats untouched


def test_preact_bottleneck_stage_writes_over_dead_inputs_only():
    model = randomize_bn(
        nn.Sequential(
            reference.PreActBottleneck(16, 8, stride=2),
            reference.PreActBottleneck(32, 8),
            reference.PreActBottleneck(32, 8),
        )
    ).eval()
    fused = resfused.fuse(model)
    assert type(fused) is resfused.ResidualStage and all(type(b) is resfused.PreActBottleneck for b in fused)
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.no_grad(), trace_kernels() as ran:
        actual = fused(x)
    assert torch.equal(x, before)  # the stage's own input is never written
    assert "onednn(into residual)" in [c.kernel for c in ran if c.op == "conv"], ran
    assert_matches_reference(actual, _expected64(model, x), torch.float32, what="PreActBottleneck stage")
