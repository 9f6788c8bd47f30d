"""The block cases every test file draws from: each block type with an identity shortcut and with a
projection, ResNeXt at 4, 8 and 16 channels per group (the grouped kernels' cases), and the
pre-activation bottleneck with a grouped, strided 3x3.

A case is (block name, constructor arguments of the reference block); the input channels are
args[0]. Small channel counts keep the Triton interpreter and the float64 references quick.
"""

import pytest

from resfused import reference as R

BLOCK_CASES = [
    ("BasicBlock", (8, 8, 1)),
    ("BasicBlock", (8, 16, 2)),  # projection
    ("PreActBasicBlock", (8, 8, 1)),
    ("PreActBasicBlock", (8, 16, 2)),  # projection on the pre-activated input
    ("Bottleneck", (32, 8, 1)),
    ("Bottleneck", (16, 8, 2)),  # projection
    ("ResNeXtBottleneck", (128, 32, 1, 8, 8)),  # width 32: 4 channels per group
    ("ResNeXtBottleneck", (32, 32, 2, 4, 8)),  # width 32: 8 channels per group, projection
    ("ResNeXtBottleneck", (32, 16, 2, 2, 64)),  # width 32: 16 channels per group, projection
    ("PreActBottleneck", (32, 8, 1)),
    ("PreActBottleneck", (16, 16, 2, 4)),  # 3x3 with 4 channels per group; projection on the pre-activated input
]

PROJECTION_CASES = [case for case in BLOCK_CASES if getattr(R, case[0])(*case[1]).downsample is not None]
ONE_PER_TYPE = [BLOCK_CASES[1], BLOCK_CASES[3], BLOCK_CASES[5], BLOCK_CASES[7], BLOCK_CASES[10]]


def case_id(case) -> str:
    name, args = case
    return f"{name}{args}"


def parametrize_cases(cases=BLOCK_CASES):
    """@parametrize("name, args", cases) with readable ids."""
    return pytest.mark.parametrize("name, args", cases, ids=[case_id(c) for c in cases])
