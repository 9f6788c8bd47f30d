"""The CPU benchmark: fused blocks and converted models against eager PyTorch (and torch.compile).

Every case is timed with a fixed thread count, each variant in a worker process of its own (its
heap is its own: see benchmarks/isolation.py for why that matters) and the variants' rounds
interleaved (common.interleaved_rounds):

    fused        the resfused module, channels_last input (the fused kernels' native layout:
                 oneDNN and the grouped kernel work in NHWC, so no layout conversion happens)
    fused_nchw   the same module given NCHW input (models by default; blocks with --block-nchw)
    eager_nchw   the reference / torchvision module, eval(), inference_mode, NCHW input: what a
                 user has
    eager_cl     the same after model.to(memory_format=torch.channels_last), channels_last input
    compile      (--compile, models only) torch.compile with inductor freezing, NCHW input
    onnxruntime  (--onnx, models, fp32) the model exported to ONNX, in ONNX Runtime
    openvino     (--onnx, models, fp32) the same file in OpenVINO (benchmarks/onnx_baselines.py)

Speedup = baseline time / fused time. GFLOP/s counts conv + linear multiply-adds (x2); "% peak"
divides by the larger of a dense GEMM's and a dense conv's GFLOP/s measured at the start and at
the end of the same run (the better of the two), in the same dtype and thread count.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib
import os
import sys
import time
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import common, onnx_baselines
from benchmarks.common import DTYPES, Result
from benchmarks.isolation import WorkerPool

CL = torch.channels_last


@dataclasses.dataclass(frozen=True)
class BlockCase:
    """A residual block at one stage shape: `cls(*args, **kwargs)` on a (C, hw, hw) input."""

    cls: str
    args: tuple
    hw: int
    kwargs: tuple = ()  # (key, value) pairs, hashable

    @property
    def config(self) -> str:
        in_ch, ch = self.args[0], self.args[1]
        stride = self.args[2] if len(self.args) > 2 else 1
        extra = "".join(f" {k}={v}" for k, v in self.kwargs)
        return f"{in_ch}->{ch} s{stride}{extra} @{self.hw}x{self.hw}"


# ResNet-18/34 (Basic, PreAct) and ResNet-50 / ResNeXt-50 (Bottleneck, ResNeXt) stages: the
# stride-1 block of each stage and the stride-2 first block of stages 2-4, at their input size.
_BASIC = [
    ((64, 64, 1), 56),
    ((64, 128, 2), 56),
    ((128, 128, 1), 28),
    ((128, 256, 2), 28),
    ((256, 256, 1), 14),
    ((256, 512, 2), 14),
    ((512, 512, 1), 7),
]
_BOTTLENECK = [
    ((256, 64, 1), 56),
    ((256, 128, 2), 56),
    ((512, 128, 1), 28),
    ((512, 256, 2), 28),
    ((1024, 256, 1), 14),
    ((1024, 512, 2), 14),
    ((2048, 512, 1), 7),
]
_RESNEXT = (("groups", 32), ("base_width", 4))

# --quick: tiny shapes that still take every path (identity and projection shortcuts; ResNeXt
# with 4 channels per group, like stage 1 of ResNeXt-50 32x4d).
_QUICK = [
    BlockCase("BasicBlock", (16, 16, 1), 12),
    BlockCase("BasicBlock", (16, 32, 2), 12),
    BlockCase("PreActBasicBlock", (16, 16, 1), 12),
    BlockCase("PreActBasicBlock", (16, 32, 2), 12),
    BlockCase("Bottleneck", (64, 16, 1), 12),
    BlockCase("Bottleneck", (64, 32, 2), 12),
    BlockCase("ResNeXtBottleneck", (64, 16, 1), 12, (("groups", 4), ("base_width", 16))),
    BlockCase("ResNeXtBottleneck", (64, 32, 2), 12, (("groups", 4), ("base_width", 16))),
]

MODELS = ("resnet18", "resnet50", "resnext50_32x4d")
# The rest of the residual family: SE / ECA, ResNet-D shortcuts, pre-activation
# bottlenecks, RegNet X / Y. `--models family` runs these alone.
FAMILY = (
    "regnet_y_800mf",
    "regnet_x_800mf",
    "seresnext50_32x4d",
    "ecaresnet50d",
    "resnet50d",
    "resnetv2_50",
)
MODEL_SETS = {"default": MODELS, "family": FAMILY, "all": MODELS + FAMILY}
# Where each model comes from: torchvision unless listed here (timm.create_model, random weights).
TIMM_MODELS = frozenset({"seresnext50_32x4d", "ecaresnet50d", "resnet50d", "resnetv2_50"})


def model_names(selection: list[str] | None, quick: bool) -> tuple[str, ...]:
    """The models of `--models`: set names (MODEL_SETS) and model names, in order, without repeats.
    None: resnet18 under --quick, else the default set."""
    if selection is None:
        return ("resnet18",) if quick else MODELS
    names: list[str] = []
    for item in selection:
        for name in MODEL_SETS.get(item, (item,)):
            if name not in names:
                names.append(name)
    return tuple(names)


def unknown_models(names) -> list[str]:
    """The names build_model cannot build: neither a TIMM_MODELS entry nor a torchvision model."""
    import torchvision

    return [n for n in names if n not in TIMM_MODELS and n not in torchvision.models.list_models()]


def build_model(name: str) -> nn.Module:
    """A randomly initialised model by name: timm for TIMM_MODELS, else torchvision."""
    if name in TIMM_MODELS:
        import timm

        return timm.create_model(name, pretrained=False)
    import torchvision

    return torchvision.models.get_model(name, weights=None)


def block_cases(quick: bool) -> list[BlockCase]:
    if quick:
        return list(_QUICK)
    cases = []
    for cls in ("BasicBlock", "PreActBasicBlock"):
        cases += [BlockCase(cls, a, hw) for a, hw in _BASIC]
    cases += [BlockCase("Bottleneck", a, hw) for a, hw in _BOTTLENECK]
    cases += [BlockCase("ResNeXtBottleneck", a, hw, _RESNEXT) for a, hw in _BOTTLENECK]
    return cases


@dataclasses.dataclass
class TimingPlan:
    """How long to time each variant (seconds); --quick shrinks everything."""

    block_s: float
    min_time_s: float
    min_rounds: int
    warmup_s: float

    @classmethod
    def for_kind(cls, kind: str, quick: bool) -> TimingPlan:
        if quick:
            return cls(block_s=0.005, min_time_s=0.02, min_rounds=3, warmup_s=0.01)
        if kind == "model":
            return cls(block_s=0.05, min_time_s=1.0, min_rounds=5, warmup_s=0.3)
        return cls(block_s=0.03, min_time_s=0.25, min_rounds=7, warmup_s=0.1)


# ------------------------------------------------------------------------------ peaks


def measure_peaks(dtype: torch.dtype, threads: int, quick: bool) -> dict[str, float]:
    """GFLOP/s of a large dense GEMM and a large dense 3x3 conv (channels_last, oneDNN)."""
    n = 512 if quick else 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    min_t = 0.05 if quick else 0.6
    with torch.inference_mode():
        t_gemm = common.median_call_s(lambda: torch.mm(a, b), threads=threads, min_time_s=min_t)
        batch, c, hw = (1, 64, 28) if quick else (8, 256, 56)
        x = torch.randn(batch, c, hw, hw, dtype=dtype).contiguous(memory_format=CL)
        w = torch.randn(c, c, 3, 3, dtype=dtype).contiguous(memory_format=CL)
        t_conv = common.median_call_s(lambda: F.conv2d(x, w, padding=1), threads=threads, min_time_s=min_t)
    gemm = 2 * n**3 / t_gemm / 1e9
    conv = 2 * batch * hw * hw * c * c * 9 / t_conv / 1e9
    return {
        "gemm_gflops": gemm,
        "gemm_shape": f"{n}x{n}x{n}",
        "conv_gflops": conv,
        "conv_shape": f"{batch}x{c}x{hw}x{hw} k3 {c}->{c}",
        "peak_gflops": max(gemm, conv),
    }


# ------------------------------------------------------------------------------ helpers


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics, so folding does real work (torchvision starts at mean 0, var 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) - 0.5)


def _inference_call(module: nn.Module, x: torch.Tensor):
    def call():
        with torch.inference_mode():
            return module(x)

    return call


def _kernels_used(fused: nn.Module, x: torch.Tensor) -> dict[str, int]:
    from resfused.ops import trace_kernels

    with trace_kernels() as ran, torch.inference_mode():
        fused(x)
    return dict(collections.Counter(f"{c.op}/{c.kernel}" for c in ran))


# Sanity bound on max|fused - eager| / max|eager|: far above rounding (the tests check the
# tolerances against float64); crossing it means the timed fused module computes something else.
_SANE = {"fp32": 1e-3, "bf16": 1e-1}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: a block (`spec` a BlockCase) or a model (`spec` = (torchvision name, resolution))."""

    kind: str
    spec: object
    dtype: str
    batch: int

    @property
    def name(self) -> str:
        return self.spec.cls if self.kind == "block" else self.spec[0]

    @property
    def config(self) -> str:
        return self.spec.config if self.kind == "block" else f"{self.spec[1]}x{self.spec[1]}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.config} b{self.batch} {self.dtype}"

    @property
    def input_shape(self) -> list[int]:
        if self.kind == "block":
            return [self.batch, self.spec.args[0], self.spec.hw, self.spec.hw]
        return [self.batch, 3, self.spec[1], self.spec[1]]

    @property
    def seed(self) -> int:
        return zlib.crc32(self.label.encode())  # the same weights and input in every worker


def make_variant(variant: str, case: Case):
    """Build one variant of `case` in this (worker) process: returns (call, info), the recipe of
    isolation.Worker.build. info: the output (for the sanity check) and, by variant, the FLOP
    count (eager_nchw), fuse time, kernels and fuse summary (fused), compile time (compile)."""
    import resfused

    dtype = DTYPES[case.dtype]
    torch.manual_seed(case.seed)
    gen = torch.Generator().manual_seed(case.seed)
    if case.kind == "block":
        eager = getattr(resfused.reference, case.spec.cls)(*case.spec.args, **dict(case.spec.kwargs))
    else:
        eager = build_model(case.spec[0])
    _randomize_bn(eager, gen)
    eager = eager.eval().to(dtype)
    x = torch.randn(*case.input_shape, generator=gen).to(dtype)
    x_cl = x.contiguous(memory_format=CL)

    info: dict = {}
    if variant in ("fused", "fused_nchw"):
        t0 = time.perf_counter()
        if case.kind == "block":
            module = getattr(resfused, case.spec.cls)(*case.spec.args, **dict(case.spec.kwargs)).eval().to(dtype)
            module.load_state_dict(eager.state_dict())
        else:
            module = resfused.fuse(eager)
            info["fuse_summary"] = str(module.resfused_report).splitlines()[0]
            info["fuse_skipped"] = [f"{e.path}: {e.detail}" for e in module.resfused_report.skipped]
        x_in = x_cl if variant == "fused" else x
        with torch.inference_mode():
            module(x_in)
        info["fuse_time_s"] = time.perf_counter() - t0
        info["kernels"] = _kernels_used(module, x_in)
    elif variant == "eager_nchw":
        module, x_in = eager, x
        info["flops"] = common.count_flops(eager, x)
    elif variant == "eager_cl":
        module, x_in = eager.to(memory_format=CL), x_cl
    elif variant == "compile":
        module, info["compile_time_s"] = _compile(eager, x)
        x_in = x
    elif variant in onnx_baselines.RUNTIMES:
        key = f"{case.name}-{'x'.join(map(str, case.input_shape))}-{case.seed:08x}"
        return onnx_baselines.build(variant, eager, x, key, torch.get_num_threads())
    else:
        raise ValueError(f"make_variant: unknown variant {variant!r}")
    with torch.inference_mode():
        info["output"] = module(x_in).float()
    return _inference_call(module, x_in), info


def bench_case(pool, case: Case, variants: list[str], plan: TimingPlan) -> Result:
    """Time the variants of one case, each in its own worker process (benchmarks.isolation),
    in interleaved rounds; returns one Result row."""
    # Variants whose build time is reported (fuse time, compile time) are built alone; the others
    # side by side, which only shortens the run.
    timed_builds = [v for v in variants if v in ("fused", "compile")]
    infos = {v: pool[v].build(functools.partial(make_variant, v, case)) for v in timed_builds}
    infos.update(
        pool.build_all({v: functools.partial(make_variant, v, case) for v in variants if v not in timed_builds})
    )
    fused, eager = infos["fused"], infos["eager_nchw"]
    row = Result(case.kind, case.name, case.config, case.batch, case.dtype, case.input_shape, eager["flops"])
    row.max_rel_diff = common.relative_difference(fused["output"], eager["output"])
    row.kernels = fused["kernels"]
    if row.max_rel_diff > _SANE[case.dtype]:
        row.notes.append(
            f"fused output differs from eager by {row.max_rel_diff:.1e} (relative), above {_SANE[case.dtype]:.0e}"
        )
    for skipped in fused.get("fuse_skipped", []):
        row.notes.append(f"fuse left a block alone: {skipped}")
    if "conv/reference" in row.kernels:
        row.notes.append("some convs fell back to the reference kernel")
    for runtime in onnx_baselines.RUNTIMES:
        if runtime in infos:
            diff = common.relative_difference(infos[runtime]["output"], eager["output"])
            if diff > _SANE[case.dtype]:
                row.notes.append(f"{runtime} output differs from eager by {diff:.1e} (relative)")
    row.times = common.interleaved_rounds(
        {v: pool[v] for v in variants},
        block_s=plan.block_s,
        min_time_s=plan.min_time_s,
        min_rounds=plan.min_rounds,
        warmup_s=plan.warmup_s,
    )
    if case.kind == "model":
        row.fuse_time_s, row.fuse_summary = fused["fuse_time_s"], fused["fuse_summary"]
        row.compile_time_s = infos.get("compile", {}).get("compile_time_s")
    return row


def host_overhead(model_name: str, resolution: int = 32, calls: int = 200):
    """(call, info) for isolation.Worker.build: the host (Python) time of one fused forward.

    A fused torchvision model at batch 1 and a tiny input. `host_ms` is the Python work of the
    fused modules (checks, plan lookups, the blocks' programs): the forward timed with every kernel
    call of the blocks' recorded plans answered from what it returned before (no conv runs; the
    rest of the forward runs as always), minus the self time the profiler gives the ops that
    still run there (the NaN/Inf checks, the model's own pooling and fc). Python time alone is
    steady where kernel time is not: on a noisy machine a real forward minus its profiled
    kernels' time is no trustworthy difference (docs/measurements.md, Python overhead).
    `forward_ms` is the median real forward, for scale; `convs_run` counts the oneDNN calls the
    profiler saw while the kernels were skipped (0 when the skipping works)."""
    import torchvision

    import resfused

    torch.manual_seed(0)
    fused = resfused.fuse(getattr(torchvision.models, model_name)(weights=None).eval())
    x = torch.randn(1, 3, resolution, resolution).contiguous(memory_format=CL)

    def median_ms(n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fused(x)
            times.append(time.perf_counter() - t0)
        return sorted(times)[n // 2] * 1e3

    with torch.inference_mode():
        for _ in range(10):
            fused(x)
        info = {"model": model_name, "input": f"1x3x{resolution}x{resolution}", "forward_ms": median_ms(calls)}
        with _plan_kernels_skipped(fused, lambda: fused(x)) as skipped:
            # Noise only adds to Python-bound times: the fastest round is the best estimate.
            info["no_kernels_ms"] = min(median_ms(calls // 5) for _ in range(5))
            rounds = []
            for _ in range(5):
                # The legacy (non-Kineto) profiler: on this CUDA build of torch without a GPU,
                # Kineto's CPU profiler slowed these forwards ~10x, the legacy one ~1.5x.
                with torch.autograd.profiler.profile(use_kineto=False) as prof:
                    for _ in range(10):
                        fused(x)
                # Top-level ops only: an op's self time excludes the ops it calls.
                ops = [e for e in prof.key_averages() if e.key.startswith(("aten::", "mkldnn::", "resfused::"))]
                rounds.append(sum(e.self_cpu_time_total for e in ops) / 10 / 1e3)
            info["other_ops_ms"] = min(rounds)
            convs_run = sum(e.count for e in ops if e.key.startswith("mkldnn::")) // 10
    info["skipped_calls"] = skipped
    info["convs_run"] = convs_run
    info["host_ms"] = info["no_kernels_ms"] - info["other_ops_ms"]
    return (lambda: None), info


@contextlib.contextmanager
def _plan_kernels_skipped(model: nn.Module, forward):
    """Inside: each fused block's recorded plan calls (blocks.py, runners.PlanRunner) return the
    tensor they returned in one recording `forward()` instead of running their kernel. Yields the
    number of calls so replaced; restores the plans on exit."""
    from resfused.blocks import FusedModule

    plans = [
        plan for m in model.modules() if isinstance(m, FusedModule) and m._derived for plan in m._derived.plans.values()
    ]
    saved = [list(plan.calls) for plan in plans]
    outputs = {}

    def recording(call, slot):
        def run(x, residual):
            outputs[slot] = call(x, residual)
            return outputs[slot]

        return run

    try:
        for p, (plan, originals) in enumerate(zip(plans, saved)):
            plan.calls[:] = [recording(c, (p, i)) for i, c in enumerate(originals)]
        forward()
        for p, plan in enumerate(plans):
            if all((p, i) in outputs for i in range(len(plan.calls))):  # a plan the forward ran
                plan.calls[:] = [_returning(outputs[p, i]) for i in range(len(plan.calls))]
        yield len(outputs)
    finally:
        for plan, originals in zip(plans, saved):
            plan.calls[:] = originals


def _returning(out):
    return lambda x, residual: out


def _compile(model: nn.Module, x: torch.Tensor):
    """torch.compile with inductor freezing (weights become constants); returns (module, seconds
    of the first call, which compiles)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    inductor_config.freezing = True
    compiled = torch.compile(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x)
    return compiled, time.perf_counter() - t0


# ------------------------------------------------------------------------------ the run


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=False)


def _selected(label: str, filters: list[str] | None) -> bool:
    return not filters or any(f.lower() in label.lower() for f in filters)


def run_cpu_benchmark(args) -> dict:
    """Run the CPU benchmark for parsed CLI `args` (see benchmarks.__main__); returns a dict with
    "results" (list of Result), "meta", "skipped" (what did not run and why) and "grouped"."""
    torch.set_num_threads(args.threads)
    meta = common.machine_info(args.threads)
    meta["args"] = {k: v for k, v in vars(args).items()}
    skipped: list[dict] = []
    dtypes = []
    for d in args.dtype:
        if d == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            msg = (
                "bf16 rows skipped: oneDNN reports no bf16 support on this CPU "
                "(torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)"
            )
            print(f"[bench] {msg}")
            skipped.append({"what": "bf16", "why": msg})
            continue
        dtypes.append(d)
    batches = args.batch or ([1] if args.quick else [1, 8])

    jobs: list[Case] = []
    if not args.models_only:
        for spec in block_cases(args.quick):
            for d in dtypes:
                for b in batches:
                    jobs.append(Case("block", spec, d, b))
    if not args.blocks_only:
        models = model_names(args.models, args.quick)
        res = args.resolution or (64 if args.quick else 224)
        jobs += [Case("model", (name, res), d, b) for name in models for d in dtypes for b in batches]
    selected = [c for c in jobs if _selected(c.label, args.filter)]
    if jobs and not selected:
        labels = "\n  ".join(c.label for c in jobs)
        raise SystemExit(f"resfused-bench: --filter {' '.join(args.filter)} matches none of these cases:\n  {labels}")
    jobs = selected

    peaks = {}
    for d in dtypes:
        print(f"[bench] measuring {d} peak (dense GEMM and conv, {args.threads} threads)...", file=sys.stderr)
        peaks[d] = measure_peaks(DTYPES[d], args.threads, args.quick)

    results: list[Result] = []
    bar = _progress(len(jobs), enabled=not args.no_progress)
    preload = ("resfused", "torchvision", "benchmarks.cpu")
    if any(c.kind == "model" and c.name in TIMM_MODELS for c in jobs):
        preload += ("timm",)
    with WorkerPool(args.threads, preload=preload) as pool:
        pool.start(sorted({v for case in jobs for v in _variants(case, args)}))
        for case in jobs:
            bar.set_description(case.label)
            row = bench_case(pool, case, _variants(case, args), TimingPlan.for_kind(case.kind, args.quick))
            for n in row.notes:
                bar.write(f"[bench] {row.label}: {n}")
            results.append(row)
            bar.update(1)
    bar.close()
    # The peak again at the end, keeping the better of the two: on a shared machine a burst of
    # load during one measurement would otherwise understate the peak (and inflate "% peak").
    for d in dtypes:
        again = measure_peaks(DTYPES[d], args.threads, args.quick)
        peaks[d] = _best_peaks(peaks[d], again)
    meta["peaks"] = peaks

    overhead = []
    if not args.blocks_only and not args.quick:
        with WorkerPool(args.threads, preload=("resfused", "torchvision")) as pool:
            pool.start(["overhead"])
            for name in model_names(args.models, args.quick):
                if name in MODELS and _selected(name, args.filter):
                    overhead.append(pool["overhead"].build(functools.partial(host_overhead, name)))

    grouped = []
    if not args.models_only and not args.skip_grouped:
        grouped = _grouped_rows(batches, dtypes, skipped)
    meta["loadavg_end"] = list(os.getloadavg())
    return {
        "meta": meta,
        "results": results,
        "skipped": skipped,
        "grouped": grouped,
        "peaks": peaks,
        "host_overhead": overhead,
    }


def _variants(case: Case, args) -> list[str]:
    variants = ["fused"]
    if (case.kind == "model" and not args.no_fused_nchw) or (case.kind == "block" and args.block_nchw):
        variants.append("fused_nchw")
    variants += ["eager_nchw", "eager_cl"]
    if case.kind == "model" and args.compile:
        variants.append("compile")
    if case.kind == "model" and args.onnx and case.dtype == "fp32":
        variants += list(onnx_baselines.RUNTIMES)
    return variants


def _best_peaks(a: dict, b: dict) -> dict:
    best = dict(a)
    for k in ("gemm_gflops", "conv_gflops"):
        best[k] = max(a[k], b[k])
        best[k.replace("gflops", "gflops_runs")] = [a[k], b[k]]
    best["peak_gflops"] = max(best["gemm_gflops"], best["conv_gflops"])
    return best


def _grouped_rows(batches: list[int], dtypes: list[str], skipped: list[dict]) -> list[dict]:
    """Rows of the grouped 3x3 micro-benchmark (benchmarks/grouped_cpu.py), when it exists."""
    try:
        grouped = importlib.import_module("benchmarks.grouped_cpu")
    except ModuleNotFoundError as e:
        if e.name != "benchmarks.grouped_cpu":
            raise
        msg = "grouped 3x3 micro-benchmark skipped: benchmarks/grouped_cpu.py does not exist yet"
        print(f"[bench] {msg}")
        skipped.append({"what": "grouped", "why": msg})
        return []
    rows = grouped.run(list(batches), list(dtypes))
    return [
        r.to_dict() if hasattr(r, "to_dict") else dataclasses.asdict(r) if dataclasses.is_dataclass(r) else dict(r)
        for r in rows
    ]
