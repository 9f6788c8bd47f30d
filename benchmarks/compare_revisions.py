"""A fused model timed in this working tree against another git revision of resfused, side by side.

    python -m benchmarks.compare_revisions REV [--model resnet18] [--batch 1] [--resolution 224]
                                               [--rounds 21] [--threads 2] [--keep]

Why: on these shared machines the same model reads 10-25% apart between runs, so a regression
(or a speedup) is only visible when both versions run in one interleaved measurement. REV is
checked out in a temporary git worktree and its extension built there (CPU kernels only,
`RESFUSED_SKIP_CUDA_BUILD=1`; a few minutes on 2 cores, reused while the worktree is kept). Each
tree then runs the model in a process of its own, with its own resfused first on `sys.path`, and
the rounds alternate in order. Printed: the median per forward of each and new / old.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: resfused from TREE, the model fused once, then "N" on stdin times N forwards.
_CHILD = r"""
import sys, time, torch
tree, model, batch, res, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, tree)
torch.set_num_threads(threads)
import resfused, torchvision
if not resfused.__file__.startswith(tree):
    raise SystemExit(f"compare_revisions: resfused was imported from {resfused.__file__}, not {tree}")
torch.manual_seed(0)
fused = resfused.fuse(getattr(torchvision.models, model)(weights=None).eval())
x = torch.randn(batch, 3, res, res).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(3):
        fused(x)
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        t = time.perf_counter()
        for _ in range(n):
            fused(x)
        print((time.perf_counter() - t) / n * 1e3, flush=True)
"""


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
            done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp",
                                   os.path.join(where, "build")], cwd=where, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise SystemExit(f"compare_revisions: building {rev} failed; see {log}")
        open(marker, "w").close()
    return where


def time_trees(trees: dict[str, str], model: str, batch: int, resolution: int, rounds: int, threads: int,
               calls: int | None = None) -> dict[str, float]:
    """Median ms per forward of `model` fused by each tree's resfused, rounds interleaved."""
    calls = calls or (2 if batch >= 8 else 10)
    procs = {name: subprocess.Popen([sys.executable, "-c", _CHILD, tree, model, str(batch), str(resolution), str(threads)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir())
             for name, tree in trees.items()}
    try:
        for name, p in procs.items():
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"compare_revisions: the {name!r} process failed to start (exit {p.wait()})")
        samples: dict[str, list[float]] = {name: [] for name in procs}
        names = list(procs)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                procs[name].stdin.write(f"{calls}\n")
                procs[name].stdin.flush()
                samples[name].append(float(procs[name].stdout.readline()))
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
            p.wait()
    return {name: statistics.median(v) for name, v in samples.items()}


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
        print(f"[compare] timing {args.model} b{args.batch} {args.resolution}x{args.resolution}, {args.rounds} "
              "interleaved rounds...", file=sys.stderr, flush=True)
        med = time_trees({"this tree": ROOT, args.rev: old}, args.model, args.batch, args.resolution, args.rounds,
                         args.threads)
    finally:
        if not args.keep and os.path.isdir(where):
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", where], check=False)
    this, other = med["this tree"], med[args.rev]
    print(f"{args.model} b{args.batch} {args.resolution}x{args.resolution}, {args.threads} threads: this tree "
          f"{this:.2f} ms, {args.rev} {other:.2f} ms per forward (medians of {args.rounds}); this / {args.rev} = "
          f"{this / other:.3f}")


if __name__ == "__main__":
    main()
