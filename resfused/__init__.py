"""resfused: fused conv-BN-ReLU, residual add-ReLU tails and a grouped 3x3 path for the residual
blocks of ResNet / ResNeXt (v1 and pre-activation). See README.md."""

from resfused import reference
from resfused.backend import BackendUnavailable, get_backend, set_backend, use_backend
from resfused.blocks import (
    BasicBlock,
    Bottleneck,
    ConvBNAct,
    PreActBasicBlock,
    PreActBottleneck,
    RegNetBottleneck,
    ResNeXtBottleneck,
    SEBasicBlock,
    SEBottleneck,
    refresh,
)
from resfused.convert import fuse
from resfused.stage import ResidualStage
from resfused.tuning import set_tuning, tune

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "PreActBasicBlock",
    "Bottleneck",
    "ResNeXtBottleneck",
    "PreActBottleneck",
    "RegNetBottleneck",
    "SEBasicBlock",
    "SEBottleneck",
    "ConvBNAct",
    "ResidualStage",
    "fuse",
    "refresh",
    "reference",
    "set_backend",
    "get_backend",
    "use_backend",
    "BackendUnavailable",
    "tune",
    "set_tuning",
    "__version__",
]
