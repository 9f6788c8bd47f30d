"""BatchNorm folding, in float64 then cast.

An eval-mode BN is an affine map per channel c:

    bn(y)[c] = (y[c] - mean[c]) * gamma[c] / sqrt(var[c] + eps) + beta[c]
             = y[c] * scale[c] + shift[c],
    scale = gamma / sqrt(var + eps),   shift = beta - mean * scale.

After a conv y = W * x + b it folds into the conv:  W'[c] = W[c] * scale[c],  b' = b * scale + shift.
Before a ReLU that precedes a conv (pre-activation) it cannot fold, so it stays a per-channel
scale/shift applied as the conv's prologue.

Computing in float64 keeps the fold exact to the target dtype even for extreme running_var
(1e-8 makes scale ~1e4; float32 arithmetic would lose digits in W * scale and beta - mean*scale).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def bn_scale_shift(
    bn: nn.BatchNorm2d, dtype: torch.dtype | None = None, differentiable: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm, computed in float64 and cast to `dtype`
    (default: the dtype of the BN's running_mean). With `differentiable`, autograd reaches the
    BN's weight and bias through the result (frozen-BN fine-tuning); otherwise it is detached."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("resfused: cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    dtype = dtype or bn.running_mean.dtype
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.detach().double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
    return scale.to(dtype), shift.to(dtype)


def fold_conv_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: nn.BatchNorm2d | None,
    dtype: torch.dtype | None = None,
    differentiable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold `bn` (eval mode) into a conv's (weight, bias); returns (weight', bias') in `dtype`
    (default: the weight's dtype). With bn=None the conv is returned cast, unchanged. With
    `differentiable`, autograd reaches weight, bias and the BN's affine parameters through the
    result; otherwise it is detached (inference plans).
    """
    dtype = dtype or weight.dtype
    if not differentiable:
        weight, bias = weight.detach(), None if bias is None else bias.detach()
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        if bn is None:
            return weight.to(dtype), None if bias is None else bias.to(dtype)
        scale, shift = bn_scale_shift(bn, torch.float64, differentiable)
        w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
        b = shift if bias is None else bias.double() * scale + shift
    return w.to(dtype), b.to(dtype)


def fold_conv_bn_modules(
    conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype | None = None, differentiable: bool = False
):
    """`fold_conv_bn` on module objects."""
    return fold_conv_bn(conv.weight, conv.bias, bn, dtype, differentiable)
