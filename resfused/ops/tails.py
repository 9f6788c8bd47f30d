"""Elementwise tails: the residual add+ReLU and the per-channel scale/shift(+ReLU).

Kernels: csrc/cpu/tails.cpp and csrc/cuda/tails.cu, registered as torch.ops.resfused.*; this
file adds their fake (meta) kernels and autograd, and picks native or reference per call.

    add_relu(x, r)                    = relu(x + r)
    scale_shift_act(x, s, b, relu)    = [relu](x * s[c] + b[c]),   c = channel (dim 1)
    d/dx, d/ds, d/db of the latter    = g', sum(g' * x), sum(g')   over all but dim 1,
                                        g' = grad * (x*s+b > 0) when relu
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

from resfused import _native, backend
from resfused.ops import buffer_cache, checks
from resfused.ops.dispatch import record


def _native_kernel(op: str, x: torch.Tensor) -> bool:
    """Use the compiled kernel unless the reference backend is forced or none was built."""
    return backend.resolve(x.device) != "reference" and _native.has_kernel(op, x.device.type)


def add_relu(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(x + residual) in one pass (the residual tail of a block)."""
    checks.activation(x, "x")
    checks.like(x, "x", residual, "residual")
    if _native_kernel("add_relu", x):
        record("add_relu", f"native-{x.device.type}")
        return torch.ops.resfused.add_relu(x, residual)
    record("add_relu", "reference")
    return torch.relu(x + residual)


def scale_shift_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """x * scale[c] + shift[c] (+ReLU) with channels in dim 1: an eval-mode BatchNorm(+ReLU)."""
    checks.activation(x, "x")
    checks.channel_vector(scale, "scale", x, "x")
    checks.channel_vector(shift, "shift", x, "x")
    if _native_kernel("scale_shift_act", x):
        record("scale_shift_act", f"native-{x.device.type}")
        return torch.ops.resfused.scale_shift_act(x, scale, shift, bool(relu))
    record("scale_shift_act", "reference")
    view = [1, -1] + [1] * (x.dim() - 2)
    compute = torch.promote_types(x.dtype, torch.float32)  # BN math in float, as eager BN does
    y = x.to(compute) * scale.to(compute).view(view) + shift.to(compute).view(view)
    return (torch.relu(y) if relu else y).to(x.dtype)


# --- fake kernels and autograd of the compiled ops (registered only when _C provides them) ---

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
        with buffer_cache.scope():  # see ops/conv_train.py
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
