"""The one way every op family chooses its kernel.

Each op module lists, per backend, its candidate kernels from the most to the least preferred
(`resfused/kernels/`), and a fallback that takes every call (the reference). `select` walks
the list and returns the first candidate with no reason against it. The reasons are the
candidate's own (`Kernel.unsupported_reasons`: dtype, shape, a kernel that was not built, a rule
measured on this kind of machine) followed by what its capability flags rule out for this call:
no backward while autograd records, untraceable while torch.compile traces, a ReLU that maps NaN
to 0 on an input not known to be finite. While `trace_kernels()` records, every reason of every
skipped candidate is kept with the choice; otherwise the walk stops at each candidate's first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import chain

import torch

from resfused import backend
from resfused.kernels.base import Kernel
from resfused.runtime import trace

NO_BACKWARD = "has no backward, and autograd must flow through this call"
NOT_TRACEABLE = "torch.compile / torch.export cannot trace it"
RELU_DROPS_NAN = "its ReLU maps NaN to 0, and the input is not known to be finite"


def compiled_on_every_backend(kernel: Kernel) -> dict[str, list[Kernel]]:
    """The table of an op whose one candidate is its compiled kernel (for whichever device _C has
    it) on every backend but "reference"."""
    return {"cpu": [kernel], "auto-cuda": [kernel], "cuda": [kernel], "triton": [kernel], "reference": []}


def candidates(table: dict[str, Sequence[Kernel]], device: torch.device) -> Sequence[Kernel]:
    """The ranked candidates of an op family's `table` for the backend that runs on `device`."""
    return table[backend.resolve(device)]


def _flag_reasons(kernel: Kernel, needs_grad: bool, compiling: bool):
    if needs_grad and not kernel.differentiable:
        yield NO_BACKWARD
    if compiling and not kernel.traceable:
        yield NOT_TRACEABLE


def select(
    op: str,
    ranked: Sequence[Kernel],
    fallback: Kernel,
    args: tuple,
    *,
    needs_grad: bool = False,
    relu_input_finite: Callable[[], bool] | None = None,
) -> Kernel:
    """The first kernel of `ranked` that takes `args` (else `fallback`), recorded for trace_kernels.

    relu_input_finite: for a call that applies a ReLU, a function saying whether its inputs are
    known to hold no NaN/Inf; asked only when a candidate whose ReLU drops NaN would otherwise run.
    """
    compiling = torch.compiler.is_compiling()
    tracing = trace.active()
    skipped = [] if tracing else None
    for kernel in ranked:
        reasons = chain(_flag_reasons(kernel, needs_grad, compiling), kernel.unsupported_reasons(*args))
        if tracing:
            found = list(reasons)
            skipped += [(kernel.name, why) for why in found]
        else:
            found = next(reasons, None) is not None
        if not found and relu_input_finite is not None and not kernel.relu_keeps_nan and not relu_input_finite():
            found = True
            if tracing:
                skipped.append((kernel.name, RELU_DROPS_NAN))
        if not found:
            trace.record(op, kernel.name, skipped)
            return kernel
    trace.record(op, fallback.name, skipped)
    return fallback
