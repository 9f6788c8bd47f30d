"""Where a fused model's CPU time goes, and the fastest it could run with its present algorithms.

    python -m benchmarks.floor_cpu [--model resnet50] [--batch 8] [--dtype fp32 bf16] [--threads 2]

For each dtype, the fused model (channels_last input) and eager NCHW are timed side by side, each
in a worker process of its own (benchmarks.isolation, as in the main benchmark). The fused model
is then profiled (torch.profiler, per-op self time) and its time split by kind of work:

    1x1 conv, 3x3 conv (direct), grouped conv, other conv (the 7x7 stem) and the Winograd GEMMs,
    with the multiply-adds each executes (a Winograd conv counts the GEMMs it really runs);
    Winograd tile transforms, other ops, and what no op accounts for (Python, dispatch, and the
    drift between the profiled and the timed forwards on a noisy machine).

The floor is the time if every conv and GEMM ran at the peak measured in the same run (a large
dense conv or GEMM, benchmarks.cpu.measure_peaks) and everything else took what it took: an
optimistic bound, so a speedup target above eager / floor cannot be reached by running the
same work faster, only by doing less of it (another algorithm). With two dtypes it also prints
fused fp32 / floor of the other dtype, the best dtype-to-dtype speedup.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import torch

from benchmarks import common
from benchmarks.cpu import DTYPES, Case, TimingPlan, make_variant, measure_peaks
from benchmarks.isolation import WorkerPool

# Row order of the table; the first five are convs (timed against the peak), the rest are not.
CONV_KINDS = ("1x1 conv", "3x3 conv (direct)", "grouped conv", "other conv", "Winograd GEMMs")
OTHER_KINDS = ("Winograd transforms", "other ops", "outside ops (Python, drift)")

# Where an op's input, weight and (padding, stride, dilation, groups) sit among its arguments.
_CONV_ARGS = {
    # name, number of arguments -> index of x, of weight, of padding (stride, dilation, groups follow)
    ("mkldnn::_convolution_pointwise", 10): (0, 1, 3),  # unary post-op
    ("mkldnn::_convolution_pointwise", 13): (0, 2, 4),  # .binary(x, other, weight, ...)
    ("mkldnn::_convolution_pointwise_", 13): (1, 2, 4),  # (other, x, weight, ...): sum in place
    ("aten::mkldnn_convolution", 7): (0, 1, 3),
}
# The Winograd GEMMs are one grouped 1x1 conv with this many groups over a 1 x T image.
_WINOGRAD_GROUPS = 36


@dataclasses.dataclass
class Conv:
    x: list[int]
    weight: list[int]
    stride: int
    padding: int
    dilation: int
    groups: int

    def multiply_adds(self) -> int:
        n, c_in, h, w = self.x
        c_out, c_per_group, kh, kw = self.weight
        ho = (h + 2 * self.padding - self.dilation * (kh - 1) - 1) // self.stride + 1
        wo = (w + 2 * self.padding - self.dilation * (kw - 1) - 1) // self.stride + 1
        return n * ho * wo * c_out * c_per_group * kh * kw

    def kind(self) -> str:
        kh, kw = self.weight[2:]
        if self.groups == _WINOGRAD_GROUPS and self.x[2] == 1 and (kh, kw) == (1, 1):
            return "Winograd GEMMs"
        if self.groups > 1:
            return "grouped conv"
        if (kh, kw) == (1, 1):
            return "1x1 conv"
        return "3x3 conv (direct)" if (kh, kw) == (3, 3) else "other conv"


def conv_of(event) -> Conv | None:
    """The conv a profiler event ran, from its recorded shapes and concrete arguments; None for
    an op that is not a conv."""
    shapes, values = event.input_shapes, event.concrete_inputs
    if event.name == "resfused::grouped_conv3x3":  # (x, weight, bias, stride, relu), padding 1
        x, w = shapes[0], shapes[1]
        return Conv(x, w, int(values[3]), 1, 1, x[1] // w[1])
    where = _CONV_ARGS.get((event.name, len(shapes)))
    if where is None:
        return None
    ix, iw, ip = where
    first = lambda v: int(v[0]) if isinstance(v, (list, tuple)) else int(v)  # square kernels only
    return Conv(
        shapes[ix], shapes[iw], first(values[ip + 1]), first(values[ip]), first(values[ip + 2]), int(values[ip + 3])
    )


def split_profile(events, forwards: int) -> dict[str, dict]:
    """Per kind: milliseconds and multiply-adds per forward, and calls, from profiler events."""
    rows = {k: {"ms": 0.0, "macs": 0, "calls": 0} for k in CONV_KINDS + OTHER_KINDS}
    for e in events:
        conv = conv_of(e)
        if conv is not None:
            kind = conv.kind()
            rows[kind]["macs"] += conv.multiply_adds() // forwards
        elif e.name.startswith("resfused::winograd_"):
            kind = "Winograd transforms"
        else:
            kind = "other ops"
        rows[kind]["ms"] += e.self_cpu_time_total / 1e3 / forwards
        rows[kind]["calls"] += 1
    for r in rows.values():
        r["calls"] //= forwards
    return rows


def _profiled_fused(case: Case, forwards: int = 3):
    """make_variant("fused", case), plus the split of its profiled time (info["split"])."""
    call, info = make_variant("fused", case)
    call(), call()
    with torch.profiler.profile(record_shapes=True) as prof:
        for _ in range(forwards):
            call()
    info["split"] = split_profile(prof.events(), forwards)
    del info["output"]
    return call, info


def _measure(pool: WorkerPool, case: Case, threads: int) -> dict:
    # One build at a time: the profile must not share the cores with another worker's build.
    infos = {
        "fused": pool["fused"].build(functools.partial(_profiled_fused, case)),
        "eager_nchw": pool["eager_nchw"].build(functools.partial(make_variant, "eager_nchw", case)),
    }
    plan = TimingPlan.for_kind("model", quick=False)
    times = common.interleaved_rounds(
        {v: pool[v] for v in infos},
        block_s=plan.block_s,
        min_time_s=plan.min_time_s,
        min_rounds=plan.min_rounds,
        warmup_s=plan.warmup_s,
    )
    fused_ms = times["fused"].median_s * 1e3
    split = infos["fused"]["split"]
    # The timed forward less the profiled time inside ops: Python, module calls, dispatch, and
    # any drift between the profiled forwards and the timed ones (a noisy machine).
    split["outside ops (Python, drift)"]["ms"] = max(0.0, fused_ms - sum(r["ms"] for r in split.values()))
    return {"fused_ms": fused_ms, "eager_ms": times["eager_nchw"].median_s * 1e3, "split": split}


def _peak(dtype: str, threads: int) -> float:
    """The better of two peak measurements (a burst of load during one would understate it and
    so overstate the floor)."""
    return max(measure_peaks(DTYPES[dtype], threads, quick=False)["peak_gflops"] for _ in range(2))


def floor_ms(m: dict) -> float:
    """Convs and GEMMs at the peak, the rest as measured."""
    split = m["split"]
    at_peak = sum(2 * split[k]["macs"] / (m["peak_gflops"] * 1e9) * 1e3 for k in CONV_KINDS)
    return at_peak + sum(split[k]["ms"] for k in OTHER_KINDS)


def format_report(case: Case, m: dict) -> str:
    split, peak = m["split"], m["peak_gflops"]
    total = m["fused_ms"]
    lines = [
        f"{case.label}: fused {total:.1f} ms, eager NCHW {m['eager_ms']:.1f} ms "
        f"({m['eager_ms'] / total:.2f}x); peak {peak:.0f} GFLOP/s",
        f"  {'':<32}{'calls':>6}{'ms':>9}{'share':>7}{'GFLOP':>8}{'GFLOP/s':>9}{'% peak':>8}{'at peak ms':>12}",
    ]
    for kind in CONV_KINDS + OTHER_KINDS:
        r = split[kind]
        if not r["calls"] and not r["ms"]:
            continue
        share = f"{100 * r['ms'] / total:6.1f}%"
        if kind in CONV_KINDS:
            gflop = 2 * r["macs"] / 1e9
            rate = gflop / (r["ms"] / 1e3) if r["ms"] else 0.0
            tail = f"{gflop:8.2f}{rate:9.0f}{100 * rate / peak:7.0f}%{1e3 * gflop / peak:12.1f}"
        else:
            tail = f"{'':>8}{'':>9}{'':>8}{'(as is)':>12}"
        lines.append(f"  {kind:<32}{r['calls']:>6}{r['ms']:9.1f}{share}{tail}")
    floor = floor_ms(m)
    lines.append(
        f"  floor {floor:.1f} ms: at most {m['eager_ms'] / floor:.2f}x eager NCHW "
        f"(now {m['eager_ms'] / m['fused_ms']:.2f}x)"
    )
    return "\n".join(lines)


def run(model: str, batch: int, dtypes: list[str], threads: int) -> dict[str, dict]:
    results = {}
    with WorkerPool(threads, preload=("resfused", "torchvision", "benchmarks.cpu")) as pool:
        for d in dtypes:
            case = Case("model", (model, 224), d, batch)
            results[d] = _measure(pool, case, threads) | {"peak_gflops": _peak(d, threads)}
            print(format_report(case, results[d]), flush=True)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a torchvision model name (default resnet50)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.threads < 1:
        raise SystemExit("floor_cpu: --batch and --threads must be >= 1")
    if "bf16" in args.dtype and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise SystemExit("floor_cpu: --dtype bf16 needs oneDNN bf16 support, which this CPU lacks")
    torch.set_num_threads(args.threads)
    results = run(args.model, args.batch, args.dtype, args.threads)
    if "fp32" in results and len(results) > 1:
        for d, m in results.items():
            if d != "fp32":
                print(
                    f"{d}: fused fp32 / fused {d} = {results['fp32']['fused_ms'] / m['fused_ms']:.2f}x now, "
                    f"at most {results['fp32']['fused_ms'] / floor_ms(m):.2f}x (fused fp32 / {d} floor)"
                )


if __name__ == "__main__":
    main()
