"""The elementwise tails, compiled (csrc/cpu/tails.cpp, csrc/cuda/tails.cu) and in plain PyTorch,
with the compiled ops' fake kernels and autograd formulas side by side.

    add_relu(x, r)                    = relu(x + r)
    scale_shift_act(x, s, b, relu)    = [relu](x * s[c] + b[c]),   c = channel (dim 1)
    d/dx, d/ds, d/db of the latter    = g', sum(g' * x), sum(g')   over all but dim 1,
                                        g' = grad, 0 where x*s+b <= 0 when relu
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from resfused import _native
from resfused.kernels.base import Kernel
from resfused.runtime import buffer_cache


class CompiledKernel(Kernel):
    """`torch.ops.resfused.<op>`, for the device types resfused._C has a kernel for."""

    name = "native"
    differentiable = True  # autograd registered with the op

    def __init__(self, op: str):
        self.op = op

    def unsupported_reasons(self, x, *rest):
        if not _native.has_kernel(self.op, x.device.type):
            yield f"resfused._C has no {self.op} kernel for {x.device.type}" + (
                "" if _native.loaded else f" (not loaded: {_native.load_error})"
            )

    def run(self, *args):
        return getattr(torch.ops.resfused, self.op)(*args)


class ReferenceAddRelu(Kernel):
    name = "reference"
    differentiable = True

    def run(self, x, residual):
        return torch.relu(x + residual)


class ReferenceScaleShiftAct(Kernel):
    name = "reference"
    differentiable = True

    def run(self, x, scale, shift, relu):
        view = [1, -1] + [1] * (x.dim() - 2)
        compute = torch.promote_types(x.dtype, torch.float32)  # BN math in float, as eager BN does
        y = x.to(compute) * scale.to(compute).view(view) + shift.to(compute).view(view)
        return (torch.relu(y) if relu else y).to(x.dtype)


def _empty_like_native(x: torch.Tensor) -> torch.Tensor:
    # The kernels write a dense output in x's suggested memory format.
    return torch.empty_like(x, memory_format=suggest_memory_format(x))


def _register() -> None:
    @torch.library.register_fake("resfused::add_relu")
    def _(x, residual):
        return _empty_like_native(x)

    @torch.library.register_fake("resfused::add_relu_backward")
    def _(grad_out, out):
        return _empty_like_native(out)

    @torch.library.register_fake("resfused::scale_shift_act")
    def _(x, scale, shift, relu):
        return _empty_like_native(x)

    @torch.library.register_fake("resfused::scale_shift_act_backward")
    def _(grad_out, x, scale, shift, relu):
        return _empty_like_native(x), torch.empty_like(scale), torch.empty_like(shift)

    def add_relu_setup(ctx, inputs, output):
        ctx.save_for_backward(output)

    def add_relu_backward(ctx, grad):
        (out,) = ctx.saved_tensors
        with buffer_cache.scope():  # see kernels/conv_train.py
            g = torch.ops.resfused.add_relu_backward(grad.contiguous(memory_format=suggest_memory_format(out)), out)
        return g, g  # autograd never accumulates in place into a shared gradient

    torch.library.register_autograd("resfused::add_relu", add_relu_backward, setup_context=add_relu_setup)

    def ssa_setup(ctx, inputs, output):
        x, scale, shift, relu = inputs
        ctx.relu = relu
        ctx.save_for_backward(x, scale, shift)

    def ssa_backward(ctx, grad):
        x, scale, shift = ctx.saved_tensors
        gx, gs, gb = torch.ops.resfused.scale_shift_act_backward(grad, x, scale, shift, ctx.relu)
        return gx, gs, gb, None

    torch.library.register_autograd("resfused::scale_shift_act", ssa_backward, setup_context=ssa_setup)


if _native.has_op("add_relu"):
    _register()
