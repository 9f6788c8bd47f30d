"""Squeeze-excitation blocks: torchvision RegNet X / Y (ResBottleneckBlock with an optional
SE between the grouped 3x3 and the last 1x1, SimpleStemIN stem), against the float64 originals
(docs/design.md, Numerics)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import resfused
from resfused.ops import trace_kernels
from tests.harness import assert_matches_reference, compare_step, randomize_bn

torchvision = pytest.importorskip("torchvision")
regnet = pytest.importorskip("torchvision.models.regnet")


def _expected64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def _se_convs(model: nn.Module) -> int:
    return sum(2 for m in model.modules() if type(m).__name__ == "SqueezeExcitation")


# ------------------------------------------------------------------------------------ whole models
REGNETS = [("regnet_x_400mf", 22, False), ("regnet_y_400mf", 16, True)]


@pytest.mark.parametrize("hw", [(64, 64), (65, 63)], ids=["64x64", "odd"])
@pytest.mark.parametrize("name, n_blocks, has_se", REGNETS, ids=[r[0] for r in REGNETS])
def test_torchvision_regnet_converts_every_block_and_the_stem(name, n_blocks, has_se, hw):
    model = randomize_bn(getattr(torchvision.models, name)(weights=None)).eval()
    x = torch.randn(2, 3, *hw)
    expected = _expected64(model, x)
    fused = resfused.fuse(model)
    report = fused.resfused_report
    assert str(report).startswith(f"resfused.fuse(RegNet): converted {n_blocks + 1}, left alone 0"), str(report)
    assert report.skipped == []
    assert [e.path for e in report.converted if e.source.endswith("SimpleStemIN")] == ["stem"]
    blocks = [e for e in report.converted if e.source.endswith("ResBottleneckBlock")]
    assert len(blocks) == n_blocks and all(e.detail == "resfused.RegNetBottleneck" for e in blocks)
    assert (_se_convs(model) > 0) == has_se
    # The fused modules hold the original children: every state_dict key is unchanged.
    assert set(fused.state_dict()) == set(model.state_dict())
    assert isinstance(fused.stem, resfused.ConvBNAct)
    assert all(isinstance(s, resfused.ResidualStage) for s in fused.trunk_output if len(s) > 1)
    with torch.no_grad(), trace_kernels() as ran:
        actual = fused(x)
    assert_matches_reference(actual, expected, torch.float32, what=f"{name} {hw} eval")
    # Folded: every conv but the SE's ran one fused kernel call, and no batch norm ran.
    convs = [c.kernel for c in ran if c.op == "conv"]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) - _se_convs(model), ran
    assert "reference" not in convs and "library+tail" not in convs, ran
    assert not [c for c in ran if c.op == "batch_norm"], ran


# The benchmark runs the 800MF models: the same blocks at other widths and group widths.
REGNETS_800MF = [("regnet_x_800mf", 16, False), ("regnet_y_800mf", 14, True)]


@pytest.mark.parametrize("name, n_blocks, has_se", REGNETS_800MF, ids=[r[0] for r in REGNETS_800MF])
def test_torchvision_regnet_800mf_converts_every_block(name, n_blocks, has_se):
    model = randomize_bn(getattr(torchvision.models, name)(weights=None)).eval()
    fused = resfused.fuse(model)
    report = fused.resfused_report
    assert str(report).startswith(f"resfused.fuse(RegNet): converted {n_blocks + 1}, left alone 0"), str(report)
    assert [e.detail for e in report.converted if e.source.endswith("ResBottleneckBlock")] == [
        "resfused.RegNetBottleneck"
    ] * n_blocks
    assert (_se_convs(model) > 0) == has_se
    x = torch.randn(2, 3, 65, 63)
    with torch.no_grad(), trace_kernels() as ran:
        actual = fused(x)
    assert_matches_reference(actual, _expected64(model, x), torch.float32, what=f"{name} eval")
    assert not [c for c in ran if c.op == "batch_norm" or c.kernel in ("reference", "library+tail")], ran


@pytest.mark.parametrize("name, n_blocks, has_se", REGNETS, ids=[r[0] for r in REGNETS])
def test_torchvision_regnet_trains_like_the_original(name, n_blocks, has_se):
    # One train-mode forward (batch statistics, fused BN kernels) against the original in float64:
    # the output and every running statistic. Gradients are checked per block below (through 16+
    # train-mode blocks even eager float32 misses float64 gradients by more than the tolerance).
    model = randomize_bn(getattr(torchvision.models, name)(weights=None)).train()
    fused = resfused.fuse(model)
    assert len(fused.resfused_report.converted) == n_blocks + 1
    x = torch.randn(4, 3, 65, 63)
    with trace_kernels() as ran:
        actual = fused(x)
    assert ("batch_norm", "native") in [c[:2] for c in ran], ran
    reference64 = copy.deepcopy(model).double()
    assert_matches_reference(actual, reference64(x.double()), torch.float32, what=f"{name} train mode")
    buffers64 = dict(reference64.named_buffers())
    for key, b in fused.named_buffers():
        assert_matches_reference(b.double(), buffers64[key], torch.float32, what=f"{name} buffer {key}")


# ------------------------------------------------------------------------------------ single blocks
def _block(width_in, width_out, stride, group_width, se_ratio):
    block = regnet.ResBottleneckBlock(
        width_in, width_out, stride, nn.BatchNorm2d, nn.ReLU, group_width, bottleneck_multiplier=1.0, se_ratio=se_ratio
    )
    return randomize_bn(block)


BLOCKS = [
    (32, 32, 1, 8, None),  # identity, 8 channels per group (RegNetX-400MF)
    (32, 64, 2, 16, None),  # projection, 16 per group (oneDNN where it measured faster)
    (32, 32, 1, 8, 0.25),  # identity with SE (RegNetY)
    (16, 48, 2, 24, 0.25),  # projection with SE, 24 channels per group
]


@pytest.mark.parametrize("mode", ["eval", "eval+autograd", "train"])
@pytest.mark.parametrize("hw", [(16, 16), (15, 13)], ids=["even", "odd"])
@pytest.mark.parametrize("args", BLOCKS, ids=[f"{a[0]}-{a[1]}-s{a[2]}-g{a[3]}-se{a[4]}" for a in BLOCKS])
def test_regnet_block_matches_in_eval_and_train(args, hw, mode):
    block = _block(*args).train(mode == "train")
    fused = resfused.fuse(block)
    assert type(fused) is resfused.RegNetBottleneck, str(fused.resfused_report)
    assert set(fused.state_dict()) == set(block.state_dict())
    x = torch.randn(3, args[0], *hw)
    what = f"{args} {hw} {mode}"
    ran = compare_step(fused, block, x, mode, what)
    convs = [c.kernel for c in ran if c.op in ("conv", "conv_train")]
    assert len(convs) == 3 + (block.proj is not None), ran
    if mode == "eval":
        assert "reference" not in convs and "library+tail" not in convs, ran
        assert not [c for c in ran if c.op == "batch_norm"], ran
    if mode == "train":
        assert ("batch_norm", "native") in [c[:2] for c in ran], ran


def _replays_match_the_reference(fused, block, x, what):
    """Three eval calls (the second and third replay the plan) against the float64 original; the
    plan replays the program (the gate makes and scales tensors outside the recorded conv calls,
    so the plan has no flow of its own: runners.Plan)."""
    expected = _expected64(block, x)
    with torch.no_grad():
        for call in ("first", "replayed", "replayed again"):
            assert_matches_reference(fused(x), expected, torch.float32, what=f"{what}, {call} call")
    (plan,) = fused._derived.plans.values()
    assert plan.flow is None


def test_regnet_se_block_replays_its_gate():
    block = _block(16, 48, 2, 24, 0.25).eval()
    _replays_match_the_reference(resfused.fuse(block), block, torch.randn(2, 16, 9, 9), "RegNetY block")


def test_regnet_block_with_a_nan_gives_the_reference_result():
    block = _block(32, 32, 1, 8, 0.25).eval()
    x = torch.randn(2, 32, 9, 9)
    x[1, 3, 4, 4] = float("nan")
    with torch.no_grad():
        y = resfused.fuse(block)(x)
    assert y[1].isnan().any() and not y[0].isnan().any()
    assert_matches_reference(y, _expected64(block, x), torch.float32, what="NaN input")


def test_regnet_lookalikes_are_left_alone_with_the_reason():
    cases = []
    b = _block(32, 32, 1, 8, 0.25)
    b.f.se.activation = nn.SiLU()
    cases.append((b, "f.se.activation is SiLU, not ReLU"))
    b = _block(32, 32, 1, 8, 0.25)
    b.f.se.scale_activation = nn.Hardsigmoid()
    cases.append((b, "f.se.scale_activation is Hardsigmoid, not Sigmoid"))
    b = _block(32, 32, 1, 8, 0.25)
    b.f.se.avgpool = nn.AdaptiveMaxPool2d(1)
    cases.append((b, "f.se.avgpool is AdaptiveMaxPool2d(output_size=1), not a global average pool"))
    b = _block(32, 32, 1, 8, 0.25)
    b.f.se.avgpool = nn.AdaptiveAvgPool2d(2)
    cases.append((b, "f.se.avgpool is AdaptiveAvgPool2d(output_size=2), not a global average pool"))
    b = _block(32, 32, 1, 8, None)
    b.f.b[2] = nn.SiLU()
    cases.append((b, "f.b.2 is SiLU, not ReLU"))
    b = _block(32, 64, 2, 8, None)
    b.proj = torchvision.ops.Conv2dNormActivation(32, 64, 1, 2, activation_layer=nn.ReLU)
    cases.append((b, "proj is (Conv2d, BatchNorm2d, ReLU), not conv, BN"))
    b = _block(32, 32, 1, 8, None)
    b.f.c[1] = nn.GroupNorm(4, 32)
    cases.append((b, "f.c.1 is GroupNorm, not nn.BatchNorm2d or nn.SyncBatchNorm"))
    b = _block(32, 32, 1, 8, None)
    b.f.add_module("drop", nn.Dropout())
    cases.append((b, "not BottleneckTransform(a, b, [se], c)"))
    b = _block(32, 32, 1, 8, None)
    b.activation = nn.SiLU()
    cases.append((b, "activation is SiLU, not ReLU"))
    for block, reason in cases:
        fused = resfused.fuse(block)
        report = fused.resfused_report
        assert type(fused) is regnet.ResBottleneckBlock and report.converted == [], str(report)
        assert reason in report.skipped[0].detail, str(report)

    # A model whose activations are all SiLU: nothing converts, each block and the stem say why.
    model = torchvision.models.regnet.RegNet(
        regnet.BlockParams.from_init_params(depth=4, w_0=24, w_a=24.48, w_m=2.54, group_width=8, se_ratio=0.25),
        activation=nn.SiLU,
    )
    report = resfused.fuse(model).resfused_report
    assert report.converted == [] and len(report.skipped) == 5, str(report)
    assert "stem.2 is SiLU, not ReLU" in report.skipped[0].detail
    assert all("f.a.2 is SiLU, not ReLU" in e.detail for e in report.skipped[1:]), str(report)


# ------------------------------------------------------------------------ the SE tail op (compiled)
def _tail_inputs(dtype, shape, layout, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    y, r = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    gate = torch.rand(shape[:2], generator=g).to(dtype)
    if layout == "channels_last":
        y, r = y.contiguous(memory_format=torch.channels_last), r.contiguous(memory_format=torch.channels_last)
    return [t.requires_grad_(requires_grad) for t in (y, gate, r)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 24, 7, 5), (3, 67, 4, 9), (1, 8, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scale_add_relu_matches_the_reference(dtype, shape, layout):
    y, gate, r = _tail_inputs(dtype, shape, layout)
    y[0, 1, 0, 0], r[-1, -1, -1, -1] = float("nan"), float("inf")
    with trace_kernels() as ran:
        out = resfused.ops.se.scale_add_relu(y, gate, r)
    assert [c[:2] for c in ran] == [("scale_add_relu", "native")], ran
    expected = torch.relu(y.double() * gate.double()[:, :, None, None] + r.double())
    eager = torch.relu(y * gate[:, :, None, None] + r)
    assert_matches_reference(out, expected, dtype, eager if dtype == torch.bfloat16 else None, what=f"{shape}")
    assert out.is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_scale_add_relu_gradcheck_and_opcheck(layout):
    args = _tail_inputs(torch.float64, (2, 5, 3, 4), layout, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.resfused.scale_add_relu, args)
    torch.library.opcheck(torch.ops.resfused.scale_add_relu, _tail_inputs(torch.float32, (2, 16, 5, 3), layout))
    torch.library.opcheck(torch.ops.resfused.scale_add_relu, _tail_inputs(torch.float32, (2, 16, 5, 3), layout, True))


def test_scale_add_relu_bad_input_names_the_argument():
    y, gate, r = _tail_inputs(torch.float32, (2, 8, 3, 3), "nchw")
    sar = resfused.ops.se.scale_add_relu
    with pytest.raises(ValueError, match=r"'gate' must have shape \(2, 8\)"):
        sar(y, gate[:, :4], r)
    with pytest.raises(ValueError, match="'residual' must have the shape of 'y'"):
        sar(y, gate, r[:, :4])
    with pytest.raises(TypeError, match="'gate' has dtype torch.float64"):
        sar(y, gate.double(), r)
    with pytest.raises(RuntimeError, match=r"'gate' must have shape \[2, 8\]"):
        torch.ops.resfused.scale_add_relu(y, gate[:1], r)


# ------------------------------------------------------------------- timm SE-ResNet / ECA-ResNet
def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kwargs)


TIMM_SE = [
    ("seresnet50", "resfused.SEBottleneck"),
    ("seresnext50_32x4d", "resfused.SEBottleneck"),
    ("ecaresnet50d", "resfused.SEBottleneck"),
    ("resnetrs50", "resfused.SEBottleneck"),
]


@pytest.mark.parametrize("name, detail", TIMM_SE, ids=[t[0] for t in TIMM_SE])
def test_timm_se_resnets_convert_every_block_and_match_in_eval_and_train(name, detail):
    model = randomize_bn(_timm(name)).eval()
    fused = resfused.fuse(model)
    report = fused.resfused_report
    assert str(report).startswith("resfused.fuse(ResNet): converted 17, left alone 0"), str(report)
    assert [e.detail for e in report.converted if "stem" not in e.source] == [detail] * 16
    assert list(fused.state_dict()) == list(model.state_dict())  # every key kept, the stem's included
    for hw in [(64, 64), (65, 63)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad(), trace_kernels() as ran:
            actual = fused(x)
        assert_matches_reference(actual, _expected64(model, x), torch.float32, what=f"{name} {hw} eval")
        assert [c.kernel for c in ran if c.op == "scale_add_relu"] == ["native"] * 16, ran
        assert not [c for c in ran if c.op == "batch_norm" or c.kernel == "reference"], ran
    # One train-mode forward against the original in float64: the output and the running statistics.
    model.train(), fused.train()
    x = torch.randn(4, 3, 65, 63)
    with trace_kernels() as ran:
        actual = fused(x)
    assert ("batch_norm", "native") in [c[:2] for c in ran] and ("scale_add_relu", "native") in [c[:2] for c in ran]
    reference64 = copy.deepcopy(model).double()
    assert_matches_reference(actual, reference64(x.double()), torch.float32, what=f"{name} train mode")
    buffers64 = {k: b for k, b in reference64.state_dict().items() if k in dict(reference64.named_buffers())}
    buffers = {k: b for k, b in fused.state_dict().items() if k in buffers64}  # the state_dict keeps the keys
    assert len(buffers) == len(buffers64) > 16 * 3 * 3
    for key, b in buffers.items():
        assert_matches_reference(b.double(), buffers64[key], torch.float32, what=f"{name} buffer {key}")


def _timm_se_block(kind: str, attn: str):
    timm_resnet = pytest.importorskip("timm.models.resnet")
    from timm.layers import get_attn

    cls, planes, kwargs = {
        "basic": (timm_resnet.BasicBlock, 32, {}),
        "bottleneck": (timm_resnet.Bottleneck, 8, {}),
        "resnext": (timm_resnet.Bottleneck, 16, {"cardinality": 4, "base_width": 16}),
    }[kind]
    downsample = timm_resnet.downsample_avg(16, planes * cls.expansion, 1, stride=2)
    return randomize_bn(cls(16, planes, stride=2, downsample=downsample, attn_layer=get_attn(attn), **kwargs))


SE_BLOCKS = [("basic", "se"), ("bottleneck", "se"), ("resnext", "se"), ("bottleneck", "eca"), ("basic", "eca")]


@pytest.mark.parametrize("mode", ["eval", "eval+autograd", "train"])
@pytest.mark.parametrize("kind, attn", SE_BLOCKS, ids=[f"{k}-{a}" for k, a in SE_BLOCKS])
def test_timm_se_block_matches_with_gradients(kind, attn, mode):
    block = _timm_se_block(kind, attn).train(mode == "train")
    fused = resfused.fuse(block)
    assert type(fused) is (resfused.SEBasicBlock if kind == "basic" else resfused.SEBottleneck)
    assert set(fused.state_dict()) == set(block.state_dict())
    x = torch.randn(3, 16, 15, 13)
    what = f"{kind} {attn} {mode}"
    ran = compare_step(fused, block, x, mode, what)
    assert [c.kernel for c in ran if c.op == "scale_add_relu"] == ["native"], ran


@pytest.mark.parametrize("kind, attn", [("bottleneck", "se"), ("basic", "eca")])
def test_timm_se_block_replays_its_gate(kind, attn):
    block = _timm_se_block(kind, attn).eval()
    _replays_match_the_reference(resfused.fuse(block), block, torch.randn(2, 16, 9, 9), f"{kind} {attn}")


def test_timm_gates_that_compute_otherwise_are_left_alone():
    from timm.layers import EcaModule, EffectiveSEModule, SEModule

    cases = [
        (SEModule(32, act_layer=nn.SiLU), "se.act is SiLU, not ReLU"),
        (SEModule(32, gate_layer="hard_sigmoid"), "se.gate is Hardsigmoid, not Sigmoid"),
        (SEModule(32, add_maxpool=True), "se adds a global max pool"),
        (SEModule(32, norm_layer=nn.BatchNorm2d), "se.bn is BatchNorm2d (the fused block has none)"),
        (EcaModule(32, use_mlp=True), "se is an MLP ECA (use_mlp=True)"),
        (EffectiveSEModule(32), "se=EffectiveSEModule (SEModule and EcaModule are fused)"),
    ]
    for se, reason in cases:
        block = _timm_se_block("basic", "se")
        block.se = se
        report = resfused.fuse(block).resfused_report
        assert report.converted == [] and reason in report.skipped[0].detail, str(report)


# ------------------------------------------------------------------------ timm legacy SENet blocks
LEGACY = [("legacy_seresnext26_32x4d", 8), ("legacy_seresnet50", 16)]


@pytest.mark.parametrize("name, n_blocks", LEGACY, ids=[n for n, _ in LEGACY])
def test_timm_legacy_se_bottlenecks_convert_and_match_in_eval_and_train(name, n_blocks):
    # timm.models.senet's own SEModule (fc1 / fc2 1x1 convs with bias, ReLU, sigmoid, gating bn3's
    # output) computes se_gate's math. The stem (layer0) is a plain Sequential left as it is.
    # drop_rate=0: SENet's head otherwise drops out (0.2) in train mode, at random.
    model = randomize_bn(_timm(name, drop_rate=0.0)).eval()
    fused = resfused.fuse(model)
    report = fused.resfused_report
    assert str(report).startswith(f"resfused.fuse(SENet): converted {n_blocks}, left alone 0"), str(report)
    assert [e.detail for e in report.converted] == ["resfused.TimmLegacySEBottleneck"] * n_blocks
    assert list(fused.state_dict()) == list(model.state_dict())  # se_module.fc1 ... keys kept
    for hw in [(64, 64), (65, 63)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad(), trace_kernels() as ran:
            actual = fused(x)
        assert_matches_reference(actual, _expected64(model, x), torch.float32, what=f"{name} {hw} eval")
        assert [c.kernel for c in ran if c.op == "scale_add_relu"] == ["native"] * n_blocks, ran
        assert not [c for c in ran if c.op == "batch_norm" or c.kernel == "reference"], ran
    model.train(), fused.train()
    x = torch.randn(4, 3, 65, 63)
    with trace_kernels() as ran:
        actual = fused(x)
    assert ("batch_norm", "native") in [c[:2] for c in ran], ran
    assert_matches_reference(actual, copy.deepcopy(model).double()(x.double()), torch.float32, what=f"{name} train")


def _legacy_block(kind: str):
    senet = pytest.importorskip("timm.models.senet")
    cls, planes, groups = {
        "seresnet": (senet.SEResNetBottleneck, 8, 1),  # stride on conv1 (caffe style)
        "seresnext": (senet.SEResNeXtBottleneck, 16, 4),  # 4 channels per group
        "senet154": (senet.SEBottleneck, 8, 4),
        "basic": (senet.SEResNetBlock, 32, 1),
    }[kind]
    out = planes * cls.expansion
    downsample = nn.Sequential(nn.Conv2d(16, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
    return randomize_bn(cls(16, planes, groups, reduction=4, stride=2, downsample=downsample))


@pytest.mark.parametrize("mode", ["eval", "eval+autograd", "train"])
@pytest.mark.parametrize("kind", ["seresnet", "seresnext", "senet154"])
def test_timm_legacy_se_block_matches_with_gradients(kind, mode):
    block = _legacy_block(kind).train(mode == "train")
    fused = resfused.fuse(block)
    assert isinstance(fused, resfused.SEBottleneck), str(fused.resfused_report)
    assert list(fused.state_dict()) == list(block.state_dict())
    ran = compare_step(fused, block, torch.randn(3, 16, 15, 13), mode, f"legacy {kind} {mode}")
    assert [c.kernel for c in ran if c.op == "scale_add_relu"] == ["native"], ran


def test_timm_legacy_lookalikes_are_left_alone_with_the_reason():
    # SEResNetBlock (legacy_seresnet18/34) gates relu(bn2(...)), not bn2's output: not SEBasicBlock.
    cases = [(_legacy_block("basic"), "applies a ReLU to bn2's output before its SE gate")]
    b = _legacy_block("seresnet")
    b.se_module.relu = nn.SiLU()
    cases.append((b, "se_module.relu is SiLU, not ReLU"))
    b = _legacy_block("seresnet")
    b.se_module.sigmoid = nn.Hardsigmoid()
    cases.append((b, "se_module.sigmoid is Hardsigmoid, not Sigmoid"))
    b = _legacy_block("seresnet")
    b.se_module = nn.Identity()
    cases.append((b, "se_module is Identity, not timm.models.senet.SEModule"))
    b = _legacy_block("seresnext")
    b.bn3 = nn.GroupNorm(4, b.bn3.num_features)
    cases.append((b, "bn3 is GroupNorm, not nn.BatchNorm2d or nn.SyncBatchNorm"))
    for block, reason in cases:
        fused = resfused.fuse(block)
        report = fused.resfused_report
        assert fused is not block and type(fused) is type(block) and report.converted == [], str(report)
        assert reason in report.skipped[0].detail, str(report)
    x = torch.randn(2, 16, 9, 9)
    with torch.no_grad():  # what is left alone still computes what it did
        assert torch.equal(resfused.fuse(cases[0][0]).eval()(x), cases[0][0].eval()(x))


# ------------------------------------------------------------------------------ torch.compile
COMPILED = ["regnet-se", "timm-se", "timm-eca", "legacy-seresnext"]


@pytest.mark.parametrize("which", COMPILED)
def test_se_blocks_compile_fullgraph_and_match(which):
    # No graph break: the gates (PyTorch ops) and the scale_add_relu op (fake kernel) trace.
    block = {
        "regnet-se": lambda: _block(16, 48, 2, 24, 0.25),
        "timm-se": lambda: _timm_se_block("resnext", "se"),
        "timm-eca": lambda: _timm_se_block("bottleneck", "eca"),
        "legacy-seresnext": lambda: _legacy_block("seresnext"),
    }[which]().eval()
    fused = resfused.fuse(block)
    assert fused.resfused_report.skipped == [], str(fused.resfused_report)
    x = torch.randn(2, 16, 15, 13)
    torch._dynamo.reset()
    with torch.no_grad():
        actual = torch.compile(fused, fullgraph=True)(x)
    assert_matches_reference(actual, _expected64(block, x), torch.float32, what=f"{which} compiled")
