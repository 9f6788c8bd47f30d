"""GPU benchmark: fused blocks, the grouped 3x3 kernel and fused whole models against eager
cuDNN (and torch.compile), each row checked against the float64 reference; and the analytic
DRAM-bytes model, printable on any machine.

    python -m benchmarks.gpu [--gpu-dtype fp16 bf16] [--batch 32] [--compile [MODE]] [--budget S]
    python -m benchmarks.gpu --dram-model     # any machine: DRAM bytes, fused vs eager, per block
    python -m benchmarks.gpu --dry-run        # any machine: every row kind on the CPU, tiny shapes
    python -m benchmarks                      # on a CUDA machine: calls run_gpu_benchmark(args)

Rows, in this order (a --budget stops starting new rows once spent; rows not run are listed):
- grouped: the CUDA grouped 3x3 op (bias + ReLU) at each ResNeXt-50 stage shape against cuDNN's
  grouped conv + ReLU on the same channels_last tensors;
- block: each block at a ResNet-50 / ResNeXt-50 (and ResNet-18, pre-activation) stage shape,
  the fused block (backend auto) on channels_last input against eager NCHW and eager
  channels_last, both with cudnn.benchmark=True;
- model: fuse(resnet50), fuse(resnext50_32x4d) at 224x224 (fp16 and bf16, batch 32 by default)
  against the eager model in channels_last and, with --compile, torch.compile(mode="max-autotune")
  of it. max-autotune compiles and benchmarks many conv kernels (several minutes per model and
  dtype on an H100), so it is off unless asked for; `make gpu-check` runs without it, and the
  compile target then reads "not measured".

Every row first runs once and compares its output with the float64 reference (the module or op in
float64 on the GPU), with the tolerances of docs/design.md, Numerics: fp32 1e-4 of max|ref| with
TF32 off; fp16 / bf16 (and fp32 under --tf32 on) twice the eager same-dtype error plus one rounding
step. The error is printed next to the time; a row over its limit makes the exit status 1.

Timing: triton.testing.do_bench (median, ms) and, for the fused and eager channels_last variants,
triton.testing.do_bench_cudagraph (the calls captured in one CUDA graph: no host overhead) after
the plain timing has warmed the module up (autotuning and folding happen before any capture).
Compiled models are timed with do_bench only: mode="max-autotune" replays CUDA graphs itself.

TF32: --tf32 off (default) or on sets both torch.backends.cudnn.allow_tf32 (eager convolutions, and
the fused fp32 conv, which follows the flag that governs convolutions) and
torch.backends.cuda.matmul.allow_tf32 to the same value; the run prints and records them.

Roofline: t_roof = max(FLOPs / peak FLOP/s, fused DRAM bytes / peak bandwidth), fraction =
t_roof / t_measured, from the peaks of the device in KNOWN_GPUS (dense tensor-core peaks; fp32
uses the TF32 peak when TF32 is on, else the FMA peak). Model rows count FLOPs only (conv and
linear layers): the fraction of the compute peak.

The project's GPU targets, printed with the measured ratio and pass / FAIL / not measured: every
ResNet-50 / ResNeXt-50 block at batch 32 fp16 >= 1.3x eager channels_last; whole models (fp16 and
bf16, batch 32) >= 1.3x eager channels_last and >= 1.0x torch.compile max-autotune (the fused model
with CUDA graphs against the compiled one, which uses them too); the grouped 3x3 at ResNeXt-50
stage 1 (batch 32 fp16) >= 1.5x cuDNN. Ratios without CUDA graphs decide the eager targets.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import time

import torch

# name substring -> (fp16/bf16 dense TFLOP/s, tf32 dense TFLOP/s, fp32 FMA TFLOP/s, DRAM TB/s)
KNOWN_GPUS = {
    "H200": (989.4, 494.7, 66.9, 4.8),
    "H100 PCIe": (756.0, 378.0, 51.2, 2.0),
    "H100": (989.4, 494.7, 66.9, 3.35),  # SXM
    "A100-PCIE": (312.0, 156.0, 19.5, 1.94),
    "A100": (312.0, 156.0, 19.5, 2.04),  # SXM 80 GB
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class BlockCase:
    """One block at one stage shape: constructor args and the input's (C, H, W)."""

    label: str
    block: str
    args: tuple
    hw: int

    @property
    def in_ch(self) -> int:
        return self.args[0]


# ResNet-50 / ResNeXt-50 32x4d (ImageNet 224): first block of each stage (projection shortcut,
# stride 2 from stage 2 on) and a later identity block. BasicBlock / PreAct at ResNet-18/34 shapes.
CASES = [
    BlockCase("r50 s1 proj", "Bottleneck", (64, 64, 1), 56),
    BlockCase("r50 s1 id", "Bottleneck", (256, 64, 1), 56),
    BlockCase("r50 s2 proj", "Bottleneck", (256, 128, 2), 56),
    BlockCase("r50 s2 id", "Bottleneck", (512, 128, 1), 28),
    BlockCase("r50 s3 proj", "Bottleneck", (512, 256, 2), 28),
    BlockCase("r50 s3 id", "Bottleneck", (1024, 256, 1), 14),
    BlockCase("r50 s4 proj", "Bottleneck", (1024, 512, 2), 14),
    BlockCase("r50 s4 id", "Bottleneck", (2048, 512, 1), 7),
    BlockCase("x50 s1 id", "ResNeXtBottleneck", (256, 64, 1, 32, 4), 56),
    BlockCase("x50 s2 id", "ResNeXtBottleneck", (512, 128, 1, 32, 4), 28),
    BlockCase("x50 s3 id", "ResNeXtBottleneck", (1024, 256, 1, 32, 4), 14),
    BlockCase("x50 s4 id", "ResNeXtBottleneck", (2048, 512, 1, 32, 4), 7),
    BlockCase("r18 s1 id", "BasicBlock", (64, 64, 1), 56),
    BlockCase("r18 s3 proj", "BasicBlock", (128, 256, 2), 28),
    BlockCase("preact s1 id", "PreActBasicBlock", (64, 64, 1), 56),
    BlockCase("preact s3 proj", "PreActBasicBlock", (128, 256, 2), 28),
]


# ------------------------------------------------------------------ shapes, FLOPs and DRAM bytes


def conv_shapes(case: BlockCase, batch: int) -> dict[str, dict]:
    """Per conv module name: input/output shapes, weight numel, FLOPs (a forward on 'meta')."""
    from resfused import reference

    with torch.device("meta"):
        block = getattr(reference, case.block)(*case.args).eval()
        x = torch.empty(batch, case.in_ch, case.hw, case.hw)
    shapes = {}

    def hook(name):
        def record(mod, inputs, out):
            kh, kw = mod.kernel_size
            n, c_out, oh, ow = out.shape
            shapes[name] = dict(
                x=inputs[0].numel(),
                y=out.numel(),
                w=mod.weight.numel() + c_out,
                flops=2 * n * oh * ow * c_out * (mod.in_channels // mod.groups) * kh * kw,
            )

        return record

    for name, mod in block.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(hook(name))
    with torch.no_grad():
        block(x)
    return shapes


def dram_bytes(case: BlockCase, batch: int, dtype_bytes: int) -> dict[str, int]:
    """Analytic DRAM traffic of one block forward, in bytes, eager vs fused.

    Model: every kernel reads its inputs and writes its outputs once (tiles re-read from L2 are
    free); weights are read once per conv. Eager eval mode runs conv, BN, ReLU (in place), the
    residual add and the final ReLU as separate kernels, each reading and writing the activation.
    Fused: each conv reads its input and writes its output once; BN, ReLU, the residual add and
    the pre-activation prologue ride in the conv's epilogue / prologue. The PreAct block with a
    projection materializes relu(bn1(x)) once (two convs read it).
    """
    s = conv_shapes(case, batch)
    conv = lambda name: s[name]["x"] + s[name]["w"] + s[name]["y"]  # noqa: E731
    bn_relu = lambda name: 2 * s[name]["y"] + 2 * s[name]["y"]  # noqa: E731  BN r+w, ReLU r+w
    bn = lambda name: 2 * s[name]["y"]  # noqa: E731
    last = {"BasicBlock": "conv2", "PreActBasicBlock": "conv2"}.get(case.block, "conv3")
    proj = "downsample.0" if "downsample.0" in s else None
    names = [n for n in s if n != proj]
    out = s[last]["y"]
    residual = s[proj]["y"] if proj else out  # the identity has the output's shape
    if case.block == "PreActBasicBlock":
        x = s["conv1"]["x"]
        eager = 4 * x + conv("conv1") + bn_relu("conv1") + conv("conv2") + 3 * out  # bn1+relu on x; add
        eager += (conv(proj) + bn(proj)) if proj else 0
        fused = conv("conv1") + conv("conv2") + residual
        fused += (2 * x + conv(proj)) if proj else 0
        return dict(eager=eager * dtype_bytes, fused=fused * dtype_bytes)
    eager = sum(conv(n) for n in names) + sum(bn_relu(n) for n in names if n != last) + bn(last)
    eager += 3 * out + 2 * out  # add (2 reads, 1 write), final ReLU (read, write)
    fused = sum(conv(n) for n in names) + residual
    if proj:
        eager += conv(proj) + bn(proj)
        fused += conv(proj)
    return dict(eager=eager * dtype_bytes, fused=fused * dtype_bytes)


def block_flops(case: BlockCase, batch: int) -> int:
    return sum(v["flops"] for v in conv_shapes(case, batch).values())


def print_dram_model(batches=(1, 32), dtypes=("fp16", "fp32")) -> list[dict]:
    """Per block: DRAM bytes the fused path moves vs eager's (analytic, no GPU needed)."""
    rows = []
    print("DRAM bytes per block forward (analytic model, benchmarks/gpu.py:dram_bytes): fused vs eager eval mode")
    print(
        f"{'block':16s} {'type':18s} {'batch':>5s} {'dtype':>5s} {'eager MB':>9s} {'fused MB':>9s} {'saved':>6s} "
        f"{'FLOP/B fused':>12s}"
    )
    for case in CASES:
        for batch in batches:
            flops = block_flops(case, batch)
            for d in dtypes:
                b = dram_bytes(case, batch, DTYPES[d].itemsize)
                rows.append(dict(block=case.label, type=case.block, batch=batch, dtype=d, **b, flops=flops))
                print(
                    f"{case.label:16s} {case.block:18s} {batch:5d} {d:>5s} {b['eager'] / 1e6:9.2f} "
                    f"{b['fused'] / 1e6:9.2f} {1 - b['fused'] / b['eager']:6.0%} {flops / b['fused']:12.1f}"
                )
    return rows


# ------------------------------------------------------------------------------- GPU timing

BLOCK_TARGET = 1.3  # fused block vs eager channels_last, batch 32 fp16
MODEL_EAGER_TARGET = 1.3  # fused model vs eager channels_last, batch 32
MODEL_COMPILE_TARGET = 1.0  # fused model vs torch.compile(mode="max-autotune")
GROUPED_TARGET = 1.5  # CUDA grouped 3x3 vs cuDNN at ResNeXt-50 stage 1
TARGET_BATCH = 32
MODELS = ("resnet50", "resnext50_32x4d")
LOWP_EPS = {torch.float16: 1e-3, torch.bfloat16: 8e-3, "tf32": 1e-3}  # one rounding step (tf32: 10-bit mantissa)
FP32_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class GroupedCase:
    """The grouped 3x3 conv of a ResNeXt-50 32x4d stage: channels, channels per group, stride, input size."""

    label: str
    channels: int
    cpg: int
    stride: int
    hw: int


GROUPED_CASES = [
    GroupedCase("x50 s1 grouped", 128, 4, 1, 56),
    GroupedCase("x50 s2 grouped s2", 256, 8, 2, 56),
    GroupedCase("x50 s2 grouped", 256, 8, 1, 28),
    GroupedCase("x50 s3 grouped", 512, 16, 1, 14),
    GroupedCase("x50 s4 grouped", 1024, 32, 1, 7),
]
GROUPED_TARGET_ROW = "x50 s1 grouped"


def device_peaks(name: str, dtype: torch.dtype) -> tuple[float, float] | None:
    """(peak FLOP/s, peak DRAM bytes/s) for `dtype` on the GPU called `name`, or None if unknown."""
    for key, (tc16, tf32, fp32, tbs) in KNOWN_GPUS.items():
        if key.lower() in name.lower():
            if dtype == torch.float32:
                flops = tf32 if torch.backends.cudnn.allow_tf32 else fp32
            else:
                flops = tc16
            return flops * 1e12, tbs * 1e12
    return None


def set_tf32(on: bool) -> dict:
    """Both TF32 flags to `on`; returns what the run records and prints."""
    torch.backends.cudnn.allow_tf32 = on
    torch.backends.cuda.matmul.allow_tf32 = on
    return {
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "fp32 convs": "TF32 (eager cuDNN and fused)" if on else "IEEE fp32 (eager cuDNN and fused)",
    }


def _max_abs(t: torch.Tensor) -> float:
    t = t[t.isfinite()]
    return float(t.abs().max()) if t.numel() else 0.0


def check_error(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, eager: torch.Tensor | None) -> dict:
    """Errors relative to max|ref64| and the limit of docs/design.md, Numerics (module docstring).

    {"fused": max|out - ref| / max|ref|, "eager": eager's, "limit": the allowed "fused", "ok": ...}.
    A NaN / Inf where the reference has none (or the reverse) is an infinite error."""
    ref64 = ref64.detach().double()
    scale = _max_abs(ref64) or 1.0

    def rel(t):
        if t is None:
            return None
        t = t.detach().double()
        if t.shape != ref64.shape:
            return math.inf
        same = (t.isnan() == ref64.isnan()) & (t.isposinf() == ref64.isposinf()) & (t.isneginf() == ref64.isneginf())
        if not bool(same.all()):
            return math.inf
        finite = ref64.isfinite()
        return float((t[finite] - ref64[finite]).abs().max()) / scale if bool(finite.any()) else 0.0

    fused_err, eager_err = rel(out), rel(eager)
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and out.is_cuda
    if dtype in (torch.float32, torch.float64) and not tf32:
        limit = FP32_RTOL
    else:
        if eager_err is None:
            raise ValueError("check_error: a float16 / bfloat16 / TF32 limit needs the eager same-dtype result")
        limit = 2.0 * eager_err + LOWP_EPS["tf32" if tf32 else dtype]
    return {"fused": fused_err, "eager": eager_err, "limit": limit, "ok": fused_err <= limit}


class Clock:
    """Times a zero-argument callable in ms: on CUDA triton.testing's do_bench (median) and
    do_bench_cudagraph; on the CPU (--dry-run only) the median of a few perf_counter calls and no
    graphs. A graph that cannot be captured is recorded as None with the reason."""

    def __init__(self, device: str, rep_ms: int = 100):
        self.device = device
        self.rep_ms = rep_ms

    def time(self, fn) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=self.rep_ms, return_mode="median"))
        fn()  # warm-up: the first call folds and packs weights
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    def time_graph(self, fn) -> tuple[float | None, str | None]:
        if self.device != "cuda":
            return None, None  # the dry run: no CUDA graphs on the CPU
        from triton.testing import do_bench_cudagraph

        try:
            # rep: the ms of calls captured in one graph, replayed 10 times; half of do_bench's
            # keeps a row's graph timings near one second.
            return float(do_bench_cudagraph(fn, rep=max(1, self.rep_ms // 2), return_mode="median")), None
        except Exception as e:  # a capture failure is a finding to report, not a crash of the run
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: S110  the device error is already in the message below
                pass
            return None, f"CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _cases(args) -> list[BlockCase]:
    cases = CASES
    if getattr(args, "filter", None):
        keep = [f.lower() for f in args.filter]
        cases = [c for c in cases if any(k in f"{c.label} {c.block}".lower() for k in keep)]
    if getattr(args, "quick", False):
        cases = cases[:2]
    return cases


def _randomize_bn(module):
    """Non-trivial BN statistics and affine parameters (fresh BN is the identity), so folding does real work."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return module


def model_flops(name: str, batch: int, resolution: int) -> int:
    """Conv and linear FLOPs (2 x MACs) of one forward of torchvision `name` (counted on 'meta')."""
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None).eval()
        x = torch.empty(batch, 3, resolution, resolution)
    total = 0

    def count(mod, inputs, out):
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            total += 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw
        else:
            total += 2 * out.numel() * mod.in_features

    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            mod.register_forward_hook(count)
    with torch.no_grad():
        model(x)
    return total


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


class _Run:
    """One benchmark run: the rows measured so far, written to JSON after each row (a run stopped
    from outside keeps what it measured), the budget and the rows it left out."""

    def __init__(self, args, device: str):
        self.args = args
        self.device = device
        self.clock = Clock(device, rep_ms=20 if device == "cpu" else 100)
        self.rows: list[dict] = []
        self.not_run: list[str] = []
        budget = getattr(args, "budget", None)
        self.deadline = None if budget is None else time.monotonic() + budget
        self.name = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
        self.tf32 = set_tf32(getattr(args, "tf32", "off") == "on")
        self.meta = {
            "device": self.name,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "tf32": self.tf32,
            "budget_s": budget,
            "compile_mode": _compile_mode(args),
            "cudnn_benchmark": True,
        }

    def has_time(self, label: str) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.not_run.append(label)
            print(f"{label}: not run (the --budget of {self.args.budget:.0f} s is spent)", flush=True)
            return False
        return True

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(format_row(row), flush=True)
        self.write()

    def document(self) -> dict:
        return dict(self.meta, rows=self.rows, targets=evaluate_targets(self.rows), not_run=self.not_run)

    def write(self) -> None:
        out = getattr(self.args, "out", None)
        if not out:
            return
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "gpu_results.json")
        with open(path + ".part", "w") as f:
            json.dump(self.document(), f, indent=1)
        os.replace(path + ".part", path)


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _compile_mode(args) -> str | None:
    mode = getattr(args, "compile", None)
    if mode is True:  # benchmarks/__main__.py's --compile flag
        return "max-autotune"
    return mode or None


def _row(kind, label, type_, dtype_name, batch, times, graphs, error, kernels=(), notes=(), **extra) -> dict:
    base = "eager_cl"
    row = dict(
        kind=kind,
        block=label,
        type=type_,
        dtype=dtype_name,
        batch=batch,
        ms=times,
        ms_graph=graphs,
        speedup_vs_eager_cl=_ratio(times.get(base), times.get("fused")),
        speedup_vs_eager_nchw=_ratio(times.get("eager_nchw"), times.get("fused")),
        speedup_graph_vs_eager_cl=_ratio(graphs.get(base), graphs.get("fused")),
        error=error,
        kernels=sorted(set(kernels)),
        notes=list(notes),
    )
    row.update(extra)
    return row


def _time_variants(run: _Run, fns: dict, graph_variants=("fused", "eager_cl")):
    times, graphs, notes = {}, {}, []
    for name, fn in fns.items():
        times[name] = run.clock.time(fn)
    for name in graph_variants:
        if name in fns:
            graphs[name], why = run.clock.time_graph(fns[name])
            if why:
                notes.append(f"{name}: {why}")
    return times, graphs, notes


def grouped_row(run: _Run, case: GroupedCase, d: str, batch: int, hw: int) -> dict | None:
    import torch.nn.functional as F

    from resfused import _native

    dtype, dev = DTYPES[d], run.device
    label = case.label
    if not _native.has_kernel("grouped_conv3x3", dev):
        run.not_run.append(f"{label} {d} b{batch}: resfused._C has no {dev} grouped_conv3x3 kernel")
        return None
    g = torch.Generator().manual_seed(0)
    c, groups = case.channels, case.channels // case.cpg
    x = torch.randn(batch, c, hw, hw, generator=g).to(dev, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(c, case.cpg, 3, 3, generator=g) / (3 * case.cpg**0.5)).to(dev, dtype)
    b = torch.randn(c, generator=g).to(dev, dtype)
    fused = lambda: torch.ops.resfused.grouped_conv3x3(x, w, b, case.stride, True)  # noqa: E731
    w_cl = w.contiguous(memory_format=torch.channels_last)  # cuDNN's channels_last conv wants both so
    cudnn = lambda: torch.relu_(F.conv2d(x, w_cl, b, case.stride, 1, 1, groups))  # noqa: E731
    with torch.inference_mode():
        error = check_error(
            fused(), torch.relu(F.conv2d(x.double(), w.double(), b.double(), case.stride, 1, 1, groups)), dtype, cudnn()
        )
        times, graphs, notes = _time_variants(run, {"fused": fused, "eager_cl": cudnn})
    oh = (hw - 1) // case.stride + 1
    flops = 2 * batch * oh * oh * c * case.cpg * 9
    moved = (x.numel() + w.numel() + 2 * batch * oh * oh * c) * dtype.itemsize
    peaks = device_peaks(run.name, dtype)
    roof = None if not peaks else max(flops / peaks[0], moved / peaks[1]) / (times["fused"] * 1e-3)
    return _row(
        "grouped", label, f"grouped 3x3 {case.cpg} ch/group s{case.stride}", d, batch, times, graphs, error,
        kernels=["grouped_conv3x3"], notes=notes, tflops=flops / (times["fused"] * 1e-3) / 1e12,
        roofline_fraction=roof, baseline="cuDNN grouped conv + ReLU",
    )  # fmt: skip


def block_row(run: _Run, case: BlockCase, d: str, batch: int, hw: int) -> dict:
    import resfused
    from resfused import reference

    dtype, dev = DTYPES[d], run.device
    ref = _randomize_bn(getattr(reference, case.block)(*case.args)).eval().to(dev, dtype)
    ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    fused = getattr(resfused, case.block).from_reference(copy.deepcopy(ref))
    x = torch.randn(batch, case.in_ch, hw, hw, device=dev, dtype=dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        with resfused.ops.trace_kernels() as ran:
            out = fused(x_cl)
        expected = copy.deepcopy(ref).double()(x.double())
        error = check_error(out, expected, dtype, ref_cl(x_cl))
        del expected, out
        fns = {"fused": lambda: fused(x_cl), "eager_nchw": lambda: ref(x), "eager_cl": lambda: ref_cl(x_cl)}
        times, graphs, notes = _time_variants(run, fns)
    flops = block_flops(case, batch) if hw == case.hw else None
    moved = dram_bytes(case, batch, dtype.itemsize) if hw == case.hw else None
    peaks = device_peaks(run.name, dtype)
    roof = None
    if peaks and flops:
        roof = max(flops / peaks[0], moved["fused"] / peaks[1]) / (times["fused"] * 1e-3)
    return _row(
        "block", case.label, case.block, d, batch, times, graphs, error,
        kernels=[c.kernel for c in ran], notes=notes,
        tflops=None if flops is None else flops / (times["fused"] * 1e-3) / 1e12,
        roofline_fraction=roof, dram=moved,
    )  # fmt: skip


def model_row(run: _Run, name: str, d: str, batch: int, resolution: int) -> dict:
    import torchvision

    import resfused

    dtype, dev = DTYPES[d], run.device
    model = _randomize_bn(getattr(torchvision.models, name)(weights=None)).eval().to(dev)
    fused = resfused.fuse(model).to(dtype)
    eager_cl = copy.deepcopy(model).to(dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, resolution, resolution, device=dev, dtype=dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    notes, extra = [], {}
    with torch.inference_mode():
        with resfused.ops.trace_kernels() as ran:
            out = fused(x_cl)
        expected = copy.deepcopy(model).to(dtype).double()(x.double())
        eager_out = eager_cl(x_cl)
        error = check_error(out, expected, dtype, eager_out)
        times, graphs, notes = _time_variants(run, {"fused": lambda: fused(x_cl), "eager_cl": lambda: eager_cl(x_cl)})
    mode = _compile_mode(run.args)
    if mode and run.device == "cuda":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights as constants: what deployment compiles
        compiled = torch.compile(copy.deepcopy(eager_cl), mode=mode)
        with torch.inference_mode():
            t0 = time.perf_counter()
            compiled_out = compiled(x_cl)
            torch.cuda.synchronize()
            extra["compile_s"] = time.perf_counter() - t0
            extra["compile_error"] = check_error(compiled_out, expected, dtype, eager_out)
            times["compile"] = run.clock.time(lambda: compiled(x_cl))
        del compiled
    del expected, out, eager_out
    flops = model_flops(name, batch, resolution)
    peaks = device_peaks(run.name, dtype)
    roof = None if not peaks else flops / peaks[0] / (times["fused"] * 1e-3)
    counted = {}
    for c in ran:
        counted[f"{c.op}/{c.kernel}"] = counted.get(f"{c.op}/{c.kernel}", 0) + 1
    row = _row(
        "model", f"fuse({name})", f"{resolution}x{resolution}", d, batch, times, graphs, error,
        kernels=[f"{k} x{n}" for k, n in sorted(counted.items())], notes=notes,
        tflops=flops / (times["fused"] * 1e-3) / 1e12, roofline_fraction=roof, **extra,
    )  # fmt: skip
    row["speedup_vs_compile"] = _ratio(times.get("compile"), times["fused"])
    row["speedup_graph_vs_compile"] = _ratio(times.get("compile"), graphs.get("fused"))
    return row


def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def format_row(r: dict) -> str:
    """One printed line: times (and with CUDA graphs), speedups, the error and its limit."""
    t, g, e = r["ms"], r["ms_graph"], r["error"]
    parts = [f"{r['block']:18s} {r['dtype']:5s} b{r['batch']:<3d} fused {_fmt(t.get('fused'))} ms"]
    for name in ("eager_cl", "eager_nchw", "compile"):
        if name in t:
            parts.append(f"{name} {_fmt(t[name])}")
    parts.append(f"x{_fmt(r['speedup_vs_eager_cl'], '.2f')} vs {'cuDNN' if r['kind'] == 'grouped' else 'CL'}")
    if any(v is not None for v in g.values()):
        parts.append(
            f"| graphs: fused {_fmt(g.get('fused'))} {'cuDNN' if r['kind'] == 'grouped' else 'eager_cl'} "
            f"{_fmt(g.get('eager_cl'))} x{_fmt(r['speedup_graph_vs_eager_cl'], '.2f')}"
        )
    if r.get("speedup_vs_compile") is not None:
        parts.append(
            f"| x{r['speedup_vs_compile']:.2f} vs compile (x{_fmt(r['speedup_graph_vs_compile'], '.2f')} graphed)"
        )
    if r.get("tflops") is not None:
        parts.append(f"| {r['tflops']:.1f} TFLOP/s")
    if r.get("roofline_fraction") is not None:
        parts.append(f"{r['roofline_fraction']:.0%} of roofline")
    parts.append(
        f"| err {e['fused']:.2e} (limit {e['limit']:.2e}, eager {_fmt(e['eager'], '.2e')}) "
        + ("ok" if e["ok"] else "WRONG")
    )
    parts.append(f"| {', '.join(r['kernels'])}")
    return "  ".join(parts) + "".join(f"\n    note: {n}" for n in r["notes"])


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Issue 17's targets, each with the measured ratio and "pass", "FAIL" or "not measured"."""
    out = []

    def target(what, threshold, measured, where):
        status = "not measured" if measured is None else ("pass" if measured >= threshold else "FAIL")
        out.append(dict(target=what, threshold=threshold, measured=measured, status=status, where=where))

    wanted = [c.label for c in CASES if c.block in ("Bottleneck", "ResNeXtBottleneck")]
    blocks = {
        r["block"]: r
        for r in rows
        if r["kind"] == "block" and r["dtype"] == "fp16" and r["batch"] == TARGET_BATCH and r["block"] in wanted
    }
    for label in wanted:
        r = blocks.get(label)
        target(
            f"block {label}: fused vs eager channels_last (b32 fp16)",
            BLOCK_TARGET,
            r and r["speedup_vs_eager_cl"],
            label,
        )
    ratios = [blocks[label]["speedup_vs_eager_cl"] for label in wanted if label in blocks]
    worst = min(ratios) if len(ratios) == len(wanted) else None
    target(
        f"every ResNet-50/ResNeXt-50 block (b32 fp16, {len(ratios)} of {len(wanted)} measured): worst ratio",
        BLOCK_TARGET, worst, "blocks",
    )  # fmt: skip
    for name in MODELS:
        for d in ("fp16", "bf16"):
            r = next(
                (r for r in rows if r["kind"] == "model" and r["block"] == f"fuse({name})" and r["dtype"] == d
                 and r["batch"] == TARGET_BATCH and r["type"] == "224x224"),
                None,
            )  # fmt: skip
            target(
                f"fuse({name}) {d} b32 vs eager channels_last", MODEL_EAGER_TARGET, r and r["speedup_vs_eager_cl"], name
            )
            target(
                f"fuse({name}) {d} b32 (CUDA graphs) vs torch.compile max-autotune",
                MODEL_COMPILE_TARGET, r and r.get("speedup_graph_vs_compile"), name,
            )  # fmt: skip
    r = next(
        (r for r in rows if r["kind"] == "grouped" and r["block"] == GROUPED_TARGET_ROW and r["dtype"] == "fp16"
         and r["batch"] == TARGET_BATCH),
        None,
    )  # fmt: skip
    target(
        "grouped 3x3 ResNeXt-50 stage 1 (b32 fp16) vs cuDNN",
        GROUPED_TARGET,
        r and r["speedup_vs_eager_cl"],
        GROUPED_TARGET_ROW,
    )
    return out


def print_targets(targets: list[dict]) -> None:
    print("\ntargets (ratios without CUDA graphs unless said):")
    for t in targets:
        measured = "-" if t["measured"] is None else f"x{t['measured']:.2f}"
        print(f"  {t['status']:>12s}  {measured:>7s} (>= x{t['threshold']:.1f})  {t['target']}")


def run_gpu_benchmark(args, device: str = "cuda") -> int:
    """Run every row (module docstring) on `device`, print them and the targets, write
    args.out/gpu_results.json. Exit status 1 when a row's error is over its limit."""
    import resfused

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device (torch.cuda.is_available() is False)")
    dry = device != "cuda"
    dtypes = getattr(args, "gpu_dtype", None) or (["fp32", "bf16"] if dry else ["fp16", "bf16", "fp32"])
    batches = getattr(args, "batch", None) or ([1] if dry or getattr(args, "quick", False) else [1, 32])
    model_batches = getattr(args, "model_batch", None) or ([1] if dry else [TARGET_BATCH])
    model_dtypes = getattr(args, "model_dtype", None) or (["bf16"] if dry else ["fp16", "bf16"])
    resolution = 32 if dry else getattr(args, "resolution", None) or 224
    shrink = (lambda hw: max(3, hw // 8)) if dry else (lambda hw: hw)  # noqa: E731
    resfused.set_backend("auto")
    torch.backends.cudnn.benchmark = True
    run = _Run(args, device)
    print(
        f"GPU benchmark on {run.name}: torch {run.meta['torch']}, triton {run.meta['triton']}; TF32: "
        + ", ".join(f"{k}={v}" for k, v in run.tf32.items())
        + f"; cudnn.benchmark=True; compile: {run.meta['compile_mode'] or 'off (--compile max-autotune to add it)'}",
        flush=True,
    )
    if not getattr(args, "no_grouped", False):
        for case in GROUPED_CASES[:2] if dry else GROUPED_CASES:
            for d in dtypes:
                for batch in batches:
                    if run.has_time(f"{case.label} {d} b{batch}") and (
                        row := grouped_row(run, case, d, batch, shrink(case.hw))
                    ):
                        run.add(row)
    if not getattr(args, "no_blocks", False):
        cases = [c for c in _cases(args)][: 3 if dry else None]
        for case in cases:
            for d in dtypes:
                for batch in batches:
                    if run.has_time(f"{case.label} {d} b{batch}"):
                        run.add(block_row(run, case, d, batch, shrink(case.hw)))
    names = getattr(args, "models", None) or ([MODELS[0]] if dry else MODELS)
    for name in [] if getattr(args, "no_models", False) else names:
        if name not in MODELS:  # a name benchmarks/__main__.py's --models took for the CPU benchmark
            run.not_run.append(f"{name}: not a GPU benchmark model (these are {', '.join(MODELS)})")
            continue
        for d in model_dtypes:
            for batch in model_batches:
                if run.has_time(f"fuse({name}) {d} b{batch}"):
                    run.add(model_row(run, name, d, batch, resolution))
    doc = run.document()
    run.write()
    print_targets(doc["targets"])
    wrong = [f"{r['block']} {r['dtype']} b{r['batch']}" for r in run.rows if not r["error"]["ok"]]
    wrong += [
        f"{r['block']} {r['dtype']} compiled" for r in run.rows if "compile_error" in r and not r["compile_error"]["ok"]
    ]
    if run.not_run:
        print(f"not run: {len(run.not_run)} rows ({'; '.join(run.not_run)})")
    if getattr(args, "out", None):
        print(f"wrote {os.path.join(args.out, 'gpu_results.json')}")
    if wrong:
        print(f"WRONG: {len(wrong)} rows over their error limit: {', '.join(wrong)}")
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="resfused GPU benchmark (blocks, grouped 3x3, models) / DRAM model")
    p.add_argument("--dram-model", action="store_true", help="print the DRAM-bytes model only (no GPU needed)")
    p.add_argument("--dry-run", action="store_true", help="every row kind on the CPU at tiny shapes (checks the logic)")
    p.add_argument(
        "--gpu-dtype", nargs="+", choices=sorted(DTYPES), default=None, help="block and grouped rows (default all)"
    )
    p.add_argument("--batch", nargs="+", type=int, default=None, help="block and grouped rows (default 1 32)")
    p.add_argument("--model-batch", nargs="+", type=int, default=None, help=f"model rows (default {TARGET_BATCH})")
    p.add_argument(
        "--model-dtype", nargs="+", choices=sorted(DTYPES), default=None, help="model rows (default fp16 bf16)"
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=None)
    p.add_argument("--no-models", action="store_true")
    p.add_argument("--no-blocks", action="store_true")
    p.add_argument("--no-grouped", action="store_true")
    p.add_argument("--filter", nargs="+", default=None, help="block rows whose label or type contains one of these")
    p.add_argument(
        "--compile", nargs="?", const="max-autotune", default=None,
        help='add torch.compile(mode=MODE) of the eager channels_last model to the model rows (default MODE '
        '"max-autotune": minutes per model and dtype)',
    )  # fmt: skip
    p.add_argument("--tf32", choices=("off", "on"), default="off", help="both TF32 flags (default off)")
    p.add_argument("--budget", type=float, default=None, help="seconds: start no row after this (rows left are listed)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    if args.dram_model:
        print_dram_model()
        return 0
    if args.dry_run:
        return run_gpu_benchmark(args, device="cpu")
    if not torch.cuda.is_available():
        print_dram_model()
        return 0
    return run_gpu_benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
