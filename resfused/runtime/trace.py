"""Which kernel ran, and why the better-ranked ones did not: a record kept only while someone asks
(tests, `python -m resfused.info`, debugging).

    with resfused.ops.trace_kernels() as ran:
        block(x)
    for choice in ran:
        print(choice.op, choice.kernel, choice.skipped, choice.source)
    # conv onednn (('grouped3x3', 'not a grouped 3x3 conv'), ('winograd_f43', 'not a 3x3 conv')) table

Tests use it to prove that the fused path ran and that the reference did not pose as it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple


class KernelChoice(NamedTuple):
    op: str  # the op family: "conv", "add_relu", "scale_shift_act", "batch_norm"
    kernel: str  # the kernel that ran
    skipped: tuple[tuple[str, str], ...] = ()  # (better-ranked kernel, why it did not apply)
    # "table": the first candidate of the shipped ranking with no reason against it;
    # "measured": the fastest candidate timed on this machine (tuning on, ops/selection.py).
    source: str = "table"


_state = threading.local()  # each thread traces its own calls


def active() -> bool:
    return getattr(_state, "log", None) is not None


def record(op: str, kernel: str, skipped: list[tuple[str, str]] | None = None, source: str = "table") -> None:
    log = getattr(_state, "log", None)
    if log is not None:
        log.append(KernelChoice(op, kernel, tuple(skipped or ()), source))


def record_runtime_fallback(op: str, kernel: str, why: str) -> None:
    """The kernel recorded last for `op` found at run time that it could not finish the call (`why`)
    and handed it to `kernel`: the record names the kernel that really ran."""
    log = getattr(_state, "log", None)
    if log is None:
        return
    for i in range(len(log) - 1, -1, -1):
        if log[i].op == op:
            log[i] = log[i]._replace(kernel=kernel, skipped=(*log[i].skipped, (log[i].kernel, why)))
            return


def annotate_last(op: str, note: str) -> None:
    """Add `note` to the kernel name recorded last for `op` ("onednn" -> "onednn(into residual)")."""
    log = getattr(_state, "log", None)
    for i in range(len(log) - 1, -1, -1) if log is not None else ():
        if log[i].op == op:
            log[i] = log[i]._replace(kernel=f"{log[i].kernel}({note})")
            return


@contextlib.contextmanager
def paused():
    """Record nothing inside the block (the trial calls of measured kernel selection are not the
    calls the caller made)."""
    previous = getattr(_state, "log", None)
    _state.log = None
    try:
        yield
    finally:
        _state.log = previous


@contextlib.contextmanager
def trace_kernels():
    """Record every kernel choice this thread makes inside the block, as a list of KernelChoice."""
    previous = getattr(_state, "log", None)
    _state.log = []
    try:
        yield _state.log
    finally:
        _state.log = previous
