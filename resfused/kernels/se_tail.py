"""The squeeze-excitation tail, compiled (csrc/cpu/se_tail.cpp) and in plain PyTorch, with the
compiled op's fake kernel and autograd formula.

    scale_add_relu(y, gate, r)   = relu(y * gate[n, c] + r),        gate [N, C]
    with g' = grad, 0 where out <= 0:  d/dy = g' * gate[n, c],  d/dgate = sum over H, W of g' * y,  d/dr = g'

The backward is written with existing ops: g' by the compiled add_relu_backward (the same ReLU mask
from the output), the rest in PyTorch.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from resfused import _native
from resfused.kernels.base import Kernel
from resfused.runtime import buffer_cache


class ReferenceScaleAddRelu(Kernel):
    name = "reference"
    differentiable = True

    def run(self, y, gate, residual):
        return torch.relu(y * gate[:, :, None, None] + residual)


def gated_backward(masked, y, gate):
    """(d/dy, d/dgate, d/dresidual) of relu(y * gate[n, c] + residual), given g' (`masked`)."""
    grad_gate = (masked * y).sum((2, 3), dtype=torch.promote_types(y.dtype, torch.float32)).to(gate.dtype)
    return masked * gate[:, :, None, None], grad_gate, masked


def _register() -> None:
    @torch.library.register_fake("resfused::scale_add_relu")
    def _(y, gate, residual):
        torch._check(y.dim() == 4, lambda: f"resfused.scale_add_relu: 'y' must be 4-D, got {y.dim()}-D")
        return torch.empty_like(y, memory_format=suggest_memory_format(y))

    def setup(ctx, inputs, output):
        y, gate, _ = inputs
        ctx.save_for_backward(y, gate, output)

    def backward(ctx, grad):
        y, gate, out = ctx.saved_tensors
        with buffer_cache.scope():  # see kernels/conv_train.py
            masked = torch.ops.resfused.add_relu_backward(
                grad.contiguous(memory_format=suggest_memory_format(out)), out
            )
        return gated_backward(masked, y, gate)

    torch.library.register_autograd("resfused::scale_add_relu", backward, setup_context=setup)


if _native.has_op("scale_add_relu") and _native.has_op("add_relu_backward"):
    _register()
