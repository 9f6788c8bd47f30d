"""NaN and Inf on the CPU fast path.

oneDNN's ReLU post-op computes max(x, 0) with an instruction that returns 0 for a NaN, where
torch.relu keeps the NaN. A NaN reaching a oneDNN conv with ReLU would come out as 0, and a
corrupted input would give plausible outputs. So the oneDNN adapter takes a call with ReLU only
when its input and residual are known to be finite. Anything else goes to the ATen conv plus the
fused tail, whose ReLU keeps NaN.

The test is one read of the tensor's bits (resfused::all_finite, csrc/cpu/all_finite.cpp); without
the compiled kernel, one sum, which NaN and +-Inf make non-finite (a finite tensor whose sum
overflows then also reads as non-finite, which only sends it down the exact path).
`torch.isfinite(x).all()` is far slower: 1.6 ms for a 6.4 MB activation where a sum takes 0.05.

Checking every conv's input would add up (~50 convs per ResNet-50 forward). A fused block
therefore checks its own input once and runs its program inside `vouched()`. The tensors inside
are its kernels' outputs from that finite input, so they are finite too, except where float
arithmetic overflows to Inf inside the block. A block whose input is not finite runs the
reference computation instead.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

from resfused import _native

_state = threading.local()


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t` (see the module docstring)."""
    if t.device.type == "cpu" and _native.has_kernel("all_finite", "cpu"):
        return torch.ops.resfused.all_finite(t)
    return math.isfinite(t.sum().item())


@contextlib.contextmanager
def vouched():
    """Within this scope the caller vouches that the ops' inputs are finite."""
    previous = getattr(_state, "vouched", False)
    _state.vouched = True
    try:
        yield
    finally:
        _state.vouched = previous


def is_vouched() -> bool:
    """Whether this thread is inside `vouched()`."""
    return getattr(_state, "vouched", False)


def known_finite(*tensors: torch.Tensor | None) -> bool:
    """Vouched for by the caller, or checked here."""
    return is_vouched() or all(t is None or is_finite(t) for t in tensors)
