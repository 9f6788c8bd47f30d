"""The residual blocks, in plain PyTorch: the numerical truth (their definitions, in words:
docs/design.md, "The blocks").

Every fused block derives from one of these and shares its constructor arguments, defaults and
attribute names, so a state_dict of these blocks is also the state_dict of the fused blocks in
`resfused.blocks`.

State-dict mapping to torchvision (`torchvision.models.resnet`): `BasicBlock`, `Bottleneck`
and `ResNeXtBottleneck` use the same keys as torchvision's `BasicBlock` / `Bottleneck`
(conv1, bn1, conv2, bn2, [conv3, bn3], downsample.0, downsample.1); no remapping is needed.
torchvision keeps a `relu` module and a `stride` attribute, which hold no state.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BasicBlock",
    "PreActBasicBlock",
    "Bottleneck",
    "ResNeXtBottleneck",
    "PreActBottleneck",
    "conv3x3",
    "conv1x1",
]


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation
    )


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _projection(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    """1x1 conv + BN shortcut when the block changes resolution or channel count, else None."""
    if stride != 1 or in_ch != out_ch:
        return nn.Sequential(conv1x1(in_ch, out_ch, stride=stride), nn.BatchNorm2d(out_ch))
    return None


class BasicBlock(nn.Module):
    """ResNet-18/34 block (v1): conv3x3-BN-ReLU, conv3x3-BN, add shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, stride=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return F.relu(out + identity)


class PreActBasicBlock(nn.Module):
    """ResNet v2 block: BN-ReLU, conv3x3, BN-ReLU, conv3x3, add shortcut (no ReLU after the add).

    The projection shortcut is fed with the *pre-activated* input relu(bn1(x)).
    """

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch, stride=1)
        self.downsample = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        identity = x
        if self.downsample is not None:
            identity = self.downsample(out)
        out = F.relu(self.bn2(self.conv1(out)))
        out = self.conv2(out)
        return out + identity


class _BottleneckBase(nn.Module):
    """1x1 reduce-BN-ReLU, 3x3 (optionally grouped)-BN-ReLU, 1x1 expand-BN, add shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride=stride, groups=groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return F.relu(out + identity)


class Bottleneck(_BottleneckBase):
    """ResNet-50/101/152 block: 1x1 reduce-BN-ReLU, 3x3-BN-ReLU, 1x1 expand (x4)-BN, add, ReLU."""

    def __init__(self, in_ch: int, bottleneck_ch: int, stride: int = 1):
        super().__init__(in_ch, bottleneck_ch, bottleneck_ch * self.expansion, stride, groups=1)


class ResNeXtBottleneck(_BottleneckBase):
    """Bottleneck whose 3x3 is grouped: groups = cardinality, width = int(planes*base_width/64)*groups."""

    def __init__(self, in_ch: int, bottleneck_ch: int, stride: int = 1, groups: int = 32, base_width: int = 4):
        width = int(bottleneck_ch * (base_width / 64.0)) * groups
        super().__init__(in_ch, width, bottleneck_ch * self.expansion, stride, groups=groups)


class PreActBottleneck(nn.Module):
    """ResNet v2 bottleneck: BN-ReLU, conv1x1 reduce, BN-ReLU, conv3x3 (stride, optionally grouped),
    BN-ReLU, conv1x1 expand to 4 * bottleneck_ch, add shortcut (no ReLU after the add).

    As in PreActBasicBlock, the projection shortcut (1x1 conv with the block's stride + BN) is fed
    with the *pre-activated* input relu(bn1(x)); the stride sits on the 3x3 conv (timm's resnetv2,
    torchvision's v1.5). timm's PreActBottleneck projects with a bare conv: fuse() converts it too.
    """

    expansion = 4

    def __init__(self, in_ch: int, bottleneck_ch: int, stride: int = 1, groups: int = 1):
        super().__init__()
        out_ch = bottleneck_ch * self.expansion
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv1x1(in_ch, bottleneck_ch)
        self.bn2 = nn.BatchNorm2d(bottleneck_ch)
        self.conv2 = conv3x3(bottleneck_ch, bottleneck_ch, stride=stride, groups=groups)
        self.bn3 = nn.BatchNorm2d(bottleneck_ch)
        self.conv3 = conv1x1(bottleneck_ch, out_ch)
        self.downsample = _projection(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        identity = x
        if self.downsample is not None:
            identity = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + identity
