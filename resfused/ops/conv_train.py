"""Training-mode convolution as an op: conv(x) for a zero-padded nn.Conv2d with autograd to its
input and parameters, through the kernel the backend ranks first (kernels/conv_train.py).
BatchNorm is not folded in training: the runner follows this with ops.batch_norm_act."""

from __future__ import annotations

import torch
import torch.nn as nn

from resfused.kernels.conv_train import ATenTrainConv, WinogradTrainConv
from resfused.ops import checks
from resfused.ops.selection import candidates, select

_ATEN = ATenTrainConv()
KERNELS = {"cpu": [WinogradTrainConv()], "auto-cuda": [], "cuda": [], "triton": [], "reference": []}


def conv2d_train(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) with autograd; Winograd F(4x4, 3x3) where that trains faster, else ATen's conv."""
    checks.conv_input(x, "x", conv, "conv")
    args = (x, conv)
    return select("conv_train", candidates(KERNELS, x.device), _ATEN, args, needs_grad=True).run(*args)
