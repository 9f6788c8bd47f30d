"""Library convolution (ATen: cuDNN on CUDA, oneDNN/native on CPU) followed by the fused tail.

The path when no fused-epilogue kernel fits: the bias rides in the library conv, and the residual
add + ReLU is one pass of the add_relu tail instead of eager's separate BN, add and ReLU passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resfused.ops import tails
from resfused.ops.conv import ConvParams


class LibraryConvWithTail:
    name = "library+tail"
    fuses_prologue = False
    differentiable = True  # ATen conv and the add_relu tail both have a backward

    def supports(self, x, p: ConvParams, residual, prologue) -> bool:
        return True

    def run(self, x, p: ConvParams, residual, relu, prologue):
        y = F.conv2d(x, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups)
        if residual is not None:
            return tails.add_relu(y, residual) if relu else y + residual
        return torch.relu(y) if relu else y
