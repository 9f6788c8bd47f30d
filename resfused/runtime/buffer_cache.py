"""Reuse of large CPU activation buffers inside fused forwards (kernel: csrc/cpu/buffer_cache.cpp).

    with buffer_cache.scope():     # what FusedModule / ResidualStage forwards do (scope_for)
        y = stage(x)               # outputs >= 256 KiB reuse blocks freed by earlier forwards

A fresh multi-megabyte buffer costs a page fault (and a kernel zeroing) per 4 KiB page at its
first write; measured on a fused ResNet-50 at batch 8, 2 threads: ~11,500 faults per forward.
Inside a scope, tensors of at least 256 KiB come from blocks of exactly their size that earlier
scoped tensors left behind. Outside a scope every allocation goes to the allocator that was in
place before (the wrapper, installed at the first scope, adds one thread-local read). Idle blocks
are kept up to RESFUSED_BUFFER_CACHE_MB (default 2048; 0 turns the cache off at start-up);
`set_enabled(False)` turns it off at run time and `clear()` frees the idle blocks. Without the
compiled extension, and while torch.compile traces, `scope()` does nothing.

Why a cache and not THP_MEM_ALLOC_ENABLE=1 (PyTorch's transparent huge pages for large CPU
tensors, which faults far less and measured faster still at batch 8): that setting changes
allocation for the whole process, which a library must not decide for its user. The cache
changes it only inside fused forwards. docs/measurements.md has the side-by-side figures.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from resfused import _native

_AVAILABLE = _native.has_op("buffer_cache_scope")
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turn the cache on or off for the fused forwards that start from now on (all threads)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"resfused: 'enabled' must be a bool, got {enabled!r}")
    _enabled = enabled


def enabled() -> bool:
    return _enabled and _AVAILABLE


@dataclasses.dataclass(frozen=True)
class Stats:
    idle_bytes: int  # cached blocks waiting for reuse
    live_bytes: int  # cached blocks held by tensors
    hits: int  # scoped allocations served from the cache
    misses: int  # scoped allocations that needed a new block
    limit_bytes: int  # RESFUSED_BUFFER_CACHE_MB
    installed: bool  # False when another CPU allocator of higher priority is in place


@contextlib.contextmanager
def scope():
    """Serve this thread's large CPU allocations from the cache until the block exits."""
    if not (_enabled and _AVAILABLE) or torch.compiler.is_compiling():
        yield
        return
    torch.ops.resfused.buffer_cache_scope(True)
    try:
        yield
    finally:
        torch.ops.resfused.buffer_cache_scope(False)


def scope_for(module: torch.nn.Module):
    """The scope a fused module's forward runs in: `scope()` without autograd, and in training
    mode, whose backward also allocates inside scopes (kernels/conv_train.py and the fused tails'
    backwards), so the blocks the saved activations free are reused there. Nothing for eval mode
    with autograd (frozen-BN fine-tuning), whose backward is ATen's: blocks kept for the forward
    would be out of its reach (measured on a resnet18 train step at batch 8 before the backward
    was scoped: 24,600 page faults per step with only the forward scoped, 18,200 without)."""
    if torch.is_grad_enabled() and not module.training:
        return contextlib.nullcontext()
    return scope()


def stats() -> Stats | None:
    """The cache's counters, or None without the compiled extension."""
    if not _AVAILABLE:
        return None
    *counters, installed = torch.ops.resfused.buffer_cache_stats()
    return Stats(*counters, installed=bool(installed))


def clear() -> None:
    """Free every idle cached block (blocks still held by tensors return when those die)."""
    if _AVAILABLE:
        torch.ops.resfused.buffer_cache_clear()
