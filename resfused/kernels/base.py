"""What every kernel adapter shares: the folded conv's parameters and the `Kernel` base class.

A leaf of the package (it imports only `folding`): adapters, the op layer and the runners import
it, so no adapter ever imports the module that lists it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn

from resfused import folding

Prologue = tuple[torch.Tensor, torch.Tensor]  # (scale, shift) of a BN, applied with ReLU


@dataclasses.dataclass(eq=False)
class ConvParams:
    """A 2-D convolution with its BatchNorm folded in (weight OIHW, bias per output channel).

    `kernel_state` holds what kernels derive from the weight (oneDNN's blocked copies, Winograd's
    transformed weights, Triton's HWIO copy), keyed by kernel name. A ConvParams is rebuilt, never
    mutated, when the module's parameters change, so that state never goes stale.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    kernel_state: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype: torch.dtype | None = None, differentiable: bool = False
    ) -> ConvParams:
        """Fold `bn` into `conv`. `differentiable`: autograd reaches the modules' parameters
        through the folded weights (then only kernels with a backward are selected)."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"resfused: only zero, explicit padding is supported, got {conv.padding_mode!r} / {conv.padding!r}"
            )
        weight, bias = folding.fold_conv_bn_modules(conv, bn, dtype, differentiable)
        return cls(weight, bias, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)

    def state_for(self, kernel_name: str, make: Callable[[], object]):
        """What kernel `kernel_name` derived from the weight, made by `make()` on first use."""
        value = self.kernel_state.get(kernel_name)
        if value is None:
            value = self.kernel_state[kernel_name] = make()
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


class MeasuredRule(str):
    """A reason from a speed rule measured on one machine (the shipped selection table), not a
    limit of the kernel: measured selection (tuning on, ops/selection.py) times the kernel anyway."""


def measured_rule(reason: str) -> str:
    """`MeasuredRule(reason)`, or the plain string under torch.compile: torch 2.11's Dynamo cannot
    construct a str subclass (a graph break, so fullgraph=True fails), and measured selection,
    the only reader of the type, never applies while compiling (ops/selection.py tuning_applies)."""
    return reason if torch.compiler.is_compiling() else MeasuredRule(reason)


class Kernel:
    """One way to compute a call of an op family. The op layer ranks candidates per backend and runs
    the first one with no reason against it (`resfused/ops/selection.py`).

    Capability flags, which the selection turns into reasons:
        differentiable   autograd flows through `run` (needed when a gradient must reach the inputs)
        traceable        torch.compile / torch.export can trace `run`
        relu_keeps_nan   its ReLU returns NaN for NaN, as torch.relu does (oneDNN's post-op returns 0)
    Conv kernels also declare
        fuses_prologue   applies the pre-activation relu(x * scale + shift) while loading its input
        fuses_residual   adds the residual in its epilogue
    and the op layer applies what a kernel does not fuse with the elementwise tails.
    """

    name = "?"
    differentiable = False
    traceable = True
    relu_keeps_nan = True
    fuses_prologue = False
    fuses_residual = False

    def unsupported_reasons(self, *args) -> Iterator[str]:
        """Why this kernel cannot take the call (the op's arguments), most basic first; nothing when
        it can. A generator, so that the common case stops at the first reason."""
        return iter(())

    def supports(self, *args) -> bool:
        """No reason of its own against the call (the capability flags are the selection's)."""
        return next(self.unsupported_reasons(*args), None) is None

    def bind(self, x, p: ConvParams, has_residual: bool, relu: bool, prologue):
        """Conv kernels: `run` for inputs of `x`'s shape, strides, dtype and device as
        f(x, residual), with what the kernel derives from them prepared now (the op layer's
        bound calls, ops/conv.py). The default prepares nothing."""
        return lambda x, residual: self.run(x, p, residual, relu, prologue)

    def __repr__(self) -> str:
        return f"<kernel {self.name}>"
