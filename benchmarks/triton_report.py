"""Offline compile report for the Triton conv kernel (resfused/triton/conv.py): no GPU needed.

Compiles kernel variants x autotune configs for sm_80 and sm_90 with `triton.compile(ASTSource,
target=GPUTarget(...))`, runs `ptxas -v` on the PTX, and prints per config: registers, spill
bytes, shared memory, and the occupancy these imply (resident warps per SM / 64).

    python -m benchmarks.triton_report                 # worst-case variant per dtype, every config of its dtype's table
    python -m benchmarks.triton_report --set all       # every variant (slow: ~1 h on 2 cores)
    python -m benchmarks.triton_report --set test --json out.json    # what the test checks

Must run with TRITON_INTERPRET=0 (the interpreter's @triton.jit functions cannot be compiled);
running this file as a script forces it before triton is imported.

Integer arguments get the divisibility-by-16 hints the JIT gives ResNet shapes (channel counts
and NHWC strides are multiples of 16), so the PTX is the one a real launch compiles.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

PTXAS = os.environ.get("PTXAS", "/usr/local/cuda/bin/ptxas")
# Per-SM limits (CUDA occupancy tables): shared memory a block may use (opt-in maximum) and per
# SM, with 1 KiB reserved per resident block; 64K registers, 64 warps, 32 blocks.
TARGETS = {
    80: dict(arch="sm_80", smem_block=163 * 1024, smem_sm=164 * 1024),
    90: dict(arch="sm_90a", smem_block=227 * 1024, smem_sm=228 * 1024),
}
REGS_SM, MAX_WARPS_SM, MAX_BLOCKS_SM = 65536, 64, 32

# (dtype string, allow_tf32) classes; fp32 with TF32 off runs FMA (ieee), the register-heaviest.
DTYPES = {"fp16": ("fp16", False), "bf16": ("bf16", False), "fp32-tf32": ("fp32", True), "fp32-ieee": ("fp32", False)}
FORMS = {  # (KH, KW, IS_GEMM)
    "gemm1x1": (1, 1, True),
    "conv1x1": (1, 1, False),
    "conv3x3": (3, 3, False),
}
RESIDUALS = {"none": (False, False), "res_nhwc": (True, True), "res_strided": (True, False)}
DIV16_INTS = ("CIg", "COg", "C_out", "sxn", "sxh", "sxw", "srn", "srh", "srw")


@dataclasses.dataclass(frozen=True)
class Job:
    dtype: str
    form: str
    residual: str
    prologue: bool
    config: tuple  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    cc: int

    @property
    def label(self) -> str:
        bm, bn, bk, w, s = self.config
        pro = "+pro" if self.prologue else ""
        return f"sm_{self.cc} {self.dtype:9s} {self.form} {self.residual}{pro} {bm}x{bn}x{bk} w{w} s{s}"


def _variants(which: str):
    """(dtype, form, residual, prologue) tuples; bias and ReLU are on in every variant."""
    worst = ("conv3x3", "res_strided", True)  # most live values: gather, prologue, int64 residual
    if which == "all":
        return list(itertools.product(DTYPES, FORMS, RESIDUALS, (False, True)))
    if which == "worst":
        return [(d, *worst) for d in DTYPES] + [(d, "gemm1x1", "res_strided", True) for d in DTYPES]
    raise ValueError(f"unknown variant set {which!r}")


def configs_for(dtype: str) -> tuple:
    """The configs the autotuner may try for a dtype class: FMA configs for fp32 without TF32,
    else MMA ones, less those whose pipeline would overflow shared memory in that dtype."""
    from resfused.triton import conv

    dt, tf32 = DTYPES[dtype]
    return conv.configs_for(4 if dt == "fp32" else 2, conv.uses_fma(dt == "fp32", tf32))


def jobs(which: str, targets=(80, 90)) -> list[Job]:
    if which == "test":
        # Every config on both targets for fp16 and fp32-ieee (the worst variant), plus one
        # config of the other dtypes and of the GEMM specialization.
        out = [
            Job(d, "conv3x3", "res_strided", True, c, cc)
            for d in ("fp16", "fp32-ieee")
            for c in configs_for(d)
            for cc in (80, 90)
        ]
        # fp32 with TF32 on sm_80: the tightest MMA case (a 64x64x64 config spilled there).
        tf32 = configs_for("fp32-tf32")
        out += [Job("fp32-tf32", "conv3x3", "res_strided", True, c, 80) for c in tf32]
        biggest = configs_for("fp16")[0]
        out += [
            Job("bf16", "conv3x3", "res_nhwc", True, biggest, 80),
            Job("fp32-tf32", "conv3x3", "res_nhwc", False, tf32[0], 90),
            Job("fp16", "gemm1x1", "res_nhwc", False, biggest, 80),
        ]
        return out
    return [Job(*v, c, cc) for v in _variants(which) for c in configs_for(v[0]) for cc in targets]


def occupancy(regs: int, shared: int, warps: int, cc: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / 64) from registers, shared memory and warps."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in 256s
    by_regs = (REGS_SM // regs_per_warp) // warps
    by_smem = TARGETS[cc]["smem_sm"] // (shared + 1024)
    blocks = min(by_regs, by_smem, MAX_WARPS_SM // warps, MAX_BLOCKS_SM)
    return blocks, blocks * warps / MAX_WARPS_SM


def compile_job(job: Job) -> dict:
    """Compile one job to PTX, run ptxas -v on it; registers, spills, shared memory, occupancy."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from resfused.triton import conv

    fn = conv.conv2d_nhwc_kernel
    if not hasattr(fn, "params"):
        raise RuntimeError("triton_report: run with TRITON_INTERPRET=0 (the kernel is an interpreted function)")
    dt, tf32 = DTYPES[job.dtype]
    kh, kw, is_gemm = FORMS[job.form]
    has_res, res_nhwc = RESIDUALS[job.residual]
    bm, bn, bk, warps, stages = job.config
    constexprs = dict(
        KH=kh,
        KW=kw,
        IS_GEMM=is_gemm,
        HAS_BIAS=True,
        HAS_RES=has_res,
        RES_NHWC=res_nhwc,
        RELU=True,
        PROLOGUE=job.prologue,
        ALLOW_TF32=tf32,
        UPCAST_DOT=False,
        GROUP_M=conv.GROUP_M,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
    )
    signature, attrs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dt
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in DIV16_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", job.cc, 32)
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=target,
        options=dict(num_warps=warps, num_stages=stages),
    )
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [PTXAS, "-v", f"-arch={TARGETS[job.cc]['arch']}", path, "-o", os.devnull], capture_output=True, text=True
        )
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed for {job.label}: {run.stderr[-2000:]}")
    log = run.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log))
    spill_ld = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", log))
    shared = int(kernel.metadata.shared)
    blocks, occ = occupancy(regs, shared, warps, job.cc)
    return dict(
        job=dataclasses.asdict(job),
        label=job.label,
        registers=regs,
        spill_stores=spill_st,
        spill_loads=spill_ld,
        shared=shared,
        shared_limit=TARGETS[job.cc]["smem_block"],
        blocks_per_sm=blocks,
        occupancy=occ,
        tf32_mma="tf32" in ptx,
    )


def run(which: str, workers: int = 2, targets=(80, 90), only=None) -> list[dict]:
    todo = [j for j in jobs(which, targets) if only is None or "x".join(map(str, j.config[:3])) in only]
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        # One line per finished compile on stderr: `--set all` runs for about an hour.
        for i, r in enumerate(pool.map(compile_job, todo), 1):
            results.append(r)
            spill = r["spill_stores"] + r["spill_loads"]
            print(
                f"[{i}/{len(todo)}] {r['label']}: {r['registers']} regs, {spill} B spilled", file=sys.stderr, flush=True
            )
    return results


def print_table(results: list[dict]) -> None:
    print(f"{'variant / config':58s} {'regs':>4s} {'spill':>6s} {'smem KiB':>8s} {'blk/SM':>6s} {'occ':>5s}")
    for r in results:
        spill = r["spill_stores"] + r["spill_loads"]
        flag = "" if spill == 0 and r["shared"] <= r["shared_limit"] else "  <-- FAILS"
        print(
            f"{r['label']:58s} {r['registers']:4d} {spill:6d} {r['shared'] / 1024:8.1f} "
            f"{r['blocks_per_sm']:6d} {r['occupancy']:5.0%}{flag}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--set",
        choices=("worst", "all", "test"),
        default="worst",
        help="worst: the register-heaviest variant per dtype (default); all: every variant; test: the test's subset",
    )
    p.add_argument("--targets", nargs="+", type=int, default=[80, 90], choices=sorted(TARGETS))
    p.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--config", action="append", help="only this tile, as BMxBNxBK (repeatable), e.g. 128x256x64")
    args = p.parse_args(argv)
    results = run(args.set, args.jobs, tuple(args.targets), args.config)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = [r for r in results if r["spill_stores"] + r["spill_loads"] or r["shared"] > r["shared_limit"]]
    print(f"{len(results)} compiled, {len(bad)} spill or exceed shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported (pool workers inherit it)
    sys.exit(main())
