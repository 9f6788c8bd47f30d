"""Rounding to bfloat16 as the GPU does, for kernels run by the Triton interpreter.

The interpreter's fp32 -> bf16 cast drops the low 16 bits (rounds toward zero), where the GPU's
cvt.rn rounds to nearest even: up to one bf16 ulp of bias per store, which put an interpreted bf16
PreActBasicBlock at 2.5x the CPU kernels' error (3.6e-2 vs 1.4e-2, found by tests/test_fuzz.py).
Kernels that store bf16 call `round_to_bf16` before the cast under a constexpr flag set only when
interpreting, so that the interpreter checks the numerics the GPU will have; compiled kernels
never run it.
"""

from __future__ import annotations

import triton
import triton.language as tl


def interpreter_rounds_bf16(dtype) -> bool:
    """Whether a kernel storing torch `dtype` must round before its casts (interpreter and bf16).
    Compared by name: the kernel modules import no torch (tools/ compile them offline)."""
    return bool(triton.knobs.runtime.interpret) and str(dtype) == "torch.bfloat16"


@triton.jit
def round_to_bf16(v):
    """fp32 `v` rounded to the nearest bfloat16 (ties to even), still held in fp32; NaN kept.
    Adding 0x7FFF plus the lowest kept bit and then dropping the low 16 bits is round-to-nearest-
    even on the bit pattern (a carry into the exponent is the correct rounding up, up to Inf), so
    the cast after it is exact."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
