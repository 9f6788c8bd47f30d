"""What a fused module can stand in for, shared by ConvBNAct's constructor and fuse()'s rules.

An exact nn.Conv2d with explicit zero padding: subclasses (timm's StdConv2d, Conv2dSame, ...)
change the weight or pad in their forward, and padding modes other than zeros pad differently,
none of which the folded weights would carry. An exact nn.BatchNorm2d: a subclass may do more
in its forward (timm's BatchNormAct2d applies an activation).
"""

from __future__ import annotations

import torch.nn as nn


def conv_problem(conv: nn.Module) -> str | None:
    """Why `conv` cannot be a fused conv, or None when it can."""
    if type(conv) is not nn.Conv2d:
        return f"is {type(conv).__name__}, not a plain nn.Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"uses padding {conv.padding!r} / mode {conv.padding_mode!r}, not explicit zero padding"
    return None


def bn_problem(bn: nn.Module) -> str | None:
    """Why `bn` cannot be folded into a fused conv, or None when it can."""
    if type(bn) is not nn.BatchNorm2d:
        return f"is {type(bn).__name__}, not nn.BatchNorm2d"
    return None
