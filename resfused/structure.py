"""What a fused module can stand in for, shared by ConvBNAct's constructor and fuse()'s rules.

An exact nn.Conv2d with explicit zero padding: subclasses (timm's StdConv2d, Conv2dSame, ...)
change the weight or pad in their forward, and padding modes other than zeros pad differently,
none of which the folded weights would carry. An exact nn.BatchNorm2d or nn.SyncBatchNorm: a
subclass may do more in its forward (timm's BatchNormAct2d applies an activation). A SyncBatchNorm
computes what a BatchNorm2d does, except that in training mode torch synchronizes its batch
statistics across processes; the fused modules run their reference forward there (blocks.py,
`FusedModule._has_synced_bn`).
"""

from __future__ import annotations

import torch.nn as nn

BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)  # the exact classes a fused conv folds


def conv_problem(conv: nn.Module) -> str | None:
    """Why `conv` cannot be a fused conv, or None when it can."""
    if type(conv) is not nn.Conv2d:
        return f"is {type(conv).__name__}, not a plain nn.Conv2d"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"uses padding {conv.padding!r} / mode {conv.padding_mode!r}, not explicit zero padding"
    return None


def bn_problem(bn: nn.Module) -> str | None:
    """Why `bn` cannot be folded into a fused conv, or None when it can."""
    if type(bn) not in BATCH_NORMS:
        return f"is {type(bn).__name__}, not nn.BatchNorm2d or nn.SyncBatchNorm"
    return None
