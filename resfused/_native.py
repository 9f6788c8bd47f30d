"""Loads the compiled extension resfused._C defensively.

The package must import even when `_C` is missing (not built) or broken (built against another
torch): then the ops that need it fall back to the pure-PyTorch reference, a warning says so
once, and `python -m resfused.info` says why.
"""

from __future__ import annotations

import warnings

import torch

_C = None
load_error: str | None = None


def _unsupported_cpu() -> str | None:
    """Why this CPU cannot run the _C that was built (it needs the ISA baseline it was compiled for)."""
    try:
        from resfused._build_config import CPU_BASELINE
    except ImportError:
        return None
    if CPU_BASELINE == "avx2" and not torch.cpu._is_avx2_supported():
        return "it was compiled for AVX2+FMA and this CPU lacks them (rebuild with RESFUSED_CPU_BASELINE=none)"
    return None


try:
    reason = _unsupported_cpu()
    if reason:
        raise ImportError(reason)
    from resfused import _C  # noqa: F811  (registers torch.ops.resfused.*)
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    load_error = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "resfused: the compiled extension resfused._C could not be loaded "
        f"({load_error}); its ops fall back to the pure-PyTorch reference. "
        "Build it with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )

loaded = _C is not None
with_cuda = bool(getattr(_C, "with_cuda", 0))
cuda_archs = getattr(_C, "cuda_archs", "") if with_cuda else ""


def op_names() -> list[str]:
    """Every resfused::<op> that _C registered."""
    if not loaded:
        return []
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("resfused::"))


def _compiled_kernels() -> frozenset[tuple[str, str]]:
    found = set()
    for op in op_names():
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"resfused::{op}", key):
                found.add((op, device))
    return frozenset(found)


# Computed once: _C registers everything when it is imported. A plain set lookup also keeps
# has_kernel traceable by torch.compile (no dispatcher query inside a compiled region).
_kernels = _compiled_kernels()


def has_kernel(op: str, device_type: str) -> bool:
    """Whether `resfused::<op>` has a compiled kernel for `device_type` ("cpu" or "cuda")."""
    return (op, device_type) in _kernels


def has_op(op: str) -> bool:
    """Whether the schema `resfused::<op>` is registered (by _C)."""
    return loaded and op in op_names()
