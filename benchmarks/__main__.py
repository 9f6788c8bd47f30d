"""`python -m benchmarks` / `resfused-bench` / `make bench`: parse the options, run the CPU or
CUDA benchmark, print the table, write JSON and a PNG of the speedups."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resfused-bench",
        description="Fused ResNet/ResNeXt blocks and converted models against eager PyTorch "
        "(NCHW and channels_last) and, with --compile, torch.compile(freezing). "
        "Speedup = baseline time / fused time; the fused module gets channels_last input.",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when torch.cuda.is_available(), else CPU (default)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every timing (default 2)")
    p.add_argument(
        "--dtype",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32"],
        help="dtypes to run (default fp32; bf16 needs oneDNN bf16 support)",
    )
    p.add_argument("--batch", nargs="+", type=int, default=None, help="batch sizes (default 1 8; --quick: 1)")
    p.add_argument("--blocks-only", action="store_true", help="only the per-block rows")
    p.add_argument("--models-only", action="store_true", help="only the whole-model rows")
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="NAME",
        help="models to run: set names (default: resnet18 resnet50 resnext50_32x4d; family: regnet_y_800mf "
        "regnet_x_800mf seresnext50_32x4d ecaresnet50d resnet50d resnetv2_50; all: both) and/or "
        "model names (torchvision, or the timm ones of the family). Default: default (--quick: resnet18)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="input height and width of the model rows (default 224; --quick: 64)",
    )
    p.add_argument(
        "--filter",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="keep only cases whose label contains one of these (case-insensitive), "
        "e.g. --filter resnet50 'Bottleneck 256->64'",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add torch.compile with inductor freezing as a baseline for models (~30 s compile each)",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="add ONNX Runtime and OpenVINO (the model exported with torch.onnx.export) as fp32 model baselines; "
        "needs the bench extra (pip install onnx onnxruntime openvino)",
    )
    p.add_argument("--no-fused-nchw", action="store_true", help="models: skip timing the fused model on NCHW input")
    p.add_argument(
        "--block-nchw",
        action="store_true",
        help="blocks: also time the fused block on NCHW input (off by default to keep the run short)",
    )
    p.add_argument("--skip-grouped", action="store_true", help="skip the grouped 3x3 micro-benchmark")
    p.add_argument("--quick", action="store_true", help="tiny shapes and short timings: a smoke run")
    p.add_argument("--out", default="bench-results", help="directory for results.json and speedups.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _device(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("resfused-bench: --device cuda was asked for but torch.cuda.is_available() is False")
    return args.device


def _optional(module: str):
    """Import benchmarks.<module> if that file exists; None (not an error) if it does not."""
    try:
        return importlib.import_module(f"benchmarks.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"benchmarks.{module}":
            raise
        return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.blocks_only and args.models_only:
        raise SystemExit("resfused-bench: --blocks-only and --models-only exclude each other")
    if args.threads < 1:
        raise SystemExit(f"resfused-bench: --threads must be >= 1, got {args.threads}")
    if args.resolution is not None and args.resolution < 32:
        raise SystemExit(f"resfused-bench: --resolution must be >= 32 (five stride-2 stages), got {args.resolution}")
    if args.models is not None:
        from benchmarks import cpu

        if unknown := cpu.unknown_models(cpu.model_names(args.models, args.quick)):
            raise SystemExit(
                f"resfused-bench: --models: unknown {', '.join(unknown)}; give a set name "
                f"({', '.join(cpu.MODEL_SETS)}), a torchvision model or one of {', '.join(sorted(cpu.TIMM_MODELS))}"
            )
    if args.batch is not None and min(args.batch) < 1:
        raise SystemExit(f"resfused-bench: --batch sizes must be >= 1, got {args.batch}")
    if args.onnx:
        from benchmarks import onnx_baselines

        if missing := onnx_baselines.missing_packages():
            raise SystemExit(f"resfused-bench: --onnx needs {', '.join(missing)} (pip install {' '.join(missing)})")
    os.makedirs(args.out, exist_ok=True)

    if _device(args) == "cuda":
        gpu = _optional("gpu")
        if gpu is None:
            raise SystemExit(
                "resfused-bench: a CUDA device is present but benchmarks/gpu.py does not exist yet; "
                "run with --device cpu for the CPU benchmark"
            )
        result = gpu.run_gpu_benchmark(args)
        return 0 if result is None or not isinstance(result, int) else result

    return _run_cpu(args)


def _run_cpu(args) -> int:
    from benchmarks import common, cpu

    t0 = time.perf_counter()
    out = cpu.run_cpu_benchmark(args)
    results, meta, peaks = out["results"], out["meta"], out["peaks"]
    meta["wall_s"] = time.perf_counter() - t0
    print()
    print(
        f"resfused CPU benchmark: torch {meta['torch']}, {meta['cpu']} ({meta['cpu_capability']}), "
        f"{meta['threads']} threads, load average {meta['loadavg_start'][0]:.2f} at start, "
        f"{meta['loadavg_end'][0]:.2f} at end, {meta['wall_s']:.0f} s"
    )
    for d, p in peaks.items():
        print(
            f"  {d} peak (best of start and end of the run): GEMM {p['gemm_shape']} {p['gemm_gflops']:.1f} GFLOP/s, "
            f"conv {p['conv_shape']} {p['conv_gflops']:.1f} GFLOP/s -> peak {p['peak_gflops']:.1f} GFLOP/s"
        )
    if max(meta["loadavg_start"][0], meta["loadavg_end"][0]) > 0.5 * (meta["logical_cpus"] or 1):
        print(
            "  NOTE: the machine was loaded during this run (load average above); absolute times are noisy, "
            "compare the side-by-side ratios"
        )
    print(
        "  fused = resfused module with channels_last input; speedup = baseline / fused; "
        "GFLOP/s and % peak are the fused row's;\n  noise = largest (interquartile range / median) over "
        "the row's variants (above ~10%, treat its ratios as rough)"
    )
    if results:
        print()
        print(common.format_table(results, {d: p["peak_gflops"] for d, p in peaks.items()}))
    if out["host_overhead"]:
        from tabulate import tabulate

        print(
            "\nhost (Python) time per fused forward (batch 1, tiny input; "
            "the forward with its conv kernels skipped, minus the ops still run)"
        )
        print(tabulate(out["host_overhead"], headers="keys", tablefmt="github", floatfmt=".2f"))
    if out["grouped"]:
        from tabulate import tabulate

        print("\ngrouped 3x3 micro-benchmark (benchmarks/grouped_cpu.py)")
        print(tabulate(out["grouped"], headers="keys", tablefmt="github", floatfmt=".3g"))
    _print_targets(results)
    for s in out["skipped"]:
        print(f"  skipped: {s['why']}")

    json_path = os.path.join(args.out, "results.json")
    common.write_json(
        json_path,
        meta,
        results,
        {"skipped": out["skipped"], "grouped": out["grouped"], "host_overhead": out["host_overhead"]},
    )
    png_path = os.path.join(args.out, "speedups.png")
    title = f"resfused CPU, {meta['threads']} threads, {meta['cpu']}"
    wrote_png = common.plot_speedups(png_path, results, title)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if wrote_png else ""))

    gpu = _optional("gpu")
    if gpu is not None and hasattr(gpu, "print_dram_model"):
        print()
        gpu.print_dram_model()
    else:
        print("(GPU DRAM-bytes model not printed: benchmarks/gpu.py with print_dram_model() does not exist yet)")
    return 0


# The project's CPU targets (fp32, 2 threads, batch 8 unless noted), printed next to what this run
# measured: for the default models and for the family (--models family).
_TARGETS = [
    ("resnet50", 8, "eager_nchw", 1.8),
    ("resnet50", 8, "compile", 1.0),
    ("resnext50_32x4d", 8, "eager_nchw", 2.0),
    ("resnext50_32x4d", 8, "compile", 1.0),
] + [
    (name, 8, baseline, target)
    for name in ("regnet_y_800mf", "seresnext50_32x4d", "resnet50d", "resnetv2_50")
    for baseline, target in (("eager_nchw", 1.4), ("compile", 1.05))
]


def _print_targets(results) -> None:
    lines = []
    by_key = {(r.kind, r.name, r.batch, r.dtype): r for r in results}
    for name, batch, baseline, target in _TARGETS:
        r = by_key.get(("model", name, batch, "fp32"))
        s = None if r is None else r.speedup(baseline)
        if s is not None:
            lines.append(
                f"  {name} b{batch} fp32 vs {baseline}: {s:.2f}x (target >= {target}x) "
                f"{'met' if s >= target else 'NOT met'}"
            )
    for r in results:
        if (
            r.kind == "model"
            and r.name == "resnet50"
            and r.batch == 1
            and r.dtype == "fp32"
            and r.fuse_time_s is not None
        ):
            lines.append(
                f"  fuse(resnet50) + first forward (b1): {r.fuse_time_s:.2f} s (target < 2 s) "
                f"{'met' if r.fuse_time_s < 2.0 else 'NOT met'}"
            )
    for batch in (8,):
        f32, b16 = by_key.get(("model", "resnet50", batch, "fp32")), by_key.get(("model", "resnet50", batch, "bf16"))
        if f32 and b16:
            ratio = f32.times["fused"].median_s / b16.times["fused"].median_s
            lines.append(
                f"  fused resnet50 b{batch}: bf16 {ratio:.2f}x fused fp32 (target >= 2x; "
                "fp32 and bf16 rows are timed apart, not interleaved)"
            )
    if lines:
        print("\ntargets:")
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
