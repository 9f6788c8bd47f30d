"""The reference conv: F.conv2d on the folded weights, then the residual add and ReLU in plain
PyTorch. Always available; the fallback of every backend and the numerical baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resfused.kernels.base import ConvParams, Kernel


class ReferenceConv(Kernel):
    name = "reference"
    differentiable = True
    fuses_residual = True

    def run(self, x, p: ConvParams, residual, relu, prologue):
        y = F.conv2d(x, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y
