"""Micro-benchmark of the CPU grouped 3x3 conv (+ bias + ReLU) at ResNeXt-50 32x4d stage shapes.

    python -m benchmarks.grouped_cpu [--batch 1 8] [--dtype fp32 bf16] [--rounds 7] [--tune] [--json out.json]

Variants, timed interleaved in one process with a fixed 2 threads (median over rounds, each round
a torch.utils.benchmark Timer.timeit of a few calls, the variants' order rotated every round):
  ours    torch.ops.resfused.grouped_conv3x3 (channels_last in and out)
  onednn  torch.ops.mkldnn._convolution_pointwise with prepacked weights and its "relu" post-op
  eager   F.conv2d + relu on the same channels_last input
plus a dense 64->64 3x3 conv at 56x56 through oneDNN as the "peak" that the GFLOP/s are set
against (docs/design.md, Measuring speed). `run(batch_sizes, dtypes)` returns one dict per row for the main benchmark.

"used": whether the conv op runs ours for the case: by the shipped table (kernels/conv_grouped.py),
or with --tune by measured selection (resfused.set_tuning) done in this run on the same tensors,
with a fresh cache, so "used" shows where ours was the fastest candidate here. The tuner times
its own few calls; where two kernels are within noise, its pick and this table's medians may differ
(the "tuned" column names the tuner's pick; a "*" marks a pick that is not this table's fastest).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile

import torch
import torch.nn.functional as F

from benchmarks.common import measure_side_by_side, relative_difference

THREADS = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Shape:
    channels: int
    groups: int
    size: int  # input H = W
    stride: int

    @property
    def cpg(self) -> int:
        return self.channels // self.groups

    @property
    def out_size(self) -> int:
        return (self.size - 1) // self.stride + 1

    def flops(self, batch: int) -> int:
        return 2 * batch * self.out_size**2 * self.channels * self.cpg * 9

    def label(self) -> str:
        return f"{self.channels}/{self.groups}g {self.size}x{self.size} s{self.stride}"


# The grouped 3x3 of every ResNeXt-50 32x4d stage, and the stride-2 first block of stages 2-4.
SHAPES = [
    Shape(128, 32, 56, 1),
    Shape(256, 32, 28, 1),
    Shape(512, 32, 14, 1),
    Shape(1024, 32, 7, 1),
    Shape(256, 32, 56, 2),
    Shape(512, 32, 28, 2),
    Shape(1024, 32, 14, 2),
]


def _interleaved_medians(fns: dict, rounds: int, min_time_s: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each fn over exactly `rounds` interleaved rounds of ~min_time_s."""
    timings = measure_side_by_side(
        fns, threads=THREADS, block_s=min_time_s, min_time_s=0, min_rounds=rounds, max_rounds=rounds, warmup_s=0
    )
    return {name: t.median_s for name, t in timings.items()}


def _peak_gflops(rounds: int) -> float:
    """Dense 64->64 3x3 conv, 8x56x56, fp32 through oneDNN: the CPU's practical conv peak."""
    x = torch.randn(8, 64, 56, 56).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3)
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, None)
    fn = lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [1, 1], [1, 1], 1, "none", [], None)  # noqa: E731
    t = _interleaved_medians({"dense": fn}, rounds)["dense"]
    return 2 * 8 * 56 * 56 * 64 * 64 * 9 / t / 1e9


def _tensors(shape: Shape, batch: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    c = shape.channels
    x = (
        torch.randn(batch, c, shape.size, shape.size, generator=g)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last)
    )
    w = (torch.randn(c, shape.cpg, 3, 3, generator=g) / 6).to(dtype)
    b = torch.randn(c, generator=g).to(dtype)
    return x, w, b


def _variants(shape: Shape, batch: int, dtype: torch.dtype, has_ours: bool) -> dict:
    x, w, b = _tensors(shape, batch, dtype)
    s = shape.stride
    packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [s, s], [1, 1], shape.groups, None)
    fns = {
        "onednn": lambda: torch.ops.mkldnn._convolution_pointwise(
            x, packed, b, [1, 1], [s, s], [1, 1], shape.groups, "relu", [], None
        ),
        "eager": lambda: torch.relu(F.conv2d(x, w, b, s, 1, 1, shape.groups)),
    }
    if has_ours:
        fns["ours"] = lambda: torch.ops.resfused.grouped_conv3x3(x, w, b, s, True)
        # sanity: ours and oneDNN agree (a wrong fast kernel must not post a number)
        ref = fns["onednn"]().float()
        diff = relative_difference(fns["ours"](), ref)
        if diff > (1e-4 if dtype == torch.float32 else 3e-2):
            raise RuntimeError(f"grouped_cpu: ours differs from oneDNN by {diff:.2e} (relative) on {shape.label()}")
    return fns


def _measured_choice(shape: Shape, batch: int, dtype: torch.dtype):
    """The kernel measured selection picks for this case (the conv op with tuning on), and the
    tuner's median ms per candidate."""
    from resfused.kernels.base import ConvParams
    from resfused.ops import conv_bias_act, trace_kernels
    from resfused.runtime import tuning_cache

    x, w, b = _tensors(shape, batch, dtype)
    p = ConvParams(w, b, (shape.stride,) * 2, (1, 1), (1, 1), shape.groups)
    with torch.no_grad(), trace_kernels() as ran:
        conv_bias_act(x, p, relu=True, inputs_finite=True)
    (choice,) = ran
    if choice.source != "measured":
        raise RuntimeError(f"grouped_cpu: the choice for {shape.label()} was not measured: {choice}")
    entry = tuning_cache.lookup(_tuning_key(x, p))
    return choice.kernel, dict(entry["ms"])


def _tuning_key(x, p) -> str:
    from resfused.ops.selection import conv_tuning_key

    return conv_tuning_key(x, p, None, None, True)


@contextlib.contextmanager
def _fresh_tuning(on: bool):
    """Tuning on with an empty cache of its own (so every choice is measured in this run)."""
    if not on:
        yield
        return
    from resfused.runtime import tuning_cache

    with tempfile.TemporaryDirectory(prefix="resfused-bench-tuning-") as directory:
        tuning_cache.set_cache_dir(directory)
        try:
            with tuning_cache.enabled_as(True):
                yield
        finally:
            tuning_cache.set_cache_dir(None)
            tuning_cache.forget()


def run(
    batch_sizes=(1, 8),
    dtypes=("fp32", "bf16"),
    shapes=SHAPES,
    rounds: int = 7,
    verbose: bool = False,
    tune: bool = False,
) -> list[dict]:
    """One dict per (shape, batch, dtype): median ms, GFLOP/s and speedups of ours over the others.
    tune: "adapter_selects" is measured selection's choice in this run (module docstring)."""
    import resfused  # noqa: F401  (loads the kernels)
    from resfused import _native
    from resfused.kernels.base import ConvParams
    from resfused.kernels.conv_grouped import GroupedConv3x3, cpu_path

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        peak = _peak_gflops(rounds)
        has_kernel = _native.has_kernel("grouped_conv3x3", "cpu")
        adapter = GroupedConv3x3()
        rows = []
        for shape in shapes:
            path = cpu_path(shape.cpg) if has_kernel else "missing"
            for batch in batch_sizes:
                for dname in dtypes:
                    dtype = DTYPES[dname]
                    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                        continue
                    # The scalar fallback is for correctness only (it is 10-50x slower); not timed.
                    has_ours = path in ("avx512", "avx2")
                    med = _interleaved_medians(_variants(shape, batch, dtype, has_ours), rounds)
                    p = ConvParams(
                        torch.empty(shape.channels, shape.cpg, 3, 3, dtype=dtype),
                        None,
                        (shape.stride,) * 2,
                        (1, 1),
                        (1, 1),
                        shape.groups,
                    )
                    probe = torch.empty(batch, shape.channels, 1, 1, dtype=dtype)
                    fl = shape.flops(batch)
                    row = {
                        "shape": shape.label(),
                        "channels_per_group": shape.cpg,
                        "batch": batch,
                        "dtype": dname,
                        "threads": THREADS,
                        "gflop": fl / 1e9,
                        "path": path,
                        "peak_gflops": peak,
                        "adapter_selects": bool(has_kernel and adapter.supports(probe, p, None, False)),
                        "selection": "table",
                    }
                    if tune:
                        with _fresh_tuning(True):
                            kernel, tuned_ms = _measured_choice(shape, batch, dtype)
                        row.update(
                            selection="measured",
                            adapter_selects=kernel == adapter.name,
                            tuned_kernel=kernel,
                            tuned_ms=tuned_ms,
                        )
                    for name, t in med.items():
                        row[f"{name}_ms"] = t * 1e3
                        row[f"{name}_gflops"] = fl / t / 1e9
                    if "ours_ms" in row:
                        row["speedup_vs_onednn"] = row["onednn_ms"] / row["ours_ms"]
                        row["speedup_vs_eager"] = row["eager_ms"] / row["ours_ms"]
                    if tune:  # the tuner's pick against this table's fastest of the same kernels
                        same = {"ours": adapter.name, "onednn": "onednn", "eager": "library+tail"}
                        fastest = min((n for n in same if f"{n}_ms" in row), key=lambda n: row[f"{n}_ms"])
                        row["tuned_is_fastest_here"] = row["tuned_kernel"] == same[fastest]
                    rows.append(row)
                    if verbose:
                        print(format_row(row), flush=True)
        return rows
    finally:
        torch.set_num_threads(previous_threads)


HEADER = (
    f"{'shape':22s} {'b':>2s} {'dtype':5s} {'path':7s} {'ours ms':>8s} {'GF/s':>6s} {'%pk':>4s} "
    f"{'oneDNN ms':>9s} {'GF/s':>6s} {'eager ms':>8s} {'x oneDNN':>8s} {'x eager':>7s} {'used':>4s}"
)


def format_row(r: dict) -> str:
    ours = (
        f"{r['ours_ms']:8.3f} {r['ours_gflops']:6.1f} {100 * r['ours_gflops'] / r['peak_gflops']:3.0f}%"
        if "ours_ms" in r
        else f"{'-':>8s} {'-':>6s} {'-':>4s}"
    )
    speed = (
        f"{r['speedup_vs_onednn']:7.2f}x {r['speedup_vs_eager']:6.2f}x" if "ours_ms" in r else f"{'-':>8s} {'-':>7s}"
    )
    tuned = ""
    if r.get("selection") == "measured":
        tuned = f" {r['tuned_kernel']}{'' if r['tuned_is_fastest_here'] else '*'}"
    return (
        f"{r['shape']:22s} {r['batch']:2d} {r['dtype']:5s} {r['path']:7s} {ours} "
        f"{r['onednn_ms']:9.3f} {r['onednn_gflops']:6.1f} {r['eager_ms']:8.3f} {speed} "
        f"{'yes' if r['adapter_selects'] else 'no':>4s}{tuned}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument(
        "--tune", action="store_true", help="'used' from measured kernel selection in this run, not the shipped table"
    )
    args = ap.parse_args(argv)
    used = (
        "measured selection (tuning on, fresh cache) picks ours in this run; 'tuned': its pick, * where it is "
        "not the fastest of these medians"
        if args.tune
        else "the shipped selection table picks ours"
    )
    print(f"grouped 3x3 + bias + ReLU, {THREADS} threads, median of {args.rounds} interleaved rounds; 'used' = {used}")
    print(HEADER + (" tuned" if args.tune else ""))
    rows = run(args.batch, args.dtype, rounds=args.rounds, verbose=True, tune=args.tune)
    if rows:
        print(f"dense 64->64 3x3 oneDNN fp32 peak in this run: {rows[0]['peak_gflops']:.1f} GFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
