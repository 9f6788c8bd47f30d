"""resfused.fuse: converted models match the originals (float64 reference, docs/design.md, Numerics), the
report says exactly what was converted and what was left alone and why, the fused kernels ran."""

from __future__ import annotations

import copy
import subprocess
import sys

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


def _check_model(model: nn.Module, x: torch.Tensor, what: str):
    """fuse(model) in eval mode; assert §5 against the original in float64 and that every conv of
    the fused part ran a fused kernel (never the reference conv). Returns (fused, report, trace)."""
    randomize_bn(model).eval()
    expected = _expected64(model, x)
    fused = resfused.fuse(model)
    with torch.no_grad(), trace_kernels() as ran:
        actual = fused(x)
    assert_matches_reference(actual, expected, torch.float32, what=what)
    convs = [c.kernel for c in ran if c.op == "conv"]
    assert convs, f"{what}: no fused conv ran"
    assert all(c.kernel != "reference" for c in ran), f"{what}: {ran}"
    return fused, fused.resfused_report, convs


# ------------------------------------------------------------------------------ torchvision models
@pytest.mark.parametrize(
    "name, shape, n_blocks, fused_cls",
    [
        ("resnet18", (2, 3, 64, 64), 8, resfused.BasicBlock),
        ("resnet50", (1, 3, 64, 64), 16, resfused.Bottleneck),
        ("resnext50_32x4d", (1, 3, 64, 64), 16, resfused.ResNeXtBottleneck),
        ("wide_resnet50_2", (1, 3, 32, 32), 16, resfused.Bottleneck),
    ],
)
def test_torchvision_models_match_and_run_fused(name, shape, n_blocks, fused_cls):
    model = getattr(torchvision.models, name)(weights=None)
    fused, report, ran = _check_model(model, torch.randn(shape), name)
    blocks = [e for e in report.converted if e.source.endswith(("BasicBlock", "Bottleneck"))]
    assert len(blocks) == n_blocks and all(e.detail == f"resfused.{fused_cls.__name__}" for e in blocks)
    assert report.skipped == [], str(report)
    assert [e.path for e in report.converted if "stem" in e.source] == ["conv1+bn1+relu"]
    assert isinstance(fused.conv1, resfused.ConvBNAct) and isinstance(fused.bn1, nn.Identity)
    assert sum(isinstance(m, fused_cls) for m in fused.modules()) == n_blocks
    # Every conv of the network (stem, blocks, projections) went through one fused call.
    assert len(ran) == sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_a_nan_in_the_input_reaches_the_output_as_in_the_original():
    # oneDNN's ReLU maps NaN to 0 (runtime/finite.py): unchecked, the stem alone would turn a corrupted
    # image into plausible logits. Image 0 is clean and must stay on the fused path.
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    x = torch.randn(2, 3, 32, 32)
    x[1, 0, 5, 5] = float("nan")
    fused = resfused.fuse(model)
    with torch.no_grad():
        actual, expected = fused(x), _expected64(model, x)
        clean = fused(x[:1])
    assert actual[1].isnan().all() and not actual[0].isnan().any()
    assert_matches_reference(actual, expected, torch.float32, what="resnet18 with a NaN")
    assert_matches_reference(clean, expected[:1], torch.float32, what="resnet18, the clean image alone")


def _models_with_a_fused_stem():
    yield "torchvision resnet18", lambda: torchvision.models.resnet18(weights=None)
    yield "inside a Sequential", lambda: nn.Sequential(torchvision.models.resnet18(weights=None))
    timm = pytest.importorskip("timm")
    yield "timm resnet50d (deep stem)", lambda: timm.create_model("resnet50d", pretrained=False)


@pytest.mark.parametrize("what, make", list(_models_with_a_fused_stem()), ids=lambda v: v if isinstance(v, str) else "")
def test_checkpoints_move_both_ways_with_the_original_keys(what, make):
    model = make().eval()
    fused = resfused.fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict()), what  # the stem included, in order
    x = torch.randn(1, 3, 48, 48)
    # An original checkpoint loads into the fused model ...
    other = randomize_bn(make(), torch.Generator().manual_seed(7)).eval()
    fused.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_matches_reference(fused(x), _expected64(other, x), torch.float32, what=f"{what}: original -> fused")
    # ... and the fused model's checkpoint into the original.
    model.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert_matches_reference(model(x), _expected64(other, x), torch.float32, what=f"{what}: fused -> original")


def test_dilated_and_non_bn_models_are_left_alone_with_reasons():
    dilated = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    fused, report, _ = _check_model(dilated, torch.randn(1, 3, 64, 64), "dilated resnet50")
    skipped = {e.path: e.detail for e in report.skipped}
    # torchvision keeps dilation 1 in the first block of a dilated stage (stride 1 there instead of 2)
    # and dilates the rest: every dilated block is left alone, every other one converted.
    for path, module in dilated.named_modules():
        if isinstance(module, torchvision.models.resnet.Bottleneck):
            if module.conv2.dilation != (1, 1):
                assert "dilated" in skipped[path]
                assert type(fused.get_submodule(path)) is torchvision.models.resnet.Bottleneck
            else:
                assert path not in skipped and isinstance(fused.get_submodule(path), resfused.Bottleneck)
    assert skipped

    group_norm = torchvision.models.resnet18(weights=None, norm_layer=lambda c: nn.GroupNorm(4, c))
    fused = resfused.fuse(group_norm.eval())
    report = fused.resfused_report
    assert report.converted == [] and len(report.skipped) == 9  # 8 blocks + the stem
    assert all("GroupNorm, not nn.BatchNorm2d" in e.detail for e in report.skipped), str(report)
    assert "nothing convertible found" in str(report)


# ------------------------------------------------------------------------------------ timm models
def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.parametrize(
    "name, n_blocks, fused_cls",
    [("resnet18", 8, resfused.BasicBlock), ("resnext50_32x4d", 16, resfused.ResNeXtBottleneck)],
)
def test_timm_resnets_match(name, n_blocks, fused_cls):
    model = _timm(name)
    fused, report, ran = _check_model(model, torch.randn(1, 3, 64, 64), f"timm {name}")
    assert report.skipped == [], str(report)
    assert len(report.converted) == n_blocks + 1  # + the stem
    assert [e.detail for e in report.converted if "stem" not in e.source] == [
        f"resfused.{fused_cls.__name__}"
    ] * n_blocks
    assert len(ran) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    # Every key is timm's own (act/aa/drop_block hold no state), the stem's included.
    assert list(fused.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize(
    "name, fused_cls", [("resnet50d", resfused.Bottleneck), ("resnext50d_32x4d", resfused.ResNeXtBottleneck)]
)
def test_timm_d_variants_convert_every_block_avg_down_shortcuts_included(name, fused_cls):
    # Deep stem (three conv-BN-ReLU) and avg-pool shortcuts: layer1.0's pool is Identity (stride 1),
    # layer2-4.0 pool (2x2, ceil_mode, count_include_pad=False) before the 1x1 conv. At 65x65 the
    # stages see 17x17, 9x9 and 5x5 inputs: every pool has ceil_mode's partial border windows.
    model = _timm(name)
    fused, report, ran = _check_model(model, torch.randn(1, 3, 64, 64), f"timm {name}")
    assert report.skipped == [], str(report)
    assert [e.detail for e in report.converted if "stem" not in e.source] == [f"resfused.{fused_cls.__name__}"] * 16
    assert len(ran) == sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert [type(fused.get_submodule(f"layer{i}.0").downsample.pre_pool) for i in (1, 2, 3, 4)] == [
        type(None),
        nn.AvgPool2d,
        nn.AvgPool2d,
        nn.AvgPool2d,
    ]
    # Every key is timm's own (downsample.0 the pool, .1 the conv, .2 the BN), the deep stem's included.
    assert list(fused.state_dict()) == list(model.state_dict())
    assert sum(isinstance(m, resfused.ConvBNAct) for m in fused.conv1) == 3
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert_matches_reference(fused(x), _expected64(model, x), torch.float32, what=f"timm {name} at 65x65")


def test_timm_blocks_with_extras_are_left_alone():
    # SE / ECA blocks convert (tests/test_se_regnet.py); other attention modules do not.
    cbam = resfused.fuse(_timm("resnet18", block_args=dict(attn_layer="cbam")).eval()).resfused_report
    assert len(cbam.skipped) == 8 and all("se=CbamModule" in e.detail for e in cbam.skipped), str(cbam)

    silu = resfused.fuse(_timm("resnet18", act_layer="silu").eval()).resfused_report
    assert silu.converted == [] and all("SiLU, not ReLU" in e.detail for e in silu.skipped), str(silu)

    # Stochastic depth: the first block has rate 0 (drop_path None) and converts, the rest not.
    dp = resfused.fuse(_timm("resnet18", drop_path_rate=0.1).eval()).resfused_report
    assert [e.path for e in dp.converted] == ["conv1+bn1+act1", "layer1.0"], str(dp)
    assert len(dp.skipped) == 7 and all("drop_path" in e.detail for e in dp.skipped)

    db = resfused.fuse(_timm("resnet18", drop_block_rate=0.1).eval()).resfused_report
    assert {e.path for e in db.skipped} == {"layer3.0", "layer3.1", "layer4.0", "layer4.1"}
    assert all("drop_block is DropBlock2d" in e.detail for e in db.skipped), str(db)

    block = _timm("resnet18").layer1[0]
    block.aa = nn.AvgPool2d(1)
    assert "aa (anti-aliasing) is AvgPool2d" in resfused.fuse(block).resfused_report.skipped[0].detail


def test_timm_resnetv2_preact_basic_matches_in_eval_and_train():
    model = _timm("resnetv2_18")
    fused, report, ran = _check_model(model, torch.randn(2, 3, 64, 64), "timm resnetv2_18")
    assert len(report.converted) == 8 and report.skipped == [], str(report)
    assert all(isinstance(b, resfused.PreActBasicBlock) for s in fused.stages for b in s.blocks)
    assert set(fused.state_dict()) == set(model.state_dict())  # timm's norm1/norm2/downsample.conv keys
    # One forward in train mode (batch statistics, fused BN kernels) against timm in float64.
    # 64x64, not smaller: at 32x32 the last stage is 1x1, BN over 2 values is ill-conditioned
    # and even eager float32 misses the float64 result by 10x the tolerance.
    x = torch.randn(2, 3, 64, 64)
    with resfused.ops.trace_kernels() as ran_train:
        actual = fused.train()(x)
    assert ("batch_norm", "native") in [c[:2] for c in ran_train]
    expected = copy.deepcopy(model).double().train()(x.double())
    assert_matches_reference(actual, expected, torch.float32, what="resnetv2_18 train mode")


@pytest.mark.parametrize("name", ["resnetv2_50", "resnetv2_50d"])
def test_timm_resnetv2_preact_bottlenecks_match_in_eval_and_train(name):
    # PreActBottleneck with BatchNormAct2d norms; the projection is a bare 1x1 conv on the
    # pre-activated input (resnetv2_50d: avg-pool first, then the conv).
    model = _timm(name)
    fused, report, ran = _check_model(model, torch.randn(2, 3, 64, 64), f"timm {name}")
    assert report.skipped == [] and len(report.converted) == 16, str(report)
    assert all(e.detail == "resfused.TimmPreActBottleneck" for e in report.converted), str(report)
    assert all(isinstance(b, resfused.PreActBottleneck) for s in fused.stages for b in s.blocks)
    assert len(ran) == 3 * 16 + 4  # three convs per block, four projections
    assert set(fused.state_dict()) == set(model.state_dict())  # timm's norm1-3 / downsample.conv keys
    # One forward in train mode (batch statistics, fused BN kernels) against timm in float64: the
    # output and every running statistic. Gradients are checked per block (tests/cases.py in
    # test_training.py): through 16 train-mode blocks even eager float32 misses the float64
    # gradients by more than 1e-2 of their scale, so a whole-model gradient check says nothing.
    x = torch.randn(2, 3, 64, 64)
    with resfused.ops.trace_kernels() as ran_train:
        actual = fused.train()(x)
    assert ("batch_norm", "native") in [c[:2] for c in ran_train]
    reference64 = copy.deepcopy(model).double().train()
    assert_matches_reference(actual, reference64(x.double()), torch.float32, what=f"{name} train mode")
    buffers64 = dict(reference64.named_buffers())
    for key, b in fused.named_buffers():
        assert_matches_reference(b.double(), buffers64[key], torch.float32, what=f"{name} buffer {key}")


def test_timm_bit_models_are_left_alone_with_the_reason():
    # BiT: GroupNormAct norms and weight-standardized StdConv2d convs, neither of which folds.
    model = _timm("resnetv2_50x1_bit").eval()
    fused = resfused.fuse(model)
    report = fused.resfused_report
    assert report.converted == [] and len(report.skipped) == 16
    assert all("norm1 is GroupNormAct, not BatchNormAct2d" in e.detail for e in report.skipped), str(report)
    assert str(report).startswith("resfused.fuse(ResNetV2): nothing convertible found")
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    # With BatchNorm the weight-standardized convs still keep it unconverted.
    bn_bit = resfused.fuse(_timm("resnetv2_50x1_bit", norm_layer="batchnorm").eval()).resfused_report
    assert bn_bit.converted == [] and all("conv1 is StdConv2d" in e.detail for e in bn_bit.skipped), str(bn_bit)


# -------------------------------------------------------------------------- reference blocks, API
@pytest.mark.parametrize(
    "block, fused_cls",
    [
        (reference.BasicBlock(16, 16), resfused.BasicBlock),
        (reference.BasicBlock(16, 32, stride=2), resfused.BasicBlock),
        (reference.PreActBasicBlock(16, 16), resfused.PreActBasicBlock),
        (reference.PreActBasicBlock(16, 32, stride=2), resfused.PreActBasicBlock),
        (reference.Bottleneck(64, 16), resfused.Bottleneck),
        (reference.ResNeXtBottleneck(64, 32, stride=2, groups=8, base_width=4), resfused.ResNeXtBottleneck),
        (reference.PreActBottleneck(64, 16), resfused.PreActBottleneck),
        (reference.PreActBottleneck(32, 16, stride=2, groups=4), resfused.PreActBottleneck),
    ],
    ids=["basic", "basic-proj", "preact", "preact-proj", "bottleneck", "resnext-proj", "preact-bn", "preact-bn-proj"],
)
def test_reference_blocks_nested_and_as_the_model(block, fused_cls):
    x = torch.randn(2, block.conv1.in_channels, 9, 11)
    model = nn.Sequential(nn.Identity(), block)
    fused, report, _ = _check_model(model, x, fused_cls.__name__)
    assert type(fused[1]) is fused_cls and [(e.path, e.detail) for e in report.converted] == [
        ("1", f"resfused.{fused_cls.__name__}")
    ]
    alone = resfused.fuse(block)  # the model is the block: the result is a new fused module
    assert type(alone) is fused_cls and type(block) is not fused_cls
    with torch.no_grad():
        assert_matches_reference(alone(x), _expected64(block, x), torch.float32, what="root block")


def test_inplace_false_leaves_the_original_untouched_and_inplace_true_edits_it():
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    before_types = [type(m) for m in model.modules()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = resfused.fuse(model)
    assert fused is not model and not hasattr(model, "resfused_report")
    assert [type(m) for m in model.modules()] == before_types
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert not any(p1.data_ptr() == p2.data_ptr() for p1, p2 in zip(model.parameters(), fused.parameters()))

    same = resfused.fuse(model, inplace=True)
    assert same is model and isinstance(model.layer1[0], resfused.BasicBlock)
    assert model.resfused_report.converted


def test_nothing_convertible_is_returned_unchanged_with_a_summary(capsys):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(1, 3, 8, 8)
    model(x)
    fused = resfused.fuse(model.eval(), verbose=True)
    printed = capsys.readouterr().out
    assert "nothing convertible found" in printed and printed.strip() == str(fused.resfused_report)
    assert fused.resfused_report.entries == []
    assert [type(m) for m in fused.modules()] == [type(m) for m in model.modules()]
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


def test_already_fused_hooks_and_bad_input():
    fused = resfused.fuse(torchvision.models.resnet18(weights=None).eval())
    again = resfused.fuse(fused).resfused_report
    assert again.converted == [] and len(again.skipped) == 9
    assert all(e.detail == "already a resfused fused block" for e in again.skipped)

    model = torchvision.models.resnet18(weights=None).eval()
    model.layer1[0].register_forward_hook(lambda *args: None)
    model.layer2[1].bn1.register_forward_pre_hook(lambda *args: None)
    report = resfused.fuse(model).resfused_report
    assert [e.path for e in report.skipped] == ["layer1.0", "layer2.1"], str(report)
    assert all("forward hooks" in e.detail for e in report.skipped)

    with pytest.raises(TypeError, match="'model' must be a torch.nn.Module, got builtins.str"):
        resfused.fuse("resnet50")
    with pytest.raises(TypeError, match="'inplace' must be a bool"):
        resfused.fuse(model, inplace="yes")


def test_training_mode_is_noted():
    report = resfused.fuse(torchvision.models.resnet18(weights=None)).resfused_report
    assert any("training mode" in n for n in report.notes)


def test_threads_sharing_a_fused_model_each_get_their_own_result():
    # Serving: one fused model called from several threads at once, one of them with a NaN input.
    # Folded and packed weights and the buffer cache are shared
    # state; every thread must still get exactly the original model's result.
    import concurrent.futures

    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    fused = resfused.fuse(model)
    inputs = [torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 3, 1, 2, 3)]
    inputs[1][1, 0, 5, 5] = float("nan")
    expected = [_expected64(model, x) for x in inputs]

    def run(x):
        with torch.inference_mode():
            return [fused(x.contiguous(memory_format=torch.channels_last)) for _ in range(3)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(run, inputs))
    for i, (ys, e) in enumerate(zip(results, expected)):
        for y in ys:
            assert_matches_reference(y, e, torch.float32, what=f"thread input {i}")
    assert results[1][0][1].isnan().all() and not results[1][0][0].isnan().any()


def test_a_stem_with_hooks_is_left_alone_and_the_hook_still_runs():
    """Before, fuse() folded bn1 into conv1 and replaced it with Identity: the hook vanished and a
    hook that changes bn1's output gave a 63x relative error."""
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    model.bn1.register_forward_hook(lambda module, args, out: out * 0.5)
    x = torch.randn(2, 3, 64, 64)
    expected = _expected64(model, x)
    fused = resfused.fuse(model)
    stem = [e for e in fused.resfused_report.skipped if e.path == "conv1+bn1+relu"]
    assert stem and "forward hooks" in stem[0].detail, str(fused.resfused_report)
    assert type(fused.conv1) is nn.Conv2d and type(fused.bn1) is nn.BatchNorm2d
    with torch.no_grad():
        assert_matches_reference(fused(x), expected, torch.float32, what="stem with a hook")


def test_fusing_a_fused_model_says_it_is_already_fused():
    fused = resfused.fuse(torchvision.models.resnet18(weights=None).eval())
    head = str(resfused.fuse(fused).resfused_report).splitlines()[0]
    assert "nothing left to convert (9 already fused)" in head, head


def test_a_fused_model_that_has_run_saves_loads_and_copies(tmp_path):
    """Folded and packed weights are caches: deepcopy and torch.save drop them, and the copy or the
    model loaded in a new process rebuilds them (the stem's key hooks pickle too)."""
    model = randomize_bn(torchvision.models.resnet18(weights=None)).eval()
    fused = resfused.fuse(model)
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = fused(x)  # the caches are populated now
        torch.testing.assert_close(copy.deepcopy(fused)(x), y, rtol=0, atol=0)
    path = tmp_path / "fused.pt"
    torch.save({"model": fused, "x": x, "y": y.clone()}, path)
    code = (
        "import sys, torch, resfused\n"
        "saved = torch.load(sys.argv[1], weights_only=False)\n"
        "with torch.inference_mode():\n"
        "    torch.testing.assert_close(saved['model'](saved['x']), saved['y'], rtol=0, atol=0)\n"
        "print(type(saved['model'].layer1).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "ResidualStage"
