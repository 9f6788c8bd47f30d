"""The Triton SE kernels (resfused/triton/se_tail.py) as torch.library ops, and their adapters.

    torch.ops.resfused.scale_add_relu_triton(y, gate, residual) -> relu(y * gate[n, c] + residual)
    torch.ops.resfused.channel_mean_triton(y) -> mean over H, W of y, [N, C] in y's dtype

in y's layout (dense NCHW or channels_last; a residual in the other layout is copied to y's
first). Like conv2d_triton (kernels/conv_triton.py) it is a `triton_op`: eager calls launch the
kernel on CUDA, or run it in the interpreter on CPU tensors under TRITON_INTERPRET=1, and
torch.compile traces through `wrap_triton`. The backward is the native op's formula
(kernels/se_tail.py) in PyTorch ops, with g' = grad, 0 where out <= 0:

    d/dy = g' * gate[n, c],   d/dgate = sum over H, W of g' * y (fp32 accumulation),   d/dr = g'

and the channel mean's, d/dy[n, c, h, w] = grad[n, c] / (H * W), in y's layout.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format
from torch.library import triton_op

from resfused import backend
from resfused.kernels.base import Kernel
from resfused.kernels.conv_triton import _traceable
from resfused.kernels.se_tail import gated_backward

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _layout(y: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if suggest_memory_format(y) == torch.channels_last else torch.contiguous_format


def _check(y, gate, residual) -> None:
    """Argument consistency, with messages naming the argument (the op can be called directly)."""
    if y.dim() != 4:
        raise ValueError(f"scale_add_relu_triton: 'y' must be 4-D (N, C, H, W), got {tuple(y.shape)}")
    if y.dtype not in _DTYPES:
        raise TypeError(f"scale_add_relu_triton: 'y' must have a dtype of {_DTYPES}, got {y.dtype}")
    for name, t in (("gate", gate), ("residual", residual)):
        if t.dtype != y.dtype:
            raise TypeError(f"scale_add_relu_triton: '{name}' has dtype {t.dtype}, 'y' {y.dtype}; they must match")
        if t.device != y.device:
            raise RuntimeError(f"scale_add_relu_triton: '{name}' is on {t.device} but 'y' is on {y.device}")
    if tuple(gate.shape) != tuple(y.shape[:2]):
        raise ValueError(f"scale_add_relu_triton: 'gate' must have shape {tuple(y.shape[:2])}, got {tuple(gate.shape)}")
    if residual.shape != y.shape:
        raise ValueError(
            f"scale_add_relu_triton: 'residual' must have the shape of 'y' {tuple(y.shape)}, "
            f"got {tuple(residual.shape)}"
        )


@triton_op("resfused::scale_add_relu_triton", mutates_args=())
def scale_add_relu_triton(y: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    from resfused.triton import se_tail as kernels  # triton is imported on first use only

    _check(y, gate, residual)
    layout = _layout(y)
    # The kernel reads all three with one set of offsets: one dense layout (a no-op when they have it).
    y, residual = y.contiguous(memory_format=layout), residual.contiguous(memory_format=layout)
    out = torch.empty_like(y, memory_format=layout)
    kernels.launch(
        _traceable(kernels.scale_add_relu_kernel), y, gate.contiguous(), residual, out, layout == torch.channels_last
    )
    return out


@scale_add_relu_triton.register_fake
def _(y, gate, residual):
    _check(y, gate, residual)
    return torch.empty_like(y, memory_format=_layout(y))


def _setup(ctx, inputs, output):
    y, gate, _ = inputs
    ctx.save_for_backward(y, gate, output)


def _backward(ctx, grad):
    y, gate, out = ctx.saved_tensors
    masked = torch.where(out <= 0, torch.zeros((), dtype=grad.dtype, device=grad.device), grad)
    return gated_backward(masked, y, gate)


scale_add_relu_triton.register_autograd(_backward, setup_context=_setup)


def _reasons_against(y):
    """What both kernels cannot take: one program per image, int32 offsets inside it."""
    if y.dtype not in _DTYPES:
        yield f"dtype {y.dtype} (the kernel has {_DTYPES})"
    if y.device.type != "cuda" and not (y.device.type == "cpu" and backend.triton_interpreter_enabled()):
        yield f"needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {y.device.type}"
    if y.shape[1] * y.shape[2] * y.shape[3] >= 2**31:
        yield "one image holds 2^31 or more elements (int32 offsets inside an image)"
    if y.shape[0] > 65535:
        yield f"batch {y.shape[0]} above CUDA's grid limit of 65535 images"


class TritonScaleAddRelu(Kernel):
    """relu(y * gate + residual) in one Triton pass: CUDA tensors (or CPU under TRITON_INTERPRET=1),
    fp16 / bf16 / fp32."""

    name = "triton"
    differentiable = True

    def unsupported_reasons(self, y, gate, residual):
        yield from _reasons_against(y)

    def run(self, y, gate, residual):
        return torch.ops.resfused.scale_add_relu_triton(y, gate, residual)


# ------------------------------------------------------------------------------ channel mean
@triton_op("resfused::channel_mean_triton", mutates_args=())
def channel_mean_triton(y: torch.Tensor) -> torch.Tensor:
    from resfused.triton import se_tail as kernels

    _check_mean(y)
    layout = _layout(y)
    y = y.contiguous(memory_format=layout)
    out = torch.empty(y.shape[:2], dtype=y.dtype, device=y.device)
    kernels.launch_mean(_traceable(kernels.channel_mean_kernel), y, out, layout == torch.channels_last)
    return out


def _check_mean(y) -> None:
    if y.dim() != 4:
        raise ValueError(f"channel_mean_triton: 'y' must be 4-D (N, C, H, W), got {tuple(y.shape)}")
    if y.dtype not in _DTYPES:
        raise TypeError(f"channel_mean_triton: 'y' must have a dtype of {_DTYPES}, got {y.dtype}")


@channel_mean_triton.register_fake
def _(y):
    _check_mean(y)
    return y.new_empty(y.shape[:2])


def _mean_setup(ctx, inputs, output):
    (y,) = inputs
    ctx.shape, ctx.layout = y.shape, _layout(y)


def _mean_backward(ctx, grad):
    n, c, h, w = ctx.shape
    return (grad / (h * w))[:, :, None, None].expand(n, c, h, w).contiguous(memory_format=ctx.layout)


channel_mean_triton.register_autograd(_mean_backward, setup_context=_mean_setup)


class AtenChannelMean(Kernel):
    """y.mean((2, 3)): ATen's reduction (fp32 accumulation for fp16 / bf16), one kernel on CUDA."""

    name = "aten"
    differentiable = True

    def run(self, y):
        return y.mean((2, 3))


class TritonChannelMean(Kernel):
    """The channel mean in one Triton pass: CUDA tensors (or CPU under TRITON_INTERPRET=1)."""

    name = "triton"
    differentiable = True

    def unsupported_reasons(self, y):
        yield from _reasons_against(y)

    def run(self, y):
        return torch.ops.resfused.channel_mean_triton(y)
