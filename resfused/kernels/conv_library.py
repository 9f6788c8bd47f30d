"""Library convolution: ATen's conv (cuDNN on CUDA, oneDNN or native on the CPU) with the folded
bias. The op layer follows it with the fused add+ReLU tail where there is a residual, one pass
instead of eager's separate BN, add and ReLU passes. The path when no fused-epilogue kernel fits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resfused.kernels.base import ConvParams, Kernel


class LibraryConv(Kernel):
    name = "library+tail"
    differentiable = True  # ATen's conv has a backward

    def run(self, x, p: ConvParams, residual, relu, prologue):
        y = F.conv2d(x, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups)
        return torch.relu(y) if relu else y
