"""The reference blocks: shapes, and agreement with torchvision's blocks (same state_dict keys)."""

import pytest
import torch
import torchvision.models.resnet as tv

from resfused import reference as R

from cases import BLOCK_CASES, parametrize_cases
from harness import assert_matches_reference, randomize_bn


@parametrize_cases(BLOCK_CASES)
def test_shapes_identity_and_projection(name, args):
    m = getattr(R, name)(*args).eval()
    cin, stride = args[0], args[2]
    cout = args[1] * (4 if "Bottleneck" in name else 1)
    y = m(torch.randn(2, cin, 16, 16))
    assert y.shape == (2, cout, 16 // stride, 16 // stride)
    # A projection exists exactly when the resolution or the channel count changes.
    assert (m.downsample is not None) == (stride != 1 or cin != cout)


def test_resnext_width_and_groups():
    m = R.ResNeXtBottleneck(256, 128, groups=32, base_width=4)
    assert m.conv2.groups == 32 and m.conv2.in_channels == int(128 * 4 / 64) * 32 == 256
    assert m.conv3.out_channels == 512


def test_preact_projection_reads_preactivated_input_and_has_no_final_relu():
    m = randomize_bn(R.PreActBasicBlock(8, 16, 2)).eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        pre = torch.relu(m.bn1(x))
        expected = m.conv2(torch.relu(m.bn2(m.conv1(pre)))) + m.downsample(pre)
        assert torch.allclose(m(x), expected, atol=1e-6)
        assert (m(x) < 0).any()  # no ReLU after the add


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: R.BasicBlock(64, 64), lambda: tv.BasicBlock(64, 64)),
        (
            lambda: R.BasicBlock(32, 64, 2),
            lambda: tv.BasicBlock(32, 64, 2, downsample=tv.nn.Sequential(tv.conv1x1(32, 64, 2), tv.nn.BatchNorm2d(64))),
        ),
        (lambda: R.Bottleneck(256, 64), lambda: tv.Bottleneck(256, 64)),
        (
            lambda: R.Bottleneck(64, 32, 2),
            lambda: tv.Bottleneck(
                64, 32, 2, downsample=tv.nn.Sequential(tv.conv1x1(64, 128, 2), tv.nn.BatchNorm2d(128))
            ),
        ),
        (lambda: R.ResNeXtBottleneck(256, 64), lambda: tv.Bottleneck(256, 64, groups=32, base_width=4)),
        (
            lambda: R.ResNeXtBottleneck(64, 64, 2, 8, 8),
            lambda: tv.Bottleneck(
                64,
                64,
                2,
                downsample=tv.nn.Sequential(tv.conv1x1(64, 256, 2), tv.nn.BatchNorm2d(256)),
                groups=8,
                base_width=8,
            ),
        ),
    ],
)
def test_agrees_with_torchvision(ours, theirs):
    a, b = randomize_bn(ours()).eval().double(), theirs().eval().double()
    # Same state_dict keys: torchvision's block loads ours without remapping.
    assert set(a.state_dict()) == set(b.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, a.conv1.in_channels, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert_matches_reference(a(x), b(x), what="reference vs torchvision")
