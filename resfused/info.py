"""`python -m resfused.info`: versions, which backends are compiled and usable, and why not.

Queries the GPU (if any) only when run, never at import of the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform

import torch

from resfused import _native, backend
from resfused.runtime import tuning_cache


def _cpu_isa() -> str:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [
        name
        for name, flag in (
            ("AVX2", "avx2"),
            ("AVX-512", "avx512f"),
            ("AVX-512-BF16", "avx512_bf16"),
            ("AMX-BF16", "amx_bf16"),
            ("AVX-512-FP16", "avx512_fp16"),
        )
        if flag in flags
    ]
    return ", ".join(isa) or "unknown"


def collect() -> dict:
    """Everything `main` prints, as data."""
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    cuda_available = torch.cuda.is_available()
    ops_cpu = [op for op in _native.op_names() if _native.has_kernel(op, "cpu")]
    ops_cuda = [op for op in _native.op_names() if _native.has_kernel(op, "cuda")]
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_available else None,
        "extension_loaded": _native.loaded,
        "extension_error": _native.load_error,
        "extension_cuda_archs": _native.cuda_archs if _native.with_cuda else None,
        "native_cpu_ops": ops_cpu,
        "native_cuda_ops": ops_cuda,
        "triton_interpreter": backend.triton_interpreter_enabled(),
        "backends": {name: backend.availability(name) for name in backend.BACKENDS},
        "selected_backend": backend.get_backend(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_isa": _cpu_isa(),
        "onednn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported() if torch.backends.mkldnn.is_available() else False,
        "threads": torch.get_num_threads(),
        # Threads a resfused C++ kernel's at::parallel_for reaches (1 means a build without OpenMP).
        "kernel_threads": torch.ops.resfused.parallel_for_threads() if _native.has_op("parallel_for_threads") else None,
        # Measured kernel selection (resfused.tune / set_tuning): on or off, and the choices this
        # machine signature's cache holds, each with the table's choice for the same call.
        "tuning": {
            "enabled": tuning_cache.enabled(),
            "cache_path": tuning_cache.cache_path(),
            "choices": tuning_cache.entries(),
        },
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m resfused.info", description=__doc__.splitlines()[0])
    ap.add_argument("--tuning", action="store_true", help="list every measured kernel choice in the tuning cache")
    ap.add_argument(
        "--clear-tuning-cache", action="store_true", help="delete the tuning cache files (every machine signature)"
    )
    args = ap.parse_args(argv)
    if args.clear_tuning_cache:
        removed = tuning_cache.clear()
        print(f"removed {len(removed)} tuning cache file(s) from {tuning_cache.cache_dir()}")
        return
    if args.tuning:
        _print_tuning_cache()
        return
    info = collect()
    print("resfused environment")
    print(
        f"  python {info['python']}, torch {info['torch']} (CUDA build: {info['torch_cuda'] or 'no'}), "
        f"triton {info['triton'] or 'not installed'}"
    )
    print(f"  CUDA device: {info['cuda_device'] or 'none'}")
    if info["extension_loaded"]:
        archs = info["extension_cuda_archs"]
        print(f"  resfused._C: loaded; CUDA kernels {'compiled for ' + archs if archs else 'not compiled'}")
        print(f"    native CPU ops:  {', '.join(info['native_cpu_ops']) or 'none'}")
        print(f"    native CUDA ops: {', '.join(info['native_cuda_ops']) or 'none'}")
    else:
        print(f"  resfused._C: NOT loaded ({info['extension_error']}); ops fall back to the reference")
    print(f"  Triton interpreter (TRITON_INTERPRET=1): {'on' if info['triton_interpreter'] else 'off'}")
    print("  backends:")
    for name, (ok, why) in info["backends"].items():
        print(f"    {name:<10} {'usable' if ok else 'unavailable: ' + why}")
    print(f"  selected backend: {info['selected_backend']}")
    print(
        f"  CPU: ATen capability {info['cpu_capability']}; ISA {info['cpu_isa']}; "
        f"oneDNN bf16 {'yes' if info['onednn_bf16'] else 'no'}; {info['threads']} threads"
    )
    if info["kernel_threads"] is not None:
        note = "" if info["kernel_threads"] == info["threads"] else "  (fewer than torch's: built without OpenMP?)"
        print(f"  resfused C++ kernels run on {info['kernel_threads']} of them{note}")
    tuning = info["tuning"]
    on = "on" if tuning["enabled"] else "off: the shipped tables choose (resfused.tune, set_tuning, RESFUSED_TUNING=1)"
    print(f"  kernel tuning: {on}")
    choices = tuning["choices"]
    print(f"    cache {tuning['cache_path']}: {len(choices)} measured choices")
    for key, entry in sorted(choices.items())[:SHOWN_CHOICES]:
        table = "the table's too" if entry.get("table") == entry["kernel"] else f"table: {entry.get('table')}"
        print(f"    {key}: {entry['kernel']} measured ({table})")
    if len(choices) > SHOWN_CHOICES:
        print(f"    ... {len(choices) - SHOWN_CHOICES} more: python -m resfused.info --tuning lists them all")


def _print_tuning_cache() -> None:
    choices = tuning_cache.entries()
    print(f"kernel tuning: {'on' if tuning_cache.enabled() else 'off'}")
    print(f"cache {tuning_cache.cache_path()}: {len(choices)} measured choices (kernel: median ms of each candidate)")
    for key, entry in sorted(choices.items()):
        ms = ", ".join(f"{k} {v:.3g}" for k, v in sorted(entry.get("ms", {}).items(), key=lambda kv: kv[1]))
        table = "the table's too" if entry.get("table") == entry["kernel"] else f"table: {entry.get('table')}"
        print(f"  {key}: {entry['kernel']} measured ({table}) [{ms}]")


SHOWN_CHOICES = 20


if __name__ == "__main__":
    main()
