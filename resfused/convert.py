"""One-call model conversion: `resfused.fuse(model)` swaps every supported residual block (and a
ResNet's conv-BN-ReLU stem) for its fused equivalent.

    model = resfused.fuse(torchvision.models.resnet50(weights="DEFAULT").eval())
    print(model.resfused_report)          # what was converted, what was left alone and why
    with torch.inference_mode():
        y = model(x)

A block is converted only when it computes exactly what the fused block computes, in eval mode
*and* in train mode (the fused blocks also train: batch-statistics BN, see runners.py; so a block with
DropBlock, DropPath > 0, attention other than timm's SE / ECA, anti-aliasing, dilation, a non-ReLU activation or a norm
other than BatchNorm2d / SyncBatchNorm with running statistics is left untouched and reported;
a block with a SyncBatchNorm trains through its reference forward, see blocks.py). The fused
blocks share the original's conv and BN modules (no copies of the weights beyond the initial
`deepcopy` when inplace=False), so parameter and state_dict keys of converted blocks stay the
same as the original's -- except the stem, whose conv and BN move under one `ConvBNAct`
(`conv1.weight` -> `conv1.conv.weight`, `bn1.*` -> `conv1.bn.*`): load weights before fusing.

Supported (see the rules at the bottom of this file): resfused.reference blocks; torchvision
`resnet*` / `resnext*` / `wide_resnet*` blocks and stem; timm `resnet*` / `resnext*` blocks and
stem (deep stems and the 'd' variants' avg-pool shortcuts included); timm `resnetv2_*` `PreActBasic`
and `PreActBottleneck` blocks with BatchNormAct2d(ReLU) (not the BiT models' GroupNorm + StdConv2d);
timm SE / ECA blocks (`seresnet*`, `seresnext*`, `ecaresnet*`, `resnetrs*`) and the legacy SENet
bottlenecks (`legacy_seresnet50`+, `legacy_seresnext*`, `legacy_senet154`; not their stems, nor the
basic blocks of `legacy_seresnet18/34`, which apply a ReLU before the gate); torchvision `regnet_x_*` /
`regnet_y_*` blocks and stem (keys unchanged).
Adding a block type: see CONTRIBUTING.md.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import re
import sys

import torch.nn as nn

from resfused import blocks, reference, stage, structure

__all__ = ["fuse", "FuseReport", "FuseEntry"]


# ----------------------------------------------------------------------------------- the report
@dataclasses.dataclass(frozen=True)
class FuseEntry:
    """One module fuse() looked at: `path` is its qualified name in the model ("" = the model)."""

    path: str
    source: str  # the original class, e.g. "torchvision.models.resnet.Bottleneck"
    converted: bool
    detail: str  # the fused class when converted, else why it was left alone


@dataclasses.dataclass
class FuseReport:
    """What `fuse()` did; attached to the returned model as `model.resfused_report`."""

    model: str
    entries: list[FuseEntry] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def converted(self) -> list[FuseEntry]:
        return [e for e in self.entries if e.converted]

    @property
    def skipped(self) -> list[FuseEntry]:
        return [e for e in self.entries if not e.converted]

    def __str__(self) -> str:
        already = [e for e in self.skipped if e.detail == _ALREADY_FUSED]
        if not self.converted and already:
            head = (
                f"resfused.fuse({self.model}): nothing left to convert ({len(already)} already fused); "
                "the model is returned unchanged"
            )
        elif not self.converted:
            head = f"resfused.fuse({self.model}): nothing convertible found; the model is returned unchanged"
        else:
            head = f"resfused.fuse({self.model}): converted {len(self.converted)}, left alone {len(self.skipped)}"
        lines = [head]
        width = max([len(e.path or "<model>") for e in self.entries] + [0])
        for title, group in (("converted", self.converted), ("left alone", self.skipped)):
            if group:
                lines.append(f"  {title}:")
                arrow = "->" if title == "converted" else "--"
                lines += [f"    {(e.path or '<model>'):<{width}}  {e.source} {arrow} {e.detail}" for e in group]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ the entry
def fuse(model: nn.Module, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """Swap every supported block of `model` for its fused equivalent and return the model.

    inplace=False (default) works on a deep copy and never touches `model`; inplace=True edits
    `model` itself. Always use the returned module: when `model` is itself a block, the result is
    a new (fused) module. The returned model carries a `FuseReport` as `model.resfused_report`
    (`.converted`, `.skipped`: FuseEntry(path, source, converted, detail); `print()` gives a
    summary); verbose=True also prints it. A model with nothing convertible comes back unchanged,
    with a report saying so. The fused path runs in eval mode (call `.eval()`), under
    torch.inference_mode() / no_grad().
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"resfused.fuse: 'model' must be a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}"
        )
    if not isinstance(inplace, bool):
        raise TypeError(f"resfused.fuse: 'inplace' must be a bool, got {inplace!r}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FuseReport(type(model).__name__)
    root = _visit(model, "", report, fresh=set())
    if root is not model:
        model = root
    if model.training and report.converted:
        report.notes.append(
            "the model is in training mode: it trains with fused batch-norm kernels; call .eval() for folded inference"
        )
    synced = [m for m in model.modules() if isinstance(m, blocks.FusedModule) and _holds_sync_bn(m)]
    if synced and report.converted:
        report.notes.append(
            f"SyncBatchNorm: {len(synced)} fused module(s) hold one; in train mode they run the reference "
            "forward to keep the batch statistics synchronized (eval mode folds it like BatchNorm2d)"
        )
    model.resfused_report = report
    if verbose:
        print(report)
    return model


_ALREADY_FUSED = "already a resfused fused block"


def _holds_sync_bn(module: nn.Module) -> bool:
    return any(type(m) is nn.SyncBatchNorm for m in module.modules())


class _Unsupported(Exception):
    """A recognized block that is not structurally equivalent to a fused one; the message says why."""


def _visit(module: nn.Module, path: str, report: FuseReport, fresh: set[int]) -> nn.Module:
    """Convert `module` if a rule claims it, else recurse; returns what should sit at `path`.
    `fresh` holds the ids of modules this call created (a fused stem), which are not revisited."""
    if id(module) in fresh:
        return module
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    rule = _claiming_rule(module)
    if rule is not None:
        try:
            _no_hooks(module)
            fused = rule(module)
        except _Unsupported as why:
            report.entries.append(FuseEntry(path, name, False, str(why)))
            return module
        if fused is None:  # an already-fused block: nothing to do, still worth listing
            report.entries.append(FuseEntry(path, name, False, _ALREADY_FUSED))
            return module
        report.entries.append(FuseEntry(path, name, True, f"resfused.{type(fused).__name__}"))
        return fused
    fresh.update(_fuse_stem(module, path, report))
    if _BLOCK_NAME.search(type(module).__name__) and not isinstance(module, nn.Sequential):
        report.entries.append(
            FuseEntry(path, name, False, "not a supported block type (its forward is unknown to resfused)")
        )
    for child_name, child in list(module.named_children()):
        new = _visit(child, f"{path}.{child_name}" if path else child_name, report, fresh)
        if new is not child:
            setattr(module, child_name, new)
    return _as_stage(module)


def _as_stage(module: nn.Module) -> nn.Module:
    """A plain nn.Sequential (or torchvision RegNet's AnyStage, an nn.Sequential that adds only its
    constructor) holding two or more fused residual blocks becomes a ResidualStage (same children
    and keys), which lets chained blocks write over their scratch inputs."""
    tv_regnet = sys.modules.get("torchvision.models.regnet")
    plain = type(module) is nn.Sequential or (tv_regnet is not None and type(module) is tv_regnet.AnyStage)
    if not plain or module._forward_hooks or module._forward_pre_hooks:
        return module
    fused = [m for m in module if isinstance(m, blocks.FusedModule) and not isinstance(m, blocks.ConvBNAct)]
    if len(fused) < 2:
        return module
    return stage.ResidualStage(collections.OrderedDict(module._modules)).train(module.training)


_BLOCK_NAME = re.compile(r"(Block|Bottleneck|Basic)$")


# ------------------------------------------------------------------------------ structure checks
def _conv(conv, what: str) -> nn.Conv2d:
    if problem := structure.conv_problem(conv):
        raise _Unsupported(f"{what} {problem}")
    if tuple(conv.dilation) != (1, 1):
        raise _Unsupported(f"{what} is dilated (dilation {tuple(conv.dilation)})")
    return conv


def _bn(bn, what: str, norm_act: bool = False) -> nn.BatchNorm2d:
    """A BatchNorm2d or SyncBatchNorm with running statistics; norm_act=True: timm's BatchNormAct2d
    with a ReLU."""
    if norm_act:
        if type(bn).__name__ != "BatchNormAct2d" or not isinstance(bn, nn.BatchNorm2d):
            raise _Unsupported(f"{what} is {type(bn).__name__}, not BatchNormAct2d (BN + ReLU)")
        if type(bn.act) is not nn.ReLU:
            raise _Unsupported(f"{what} applies {type(bn.act).__name__}, not ReLU")
        _identity(bn.drop, f"{what}.drop")
    elif problem := structure.bn_problem(bn):
        raise _Unsupported(f"{what} {problem}")
    if bn.running_mean is None or bn.running_var is None:
        raise _Unsupported(f"{what} has no running statistics (track_running_stats=False)")
    return bn


def _has_forward_hooks(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for module in modules for m in module.modules())


def _no_hooks(*modules: nn.Module) -> None:
    # The fused path never calls the block's (or its convs' / BNs') forward: hooks would not run.
    if _has_forward_hooks(*modules):
        raise _Unsupported("has forward hooks (on it or a submodule), which the fused path would skip")


def _relu(act, what: str) -> None:
    if type(act) is not nn.ReLU:
        raise _Unsupported(f"{what} is {type(act).__name__}, not ReLU")


def _identity(m, what: str) -> None:
    if m is not None and type(m) is not nn.Identity:
        raise _Unsupported(f"{what} is {type(m).__name__} (the fused block has none)")


def _no_drop_path(dp, what: str = "drop_path") -> None:
    # DropPath with p = 0 is the identity in train mode too; anything else changes training.
    if dp is None or type(dp) is nn.Identity or (type(dp).__name__ == "DropPath" and dp.drop_prob == 0):
        return
    raise _Unsupported(f"{what} is {dp!r} (stochastic depth; the fused block has none)")


class ShortcutConvBN(nn.Module):
    """A [pool +] conv [+ BN] shortcut in a layout the fused blocks read: `[0]` is the conv, `[1]`
    the BN or None, `pre_pool` the nn.AvgPool2d that runs before the conv (ResNet-D) or None. Keeps
    the original's child names (and its no-op Identity children, which run in the same order), so
    state_dict keys do not change: timm's DownsampleConv (conv, norm=Identity), DownsampleAvg and
    avg-down Sequential (pool, conv, BN; the pool is Identity at stride 1) all fit."""

    _pool_name = None

    def __init__(
        self,
        children: list[tuple[str, nn.Module]],
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d | None,
        pool: nn.AvgPool2d | None = None,
    ):
        super().__init__()
        for name, child in children:
            self.add_module(name, child)
        # Names, not module references: stays right through deepcopy, _apply and reassignment.
        self._pair_names = tuple(next(n for n, c in children if c is m) if m is not None else None for m in (conv, bn))
        if pool is not None:
            self._pool_name = next(n for n, c in children if c is pool)

    def __getitem__(self, index: int):
        name = self._pair_names[index]
        return None if name is None else getattr(self, name)

    @property
    def pre_pool(self) -> nn.AvgPool2d | None:
        return None if self._pool_name is None else getattr(self, self._pool_name)

    def forward(self, x):
        for child in self.children():
            x = child(x)
        return x


def _shortcut(ds, what: str = "downsample", bn_required: bool = True):
    """None, nn.Sequential(conv, BN) as is, or a ShortcutConvBN view of an equivalent layout: an
    optional nn.AvgPool2d first (ResNet-D's avg-down; the fused shortcut runs that pool module
    itself, then the folded conv), the conv, the BN (optional where `bn_required` is False)."""
    if ds is None:
        return None
    if type(ds) is nn.Sequential and len(ds) == 2:
        _conv(ds[0], f"{what}[0]"), _bn(ds[1], f"{what}[1]")
        return ds
    children = list(ds.named_children())
    real = [(n, m) for n, m in children if type(m) is not nn.Identity]
    if type(ds) in (nn.Sequential,) or type(ds).__name__ in ("DownsampleConv", "DownsampleAvg"):
        pool = None
        if real and type(real[0][1]) is nn.AvgPool2d:
            pool, real = real[0][1], real[1:]
        for name, m in real:
            if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) or "Pool" in type(m).__name__:
                raise _Unsupported(
                    f"{what}.{name} is {type(m).__name__}; a fused shortcut pools only with an nn.AvgPool2d, first"
                )
        if len(real) == 2 and type(real[0][1]) is nn.Conv2d:
            conv, bn = _conv(real[0][1], f"{what}.{real[0][0]}"), _bn(real[1][1], f"{what}.{real[1][0]}")
            return ShortcutConvBN(children, conv, bn, pool)
        if len(real) == 1 and not bn_required and type(real[0][1]) is nn.Conv2d:
            return ShortcutConvBN(children, _conv(real[0][1], f"{what}.{real[0][0]}"), None, pool)
    raise _Unsupported(
        f"{what} is {type(ds).__name__}({', '.join(type(m).__name__ for _, m in children)}), not [avg-pool +] conv + BN"
    )


def _fused(cls, module: nn.Module, **children) -> nn.Module:
    """A fused `cls` built from exactly `children` (None allowed), checked by the caller."""
    staging = nn.Module()
    for name, child in children.items():
        if child is not None:
            staging.add_module(name, child)
    fused = cls._from_children(staging)
    for name, child in children.items():
        if child is None:  # _from_children copies registered children only; the forward reads these
            setattr(fused, name, None)
    fused.train(module.training)
    return fused


# ------------------------------------------------------------------------------------ the rules
def _reference_block(m):
    if type(m) is reference.PreActBasicBlock:
        cls, names = blocks.PreActBasicBlock, ("bn1", "conv1", "bn2", "conv2")
    elif type(m) is reference.PreActBottleneck:
        cls, names = blocks.PreActBottleneck, ("bn1", "conv1", "bn2", "conv2", "bn3", "conv3")
    else:
        cls = {
            reference.BasicBlock: blocks.BasicBlock,
            reference.Bottleneck: blocks.Bottleneck,
            reference.ResNeXtBottleneck: blocks.ResNeXtBottleneck,
        }[type(m)]
        names = ("conv1", "bn1", "conv2", "bn2") + (("conv3", "bn3") if hasattr(m, "conv3") else ())
    for n in names:
        (_conv if n.startswith("conv") else _bn)(getattr(m, n), n)
    return _fused(cls, m, **{n: getattr(m, n) for n in names}, downsample=_shortcut(m.downsample))


def _v1_block(m, acts: tuple[str, ...], se: nn.Module | None = None):
    """torchvision / timm (v1) BasicBlock or Bottleneck: conv-BN pairs, ReLUs, conv + BN shortcut;
    `se`: a checked channel gate after the last BN (timm's SE / ECA blocks)."""
    names = ("conv1", "bn1", "conv2", "bn2") + (("conv3", "bn3") if hasattr(m, "conv3") else ())
    for n in names:
        (_conv if n.startswith("conv") else _bn)(getattr(m, n), n)
    for a in acts:
        _relu(getattr(m, a), a)
    if hasattr(m, "conv3"):
        cls = blocks.ResNeXtBottleneck if m.conv2.groups > 1 else blocks.Bottleneck
    else:
        if m.conv1.groups != 1 or m.conv2.groups != 1:
            raise _Unsupported("grouped convs in a BasicBlock")
        cls = blocks.BasicBlock
    children = {n: getattr(m, n) for n in names}
    if se is not None:
        cls = blocks.SEBasicBlock if cls is blocks.BasicBlock else blocks.SEBottleneck
        children["se"] = se
    return _fused(cls, m, **children, downsample=_shortcut(m.downsample))


def _sigmoid(gate, what: str) -> None:
    timm_act = sys.modules.get("timm.layers.activations")
    if type(gate) is nn.Sigmoid or (timm_act is not None and type(gate) is timm_act.Sigmoid):
        return
    raise _Unsupported(f"{what} is {type(gate).__name__}, not Sigmoid")


def _pointwise(fc, what: str) -> nn.Conv2d:
    """An SE module's fc layer: a plain ungrouped 1x1 conv (ops/se.py computes it as a matrix product)."""
    _conv(fc, what)
    if fc.kernel_size != (1, 1) or fc.stride != (1, 1) or tuple(fc.padding) != (0, 0) or fc.groups != 1:
        raise _Unsupported(f"{what} is {fc!r}, not an ungrouped 1x1 conv")
    return fc


def _timm_gate(se, what: str = "se") -> nn.Module:
    """timm's SEModule (mean, fc1 1x1, ReLU, fc2 1x1, sigmoid; no norm, no max pool) or EcaModule
    (mean, a 1-D conv over the channels, sigmoid), which ops/se.py computes; else _Unsupported."""
    timm_se = sys.modules.get("timm.layers.squeeze_excite")
    timm_eca = sys.modules.get("timm.layers.eca")
    if timm_se is not None and type(se) is timm_se.SEModule:
        if se.add_maxpool:
            raise _Unsupported(f"{what} adds a global max pool to the mean (add_maxpool=True)")
        _pointwise(se.fc1, f"{what}.fc1"), _pointwise(se.fc2, f"{what}.fc2")
        _identity(se.bn, f"{what}.bn")
        _relu(se.act, f"{what}.act")
        _sigmoid(se.gate, f"{what}.gate")
        return se
    if timm_eca is not None and type(se) is timm_eca.EcaModule:
        if se.conv2 is not None or se.act is not None:
            raise _Unsupported(f"{what} is an MLP ECA (use_mlp=True)")
        conv = se.conv
        if type(conv) is not nn.Conv1d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise _Unsupported(f"{what}.conv is {conv!r}, not a zero-padded nn.Conv1d")
        k = conv.kernel_size[0]
        if (conv.in_channels, conv.out_channels, conv.groups, conv.stride, conv.dilation) != (1, 1, 1, (1,), (1,)):
            raise _Unsupported(f"{what}.conv is {conv!r}, not a 1-channel 1-D conv with stride 1")
        if conv.padding != ((k - 1) // 2,) or k % 2 == 0:
            raise _Unsupported(f"{what}.conv is {conv!r}, not an odd kernel with 'same' padding")
        _sigmoid(se.gate, f"{what}.gate")
        return se
    raise _Unsupported(f"has an attention module se={type(se).__name__} (SEModule and EcaModule are fused)")


class TimmLegacySEBottleneck(blocks.SEBottleneck):
    """resfused.SEBottleneck over timm's legacy SENet bottlenecks (timm.models.senet: SEBottleneck,
    SEResNetBottleneck, SEResNeXtBottleneck): keeps their child names (se_module, the one `relu`
    they share), hence their state_dict keys; `se` is a view of se_module. Their forward,
    relu(se_module(bn3(conv3(...))) + shortcut), is SEBottleneck's; the caffe-style stride on conv1
    (SEResNetBottleneck) is the convs' own business."""

    se = property(lambda self: self.se_module)


def _timm_legacy_se_module(se, what: str = "se_module") -> nn.Module:
    """timm.models.senet.SEModule: x * sigmoid(fc2(relu(fc1(mean_hw(x))))), fc1 / fc2 1x1 convs with
    bias: what ops/se.py's se_gate computes."""
    timm_senet = sys.modules.get("timm.models.senet")
    if timm_senet is None or type(se) is not timm_senet.SEModule:
        raise _Unsupported(f"{what} is {type(se).__name__}, not timm.models.senet.SEModule")
    _pointwise(se.fc1, f"{what}.fc1"), _pointwise(se.fc2, f"{what}.fc2")
    _relu(se.relu, f"{what}.relu")
    _sigmoid(se.sigmoid, f"{what}.sigmoid")
    return se


def _timm_legacy_se_block(m):
    """timm's legacy SENet blocks (legacy_seresnet*, legacy_seresnext*, legacy_senet154)."""
    if type(m).__name__ == "SEResNetBlock":
        raise _Unsupported(
            "applies a ReLU to bn2's output before its SE gate (legacy SEResNetBlock); the fused SE blocks "
            "gate the BN output itself"
        )
    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    for n in names:
        (_conv if n.startswith("conv") else _bn)(getattr(m, n), n)
    _relu(m.relu, "relu")
    se = _timm_legacy_se_module(m.se_module)
    children = {n: getattr(m, n) for n in names}
    return _fused(TimmLegacySEBottleneck, m, **children, relu=m.relu, se_module=se, downsample=_shortcut(m.downsample))


def _torchvision_block(m):
    return _v1_block(m, ("relu",))


def _timm_block(m):
    se = None if m.se is None else _timm_gate(m.se)
    _identity(m.aa, "aa (anti-aliasing)")
    _identity(m.drop_block, "drop_block")
    _no_drop_path(m.drop_path)
    return _v1_block(m, ("act1", "act2", "act3") if hasattr(m, "conv3") else ("act1", "act2"), se)


class TimmPreActBasicBlock(blocks.PreActBasicBlock):
    """resfused.PreActBasicBlock over timm's PreActBasic: keeps timm's child names (norm1, norm2),
    hence its state_dict keys; bn1 / bn2 are views of them. timm's norms are BatchNormAct2d, which
    already apply the ReLU; the reference path's second ReLU is a no-op on relu(...) >= 0."""

    bn1 = property(lambda self: self.norm1)
    bn2 = property(lambda self: self.norm2)


class TimmPreActBottleneck(blocks.PreActBottleneck):
    """resfused.PreActBottleneck over timm's PreActBottleneck, as TimmPreActBasicBlock: timm's child
    names (norm1, norm2, norm3) and keys; bn1 / bn2 / bn3 are views of them."""

    bn1 = property(lambda self: self.norm1)
    bn2 = property(lambda self: self.norm2)
    bn3 = property(lambda self: self.norm3)


def _timm_preact(m):
    """timm resnetv2's PreActBasic / PreActBottleneck with BatchNormAct2d(ReLU) norms and plain convs
    (the BiT models' GroupNormAct and StdConv2d are left alone, with the reason), and a bare-conv
    projection ([avg-pool +] conv, no norm) on the pre-activated input."""
    n = 3 if hasattr(m, "conv3") else 2
    children = {}
    for i in range(1, n + 1):
        children[f"norm{i}"] = _bn(getattr(m, f"norm{i}"), f"norm{i}", norm_act=True)
        children[f"conv{i}"] = _conv(getattr(m, f"conv{i}"), f"conv{i}")
    _no_drop_path(m.drop_path)
    ds = _shortcut(m.downsample, bn_required=False)
    if ds is not None and ds[1] is not None:
        raise _Unsupported("downsample has a norm after its conv; timm's pre-activation shortcut is a bare conv")
    cls = TimmPreActBottleneck if n == 3 else TimmPreActBasicBlock
    return _fused(cls, m, downsample=ds, **children)


def _conv_norm_act(m, what: str, relu: bool) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """torchvision's Conv2dNormActivation as children 0 (conv), 1 (BN) [, 2 (ReLU) when `relu`]."""
    if type(m).__name__ not in ("Conv2dNormActivation", "SimpleStemIN") or not isinstance(m, nn.Sequential):
        raise _Unsupported(f"{what} is {type(m).__name__}, not Conv2dNormActivation")
    children = list(m)
    if len(children) != 2 + relu:
        layout = ", ".join(type(c).__name__ for c in children)
        raise _Unsupported(f"{what} is ({layout}), not conv, BN{', ReLU' if relu else ''}")
    if relu:
        _relu(children[2], f"{what}.2")
    return _conv(children[0], f"{what}.0"), _bn(children[1], f"{what}.1")


class TorchvisionConvNormAct(blocks.ConvBNAct):
    """resfused.ConvBNAct over torchvision's Conv2dNormActivation (RegNet's SimpleStemIN): keeps its
    child names 0 (conv), 1 (BN), 2 (ReLU), hence its state_dict keys; conv / bn are views."""

    conv = property(lambda self: self._modules["0"])
    bn = property(lambda self: self._modules["1"])

    def _entry_conv(self) -> nn.Conv2d:
        return self._modules["0"]


def _torchvision_stem(m):
    """RegNet's SimpleStemIN: 3x3 stride-2 conv, BN, ReLU."""
    _conv_norm_act(m, "stem", relu=True)
    fused = _fused(TorchvisionConvNormAct, m, **dict(m.named_children()))
    fused.relu = True
    return fused


def _torchvision_se(se, what: str) -> None:
    """torchvision.ops.SqueezeExcitation computing y * sigmoid(fc2(relu(fc1(mean_hw(y))))) (ops/se.py)."""
    ops_misc = sys.modules.get("torchvision.ops.misc")
    if ops_misc is None or type(se) is not ops_misc.SqueezeExcitation:
        raise _Unsupported(f"{what} is {type(se).__name__}, not torchvision's SqueezeExcitation")
    if type(se.avgpool) is not nn.AdaptiveAvgPool2d or se.avgpool.output_size not in (1, (1, 1)):
        raise _Unsupported(f"{what}.avgpool is {se.avgpool!r}, not a global average pool")
    _pointwise(se.fc1, f"{what}.fc1"), _pointwise(se.fc2, f"{what}.fc2")
    _relu(se.activation, f"{what}.activation")
    if type(se.scale_activation) is not nn.Sigmoid:
        raise _Unsupported(f"{what}.scale_activation is {type(se.scale_activation).__name__}, not Sigmoid")


def _torchvision_regnet_block(m):
    """torchvision RegNet X / Y's ResBottleneckBlock: f = BottleneckTransform(a, b, [se], c), proj
    (1x1 conv + BN, no activation) or None, ReLU after the add."""
    f = m.f
    if type(f).__name__ != "BottleneckTransform" or list(f._modules) not in (["a", "b", "c"], ["a", "b", "se", "c"]):
        layout = ", ".join(f"{n}={type(c).__name__}" for n, c in f.named_children())
        raise _Unsupported(f"f is {type(f).__name__}({layout}), not BottleneckTransform(a, b, [se], c)")
    _conv_norm_act(f.a, "f.a", relu=True), _conv_norm_act(f.b, "f.b", relu=True)
    if "se" in f._modules:
        _torchvision_se(f.se, "f.se")
    _conv_norm_act(f.c, "f.c", relu=False)
    if m.proj is not None:
        _conv_norm_act(m.proj, "proj", relu=False)
    _relu(m.activation, "activation")
    return _fused(blocks.RegNetBottleneck, m, proj=m.proj, f=f, activation=m.activation)


def _unsupported(reason: str):
    def rule(m):
        raise _Unsupported(reason)

    return rule


def _claiming_rule(m):
    """The rule for `m`'s exact class, or None. Exact classes only: a subclass may change forward.
    Third-party classes are looked up only if their library is already imported (a model that
    contains them imported it), so fuse() never pays for importing timm or torchvision."""
    if isinstance(m, blocks.FusedModule):
        return lambda m: None
    t = type(m)
    if t in (
        reference.BasicBlock,
        reference.Bottleneck,
        reference.ResNeXtBottleneck,
        reference.PreActBasicBlock,
        reference.PreActBottleneck,
    ):
        return _reference_block
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None and t in (tv.BasicBlock, tv.Bottleneck):
        return _torchvision_block
    tv_regnet = sys.modules.get("torchvision.models.regnet")
    if tv_regnet is not None:
        if t is tv_regnet.ResBottleneckBlock:
            return _torchvision_regnet_block
        if t is tv_regnet.SimpleStemIN:
            return _torchvision_stem
    timm_v1 = sys.modules.get("timm.models.resnet")
    if timm_v1 is not None and t in (timm_v1.BasicBlock, timm_v1.Bottleneck):
        return _timm_block
    timm_senet = sys.modules.get("timm.models.senet")
    if timm_senet is not None and t in (
        timm_senet.SEBottleneck,
        timm_senet.SEResNetBottleneck,
        timm_senet.SEResNeXtBottleneck,
        timm_senet.SEResNetBlock,
    ):
        return _timm_legacy_se_block
    timm_v2 = sys.modules.get("timm.models.resnetv2")
    if timm_v2 is not None:
        if t in (timm_v2.PreActBasic, timm_v2.PreActBottleneck):
            return _timm_preact
        if t is timm_v2.Bottleneck:
            return _unsupported("resnetv2 (ViT-hybrid) bottleneck with norm-act layers is not supported")
    return None


# ------------------------------------------------------------------------------------- the stems
class OriginalStemKeys:
    """The fused stem's state_dict under the original model's keys, both ways.

    fuse() moves the stem's conv and BN under one ConvBNAct (`conv1.weight` -> `conv1.conv.weight`,
    `bn1.*` -> `conv1.bn.*`). These hooks on the model rename them back in `state_dict()` and accept
    the original keys in `load_state_dict()` (the fused ones too), so checkpoints move freely
    between the original and the fused model. `renames` holds (fused prefix, original prefix) pairs
    relative to the model. A plain object with methods, so that the model still pickles."""

    def __init__(self, renames: list[tuple[str, str]]):
        self.renames = list(renames)

    def _original(self, key: str, prefix: str) -> str:
        for fused, original in self.renames:
            if key.startswith(prefix + fused):
                return prefix + original + key[len(prefix + fused) :]
        return key

    def to_original(self, module, state_dict, prefix, local_metadata):
        # Rebuilt in place, in order: the keys keep the original model's order too.
        items = list(state_dict.items())
        state_dict.clear()
        state_dict.update((self._original(key, prefix), value) for key, value in items)

    def from_original(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        fused_prefixes = tuple(prefix + fused for fused, _ in self.renames)
        for key in list(state_dict):
            if not key.startswith(prefix) or key.startswith(fused_prefixes):
                continue
            for fused, original in self.renames:
                if key.startswith(prefix + original):
                    state_dict[prefix + fused + key[len(prefix + original) :]] = state_dict.pop(key)
                    break


def _fuse_stem(model: nn.Module, path: str, report: FuseReport) -> list[int]:
    """conv1 -> bn1 -> relu/act1 of a torchvision or timm ResNet into one ConvBNAct at conv1.

    Both forwards call self.conv1, self.bn1, self.relu (torchvision) / self.act1 (timm) in this
    order and nothing else uses bn1 and the activation, so bn1 and the activation become Identity.
    timm's deep stems (conv1 = Sequential(conv, BN, ReLU, conv, BN, ReLU, conv)) fuse their inner
    triples in place and their last conv with bn1 / act1.
    """
    tv = sys.modules.get("torchvision.models.resnet")
    timm_v1 = sys.modules.get("timm.models.resnet")
    if tv is not None and type(model) is tv.ResNet:
        act_name = "relu"
    elif timm_v1 is not None and type(model) is timm_v1.ResNet:
        act_name = "act1"
    else:
        return []
    if any(isinstance(m, blocks.ConvBNAct) for m in model.conv1.modules()):
        return []  # fused by an earlier fuse(); the ConvBNAct is listed as already fused
    where = f"{path + '.' if path else ''}conv1+bn1+{act_name}"
    source = f"{type(model).__module__}.{type(model).__qualname__} stem"
    try:
        _no_hooks(model.conv1, model.bn1, getattr(model, act_name))
        _bn(model.bn1, "bn1"), _relu(getattr(model, act_name), act_name)
        if isinstance(model.conv1, nn.Sequential):
            stem = list(model.conv1)
            if len(stem) % 3 != 1:
                raise _Unsupported("deep stem is not (conv, BN, ReLU)* + conv")
            for i in range(0, len(stem) - 1, 3):
                (
                    _conv(stem[i], f"conv1[{i}]"),
                    _bn(stem[i + 1], f"conv1[{i + 1}]"),
                    _relu(stem[i + 2], f"conv1[{i + 2}]"),
                )
            _conv(stem[-1], f"conv1[{len(stem) - 1}]")
            renames = []
            for i in range(0, len(stem) - 1, 3):
                model.conv1[i] = blocks.ConvBNAct(stem[i], stem[i + 1], relu=True).train(model.training)
                model.conv1[i + 1], model.conv1[i + 2] = nn.Identity(), nn.Identity()
                renames += [(f"conv1.{i}.conv.", f"conv1.{i}."), (f"conv1.{i}.bn.", f"conv1.{i + 1}.")]
            last = len(stem) - 1
            model.conv1[last] = blocks.ConvBNAct(stem[-1], model.bn1, relu=True).train(model.training)
            renames += [(f"conv1.{last}.conv.", f"conv1.{last}."), (f"conv1.{last}.bn.", "bn1.")]
        else:
            model.conv1 = blocks.ConvBNAct(_conv(model.conv1, "conv1"), model.bn1, relu=True).train(model.training)
            renames = [("conv1.conv.", "conv1."), ("conv1.bn.", "bn1.")]
    except _Unsupported as why:
        report.entries.append(FuseEntry(where, source, False, str(why)))
        return []
    model.bn1 = nn.Identity()
    setattr(model, act_name, nn.Identity())
    keys = OriginalStemKeys(renames)
    model._register_state_dict_hook(keys.to_original)
    model._register_load_state_dict_pre_hook(keys.from_original)
    report.entries.append(FuseEntry(where, source, True, "resfused.ConvBNAct (state_dict keys kept)"))
    return [id(m) for m in model.conv1.modules() if isinstance(m, blocks.ConvBNAct)]
