"""The rest of the residual family (issue 15): SyncBatchNorm models, ResNet-D avg-down shortcuts and
the pre-activation bottleneck, each against its original in float64 (docs/design.md, Numerics)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import resfused
from resfused import reference
from resfused.ops import trace_kernels
from tests.harness import assert_matches_reference, randomize_bn

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
