"""Minor page faults and time per inference forward, each variant in a fresh process of its own.

    python -m benchmarks.page_faults [--model resnet50] [--batch 8] [--calls 7] [--threads 2]

Why it exists: on these machines a fresh multi-megabyte activation costs a page fault (and a
kernel zeroing) per 4 KiB page, which is why the fused modules keep their activation buffers in
resfused's buffer cache and why the main benchmark times each variant in its own process
(benchmarks/isolation.py). This prints, per variant, the faults per forward (getrusage, after two
warm-up forwards) and the median forward time; `RESFUSED_BUFFER_CACHE_MB=0` turns the cache off
for comparison.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

import torch

VARIANTS = ("fused", "eager_nchw", "eager_cl", "compile")


def _measure(variant: str, model_name: str, batch: int, calls: int, threads: int) -> tuple[float, float]:
    # The variant is built exactly as the main benchmark builds it (randomized BN, same input).
    from benchmarks.cpu import Case, make_variant

    torch.set_num_threads(threads)
    call, _ = make_variant(variant, Case("model", (model_name, 224), "fp32", batch))
    call(), call()
    faults0, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    return faults / calls, statistics.median(times) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="a torchvision model name (default resnet50)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=7, help="timed forwards per variant (default 7)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    if args.batch < 1 or args.calls < 1 or args.threads < 1:
        raise SystemExit("page_faults: --batch, --calls and --threads must be >= 1")
    ctx = multiprocessing.get_context("spawn")
    print(
        f"{args.model} 224x224, batch {args.batch}, {args.threads} threads, {args.calls} forwards per variant, "
        "each variant in a fresh process"
    )
    for variant in args.variants:
        with ctx.Pool(1) as pool:
            faults, ms = pool.apply(_measure, (variant, args.model, args.batch, args.calls, args.threads))
        print(f"  {variant:<11} {faults:>10.0f} minor page faults per forward   {ms:8.1f} ms median")


if __name__ == "__main__":
    main()
