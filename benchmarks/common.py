"""What every benchmark shares: result records, side-by-side timing, FLOP counting, and the
table / JSON / PNG outputs.

Timing (docs/design.md, Measuring speed): the machines are shared and noisy, so the variants of one case (fused,
eager NCHW, eager channels_last, ...) are timed *interleaved*: after a warm-up, each round times
every variant once (in a rotated order, so no variant always runs right after another), and the
median over rounds is reported. A burst of load from a neighbour then hits all variants alike
and the ratios stay meaningful even when absolute times drift. `interleaved_rounds` takes runners:
InProcessRunner here, or benchmarks.isolation.Worker, which keeps each variant in a process of its
own (the CPU and training benchmarks do: a shared heap skews the comparison, see isolation.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn as nn

# torch.utils.benchmark imports torch.utils.cpp_extension, which on a CUDA build of torch without
# a GPU logs "No CUDA runtime is found" in every process: true, and irrelevant to a timing.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils import benchmark as tbench  # noqa: E402

# Variant names, in table order. "fused" gets channels_last input (the fused kernels' native
# layout); "fused_nchw" is the same fused module given the NCHW input a user may have.
FUSED = "fused"
VARIANTS = ("fused", "fused_nchw", "eager_nchw", "eager_cl", "compile", "onnxruntime", "openvino")
BASELINES = ("eager_nchw", "eager_cl", "compile", "onnxruntime", "openvino")
_SHORT = {"onnxruntime": "ORT", "openvino": "OpenVINO"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass
class Timing:
    """Per-call seconds of one variant: median and interquartile range over the rounds."""

    median_s: float
    iqr_s: float
    rounds: int
    number: int  # calls per timed round

    @classmethod
    def from_samples(cls, samples: list[float], number: int) -> Timing:
        if not samples:
            raise ValueError("Timing.from_samples: 'samples' is empty; time at least one round")
        if len(samples) >= 4:
            q = statistics.quantiles(samples, n=4)
            iqr = q[2] - q[0]
        else:
            iqr = max(samples) - min(samples)
        return cls(statistics.median(samples), iqr, len(samples), number)


@dataclasses.dataclass
class Result:
    """One benchmark row: a block or a model at one batch size and dtype."""

    kind: str  # "block" | "model"
    name: str  # "Bottleneck" / "resnet50"
    config: str  # "256->64 s1 @56x56" / "224x224"
    batch: int
    dtype: str  # "fp32" | "bf16"
    input_shape: list[int]
    flops: int  # conv + linear FLOPs (2 * MACs) of one forward
    times: dict[str, Timing] = dataclasses.field(default_factory=dict)
    compile_time_s: float | None = None  # torch.compile: first call (compile + run)
    fuse_time_s: float | None = None  # resfused.fuse(model) + the first forward
    max_rel_diff: float | None = None  # max|fused - eager| / max|eager|, a sanity check
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)  # fused kernels that ran
    fuse_summary: str | None = None  # models: the first line of fuse()'s report
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name} {self.config} b{self.batch} {self.dtype}"

    def speedup(self, baseline: str) -> float | None:
        """baseline time / fused time (> 1 means fused is faster); None if either is missing."""
        if baseline not in self.times or FUSED not in self.times:
            return None
        return self.times[baseline].median_s / self.times[FUSED].median_s

    def noise(self) -> float:
        """Largest interquartile range / median over the variants: how far to trust the ratios."""
        return max((t.iqr_s / t.median_s for t in self.times.values()), default=0.0)

    def gflops(self, variant: str = FUSED) -> float | None:
        t = self.times.get(variant)
        return None if t is None else self.flops / t.median_s / 1e9

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["label"] = self.label
        d["speedup"] = {b: self.speedup(b) for b in BASELINES if self.speedup(b) is not None}
        d["gflops"] = {v: self.gflops(v) for v in self.times}
        return d


# --------------------------------------------------------------------------------- timing


class InProcessRunner:
    """Times a zero-argument callable in this process (benchmarks.isolation runs one per worker)."""

    def __init__(self, fn: Callable[[], object], threads: int):
        self.fn = fn
        self.timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)

    def warm_up(self, seconds: float) -> float:
        """At least two calls and `seconds`; returns the fastest call after the first (which
        builds plans, prepacked weights and oneDNN primitives). The fastest, not the last: on a
        loaded machine one preempted call would otherwise shrink the calls per round."""
        calls, t0, fastest = 0, time.perf_counter(), math.inf
        while calls < 2 or time.perf_counter() - t0 < seconds:
            t1 = time.perf_counter()
            self.fn()
            if calls > 0:
                fastest = min(fastest, time.perf_counter() - t1)
            calls += 1
        return fastest

    def time(self, number: int) -> float:
        return self.timer.timeit(number).mean  # Measurement.mean is already per call


def measure_side_by_side(
    fns: dict[str, Callable[[], object]],
    *,
    threads: int,
    **rounds,
) -> dict[str, Timing]:
    """Median per-call time of each zero-argument callable, timed in this process in interleaved
    rounds (see interleaved_rounds for the keyword arguments)."""
    return interleaved_rounds({n: InProcessRunner(fn, threads) for n, fn in fns.items()}, **rounds)


def interleaved_rounds(
    runners: dict,
    *,
    block_s: float = 0.05,
    min_time_s: float = 0.3,
    min_rounds: int = 5,
    max_rounds: int = 40,
    warmup_s: float = 0.1,
) -> dict[str, Timing]:
    """Median per-call time of each runner (`warm_up(seconds) -> fastest call`, `time(number) ->
    seconds per call`: an InProcessRunner, or an isolation.Worker in its own process).

    Warm-up: at least two calls and `warmup_s` seconds per variant. Each round then times `number`
    calls of every variant, `number` chosen so a round lasts about `block_s`; rounds continue until
    the slowest variant has run `min_time_s` (between `min_rounds` and `max_rounds`), in an order
    rotated every round so no variant always runs right after another.
    """
    numbers, per_call = {}, {}
    for name, runner in runners.items():
        per_call[name] = runner.warm_up(warmup_s)
        numbers[name] = max(1, round(block_s / max(per_call[name], 1e-9)))
    slowest = max(numbers[n] * per_call[n] for n in runners)
    rounds = int(min(max_rounds, max(min_rounds, math.ceil(min_time_s / max(slowest, 1e-9)))))
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            samples[name].append(runners[name].time(numbers[name]))
    return {n: Timing.from_samples(samples[n], numbers[n]) for n in names}


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|: the sanity check before a fast result is timed."""
    ref = expected.float()
    return ((actual.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def median_call_s(fn: Callable[[], object], *, threads: int, min_time_s: float = 0.5) -> float:
    """Median per-call time of one callable (used for the peak GEMM / conv)."""
    return measure_side_by_side({"x": fn}, threads=threads, block_s=0.0, min_time_s=min_time_s, min_rounds=3)[
        "x"
    ].median_s


# ---------------------------------------------------------------------------- FLOP counting


def conv2d_flops(conv: nn.Conv2d, out_shape) -> int:
    """2 * MACs: each output element of a conv sums (C_in / groups) * kh * kw products."""
    n, c_out, oh, ow = out_shape
    kh, kw = conv.kernel_size
    return 2 * n * oh * ow * c_out * (conv.in_channels // conv.groups) * kh * kw


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Conv2d + Linear FLOPs (2 * MACs) of `model(x)`, from each module's shapes in one forward.

    BN, ReLU, the residual add and pooling are left out: they are O(activations), under 1% of a
    ResNet's FLOPs, and the usual GFLOP/s convention counts only the multiply-adds.
    """
    total = [0]

    def on_conv(mod, inp, out):
        total[0] += conv2d_flops(mod, out.shape)

    def on_linear(mod, inp, out):
        total[0] += 2 * out.numel() * mod.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(on_linear))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if total[0] == 0:
        raise ValueError(f"count_flops: {type(model).__name__} ran no nn.Conv2d / nn.Linear; pass the eager model")
    return total[0]


# ------------------------------------------------------------------------------- outputs


def machine_info(threads: int) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "loadavg_start": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ms(t: Timing | None) -> str:
    return "" if t is None else f"{t.median_s * 1e3:.2f}"


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def table_rows(results: list[Result], peak_gflops: dict[str, float]) -> tuple[list[str], list[list]]:
    """Headers and rows of the printed table (times in ms, speedup = baseline / fused)."""
    has = {v: any(v in r.times for r in results) for v in VARIANTS}
    headers = ["kind", "case", "batch", "dtype", "fused ms"]
    if has["fused_nchw"]:
        headers.append("fused(NCHW in) ms")
    headers += ["eager NCHW ms", "eager CL ms"]
    if has["compile"]:
        headers += ["compile ms", "compile s"]
    runtimes = [v for v in ("onnxruntime", "openvino") if has[v]]
    headers += [f"{_SHORT[v]} ms" for v in runtimes]
    headers += ["vs NCHW", "vs CL"]
    if has["compile"]:
        headers.append("vs compile")
    headers += [f"vs {_SHORT[v]}" for v in runtimes]
    headers += ["GFLOP/s", "% peak", "noise", "rel diff"]
    rows = []
    for r in results:
        row = [r.kind, f"{r.name} {r.config}", r.batch, r.dtype, _ms(r.times.get(FUSED))]
        if has["fused_nchw"]:
            row.append(_ms(r.times.get("fused_nchw")))
        row += [_ms(r.times.get("eager_nchw")), _ms(r.times.get("eager_cl"))]
        if has["compile"]:
            row += [_ms(r.times.get("compile")), "" if r.compile_time_s is None else f"{r.compile_time_s:.1f}"]
        row += [_ms(r.times.get(v)) for v in runtimes]
        row += [_x(r.speedup("eager_nchw")), _x(r.speedup("eager_cl"))]
        if has["compile"]:
            row.append(_x(r.speedup("compile")))
        row += [_x(r.speedup(v)) for v in runtimes]
        g = r.gflops()
        peak = peak_gflops.get(r.dtype)
        row += [
            "" if g is None else f"{g:.1f}",
            "" if g is None or not peak else f"{100 * g / peak:.0f}%",
            f"{100 * r.noise():.0f}%" if r.times else "",
            "" if r.max_rel_diff is None else f"{r.max_rel_diff:.1e}",
        ]
        rows.append(row)
    return headers, rows


def format_table(results: list[Result], peak_gflops: dict[str, float]) -> str:
    from tabulate import tabulate

    headers, rows = table_rows(results, peak_gflops)
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def write_json(path: str, meta: dict, results: list[Result], extra: dict | None = None) -> None:
    doc = {"meta": meta, "results": [r.to_dict() for r in results]}
    doc.update(extra or {})
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=_json_default)


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    return str(o)


def plot_speedups(path: str, results: list[Result], title: str) -> bool:
    """Horizontal bars of fused speedup over each baseline, one group per row; False if nothing to plot."""
    rows = [r for r in results if r.speedup("eager_nchw") is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [b for b in BASELINES if any(r.speedup(b) is not None for r in rows)]
    height = 0.8 / len(baselines)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.32 * len(rows) * max(1, len(baselines) / 1.5)))
    for i, b in enumerate(baselines):
        ys = [k + i * height for k in range(len(rows))]
        ax.barh(ys, [r.speedup(b) or 0.0 for r in rows], height=height, label=f"vs {b}")
    ax.set_yticks([k + height * (len(baselines) - 1) / 2 for k in range(len(rows))])
    ax.set_yticklabels([r.label for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup of fused (baseline time / fused time)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8, framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
