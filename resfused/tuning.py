"""Measured kernel selection on this machine (README, Kernel tuning).

    resfused.tune(model, x)      # time the candidate kernels of every conv x meets, at batch 1 and
                                 # x's batch; turns tuning on for the process
    resfused.set_tuning(True)    # or RESFUSED_TUNING=1: each new call signature is timed at its
                                 # first call (a few calls of each candidate)

Off by default: the shipped selection tables choose. With tuning on, an inference conv call on the
CPU (no autograd, not traced by torch.compile) runs the fastest of the kernels that can take it,
timed here, like torch.backends.cudnn.benchmark; every candidate meets the same tolerances
against the reference. Choices are cached per machine signature in
`$RESFUSED_CACHE_DIR/tuning-<hash>.json` (default `~/.cache/resfused`), so the next process reads
them instead of timing. `python -m resfused.info --tuning` lists the cache, `--clear-tuning-cache`
deletes it.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from resfused.runtime import trace, tuning_cache
from resfused.runtime.trace import KernelChoice

__all__ = ["TuningResult", "cache_path", "clear_cache", "set_tuning", "tune", "tuning_enabled"]


def set_tuning(on: bool) -> None:
    """Turn measured kernel selection on or off for this process (RESFUSED_TUNING=1 turns it on at
    start-up). Off, new choices come from the shipped tables again; a module keeps the kernels it
    chose while tuning was on for the shapes it has seen until its weights change."""
    tuning_cache.set_enabled(on)


def tuning_enabled() -> bool:
    return tuning_cache.enabled()


def cache_path() -> str:
    """This machine signature's cache file (it may not exist yet)."""
    return tuning_cache.cache_path()


def clear_cache() -> list[str]:
    """Delete every tuning cache file in the cache directory and forget this process's choices;
    returns the paths removed."""
    return tuning_cache.clear()


@dataclasses.dataclass
class TuningResult:
    seconds: float  # wall time of tune(), the forwards included
    batch_sizes: tuple[int, ...]
    choices: list[KernelChoice]  # every conv call of the forwards, in order
    cache_path: str

    @property
    def measured(self) -> int:
        """Conv calls whose kernel was chosen by timing (now or in an earlier process)."""
        return sum(c.source == "measured" for c in self.choices)


def _batch_of(inputs: tuple, n: int) -> tuple:
    return tuple(t[:n] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in inputs)


def tune(model: torch.nn.Module, example_input, *, batch_sizes=None) -> TuningResult:
    """Choose every conv kernel `model` meets on `example_input` by timing, at batch 1 and at the
    input's batch (or at `batch_sizes`, each at most the input's batch), and turn tuning on for the
    process so that the choices stay when the weights change and new shapes are timed at their
    first call. `example_input`: a tensor, or a tuple of the forward's arguments (batch along dim 0
    of each tensor). The model must be in eval mode: training convs are not tuned.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"resfused.tune: 'model' must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("resfused.tune: 'model' is in training mode; tuning measures eval-mode convs (model.eval())")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
    if first is None or first.dim() == 0:
        raise TypeError("resfused.tune: 'example_input' must be a tensor (or a tuple holding one) with a batch dim")
    batch = first.shape[0]
    sizes = sorted({1, batch} if batch_sizes is None else set(batch_sizes))
    if not sizes or any(not isinstance(n, int) or not 1 <= n <= batch for n in sizes):
        raise ValueError(f"resfused.tune: 'batch_sizes' must be ints from 1 to the input's batch {batch}, got {sizes}")
    tuning_cache.set_enabled(True)
    start = time.perf_counter()
    with torch.no_grad(), trace.trace_kernels() as ran:
        for n in sizes:
            model(*_batch_of(inputs, n))
    return TuningResult(
        seconds=time.perf_counter() - start,
        batch_sizes=tuple(sizes),
        choices=[c for c in ran if c.op == "conv"],
        cache_path=tuning_cache.cache_path(),
    )
