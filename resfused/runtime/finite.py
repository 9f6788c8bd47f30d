"""Whether tensors hold NaN or Inf, for the CPU fast path.

oneDNN's ReLU post-op computes max(x, 0) with an instruction that returns 0 for a NaN, where
torch.relu keeps the NaN. A NaN reaching a oneDNN conv with ReLU would come out as 0, and a
corrupted input would give plausible outputs. So a eval-mode fused block checks its input once
(`all_finite`) and runs the reference computation when it is not finite; the result of the check
travels with the block's calls (`conv_bias_act(..., inputs_finite=True)`), because the tensors
inside are its kernels' outputs from that finite input. Only float overflow inside a block
(Inf - Inf) can make a NaN there, and a oneDNN ReLU would map that NaN to 0. A direct
`conv_bias_act` call with ReLU and no such promise checks its own inputs.

The test is one read of the tensor's bits (resfused::all_finite, csrc/cpu/all_finite.cpp); without
the compiled kernel, one sum, which NaN and +-Inf make non-finite (a finite tensor whose sum
overflows then also reads as non-finite, which only sends it down the exact path).
`torch.isfinite(x).all()` is far slower (it writes a bool per element). Measured (the kernel, and
the check's cost in a model): docs/measurements.md, NaN/Inf check kernel and Stage-level NaN/Inf
vouching.
"""

from __future__ import annotations

import math

import torch

from resfused import _native

# The overload itself: calling it skips the op packet's Python dispatch (1.2 instead of 1.6 us).
_all_finite_cpu = torch.ops.resfused.all_finite.default if _native.has_kernel("all_finite", "cpu") else None


def is_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t` (see the module docstring)."""
    if t.is_cpu and _all_finite_cpu is not None:
        return _all_finite_cpu(t)
    return math.isfinite(t.sum().item())


def all_finite(*tensors: torch.Tensor | None) -> bool:
    """No NaN or Inf in any of `tensors` (None counts as finite)."""
    return all(t is None or is_finite(t) for t in tensors)
