"""GPU benchmark: fused blocks against eager cuDNN, with TFLOP/s and roofline fraction; and the
analytic DRAM-bytes model, printable on any machine.

    python -m benchmarks                      # on a CUDA machine: calls run_gpu_benchmark(args)
    python -m benchmarks.gpu --dram-model     # any machine: DRAM bytes, fused vs eager, per block

Timing uses triton.testing.do_bench (median). Per case (block at a ResNet-50 / ResNeXt-50 stage
shape, batch 1 and 32, fp16 / bf16 / fp32): the fused block on channels_last input (backend auto:
the Triton conv), eager NCHW and eager channels_last (both with cudnn.benchmark=True), and with
--compile torch.compile(mode="max-autotune") with inductor freezing on the channels_last model.

Roofline: t_roof = max(FLOPs / peak FLOP/s, fused DRAM bytes / peak bandwidth), fraction =
t_roof / t_measured, from the peaks of the device in KNOWN_GPUS (dense tensor-core peaks; fp32
uses the TF32 peak when torch.backends.cuda.matmul.allow_tf32 is set, else the FMA peak).

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os

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


def device_peaks(name: str, dtype: torch.dtype) -> tuple[float, float] | None:
    """(peak FLOP/s, peak DRAM bytes/s) for `dtype` on the GPU called `name`, or None if unknown."""
    for key, (tc16, tf32, fp32, tbs) in KNOWN_GPUS.items():
        if key.lower() in name.lower():
            if dtype == torch.float32:
                flops = tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
            else:
                flops = tc16
            return flops * 1e12, tbs * 1e12
    return None


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _cases(args) -> list[BlockCase]:
    cases = CASES
    if getattr(args, "filter", None):
        keep = [f.lower() for f in args.filter]
        cases = [c for c in cases if any(k in f"{c.label} {c.block}".lower() for k in keep)]
    if getattr(args, "quick", False):
        cases = cases[:2]
    return cases


def _randomize_bn(module):
    """Non-trivial BN statistics (fresh BN is the identity), so folding does real work."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module


def run_gpu_benchmark(args) -> int:
    """Time every case on the current CUDA device, print the table, write JSON to args.out."""
    import resfused
    from resfused import reference

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device (torch.cuda.is_available() is False)")
    dtypes = getattr(args, "gpu_dtype", None) or ["fp16", "bf16", "fp32"]
    batches = getattr(args, "batch", None) or ([1] if getattr(args, "quick", False) else [1, 32])
    use_compile = bool(getattr(args, "compile", False))
    name = torch.cuda.get_device_name()
    resfused.set_backend("auto")
    torch.backends.cudnn.benchmark = True
    rows = []
    for case in _cases(args):
        ref_fp32 = _randomize_bn(getattr(reference, case.block)(*case.args)).eval()
        for d in dtypes:
            dtype = DTYPES[d]
            ref = copy.deepcopy(ref_fp32).to("cuda", dtype)
            ref_cl = copy.deepcopy(ref).to(memory_format=torch.channels_last)
            fused = getattr(resfused, case.block)(*case.args).eval().to("cuda", dtype)
            fused.load_state_dict(ref.state_dict())
            compiled = None
            if use_compile:
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
                compiled = torch.compile(copy.deepcopy(ref_cl), mode="max-autotune")
            for batch in batches:
                x = torch.randn(batch, case.in_ch, case.hw, case.hw, device="cuda", dtype=dtype)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode():
                    with resfused.ops.trace_kernels() as ran:
                        fused(x_cl)
                    t = {
                        "fused": _time_ms(lambda: fused(x_cl)),
                        "eager_nchw": _time_ms(lambda: ref(x)),
                        "eager_cl": _time_ms(lambda: ref_cl(x_cl)),
                    }
                    if compiled is not None:
                        compiled(x_cl)
                        t["compile"] = _time_ms(lambda: compiled(x_cl))
                flops = block_flops(case, batch)
                moved = dram_bytes(case, batch, dtype.itemsize)
                peaks = device_peaks(name, dtype)
                roof = None
                if peaks:
                    roof = max(flops / peaks[0], moved["fused"] / peaks[1]) / (t["fused"] * 1e-3)
                rows.append(
                    dict(
                        block=case.label,
                        type=case.block,
                        dtype=d,
                        batch=batch,
                        ms=t,
                        speedup_vs_eager_cl=t["eager_cl"] / t["fused"],
                        speedup_vs_eager_nchw=t["eager_nchw"] / t["fused"],
                        tflops=flops / (t["fused"] * 1e-3) / 1e12,
                        roofline_fraction=roof,
                        kernels=sorted({c.kernel for c in ran}),
                        dram=moved,
                    )
                )
                r = rows[-1]
                print(
                    f"{case.label:16s} {d:5s} b{batch:<3d} fused {t['fused']:.3f} ms  eager_cl {t['eager_cl']:.3f}  "
                    f"nchw {t['eager_nchw']:.3f}"
                    + (f"  compile {t['compile']:.3f}" if "compile" in t else "")
                    + f"  x{r['speedup_vs_eager_cl']:.2f} vs CL  {r['tflops']:.1f} TFLOP/s"
                    + (f"  {roof:.0%} of roofline" if roof is not None else "")
                    + f"  {r['kernels']}",
                    flush=True,
                )
    out = getattr(args, "out", None)
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "gpu_results.json")
        with open(path, "w") as f:
            json.dump(
                dict(device=name, torch=torch.__version__, tf32=torch.backends.cuda.matmul.allow_tf32, rows=rows),
                f,
                indent=1,
            )
        print(f"wrote {path}")
    fp16_b32 = [r for r in rows if r["dtype"] == "fp16" and r["batch"] == 32]
    if fp16_b32:
        met = sum(r["speedup_vs_eager_cl"] >= 1.3 for r in fp16_b32)
        print(f"target (fp16, batch 32, >= 1.3x eager channels_last): {met} of {len(fp16_b32)} blocks")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="resfused GPU block benchmark / DRAM model")
    p.add_argument("--dram-model", action="store_true", help="print the DRAM-bytes model only (no GPU needed)")
    p.add_argument("--gpu-dtype", nargs="+", choices=sorted(DTYPES), default=None)
    p.add_argument("--batch", nargs="+", type=int, default=None)
    p.add_argument("--filter", nargs="+", default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    if args.dram_model or not torch.cuda.is_available():
        print_dram_model()
        return 0
    return run_gpu_benchmark(args)


if __name__ == "__main__":
    raise SystemExit(main())
