"""Which kernels run: the backend choice.

    auto       per device: CPU tensors -> "cpu"; CUDA tensors -> Triton for dense convs, CUDA C++
               for the grouped 3x3 and the tails (each falls back when not built)
    cpu        C++ CPU kernels and oneDNN post-op fusion (CPU tensors only)
    cuda       CUDA C++ kernels; dense convs run cuDNN followed by the fused CUDA tails
    triton     Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
    reference  pure PyTorch on folded weights, for debugging and as the numerical baseline

Set with `resfused.set_backend(name)`, `with resfused.use_backend(name):` or the environment
variable RESFUSED_BACKEND (read at import). Asking for a backend that cannot run here raises
`BackendUnavailable` naming what is missing. Nothing here queries a GPU at import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from resfused import _native

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says what is missing."""


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def availability(name: str) -> tuple[bool, str]:
    """(usable, why not) for one backend, checked now (may query CUDA; never at import)."""
    if name not in BACKENDS:
        raise ValueError(f"resfused: backend must be one of {BACKENDS}, got {name!r}")
    if name in ("auto", "reference"):
        return True, ""
    if name == "cpu":
        if not torch.backends.mkldnn.is_available():
            return False, "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
        if not _native.loaded:
            return False, f"the C++ extension resfused._C is not loaded ({_native.load_error})"
        return True, ""
    if name == "cuda":
        if not _native.loaded:
            return False, f"the C++ extension resfused._C is not loaded ({_native.load_error})"
        if not _native.with_cuda:
            return False, "resfused._C was built without CUDA kernels (see `python -m resfused.info`)"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        return True, ""
    # triton
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed"
    if not (triton_interpreter_enabled() or torch.cuda.is_available()):
        return False, "no CUDA device is available and TRITON_INTERPRET=1 is not set"
    return True, ""


def _validated(name: str) -> str:
    ok, why = availability(name)
    if not ok:
        raise BackendUnavailable(f"resfused: backend {name!r} is unavailable: {why}")
    return name


_current = os.environ.get("RESFUSED_BACKEND", "auto").strip().lower() or "auto"
if _current not in BACKENDS:
    raise ValueError(f"resfused: RESFUSED_BACKEND must be one of {BACKENDS}, got {_current!r}")
_checked = _current in ("auto", "reference")  # others are checked on first use (no GPU query at import)


def set_backend(name: str) -> None:
    """Force a backend for every fused op ("auto" restores the per-device choice)."""
    global _current, _checked
    _current = _validated(str(name).lower())
    _checked = True


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily force a backend: `with resfused.use_backend("reference"): ...`."""
    global _current, _checked
    previous, previous_checked = _current, _checked
    set_backend(name)
    try:
        yield
    finally:
        _current, _checked = previous, previous_checked


def resolve(device: torch.device) -> str:
    """The name of the kernel lists that serve `device`: the forced backend, or for "auto" the
    device's default: "cpu" for CPU tensors, "auto-cuda" for CUDA tensors (Triton for dense convs,
    CUDA C++ for the rest; unlike the forced "cuda", which sends dense convs to cuDNN).
    """
    global _checked
    if not _checked:
        _validated(_current)
        _checked = True
    if _current == "auto":
        return "auto-cuda" if device.type == "cuda" else "cpu"
    if _current == "cpu" and device.type != "cpu":
        raise BackendUnavailable(f"resfused: backend 'cpu' cannot run on {device} tensors")
    if _current == "cuda" and device.type != "cuda":
        raise BackendUnavailable(f"resfused: backend 'cuda' cannot run on {device} tensors")
    if _current == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise BackendUnavailable(
            f"resfused: backend 'triton' needs CUDA tensors (got {device}) unless TRITON_INTERPRET=1 is set"
        )
    return _current
