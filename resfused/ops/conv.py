"""The fused convolution op: conv with folded BN bias, then [residual add], then [ReLU], with an
optional pre-activation prologue relu(x * scale[c] + shift[c]) on the input.

    y = act( conv(pro(x), W') + b' [+ residual] )

Blocks hold a `ConvParams` (BN already folded, see folding.py) and call `conv_bias_act`. The kernel
is chosen by ops/selection.py from `KERNELS`, the ranked candidates per backend; what the chosen
kernel does not fuse (the prologue, the residual add) is applied here with the elementwise tails.
Adding a conv kernel: an adapter in resfused/kernels/ (a `Kernel` with `unsupported_reasons` and
`run`) and its place in `KERNELS` below.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from resfused import backend
from resfused.kernels.base import ConvParams, Prologue
from resfused.kernels.conv_grouped import GroupedConv3x3
from resfused.kernels.conv_library import LibraryConv
from resfused.kernels.conv_onednn import OneDNNConv
from resfused.kernels.conv_reference import ReferenceConv
from resfused.kernels.conv_triton import TritonConv
from resfused.kernels.conv_winograd import WinogradConv
from resfused.ops import checks, tails
from resfused.ops.selection import candidates, conv_tuning_key, select, select_measured, tuning_applies
from resfused.runtime import finite, trace

__all__ = ["ConvParams", "Prologue", "conv_bias_act", "bind_conv_bias_act", "KERNELS"]

_grouped, _library, _triton = GroupedConv3x3(), LibraryConv(), TritonConv()
KERNELS = {
    "cpu": [_grouped, WinogradConv(), OneDNNConv(), _library],
    "auto-cuda": [_grouped, _triton, _library],
    "cuda": [_grouped, _library],
    "triton": [_triton],
    "reference": [],
}
REFERENCE = ReferenceConv()


def check_inputs(x, p: ConvParams, residual, prologue) -> None:
    if not isinstance(p, ConvParams):
        raise TypeError(
            f"resfused: 'p' must be a ConvParams (ConvParams.from_modules(conv, bn) folds a conv and its BN), "
            f"got {type(p).__name__}"
        )
    if prologue is not None and not (
        isinstance(prologue, (tuple, list))
        and len(prologue) == 2
        and all(isinstance(t, torch.Tensor) for t in prologue)
    ):
        raise TypeError(f"resfused: 'prologue' must be a (scale, shift) pair of tensors, got {prologue!r:.80}")
    checks.activation(x, "x", rank=4)
    if x.shape[1] != p.in_channels:
        raise ValueError(
            f"resfused: 'x' must have {p.in_channels} channels (dim 1) for this conv, got shape {tuple(x.shape)}"
        )
    checks.same_device(p.weight, "weight", x, "x")
    checks.same_dtype(p.weight, "weight", x, "x")
    if residual is not None:
        checks.activation(residual, "residual", rank=4)
        checks.same_device(x, "x", residual, "residual")
        checks.same_dtype(x, "x", residual, "residual")
        expected = (x.shape[0], p.out_channels, *p.output_hw(x.shape[2], x.shape[3]))
        if tuple(residual.shape) != expected:
            raise ValueError(
                f"resfused: 'residual' must have the conv's output shape {expected}, got {tuple(residual.shape)}"
            )
    if prologue is not None:
        checks.channel_vector(prologue[0], "prologue scale", x, "x")
        checks.channel_vector(prologue[1], "prologue shift", x, "x")


def _needs_autograd(x, p: ConvParams, residual, prologue) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x, p.weight, p.bias, residual, *(prologue or ())]
    return any(t is not None and t.requires_grad for t in tensors)


def _choice_is_fixed(x, relu: bool, needs_grad: bool, inputs_finite: bool) -> bool:
    """Whether the kernel choice for a call depends only on its signature (see `_choose`)."""
    if needs_grad or trace.active() or torch.compiler.is_compiling():
        return False
    # The data decides only between a kernel whose ReLU maps NaN to 0 and the ones after it.
    return inputs_finite or not relu or all(k.relu_keeps_nan for k in candidates(KERNELS, x.device))


def _choose(x, p: ConvParams, residual, prologue, relu: bool, needs_grad: bool, inputs_finite: bool):
    """The kernel for this call, remembered in `p` for the calls that repeat it.

    A choice depends only on the backend, the input's device, dtype and shape, the conv's geometry
    (fixed for `p`) and which of residual, prologue and ReLU the call has, so a fused model's
    repeated forwards ask the candidates once per input shape instead of at every call. Calls that
    autograd records, that torch.compile traces, whose ReLU input is not known to be finite (the
    answer depends on the data) or that trace_kernels() records (it wants the reasons) always ask.
    """
    remember = _choice_is_fixed(x, relu, needs_grad, inputs_finite)
    # Tuning on (resfused.set_tuning): the fastest candidate, timed here or read from the cache.
    measure = tuning_applies(x.device, needs_grad, inputs_finite or not relu)
    if remember:
        key = ("choice", measure, backend.get_backend(), x.device, x.dtype, x.shape, residual is None, prologue is None)
        key += (relu,)
        kernel = p.kernel_state.get(key)
        if kernel is not None:
            return kernel
    if measure:
        kernel = select_measured(
            "conv", candidates(KERNELS, x.device), REFERENCE, (x, p, residual, prologue),
            key=conv_tuning_key(x, p, residual, prologue, relu), state=p.kernel_state,
            run=lambda k: _bound_call(k, x, p, residual, relu, prologue, False)(x, residual),
        )  # fmt: skip
        if remember:
            p.kernel_state[key] = kernel
        return kernel
    known_finite = None
    if relu:
        known_finite = (lambda: True) if inputs_finite else (lambda: finite.all_finite(x, residual))
    kernel = select(
        "conv", candidates(KERNELS, x.device), REFERENCE, (x, p, residual, prologue),
        needs_grad=needs_grad, relu_input_finite=known_finite,
    )  # fmt: skip
    if remember:
        p.kernel_state[key] = kernel
    return kernel


def conv_bias_act(
    x: torch.Tensor,
    p: ConvParams,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    prologue: Prologue | None = None,
    may_overwrite_residual: bool = False,
    inputs_finite: bool = False,
) -> torch.Tensor:
    """act(conv(pro(x), W') + b' [+ residual]); see the module docstring.

    may_overwrite_residual: no one reads `residual` after this call, so a kernel that can may write
    the result over it (and return it) instead of allocating; ignored when autograd records.
    inputs_finite: the caller has checked that `x` and `residual` hold no NaN/Inf (a fused block
    checks its input once); otherwise a kernel whose ReLU maps NaN to 0 checks them first.
    """
    check_inputs(x, p, residual, prologue)
    needs_grad = _needs_autograd(x, p, residual, prologue)
    kernel = _choose(x, p, residual, prologue, relu, needs_grad, inputs_finite)
    call = _bound_call(kernel, x, p, residual, relu, prologue, may_overwrite_residual and not needs_grad)
    return call(x, residual)


def bind_conv_bias_act(
    x: torch.Tensor,
    p: ConvParams,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    prologue: Prologue | None = None,
    may_overwrite_residual: bool = False,
    inputs_finite: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None:
    """`conv_bias_act` with these arguments as a function f(x, residual) for later calls with tensors
    of the same shapes, strides, dtype and device (a fused block's plan, blocks.py): the checks, the
    kernel choice and the kernel's argument preparation are done here, once. None when the choice
    cannot be fixed in advance: autograd records the call, torch.compile traces it, trace_kernels()
    wants every call recorded, or a ReLU whose input is not known finite (the choice then depends
    on the data)."""
    check_inputs(x, p, residual, prologue)
    needs_grad = _needs_autograd(x, p, residual, prologue)
    if not _choice_is_fixed(x, relu, needs_grad, inputs_finite):
        return None
    kernel = _choose(x, p, residual, prologue, relu, needs_grad, inputs_finite)
    return _bound_call(kernel, x, p, residual, relu, prologue, may_overwrite_residual)


def _bound_call(kernel, x, p: ConvParams, residual, relu: bool, prologue, may_overwrite_residual: bool):
    """What conv_bias_act does once `kernel` is chosen, as f(x, residual): the kernel's call, with the
    prologue and the residual add applied by the elementwise tails where the kernel does not fuse
    them, and the output written over the residual where the caller allows and the kernel can."""
    if prologue is not None and not kernel.fuses_prologue:
        scale, shift = prologue
        rest = _bound_call(kernel, x, p, residual, relu, None, may_overwrite_residual)
        return lambda x, residual: rest(tails.scale_shift_act(x, scale, shift, relu=True), residual)
    if residual is not None and not kernel.fuses_residual:
        conv = kernel.bind(x, p, False, False, prologue)
        if relu:
            return lambda x, residual: tails.add_relu(conv(x, None), residual)
        return lambda x, residual: conv(x, None) + residual
    run = kernel.bind(x, p, residual is not None, relu, prologue)
    if not (may_overwrite_residual and residual is not None and hasattr(kernel, "bind_into_residual")):
        return run
    into_residual, can_run_into_residual = kernel.bind_into_residual(x, p, relu, prologue), kernel.can_run_into_residual

    def run_into_residual_if_possible(x, residual):
        if can_run_into_residual(x, residual):
            trace.annotate_last("conv", "into residual")
            return into_residual(x, residual)
        return run(x, residual)

    return run_into_residual_if_possible
