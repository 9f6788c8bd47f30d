"""Fused residual blocks: same constructors and state_dict keys as `resfused.reference`.

In eval mode a block runs its fused program (below, one `_fused_forward` per block type) on a
cached plan of folded convolutions; the plan is rebuilt whenever a parameter or BN buffer changes
(load_state_dict, in-place edits, `.to(dtype)`), detected through tensor version counters and
storage pointers. In train mode, or when autograd must reach the parameters, the block computes
exactly what the reference computes (the reference forward itself).

    block = resfused.Bottleneck(256, 64).eval()
    block.load_state_dict(reference_block.state_dict())
    with torch.inference_mode():
        y = block(x.to(memory_format=torch.channels_last))
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
import torch.nn as nn

from resfused import folding, reference
from resfused.ops import conv_bias_act, scale_shift_act
from resfused.ops.conv import ConvParams

__all__ = ["BasicBlock", "PreActBasicBlock", "Bottleneck", "ResNeXtBottleneck", "ConvBNAct"]

_warned_grad = False


def _warn_grad_once(name: str) -> None:
    global _warned_grad
    if not _warned_grad:
        _warned_grad = True
        warnings.warn(
            f"resfused: {name} ran in eval mode with autograd enabled, so it used the reference path "
            "(the fused kernels have no autograd through folded BN yet). Run inference under "
            "torch.inference_mode() or torch.no_grad() for the fused path.",
            RuntimeWarning,
            stacklevel=3,
        )


class FusedModule(nn.Module):
    """Plan caching and input checks shared by every fused module.

    Subclasses define `_make_plan(dtype)` (folded ConvParams etc.) and `_fused_forward(x, plan)`;
    the reference math comes from the reference class they also derive from.
    """

    _plan_key = None
    _plan = None

    @classmethod
    def from_reference(cls, block: nn.Module) -> "FusedModule":
        """A fused block that shares `block`'s submodules (parameters and buffers, not copies)
        and plain attributes; `block` must have the reference block's structure."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        for name, child in block.named_children():
            setattr(fused, name, child)
        for name, value in vars(block).items():  # plain attributes: downsample=None, stride, ...
            if not name.startswith("_") and name != "training":
                setattr(fused, name, value)
        fused.train(block.training)
        return fused

    def __getstate__(self):
        # The plan holds backend-specific tensors (oneDNN's opaque blocked weights) that can be
        # neither deep-copied nor pickled; it is derived state, rebuilt on the next forward.
        state = dict(super().__getstate__())
        state.pop("_plan", None)
        state.pop("_plan_key", None)
        return state

    def _state_key(self, x: torch.Tensor):
        tensors = [t for t in self.parameters()] + [b for b in self.buffers()]
        return (x.dtype, x.device, tuple((t.data_ptr(), t._version) for t in tensors))

    def _current_plan(self, x: torch.Tensor):
        key = self._state_key(x)
        if key != self._plan_key:
            self._plan = self._make_plan(x.dtype)
            self._plan_key = key
        return self._plan

    def _check_input(self, x: torch.Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"resfused.{name}: expected a 4-D input (N, C, H, W), got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"resfused.{name}: expected {self.in_channels} input channels, got input of shape {tuple(x.shape)}")
        weight = next(self.parameters())
        if x.dtype != weight.dtype:
            raise TypeError(f"resfused.{name}: input dtype {x.dtype} does not match the block's parameters ({weight.dtype})")
        if x.device != weight.device:
            raise RuntimeError(f"resfused.{name}: input is on {x.device} but the block's parameters are on {weight.device}")

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.training:
            return super().forward(x)
        if self._needs_autograd(x):
            _warn_grad_once(type(self).__name__)
            return super().forward(x)
        return self._fused_forward(x, self._current_plan(x))

    @property
    def in_channels(self) -> int:
        return self.conv1.in_channels if hasattr(self, "conv1") else self.conv.in_channels


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, dtype) -> ConvParams:
    return ConvParams.from_modules(conv, bn, dtype)


def _projection(block, dtype) -> ConvParams | None:
    """The 1x1 conv + BN shortcut (downsample[0], downsample[1]), folded; None for identity."""
    if block.downsample is None:
        return None
    return _folded(block.downsample[0], block.downsample[1], dtype)


class BasicBlock(FusedModule, reference.BasicBlock):
    """conv1+BN1+ReLU; conv2+BN2 + shortcut + ReLU in one call; projection as a folded 1x1."""

    def _make_plan(self, dtype):
        return SimpleNamespace(
            c1=_folded(self.conv1, self.bn1, dtype), c2=_folded(self.conv2, self.bn2, dtype), proj=_projection(self, dtype)
        )

    def _fused_forward(self, x, plan):
        identity = x if plan.proj is None else conv_bias_act(x, plan.proj)
        out = conv_bias_act(x, plan.c1, relu=True)
        return conv_bias_act(out, plan.c2, residual=identity, relu=True)


class PreActBasicBlock(FusedModule, reference.PreActBasicBlock):
    """relu(bn1(x)) as a prologue; conv1 with BN2 folded + ReLU; conv2 + shortcut (no ReLU)."""

    def _make_plan(self, dtype):
        return SimpleNamespace(
            pre=folding.bn_scale_shift(self.bn1, dtype),
            c1=_folded(self.conv1, self.bn2, dtype),
            c2=_folded(self.conv2, None, dtype),
            proj=_projection(self, dtype),
        )

    def _fused_forward(self, x, plan):
        if plan.proj is None:
            # Only conv1 reads the pre-activated input: kernels that can, apply it while loading.
            out = conv_bias_act(x, plan.c1, relu=True, prologue=plan.pre)
            identity = x
        else:
            # conv1 and the projection both read it: materialize it once.
            act = scale_shift_act(x, *plan.pre, relu=True)
            identity = conv_bias_act(act, plan.proj)
            out = conv_bias_act(act, plan.c1, relu=True)
        return conv_bias_act(out, plan.c2, residual=identity, relu=False)


class _FusedBottleneckBase(FusedModule):
    """1x1+BN+ReLU, 3x3 (grouped for ResNeXt)+BN+ReLU, 1x1+BN + shortcut + ReLU fused in one call."""

    def _make_plan(self, dtype):
        return SimpleNamespace(
            c1=_folded(self.conv1, self.bn1, dtype),
            c2=_folded(self.conv2, self.bn2, dtype),
            c3=_folded(self.conv3, self.bn3, dtype),
            proj=_projection(self, dtype),
        )

    def _fused_forward(self, x, plan):
        identity = x if plan.proj is None else conv_bias_act(x, plan.proj)
        out = conv_bias_act(x, plan.c1, relu=True)
        out = conv_bias_act(out, plan.c2, relu=True)
        return conv_bias_act(out, plan.c3, residual=identity, relu=True)


class Bottleneck(_FusedBottleneckBase, reference.Bottleneck):
    pass


class ResNeXtBottleneck(_FusedBottleneckBase, reference.ResNeXtBottleneck):
    pass


class ConvBNAct(FusedModule):
    """conv -> BN -> [ReLU] as one fused conv (a model's stem, for example). Keys: conv.*, bn.*"""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu

    def _reference_forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y) if self.relu else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.training or self._needs_autograd(x):
            return self._reference_forward(x)
        return conv_bias_act(x, self._current_plan(x), relu=self.relu)

    def _make_plan(self, dtype):
        return _folded(self.conv, self.bn, dtype)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"
