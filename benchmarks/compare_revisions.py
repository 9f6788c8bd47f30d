"""A fused model timed in this working tree against another git revision of resfused, side by side.

    python -m benchmarks.compare_revisions REV [--model resnet18] [--batch 1] [--resolution 224]
                                               [--rounds 21] [--threads 2] [--keep]

Why: on these shared machines the same model reads 10-25% apart between runs (docs/measurements.md,
How to measure), so a regression (or a speedup) is only visible when both versions run in one
interleaved measurement. REV is
checked out in a temporary git worktree and its extension built there (CPU kernels only,
`RESFUSED_SKIP_CUDA_BUILD=1`; a few minutes on 2 cores, reused while the worktree is kept). Each
tree then runs the model in a worker process of its own (benchmarks.isolation), with its own
resfused first on `sys.path`, and the rounds are interleaved (benchmarks.common). Printed: the
median per forward of each and new / old.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile

from benchmarks.common import interleaved_rounds
from benchmarks.isolation import WorkerPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fused_model(tree: str, model: str, batch: int, resolution: int):
    """The recipe each worker builds (benchmarks.isolation): `model` fused by the resfused of
    `tree`, put first on this worker's sys.path before anything imports resfused."""
    sys.path.insert(0, tree)
    import torch
    import torchvision

    import resfused

    if not resfused.__file__.startswith(tree):
        raise RuntimeError(f"compare_revisions: resfused was imported from {resfused.__file__}, not {tree}")
    torch.manual_seed(0)
    fused = resfused.fuse(getattr(torchvision.models, model)(weights=None).eval())
    x = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=torch.channels_last)

    def call():
        with torch.inference_mode():
            fused(x)

    return call, {}


def checkout_and_build(rev: str, where: str) -> str:
    """REV in a git worktree at `where`, its CPU extension built in place; returns the path."""
    marker = os.path.join(where, ".compare-revisions-built")
    if not os.path.exists(marker):
        if not os.path.isdir(where):
            subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", where, rev], check=True)
        print(f"[compare] building {rev} in {where} (CPU kernels only)...", file=sys.stderr, flush=True)
        env = dict(os.environ, RESFUSED_SKIP_CUDA_BUILD="1")
        log = os.path.join(where, "build.log")
        with open(log, "w") as f:
            done = subprocess.run(
                [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", os.path.join(where, "build")],
                cwd=where,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        if done.returncode != 0:
            raise SystemExit(f"compare_revisions: building {rev} failed; see {log}")
        open(marker, "w").close()
    return where


def time_trees(
    trees: dict[str, str], model: str, batch: int, resolution: int, rounds: int, threads: int, block_s: float = 0.5
) -> dict[str, float]:
    """Median ms per forward of `model` fused by each tree's resfused, each tree in a worker
    process of its own, `rounds` rounds interleaved (common.interleaved_rounds)."""
    with WorkerPool(threads) as pool:
        pool.build_all(
            {name: functools.partial(_fused_model, tree, model, batch, resolution) for name, tree in trees.items()}
        )
        timings = interleaved_rounds(
            {name: pool[name] for name in trees},
            block_s=block_s,
            min_time_s=0,
            min_rounds=rounds,
            max_rounds=rounds,
            warmup_s=block_s,
        )
    return {name: t.median_s * 1e3 for name, t in timings.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the git revision to compare with (a commit, tag or branch)")
    parser.add_argument("--model", default="resnet18", help="a torchvision model name (default resnet18)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the worktree (and its build) for the next run")
    args = parser.parse_args(argv)
    if min(args.batch, args.resolution, args.rounds, args.threads) < 1:
        raise SystemExit("compare_revisions: --batch, --resolution, --rounds and --threads must be >= 1")
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", args.rev], capture_output=True, text=True)
    if sha.returncode != 0:
        raise SystemExit(f"compare_revisions: {args.rev!r} is not a revision of {ROOT}: {sha.stderr.strip()}")
    where = os.path.join(tempfile.gettempdir(), f"resfused-rev-{sha.stdout.strip()}")
    try:
        old = checkout_and_build(args.rev, where)
        print(
            f"[compare] timing {args.model} b{args.batch} {args.resolution}x{args.resolution}, {args.rounds} "
            "interleaved rounds...",
            file=sys.stderr,
            flush=True,
        )
        med = time_trees(
            {"this tree": ROOT, args.rev: old}, args.model, args.batch, args.resolution, args.rounds, args.threads
        )
    finally:
        if not args.keep and os.path.isdir(where):
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", where], check=False)
    this, other = med["this tree"], med[args.rev]
    print(
        f"{args.model} b{args.batch} {args.resolution}x{args.resolution}, {args.threads} threads: this tree "
        f"{this:.2f} ms, {args.rev} {other:.2f} ms per forward (medians of {args.rounds}); this / {args.rev} = "
        f"{this / other:.3f}"
    )


if __name__ == "__main__":
    main()
