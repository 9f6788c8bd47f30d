"""BN folding: against torch.nn.utils.fusion and the unfolded conv+BN, in float64 and bf16."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from resfused.folding import bn_scale_shift, fold_conv_bn, fold_conv_bn_modules

from harness import assert_matches_reference, randomize_bn


def _conv_bn(cin=6, cout=10, k=3, groups=1, bias=False, var=None):
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=bias)
    bn = randomize_bn(nn.BatchNorm2d(cout)).eval()
    if var is not None:
        bn.running_var.fill_(var)
    return conv.eval(), bn


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_matches_torch_fuse_conv_bn_eval(bias, groups):
    conv, bn = _conv_bn(groups=groups, bias=bias)
    fused = fuse_conv_bn_eval(conv, bn)
    w, b = fold_conv_bn_modules(conv, bn)
    assert torch.allclose(w, fused.weight, rtol=1e-6, atol=1e-7)
    assert torch.allclose(b, fused.bias, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("var", [1e-8, 1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_conv_matches_reference(var, dtype):
    conv, bn = _conv_bn(var=var)
    x = torch.randn(2, 6, 7, 7)
    with torch.no_grad():
        expected = bn.double()(conv.double()(x.double()))
        conv.float(), bn.float()
        w, b = fold_conv_bn_modules(conv, bn, dtype)
        assert w.dtype == b.dtype == dtype
        actual = F.conv2d(x.to(dtype), w, b, padding=1)
        eager = None
        if dtype == torch.bfloat16:
            eager = bn.to(dtype)(conv.to(dtype)(x.to(dtype)))
    assert_matches_reference(actual, expected, dtype, eager, what=f"folded conv var={var}")


def test_fold_is_computed_in_float64():
    # With running_var = 1e-8 the scale is ~1e4: float32 arithmetic on the fold loses digits
    # that float64-then-cast keeps. The float32 fold must equal the float64 fold rounded once.
    conv, bn = _conv_bn(var=1e-8)
    w32, b32 = fold_conv_bn_modules(conv, bn, torch.float32)
    w64, b64 = fold_conv_bn(conv.weight.double(), None, bn.double(), torch.float64)
    assert torch.equal(w32, w64.float()) and torch.equal(b32, b64.float())


def test_scale_shift_matches_bn():
    bn = randomize_bn(nn.BatchNorm2d(5)).eval()
    x = torch.randn(3, 5, 4, 4)
    scale, shift = bn_scale_shift(bn)
    with torch.no_grad():
        assert torch.allclose(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x), atol=1e-6)


def test_bn_without_running_stats_is_rejected():
    with pytest.raises(ValueError, match="running statistics"):
        bn_scale_shift(nn.BatchNorm2d(4, track_running_stats=False))
