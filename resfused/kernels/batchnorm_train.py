"""Training-mode BatchNorm(+ReLU) with batch statistics: the compiled kernel (csrc/cpu/bn_train.cpp,
csrc/cuda/bn_train.cu) with its fake kernel and autograd, and the plain PyTorch reference.

    run(x, weight, bias, eps, relu) -> (y, mean, var)
    y = [relu]((x - mean) / sqrt(var + eps) * weight + bias),  mean, var per channel (dim 1),
    var biased; mean and var in float32 (float64 for float64 x), for the running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from resfused import _native
from resfused.kernels.base import Kernel
from resfused.runtime import buffer_cache


class CompiledBatchNormTrain(Kernel):
    name = "native"
    differentiable = True  # autograd registered below

    def unsupported_reasons(self, x, weight, bias, eps, relu):
        if not _native.has_kernel("bn_train_act", x.device.type):
            yield f"resfused._C has no bn_train_act kernel for {x.device.type}"

    def run(self, x, weight, bias, eps, relu):
        c = x.shape[1]
        weight = weight if weight is not None else x.new_ones(c, dtype=torch.float32)
        bias = bias if bias is not None else x.new_zeros(c, dtype=torch.float32)
        return torch.ops.resfused.bn_train_act(x, weight, bias, eps, bool(relu))


class ReferenceBatchNormTrain(Kernel):
    name = "reference"
    differentiable = True

    def run(self, x, weight, bias, eps, relu):
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=0)
        return (torch.relu(y) if relu else y), mean, var


def _register() -> None:
    @torch.library.register_fake("resfused::bn_train_act")
    def _(x, weight, bias, eps, relu):
        stats = x.new_empty(x.shape[1], dtype=torch.promote_types(x.dtype, torch.float32))
        return torch.empty_like(x, memory_format=suggest_memory_format(x)), stats, torch.empty_like(stats)

    @torch.library.register_fake("resfused::bn_train_act_backward")
    def _(grad_out, x, weight, bias, mean, var, eps, relu):
        return (
            torch.empty_like(x, memory_format=suggest_memory_format(x)),
            torch.empty_like(weight),
            torch.empty_like(bias),
        )

    def setup(ctx, inputs, output):
        x, weight, bias, eps, relu = inputs
        _, mean, var = output
        ctx.eps, ctx.relu = eps, relu
        ctx.mark_non_differentiable(mean, var)
        ctx.save_for_backward(x, weight, bias, mean, var)

    def backward(ctx, grad_y, _grad_mean, _grad_var):
        x, weight, bias, mean, var = ctx.saved_tensors
        grad_y = grad_y.contiguous(memory_format=suggest_memory_format(x))
        with buffer_cache.scope():  # see kernels/conv_train.py
            grads = torch.ops.resfused.bn_train_act_backward(grad_y, x, weight, bias, mean, var, ctx.eps, ctx.relu)
        return (*grads, None, None)

    torch.library.register_autograd("resfused::bn_train_act", backward, setup_context=setup)


if _native.has_op("bn_train_act"):
    _register()
