"""Has a module changed since a snapshot? Answered without walking its submodules.

A fused block keeps state derived from its parameters (folded weights, bound kernel calls) for as
long as they are unchanged. What a change can touch, and how each is seen:

    a tensor's contents, in place (load_state_dict, optimizer steps, p.mul_())   its version counter
    a tensor's storage (`p.data = t`, module.to(dtype or device))                its data_ptr()
    a parameter, buffer or submodule (re)assigned (`conv.weight = Parameter(...)`,
    `block.downsample = None`, load_state_dict(assign=True), BN running stats set to None)
                                                                                 `generation()`
    the plain attributes folding copies (conv stride, padding, dilation, groups;
    BN eps) or that decide the path (a BN's training flag)                       read directly

`generation()` counts registrations through torch's global registration hooks, installed when
this module is imported: every parameter, buffer or submodule assignment to any nn.Module in the
process bumps it. A snapshot walks its module once and keeps the tensors and modules it found;
`unchanged()` reads only those while the generation is the one it was taken at, and walks again
only after some registration. The tensors' storage addresses and versions are read in one call
to the compiled `_C.tensor_state` (a ResNet-50 Bottleneck's 18 tensors: ~1 us; the Python
fallback reads two attributes per tensor, ~0.2 us per tensor). Not seen, as before: edits through
`.data` (no version counter) and in-place edits of inference tensors (none either): see
`resfused.refresh`.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

from resfused import _native

_generation = 0


def _registered(*_args) -> None:  # returns None: the registered value is kept as it is
    global _generation
    _generation += 1


_module.register_module_module_registration_hook(_registered)
_module.register_module_parameter_registration_hook(_registered)
_module.register_module_buffer_registration_hook(_registered)


def generation() -> int:
    return _generation


_conv_attrs = operator.attrgetter("stride", "padding", "dilation", "groups")
_bn_attrs = operator.attrgetter("eps", "training")
_data_ptr = torch.Tensor.data_ptr


def _tensor_state_py(tensors: list) -> tuple:
    """What _C.tensor_state says, without the compiled extension. map() with the unbound method /
    attrgetter: half the time of the equivalent list comprehensions. Inference tensors (made under
    torch.inference_mode) keep no version counter."""
    return list(map(_data_ptr, tensors)), [-1 if t.is_inference() else t._version for t in tensors]


_tensor_state = getattr(_native._C, "tensor_state", _tensor_state_py)


class Snapshot:
    """The state of `module` and all its submodules, for `unchanged()` to compare against."""

    def __init__(self, module: nn.Module):
        self.generation = _generation
        tensors, convs, bns, stack = [], [], [], [module]
        while stack:  # Module.modules() builds memo sets and generators: ~3x slower
            m = stack.pop()
            tensors += [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
            if isinstance(m, nn.Conv2d):
                convs.append(m)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                bns.append(m)
            stack.extend(c for c in m._modules.values() if c is not None)  # `block.downsample = None`
        self.tensors, self.convs, self.bns = tensors, convs, bns
        self.parameters = [t for t in tensors if isinstance(t, nn.Parameter)]
        self.key = self._current_key()

    def _current_key(self) -> tuple:
        return _tensor_state(self.tensors), list(map(_conv_attrs, self.convs)), list(map(_bn_attrs, self.bns))

    def unchanged(self) -> bool:
        """False when something may have changed: the module then takes a new snapshot, whose
        `same_state` says whether anything did."""
        return self.generation == _generation and self._current_key() == self.key

    def same_state(self, other: Snapshot) -> bool:
        return self.key == other.key and all(map(operator.is_, self.tensors, other.tensors))

    def any_requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters)


def signature(x: torch.Tensor) -> tuple:
    """What a kernel choice and a bound kernel call may depend on in an input tensor."""
    return (x.shape, x.stride(), x.dtype, x.device)
