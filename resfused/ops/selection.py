"""The one way every op family chooses its kernel.

Each op module lists, per backend, its candidate kernels from the most to the least preferred
(`resfused/kernels/`), and a fallback that takes every call (the reference). `select` walks
the list and returns the first candidate with no reason against it. The reasons are the
candidate's own (`Kernel.unsupported_reasons`: dtype, shape, a kernel that was not built, a rule
measured on this kind of machine) followed by what its capability flags rule out for this call:
no backward while autograd records, untraceable while torch.compile traces, a ReLU that maps NaN
to 0 on an input not known to be finite. While `trace_kernels()` records, every reason of every
skipped candidate is kept with the choice; otherwise the walk stops at each candidate's first.

Measured selection (tuning on: resfused.set_tuning / resfused.tune, runtime/tuning_cache.py):
`select_measured` times every candidate that can take the call and returns the fastest, the
way torch.backends.cudnn.benchmark does. A reason that is only a speed rule measured on another
machine (a `MeasuredRule`, the shipped table) does not rule a candidate out there; every other
reason does. The choice is kept per call signature in memory and in the cache file of this
machine, so the next process reads it instead of timing again.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from itertools import chain

import torch

from resfused import backend
from resfused.kernels.base import Kernel, MeasuredRule
from resfused.runtime import trace, tuning_cache

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


def tuning_applies(device: torch.device, needs_grad: bool, relu_input_finite: bool) -> bool:
    """Whether a call is chosen by `select_measured`: tuning is on, a CPU call (Triton autotunes
    itself on CUDA), and its choice does not depend on the data (no autograd, not traced by
    torch.compile, no ReLU on an input not known to be finite)."""
    return (
        tuning_cache.enabled() and device.type == "cpu" and not needs_grad and relu_input_finite
        and not torch.compiler.is_compiling()
    )  # fmt: skip


def conv_tuning_key(x, p, residual, prologue, relu: bool) -> str:
    """A conv call's signature in the tuning cache: backend, device, dtype, input shape and
    channels_last-ness, the conv's geometry, and which of residual, prologue and ReLU it has."""
    layout = "cl" if x.is_contiguous(memory_format=torch.channels_last) else "other"
    return (
        f"conv|{backend.get_backend()}|{x.device.type}|{str(x.dtype).removeprefix('torch.')}|"
        f"x{list(x.shape)}{layout}|w{list(p.weight.shape)}|s{list(p.stride)}|p{list(p.padding)}|"
        f"d{list(p.dilation)}|g{p.groups}|res{int(residual is not None)}|pro{int(prologue is not None)}|relu{int(relu)}"
    )


# Trials of measured selection: one warm-up call per candidate (it makes packed weights and oneDNN
# primitives), then interleaved rounds in a rotated order, the median per candidate. At least
# MIN_ROUNDS rounds, up to MAX_ROUNDS while the rounds have taken under ROUNDS_BUDGET_S; a call
# shorter than SAMPLE_S is repeated within a sample (up to 16 times) so that the timer's
# resolution and one-off stalls weigh less. A candidate whose fastest sample is above
# HOPELESS x the leader's slowest after two rounds runs no more rounds.
MIN_ROUNDS, MAX_ROUNDS, ROUNDS_BUDGET_S, SAMPLE_S, HOPELESS = 3, 5, 0.02, 2e-4, 1.5


def time_candidates(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed side by side (see above)."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    number = dict.fromkeys(fns, 1)
    live = list(fns)
    start = time.perf_counter()
    for r in range(MAX_ROUNDS):
        for i in range(len(live)):
            name = live[(i + r) % len(live)]
            fn, n = fns[name], number[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
        if r == 0:
            number = {name: max(1, min(16, int(SAMPLE_S / max(samples[name][0], 1e-9)))) for name in fns}
        elif len(live) > 1:
            leader = min(live, key=lambda name: statistics.median(samples[name]))
            live = [name for name in live if min(samples[name]) <= HOPELESS * max(samples[leader])]
        if r + 1 >= MIN_ROUNDS and time.perf_counter() - start > ROUNDS_BUDGET_S:
            break
    return {name: statistics.median(s) for name, s in samples.items()}


def select_measured(
    op: str,
    ranked: Sequence[Kernel],
    fallback: Kernel,
    args: tuple,
    *,
    key: str,
    run: Callable[[Kernel], object],
    state: dict | None = None,
) -> Kernel:
    """The fastest kernel of `ranked` that can take `args`, measured on this machine (or read from
    the tuning cache under `key`, the call's signature), recorded for trace_kernels as "measured".

    For calls whose choice does not depend on the data: no autograd, not traced by torch.compile,
    and no ReLU on an input that is not known to be finite (the caller's conditions). run(kernel):
    the whole call with `kernel`, what the op adds around it included (a trial; its result is
    dropped). state: the dict where kernels keep what they derive from the weight; what a trial
    made for a kernel that lost is dropped from it again (Winograd's transformed weights are 4x
    the weight).
    """
    table, usable, reasons = None, [], []
    for kernel in ranked:
        why = list(_flag_reasons(kernel, False, False)) + list(kernel.unsupported_reasons(*args))
        if not why and table is None:
            table = kernel
        if all(isinstance(w, MeasuredRule) for w in why):
            usable.append(kernel)
        else:
            reasons += [(kernel.name, w) for w in why if not isinstance(w, MeasuredRule)]
    table = table or fallback
    if not usable or usable == [table]:
        trace.record(op, table.name, reasons)
        return table
    by_name = {kernel.name: kernel for kernel in usable}
    entry = tuning_cache.lookup(key)
    if entry is None or entry["kernel"] not in by_name:
        before = set(state) if state is not None else set()
        with trace.paused():
            ms = {name: t * 1e3 for name, t in time_candidates({k.name: lambda k=k: run(k) for k in usable}).items()}
        winner = min(ms, key=ms.get)
        entry = {"kernel": winner, "table": table.name, "ms": ms}
        tuning_cache.store(key, winner, table.name, ms)
        if state is not None:
            for name in by_name.keys() - {winner} - before:  # a trial made it; the winner does not use it
                state.pop(name, None)
    winner, ms = entry["kernel"], entry.get("ms", {})
    if trace.active():
        for name in (kernel.name for kernel in usable if kernel.name != winner):
            note = f"measured {ms[name]:.3g} ms" if name in ms else "measured slower"
            reasons.append((name, f"{note}, {winner} {ms[winner]:.3g} ms" if winner in ms else note))
    trace.record(op, winner, reasons, source="measured")
    return by_name[winner]
