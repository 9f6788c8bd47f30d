"""Training-step benchmark (CPU): forward + backward of the fused blocks and of a converted
resnet18 in train mode, against eager PyTorch (NCHW and channels_last), with a fixed thread count,
each variant in a worker process of its own and the rounds interleaved (benchmarks/isolation.py).
Speedup = eager median / fused median.

    python -m benchmarks.training [--threads 2] [--dtype fp32 bf16] [--batch 8] [--size 224]
"""

from __future__ import annotations

import argparse
import functools

import torch
from tabulate import tabulate
from tqdm import tqdm

import resfused
from benchmarks.common import DTYPES, interleaved_rounds
from benchmarks.isolation import WorkerPool
from resfused import reference as R

# (block, constructor args, input H=W): ResNet-50 / ResNeXt-50 stage-1 shapes, identity and projection.
BLOCKS = [
    ("BasicBlock", (64, 64, 1), 56),
    ("BasicBlock", (64, 128, 2), 56),
    ("PreActBasicBlock", (64, 64, 1), 56),
    ("Bottleneck", (256, 64, 1), 56),
    ("Bottleneck", (256, 128, 2), 56),
    ("ResNeXtBottleneck", (256, 64, 1, 32, 4), 56),
]


def _train_step(module, x, grad):
    def step():
        for p in module.parameters():
            p.grad = None
        module(x).backward(grad)

    return step


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


VARIANTS = ("fused", "eager_nchw", "eager_cl")


def make_variant(variant: str, name: str, args, hw: int, dtype_name: str, batch: int):
    """One variant's train step, built in this (worker) process: the recipe of isolation.Worker."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    if args is None:
        import torchvision

        eager = torchvision.models.resnet18(weights=None).to(dtype).train()
        x = torch.randn(batch, 3, hw, hw, dtype=dtype)
    else:
        eager = getattr(R, name)(*args).to(dtype).train()
        x = torch.randn(batch, args[0], hw, hw, dtype=dtype)
    grad = torch.randn_like(eager(x))
    if variant == "eager_nchw":
        return _train_step(eager, x, grad), {}
    if variant == "eager_cl":
        return _train_step(eager.to(memory_format=torch.channels_last), _cl(x), _cl(grad)), {}
    if args is None:
        fused = resfused.fuse(eager)
    else:
        fused = getattr(resfused, name)(*args).to(dtype).train()
        fused.load_state_dict(eager.state_dict())
    fused = fused.to(memory_format=torch.channels_last)  # the fused blocks' native layout, weights too
    return _train_step(fused, _cl(x), _cl(grad)), {}


def run(threads: int, dtypes: list[str], batch: int, size: int, progress: bool = True) -> list[dict]:
    torch.set_num_threads(threads)
    cases = [(name, args, hw) for name, args, hw in BLOCKS] + [("resnet18", None, size)]
    rows = []
    with WorkerPool(threads, preload=("resfused", "torchvision", "benchmarks.training")) as pool:
        pool.start(VARIANTS)
        for dtype_name in dtypes:
            for name, args, hw in tqdm(cases, desc=f"training {dtype_name}", disable=not progress):
                for v in VARIANTS:
                    pool[v].build(functools.partial(make_variant, v, name, args, hw, dtype_name, batch))
                times = interleaved_rounds({v: pool[v] for v in VARIANTS}, min_time_s=1.0, min_rounds=3)
                label = name if args is None else f"{name}{args}"
                rows.append(
                    {
                        "case": f"{label} @{hw}x{hw}",
                        "batch": batch,
                        "dtype": dtype_name,
                        **{f"{k}_ms": t.median_s * 1e3 for k, t in times.items()},
                        "vs_eager_nchw": times["eager_nchw"].median_s / times["fused"].median_s,
                        "vs_eager_cl": times["eager_cl"].median_s / times["fused"].median_s,
                    }
                )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224, help="resnet18 input resolution")
    args = parser.parse_args(argv)
    rows = run(args.threads, args.dtype, args.batch, args.size)
    print(f"train step (forward + backward), {args.threads} threads, median of interleaved rounds")
    print(tabulate(rows, headers="keys", floatfmt=".2f"))


if __name__ == "__main__":
    main()
