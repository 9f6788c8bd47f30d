"""Squeeze-excitation as the blocks need it: the channel gate of an SE / ECA module, and the tail
that applies it with the residual add and ReLU in one pass.

    se_gate(y, fc1, fc2)            = sigmoid(fc2(relu(fc1(mean_hw(y)))))          -> [N, C]
    eca_gate(y, conv)               = sigmoid(conv1d over C of mean_hw(y))          -> [N, C]
    scale_add_relu(y, gate, r)      = relu(y * gate[n, c] + r)

The pooled vector is `channel_mean` (ATen's mean; the Triton kernel under the "triton" backend).
The gates run in plain PyTorch: `fc1` / `fc2` (the SE module's 1x1 convs, with or without bias)
become matrix products on the pooled [N, C] vector, a few thousand multiply-adds per image, far
below what a fused kernel would save; the same code runs in eval and train mode (autograd is
PyTorch's) and torch.compile traces it. `scale_add_relu` takes the compiled kernel where there is
one (kernels/se_tail.py: kernel, fake kernel, autograd; CPU), the Triton kernel on CUDA tensors
(kernels/se_tail_triton.py), else the PyTorch reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from resfused.kernels.se_tail import ReferenceScaleAddRelu
from resfused.kernels.se_tail_triton import AtenChannelMean, TritonChannelMean, TritonScaleAddRelu
from resfused.kernels.tails import CompiledKernel
from resfused.ops import checks
from resfused.ops.selection import candidates, select

# The pooled vector: ATen's mean everywhere (one reduction kernel on CUDA already) but under the
# "triton" backend, which runs the Triton one. It gets "auto" on CUDA once a GPU measurement says
# it is faster; none has been made (no GPU on the development machines).
_ATEN_MEAN = AtenChannelMean()
CHANNEL_MEAN_KERNELS = {"cpu": [], "auto-cuda": [], "cuda": [], "triton": [TritonChannelMean()], "reference": []}


def channel_mean(y: torch.Tensor) -> torch.Tensor:
    """mean over H, W of y as an [N, C] tensor in y's dtype (fp32 accumulation)."""
    return select("channel_mean", candidates(CHANNEL_MEAN_KERNELS, y.device), _ATEN_MEAN, (y,)).run(y)


def se_gate(y: torch.Tensor, fc1: nn.Conv2d, fc2: nn.Conv2d) -> torch.Tensor:
    """sigmoid(fc2(relu(fc1(mean over H, W of y)))) as an [N, C] tensor in y's dtype."""
    pooled = channel_mean(y)
    hidden = torch.relu(F.linear(pooled, fc1.weight.flatten(1), fc1.bias))
    return torch.sigmoid(F.linear(hidden, fc2.weight.flatten(1), fc2.bias))


def eca_gate(y: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """ECA's gate sigmoid(conv1d over the channels of mean_hw(y)) as an [N, C] tensor in y's dtype."""
    pooled = channel_mean(y)[:, None, :]  # [N, 1, C]: the channels are the 1-D conv's length
    return torch.sigmoid(F.conv1d(pooled, conv.weight, conv.bias, padding=conv.padding))[:, 0, :]


_NATIVE, _TRITON = CompiledKernel("scale_add_relu"), TritonScaleAddRelu()
# Per backend, most preferred first. _C has the op for the CPU only (csrc/cpu/se_tail.cpp): CUDA
# tensors take the Triton kernel under "auto" and "triton", and the reference under "cuda" (CUDA
# C++ only), where native names no kernel for them.
SCALE_ADD_RELU_KERNELS = {
    "cpu": [_NATIVE],
    "auto-cuda": [_TRITON, _NATIVE],
    "cuda": [_NATIVE],
    "triton": [_TRITON, _NATIVE],
    "reference": [],
}
_REFERENCE_SCALE_ADD_RELU = ReferenceScaleAddRelu()


def scale_add_relu(y: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(y * gate[n, c] + residual) in one pass: the tail of an SE / ECA block (gate [N, C])."""
    checks.activation(y, "y", rank=4)
    checks.like(y, "y", residual, "residual")
    checks.activation(gate, "gate")
    checks.same_device(y, "y", gate, "gate")
    checks.same_dtype(y, "y", gate, "gate")
    if tuple(gate.shape) != tuple(y.shape[:2]):
        raise ValueError(
            f"resfused: 'gate' must have shape {tuple(y.shape[:2])} (one value per image and channel of 'y'), "
            f"got {tuple(gate.shape)}"
        )
    args = (y, gate, residual)
    kernel = select("scale_add_relu", candidates(SCALE_ADD_RELU_KERNELS, y.device), _REFERENCE_SCALE_ADD_RELU, args)
    return kernel.run(*args)
