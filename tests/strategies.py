"""Hypothesis strategies shared by kernel and block tests."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

BLOCK_TYPES = ("BasicBlock", "PreActBasicBlock", "Bottleneck", "ResNeXtBottleneck")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block: str
    in_ch: int
    planes: int
    stride: int
    groups: int  # ResNeXt cardinality (1 otherwise)
    base_width: int
    batch: int
    height: int
    width: int
    dtype: torch.dtype
    channels_last: bool

    def constructor_args(self) -> tuple:
        if self.block == "ResNeXtBottleneck":
            return (self.in_ch, self.planes, self.stride, self.groups, self.base_width)
        return (self.in_ch, self.planes, self.stride)

    def input(self, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.randn(self.batch, self.in_ch, self.height, self.width, generator=generator).to(self.dtype)
        return x.to(memory_format=torch.channels_last) if self.channels_last else x


@st.composite
def block_configs(draw, dtypes=(torch.float32,), max_batch: int = 3, max_hw: int = 9) -> BlockConfig:
    """A block type with channels, stride 1/2, groups, batch 0..3, odd H/W down to 1, dtype, layout."""
    block = draw(st.sampled_from(BLOCK_TYPES))
    groups, base_width = 1, 64
    if block == "ResNeXtBottleneck":
        groups = draw(st.sampled_from([2, 4, 8]))
        base_width = draw(st.sampled_from([4, 8, 16]))
        planes = draw(st.sampled_from([16, 32]))  # width = planes*base_width/64*groups >= groups
    elif block == "Bottleneck":
        planes = draw(st.integers(1, 12))
    else:
        planes = draw(st.integers(1, 24))
    in_ch = draw(st.integers(1, 32))
    if draw(st.booleans()):  # identity shortcut where the block allows it
        in_ch = planes * (4 if "Bottleneck" in block else 1)
    return BlockConfig(
        block=block,
        in_ch=in_ch,
        planes=planes,
        stride=draw(st.sampled_from([1, 2])),
        groups=groups,
        base_width=base_width,
        batch=draw(st.integers(0, max_batch)),
        height=draw(st.integers(1, max_hw)),
        width=draw(st.integers(1, max_hw)),
        dtype=draw(st.sampled_from(list(dtypes))),
        channels_last=draw(st.booleans()),
    )
