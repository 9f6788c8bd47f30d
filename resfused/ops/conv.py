"""The fused convolution op: conv with folded BN bias, then [residual add], then [ReLU], with an
optional pre-activation prologue relu(x * scale[c] + shift[c]) on the input.

    y = act( conv(pro(x), W') + b' [+ residual] )

Blocks hold a `ConvParams` (BN already folded, see folding.py) and call `conv_bias_act`. Which
kernel runs is decided here from the backend (backend.resolve) and each kernel's `supports`: the
first supporting kernel in the backend's list wins; when none does (dilation, 5x5, an unbuilt
kernel...) the reference kernel runs, and `trace_kernels()` shows it. Kernels that cannot fuse
the prologue get it applied first by the scale_shift_act tail.

Adding a kernel: write an adapter module (a class with `name`, `fuses_prologue`, `supports`,
`run`; `differentiable = True` if autograd flows through `run`, `traceable = False` if
torch.compile cannot trace it, `relu_keeps_nan = False` if its ReLU maps NaN to 0 (it then gets
ReLU calls only for inputs known to be finite, ops/finite.py); optionally `run_into_residual`,
the same computation with the output written over the residual's storage, used when the caller
says the residual is scratch and `can_run_into_residual(x, residual)` agrees) and list it in
`_kernel_table` below. Nothing else changes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from resfused import backend, folding
from resfused.ops import checks, finite, tails
from resfused.ops.dispatch import record

Prologue = tuple[torch.Tensor, torch.Tensor]  # (scale, shift) of a BN, applied with ReLU


@dataclasses.dataclass(eq=False)
class ConvParams:
    """A 2-D convolution with its BatchNorm folded in (weight OIHW, bias per output channel).

    `packed` caches what kernels derive from the weight (oneDNN's blocked layout, ...), keyed by
    kernel name; a ConvParams is rebuilt, never mutated, when the module's parameters change.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    packed: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype | None = None, differentiable: bool = False
    ) -> "ConvParams":
        """Fold `bn` into `conv`. `differentiable`: autograd reaches the modules' parameters
        through the folded weights (then only kernels with a backward are selected)."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"resfused: only zero, explicit padding is supported, got {conv.padding_mode!r} / {conv.padding!r}")
        weight, bias = folding.fold_conv_bn_modules(conv, bn, dtype, differentiable)
        return cls(weight, bias, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)

    def derived(self, key, make):
        """packed[key], made by `make()` on first use (what a kernel derives from the weight)."""
        value = self.packed.get(key)
        if value is None:
            value = self.packed[key] = make()
        return value

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:])

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


class ReferenceConv:
    """Pure PyTorch on the folded weights: always available, the fallback and the baseline."""

    name = "reference"
    fuses_prologue = True
    differentiable = True

    def supports(self, x, p, residual, prologue) -> bool:
        return True

    def run(self, x, p, residual, relu, prologue):
        if prologue is not None:
            x = tails.scale_shift_act(x, *prologue, relu=True)
        y = F.conv2d(x, p.weight, p.bias, p.stride, p.padding, p.dilation, p.groups)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if relu else y


REFERENCE = ReferenceConv()


def _kernel_table() -> dict[str, list]:
    # Imported here, not at the top: adapters import this module for ConvParams.
    from resfused.ops.conv_grouped import GroupedConv3x3
    from resfused.ops.conv_library import LibraryConvWithTail
    from resfused.ops.conv_onednn import OneDNNConv
    from resfused.ops.conv_triton import TritonConv
    from resfused.ops.conv_winograd import WinogradConv

    library = LibraryConvWithTail()
    grouped = GroupedConv3x3()
    return {
        "cpu": [grouped, WinogradConv(), OneDNNConv(), library],
        "gpu": [grouped, TritonConv(), library],
        "cuda": [grouped, library],
        "triton": [TritonConv()],
        "reference": [],
    }


_KERNELS: dict[str, list] | None = None


def kernels_for(backend_name: str) -> list:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _kernel_table()
    return _KERNELS[backend_name]


def check_inputs(x, p: ConvParams, residual, prologue) -> None:
    checks.activation(x, "x", rank=4)
    if x.shape[1] != p.in_channels:
        raise ValueError(f"resfused: 'x' must have {p.in_channels} channels (dim 1) for this conv, got shape {tuple(x.shape)}")
    checks.same_device(p.weight, "weight", x, "x")
    checks.same_dtype(p.weight, "weight", x, "x")
    if residual is not None:
        checks.activation(residual, "residual", rank=4)
        checks.same_device(x, "x", residual, "residual")
        checks.same_dtype(x, "x", residual, "residual")
        expected = (x.shape[0], p.out_channels, *p.output_hw(x.shape[2], x.shape[3]))
        if tuple(residual.shape) != expected:
            raise ValueError(f"resfused: 'residual' must have the conv's output shape {expected}, got {tuple(residual.shape)}")
    if prologue is not None:
        checks.channel_vector(prologue[0], "prologue scale", x, "x")
        checks.channel_vector(prologue[1], "prologue shift", x, "x")


def _needs_autograd(x, p: ConvParams, residual, prologue) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = [x, p.weight, p.bias, residual, *(prologue or ())]
    return any(t is not None and t.requires_grad for t in tensors)


def select_kernel(x, p: ConvParams, residual, prologue, needs_grad: bool, relu: bool = False):
    """The first kernel of the backend's list that supports the call; when autograd must flow
    through it (`needs_grad`), only kernels with a backward (`differentiable = True`) qualify,
    under torch.compile / torch.export only kernels it can trace (`traceable`, default True), and
    for a ReLU on inputs not known to be finite only kernels whose ReLU keeps NaN."""
    compiling = torch.compiler.is_compiling()
    for kernel in kernels_for(backend.resolve(x.device)):
        if needs_grad and not getattr(kernel, "differentiable", False):
            continue
        if compiling and not getattr(kernel, "traceable", True):
            continue
        if kernel.supports(x, p, residual, prologue is not None):
            if relu and not getattr(kernel, "relu_keeps_nan", True) and not finite.known_finite(x, residual):
                continue
            return kernel
    return REFERENCE


def conv_bias_act(
    x: torch.Tensor,
    p: ConvParams,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    prologue: Prologue | None = None,
    residual_is_scratch: bool = False,
) -> torch.Tensor:
    """act(conv(pro(x), W') + b' [+ residual]); see the module docstring.

    residual_is_scratch: no one reads `residual` after this call, so a kernel that can may write
    the result over it (and return it) instead of allocating; ignored when autograd records.
    """
    check_inputs(x, p, residual, prologue)
    needs_grad = _needs_autograd(x, p, residual, prologue)
    kernel = select_kernel(x, p, residual, prologue, needs_grad, relu)
    if prologue is not None and not kernel.fuses_prologue:
        x = tails.scale_shift_act(x, *prologue, relu=True)
        prologue = None
    if (residual_is_scratch and residual is not None and not needs_grad and hasattr(kernel, "run_into_residual")
            and kernel.can_run_into_residual(x, residual)):
        record("conv", f"{kernel.name}(into residual)")
        return kernel.run_into_residual(x, p, residual, relu, prologue)
    record("conv", kernel.name)
    return kernel.run(x, p, residual, relu, prologue)
