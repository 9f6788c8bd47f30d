"""The elementwise tails as ops: argument checks, then the kernel the backend ranks first.

    add_relu(x, residual)                 = relu(x + residual)         (a block's residual tail)
    scale_shift_act(x, scale, shift, relu) = [relu](x * scale[c] + shift[c])   (eval BatchNorm+ReLU)

Kernels, fake kernels and autograd: resfused/kernels/tails.py.
"""

from __future__ import annotations

import torch

from resfused.kernels.tails import CompiledKernel, ReferenceAddRelu, ReferenceScaleShiftAct
from resfused.ops import checks
from resfused.ops.selection import candidates, compiled_on_every_backend, select

ADD_RELU_KERNELS = compiled_on_every_backend(CompiledKernel("add_relu"))
SCALE_SHIFT_ACT_KERNELS = compiled_on_every_backend(CompiledKernel("scale_shift_act"))
_REFERENCE_ADD_RELU = ReferenceAddRelu()
_REFERENCE_SCALE_SHIFT_ACT = ReferenceScaleShiftAct()


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(x + residual) in one pass (the residual tail of a block)."""
    checks.activation(x, "x")
    checks.like(x, "x", residual, "residual")
    args = (x, residual)
    return select("add_relu", candidates(ADD_RELU_KERNELS, x.device), _REFERENCE_ADD_RELU, args).run(*args)


def scale_shift_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """x * scale[c] + shift[c] (+ReLU) with channels in dim 1: an eval-mode BatchNorm(+ReLU)."""
    checks.activation(x, "x")
    checks.channel_vector(scale, "scale", x, "x")
    checks.channel_vector(shift, "shift", x, "x")
    args = (x, scale, shift, bool(relu))
    kernel = select("scale_shift_act", candidates(SCALE_SHIFT_ACT_KERNELS, x.device), _REFERENCE_SCALE_SHIFT_ACT, args)
    return kernel.run(*args)
