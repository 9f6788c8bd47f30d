"""Squeeze-excitation as the blocks need it: the channel gate of an SE module, in plain PyTorch.

    se_gate(y, fc1, fc2)  = sigmoid(fc2(relu(fc1(mean_hw(y)))))      -> [N, C]

`fc1` / `fc2` are the SE module's 1x1 convs (with or without bias), applied as matrix products on
the pooled [N, C] vector: the gate network is a few thousand multiply-adds per image, far below
what a kernel launch or a fused pass would save. The same code runs in eval and train mode (its
autograd is PyTorch's), and torch.compile traces it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def se_gate(y: torch.Tensor, fc1: nn.Conv2d, fc2: nn.Conv2d) -> torch.Tensor:
    """sigmoid(fc2(relu(fc1(mean over H, W of y)))) as an [N, C] tensor in y's dtype."""
    pooled = y.mean((2, 3))
    hidden = torch.relu(F.linear(pooled, fc1.weight.flatten(1), fc1.bias))
    return torch.sigmoid(F.linear(hidden, fc2.weight.flatten(1), fc2.bias))
