"""Which kernel ran: a record kept only while someone asks (tests, `resfused.info`, debugging).

    with resfused.ops.trace_kernels() as ran:
        block(x)
    ran  # [("conv", "onednn"), ("conv", "onednn"), ...]

Tests use it to prove the fused path ran and that the reference did not pose as it.
"""

from __future__ import annotations

import contextlib

_log: list[tuple[str, str]] | None = None


def record(op: str, kernel: str) -> None:
    if _log is not None:
        _log.append((op, kernel))


def record_handover(op: str, kernel: str) -> None:
    """The kernel recorded last for `op` handed the call to `kernel` (an adapter's fallback), so
    the record names the kernel that really ran."""
    if _log is None:
        return
    for i in range(len(_log) - 1, -1, -1):
        if _log[i][0] == op:
            _log[i] = (op, kernel)
            return


@contextlib.contextmanager
def trace_kernels():
    global _log
    previous, _log = _log, []
    try:
        yield _log
    finally:
        _log = previous
