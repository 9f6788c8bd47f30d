"""The Triton conv kernel compiled offline for sm_80 and sm_90 (no GPU): no spills, shared memory fits.

The compile runs in a subprocess with TRITON_INTERPRET=0: under the interpreter (which conftest
turns on for this process) @triton.jit returns an InterpretedFunction that triton.compile cannot
take. The subprocess is `python -m benchmarks.triton_report --set test`, the same code that prints
the per-config report; this test asserts on its JSON.

Scope: the test set (40 compiles, ~3 min on 2 cores with a cold Triton cache) is every config of
both tables (tensor-core MMA and fp32 FMA) on both targets for the register-heaviest variant (3x3,
prologue, strided residual, bias, ReLU) in fp16 and fp32-without-TF32, every config fp32 with TF32
may run (resfused.triton.conv.configs_for) on sm_80, plus one config each of bf16, fp32-TF32 on
sm_90 and the 1x1 GEMM specialization.
Every variant x every config (`--set all`, ~1 h on 2 cores) and
the worst variant of every dtype x form (`--set worst`) are run by the script, not here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = "/usr/local/cuda/bin/ptxas"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not os.path.exists(PTXAS) and shutil.which("ptxas") is None:
        pytest.skip(f"ptxas not found at {PTXAS}")
    out = tmp_path_factory.mktemp("triton_report") / "report.json"
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_report", "--set", "test", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), f"triton_report failed (rc {run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    return json.loads(out.read_text()), run.stdout


def test_every_job_compiled(report):
    from benchmarks.triton_report import jobs

    results, _ = report
    assert len(results) == len(jobs("test")) > 0
    from resfused.triton.conv import CONFIG_TABLE, CONFIG_TABLE_FMA, configs_for

    seen = {(r["job"]["dtype"], tuple(r["job"]["config"]), r["job"]["cc"]) for r in results}
    for cc in (80, 90):
        assert all(("fp16", c, cc) in seen for c in CONFIG_TABLE)
        assert all(("fp32-ieee", c, cc) in seen for c in CONFIG_TABLE_FMA)
    assert all(("fp32-tf32", c, 80) in seen for c in configs_for(4, False))


def test_no_spills(report):
    results, stdout = report
    spilled = [r["label"] for r in results if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"register spills in {spilled}\n{stdout}"
    assert all(0 < r["registers"] <= 255 for r in results)


def test_shared_memory_fits(report):
    results, stdout = report
    limits = {80: 163 * 1024, 90: 227 * 1024}
    over = [r["label"] for r in results if not 0 < r["shared"] <= limits[r["job"]["cc"]]]
    assert not over, f"shared memory over the per-block limit in {over}\n{stdout}"


def test_tf32_follows_the_flag(report):
    # ALLOW_TF32 must reach the MMA: TF32 instructions in the PTX exactly when it is on.
    results, _ = report
    for r in results:
        assert r["tf32_mma"] == (r["job"]["dtype"] == "fp32-tf32"), r["label"]


def test_occupancy_model():
    from benchmarks.triton_report import occupancy

    # 64 regs x 256 threads: 4 blocks by registers; 48 KiB smem: 4 blocks (228 KiB / 49 KiB).
    assert occupancy(64, 48 * 1024, 8, 90) == (4, 0.5)
    assert occupancy(255, 1024, 8, 80) == (1, 0.125)
    assert occupancy(32, 160 * 1024, 4, 80) == (1, 4 / 64)


def test_autotune_pruning_picks_the_dtype_table():
    # The autotuner's early prune (runs before any launch, so testable without a GPU).
    from resfused.triton import conv

    def pruned(dtype, allow_tf32, cig=64, cog=64, m=4096):
        args = {"x_ptr": torch.empty(0, dtype=dtype), "M": m, "M_BUCKET": conv.m_bucket(m), "CIg": cig, "COg": cog}
        return conv._prune_configs(conv.CONFIGS_MMA + conv.CONFIGS_FMA, args, ALLOW_TF32=allow_tf32)

    fma = {id(c) for c in conv.CONFIGS_FMA}
    assert all(id(c) in fma for c in pruned(torch.float32, False))
    for dtype, tf32 in ((torch.float32, True), (torch.float16, False), (torch.bfloat16, False)):
        assert not any(id(c) in fma for c in pruned(dtype, tf32))
    # the tiles that spill or overflow shared memory in fp32 are tried for 16-bit dtypes only
    half_only = {conv.config_tuple(c) for c in pruned(torch.float16, False, 256, 256)} - {
        conv.config_tuple(c) for c in pruned(torch.float32, True, 256, 256)
    }
    assert half_only == set(conv.HALF_ONLY) and half_only
    # a 16-channel group keeps only BLOCK_N = 16 tiles; tiny M keeps only BLOCK_M = 32
    assert {c.kwargs["BLOCK_N"] for c in pruned(torch.float16, False, cig=16, cog=16)} == {16}
    assert {c.kwargs["BLOCK_M"] for c in pruned(torch.float16, False, m=20)} == {32}
    # the pruning sees M only through its bucket, as the autotuner caches per bucket
    assert pruned(torch.float16, False, m=33) == pruned(torch.float16, False, m=64)


def test_autotune_key():
    from resfused.triton import conv

    # M is bucketed (a new batch or resolution re-tunes only past a power of two); stride is in.
    assert "M" not in conv.AUTOTUNE_KEY and {"M_BUCKET", "stride_h", "stride_w", "C_out"} <= set(conv.AUTOTUNE_KEY)
    assert [conv.m_bucket(m) for m in (1, 32, 33, 49, 64, 65, 25088)] == [32, 32, 64, 64, 64, 128, 32768]
    assert set(conv.AUTOTUNE_KEY) <= set(conv.RUNTIME_ARGS) | {
        "KH", "KW", "IS_GEMM", "HAS_RES", "RES_NHWC", "PROLOGUE", "ALLOW_TF32"
    }  # fmt: skip


def test_sizes_are_not_specialized():
    # Compiled (TRITON_INTERPRET=0, in a subprocess) the kernel leaves the batch- and
    # resolution-dependent sizes unspecialized; the runtime argument list matches the kernel's.
    code = (
        "from resfused.triton import conv as c; k = c.conv2d_nhwc_kernel; "
        "print([p.name for p in k.params if p.do_not_specialize]); "
        "print([p.name for p in k.params if not p.is_constexpr] == list(c.RUNTIME_ARGS))"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    names, matches = run.stdout.strip().splitlines()
    assert eval(names) == ["M", "M_BUCKET", "H", "W", "OH", "OW"] and matches == "True"
