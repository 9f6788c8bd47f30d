"""The stem's max pool without indices (resfused/pool.py, csrc/cpu/max_pool3x3s2.cpp) against
F.max_pool2d: max is exact, so the results must be equal, NaN and -Inf included."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import resfused
from resfused import _native, pool

pytestmark = pytest.mark.skipif(not _native.has_kernel("max_pool3x3s2", "cpu"), reason="no max_pool3x3s2 CPU kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 64, 112, 112), (3, 17, 7, 9), (1, 3, 1, 1), (1, 5, 2, 2), (2, 40, 6, 5)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_equals_aten_max_pool(shape, dtype, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    x.view(-1)[:: max(1, x.numel() // 7)] = float("-inf")
    x.view(-1)[5 % x.numel()] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.ops.resfused.max_pool3x3s2(x)
    expected = F.max_pool2d(x, 3, 2, 1)
    assert y.shape == expected.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(0.0), expected.nan_to_num(0.0))


def test_module_runs_the_kernel_without_grad_and_aten_with_it():
    m = pool.MaxPool3x3S2()
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    y = m(x)  # autograd: nn.MaxPool2d's forward, with its backward
    y.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    F.max_pool2d(ref_x, 3, 2, 1).sum().backward()
    assert torch.equal(x.grad, ref_x.grad)
    with torch.no_grad():
        assert torch.equal(m(x), F.max_pool2d(x, 3, 2, 1))
    torch.library.opcheck(torch.ops.resfused.max_pool3x3s2, (torch.randn(2, 8, 9, 9),))


def test_bad_input_is_named():
    with pytest.raises(RuntimeError, match="'x' must be 4-D"):
        torch.ops.resfused.max_pool3x3s2(torch.randn(3, 8, 8))
    with pytest.raises(RuntimeError, match="'x' must have a non-empty height and width"):
        torch.ops.resfused.max_pool3x3s2(torch.randn(1, 3, 0, 8))


def test_fuse_replaces_only_the_stems_exact_pool():
    torchvision = pytest.importorskip("torchvision")
    fused = resfused.fuse(torchvision.models.resnet18(weights=None).eval())
    assert type(fused.maxpool) is pool.MaxPool3x3S2
    assert "maxpool -> resfused.pool.MaxPool3x3S2" in str(fused.resfused_report)
    hooked = torchvision.models.resnet18(weights=None).eval()
    hooked.maxpool.register_forward_hook(lambda *args: None)
    assert type(resfused.fuse(hooked).maxpool) is nn.MaxPool2d
    for other in (nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.MaxPool2d(2, 2), nn.MaxPool2d(3, 2, 0), nn.AvgPool2d(3, 2, 1)):
        assert not pool.replaceable(other)
    assert pool.replaceable(nn.MaxPool2d((3, 3), (2, 2), (1, 1)))
