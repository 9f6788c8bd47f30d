"""tools/gpu_check.py (`make gpu-check`) and benchmarks/gpu.py where no GPU is needed: the no-GPU
exits, the verdict rules, and the benchmark's every row kind dry-run on the CPU (reference checks,
targets, JSON) rendered as gpu-check renders it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu as bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_one_line_and_exit_2(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU:"), run.stdout
    assert not out.exists()  # nothing built, nothing reported as checked


def test_no_gpu_reasons(gpu_check):
    assert "cannot be imported" in gpu_check.no_gpu_reason({"error": "torch cannot be imported (x)"})
    assert "not a CUDA build" in gpu_check.no_gpu_reason({"torch": "2.11.0+cpu", "torch_cuda": None})
    assert "no CUDA device" in gpu_check.no_gpu_reason({"torch": "2.11.0", "torch_cuda": "13.0", "device_count": 0})
    assert gpu_check.no_gpu_reason({"torch": "2.11.0", "torch_cuda": "13.0", "device_count": 1}) is None
    assert gpu_check.arch_list((9, 0)) == "9.0" and gpu_check.arch_list((8, 6)) == "8.6"


def _junit(path, tests, failures=0, errors=0, skipped=0):
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" '
        f'tests="{tests}" failures="{failures}" errors="{errors}" skipped="{skipped}"></testsuite></testsuites>'
    )
    return str(path)


def test_skipped_or_missing_tests_never_pass(gpu_check, tmp_path):
    passed = lambda rc, **c: gpu_check.tests_passed(rc, gpu_check.junit_counts(_junit(tmp_path / "j.xml", **c)))
    assert passed(0, tests=3)
    assert not passed(0, tests=3, skipped=1)  # a skipped GPU test was not checked
    assert not passed(1, tests=3, failures=1)
    assert not passed(1, tests=3, errors=1)
    assert not passed(5, tests=0)  # nothing collected
    assert not passed(None, tests=3)  # stopped at the time limit
    assert gpu_check.junit_counts(str(tmp_path / "missing.xml"))["tests"] == 0


def _bench_row(**changes):
    row = dict(
        kind="block",
        block="r50 s1 id",
        type="Bottleneck",
        dtype="fp16",
        batch=32,
        ms=dict(fused=0.5, eager_cl=0.8, eager_nchw=1.0),
        ms_graph=dict(fused=0.4, eager_cl=0.7),
        speedup_vs_eager_cl=1.6,
        speedup_vs_eager_nchw=2.0,
        speedup_graph_vs_eager_cl=1.75,
        tflops=100.0,
        roofline_fraction=0.25,
        error=dict(fused=1e-3, eager=1e-3, limit=3e-3, ok=True),
        kernels=["triton"],
        notes=[],
    )
    row.update(changes)
    return row


def test_benchmark_markdown_and_verdict(gpu_check):
    results = dict(device="H200", torch="2.11.0", triton="3.6.0", tf32={"torch.backends.cudnn.allow_tf32": False})
    results.update(rows=[_bench_row()], targets=bench.evaluate_targets([_bench_row()]), not_run=[])
    md = gpu_check.bench_markdown(results)
    assert "TF32: torch.backends.cudnn.allow_tf32=False" in md
    assert (
        "| r50 s1 id | Bottleneck | fp16 | 32 | 0.500 | 0.800 | 1.60 | 0.400 | 0.700 | 1.75 | - | - | 100.0 | 25% "
        in md
    )
    assert "| 1.0e-03 | 3.0e-03 | yes | triton |" in md
    assert "| block r50 s1 id: fused vs eager channels_last (b32 fp16) | x1.60 | >= x1.3 | pass |" in md
    assert gpu_check.bench_verdict(0, results)[0]
    # a wrong row, a row left out for time, a failed run or no results: never a passed benchmark
    wrong = dict(results, rows=[_bench_row(error=dict(fused=1e-2, eager=1e-3, limit=3e-3, ok=False))])
    assert gpu_check.bench_verdict(0, wrong) == (False, "1 rows (bench.md), 1 over their error limit, 0 not run")
    assert not gpu_check.bench_verdict(0, dict(results, not_run=["fuse(resnet50) fp16 b32"]))[0]
    assert not gpu_check.bench_verdict(None, results)[0] and not gpu_check.bench_verdict(0, None)[0]
    assert not gpu_check.bench_verdict(0, dict(results, rows=[]))[0]


def test_benchmark_targets():
    rows = [
        _bench_row(block=c.label, type=c.block, speedup_vs_eager_cl=1.4)
        for c in bench.CASES
        if c.block in ("Bottleneck", "ResNeXtBottleneck")
    ]
    rows[3]["speedup_vs_eager_cl"] = 1.2
    rows.append(_bench_row(kind="grouped", block="x50 s1 grouped", type="grouped", speedup_vs_eager_cl=1.6))
    model = _bench_row(kind="model", block="fuse(resnet50)", type="224x224", speedup_vs_eager_cl=1.5)
    rows.append(dict(model, speedup_graph_vs_compile=0.9))
    status = {t["target"]: t["status"] for t in bench.evaluate_targets(rows)}
    assert status[f"block {rows[3]['block']}: fused vs eager channels_last (b32 fp16)"] == "FAIL"
    assert status["block r50 s1 id: fused vs eager channels_last (b32 fp16)"] == "pass"
    assert status["every ResNet-50/ResNeXt-50 block (b32 fp16, 12 of 12 measured): worst ratio"] == "FAIL"
    assert status["grouped 3x3 ResNeXt-50 stage 1 (b32 fp16) vs cuDNN"] == "pass"
    assert status["fuse(resnet50) fp16 b32 vs eager channels_last"] == "pass"
    assert status["fuse(resnet50) fp16 b32 (CUDA graphs) vs torch.compile max-autotune"] == "FAIL"
    assert status["fuse(resnet50) bf16 b32 vs eager channels_last"] == "not measured"
    assert status["fuse(resnext50_32x4d) fp16 b32 vs eager channels_last"] == "not measured"
    # rows at another batch or dtype do not count for a target
    other = [dict(r, batch=8) for r in rows]
    assert {t["status"] for t in bench.evaluate_targets(other)} == {"not measured"}


def test_benchmark_error_check():
    ref = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    fp32 = bench.check_error(ref.float() + 1e-5, ref, torch.float32, None)
    assert fp32["limit"] == bench.FP32_RTOL and fp32["ok"] and fp32["fused"] == pytest.approx(1e-5 / 4, rel=1e-2)
    assert not bench.check_error(ref.float() + 1e-3, ref, torch.float32, None)["ok"]
    eager = (ref + 0.0625).half()  # offsets exact in float16
    half = bench.check_error((ref + 0.125).half(), ref, torch.float16, eager)
    assert half["limit"] == pytest.approx(2 * 0.0625 / 4 + 1e-3) and half["ok"]
    assert not bench.check_error((ref + 0.25).half(), ref, torch.float16, eager)["ok"]
    nan = ref.clone()
    nan[1] = float("nan")
    assert not bench.check_error(nan.float(), ref, torch.float32, None)["ok"]  # a NaN the reference has not
    with pytest.raises(ValueError, match="needs the eager"):
        bench.check_error(ref.half(), ref, torch.float16, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_benchmark_without_a_gpu():
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.run_gpu_benchmark(argparse.Namespace())
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "DRAM bytes per block forward" in run.stdout, run.stdout + run.stderr


def test_benchmark_clock_reports_a_failed_graph_capture(monkeypatch):
    """The CUDA clock's code without a GPU: do_bench's median in ms, and a capture that fails
    becomes a note on the row (None as its time), not a crash of the run."""
    import triton.testing

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append(kw) or 0.25)

    def capture_fails(fn, **kw):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", capture_fails)
    clock = bench.Clock("cuda")
    assert clock.time(lambda: None) == 0.25 and calls[0]["return_mode"] == "median"
    ms, why = clock.time_graph(lambda: None)
    assert ms is None and why == (
        "CUDA graph capture failed: RuntimeError: operation not permitted when stream is capturing"
    )


def test_benchmark_dry_run_on_the_cpu(gpu_check, tmp_path):
    """Every row kind (grouped op, block, fused model) through the same code the GPU run takes, on
    the CPU at tiny shapes: reference checks, JSON written, gpu-check's rendering and verdict."""
    rc = bench.main(["--dry-run", "--gpu-dtype", "bf16", "--filter", "x50 s1", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "gpu_results.json") as f:
        results = json.load(f)
    kinds = {r["kind"] for r in results["rows"]}
    assert kinds == {"grouped", "block", "model"}, results["rows"]
    assert all(r["error"]["ok"] and r["error"]["fused"] > 0 for r in results["rows"])
    assert results["tf32"]["torch.backends.cudnn.allow_tf32"] is False and results["not_run"] == []
    block = next(r for r in results["rows"] if r["kind"] == "block")
    assert block["block"] == "x50 s1 id" and "grouped3x3" in block["kernels"]
    assert {t["status"] for t in results["targets"]} == {"not measured"}  # nothing at batch 32 fp16 on a CPU
    assert gpu_check.bench_verdict(0, results) == (True, "4 rows (bench.md), 0 over their error limit, 0 not run")
    md = gpu_check.bench_markdown(results)
    assert "| fuse(resnet50) | 32x32 | bf16 | 1 |" in md and "| x50 s1 grouped |" in md


def test_benchmark_budget_leaves_rows_out(tmp_path):
    rc = bench.main(["--dry-run", "--budget", "0", "--no-models", "--out", str(tmp_path)])
    with open(tmp_path / "gpu_results.json") as f:
        results = json.load(f)
    assert rc == 0 and results["rows"] == [] and len(results["not_run"]) == 2 * 2 + 3 * 2  # grouped + blocks


def _stub_machine(gpu_check, monkeypatch, skipped=0, devices=1, not_run=()):
    """A fake one-GPU machine: the probes answer, each step writes what the real one would."""
    seen = {}

    def probe(py, env, code=gpu_check.PROBE):
        if code == gpu_check.PROBE:
            versions = dict(python="3.12.3", torch="2.11.0", torch_cuda="13.0", triton="3.6.0", numpy="2.5.2")
            return dict(versions, device_count=devices, device="NVIDIA H200", capability=[9, 0])
        return dict(loaded=True, with_cuda=True, cuda_ops=["add_relu"])

    def run(self, name, cmd, log, env, limit):
        seen[name] = (cmd, env, limit)
        self.steps.setdefault(name, {}).update(command=" ".join(cmd), log=os.path.basename(log), seconds=1)
        with open(log, "w") as f:
            f.write("log\n")
        if name == "tests":
            junit = next(a.split("=", 1)[1] for a in cmd if a.startswith("--junitxml="))
            _junit(pathlib.Path(junit), 3, skipped=skipped)
        if name == "benchmark":
            bench = cmd[cmd.index("--out") + 1]
            os.makedirs(bench)
            row = _bench_row(block="b", type="t")
            with open(os.path.join(bench, "gpu_results.json"), "w") as f:
                json.dump(dict(device="NVIDIA H200", rows=[row], targets=[], not_run=list(not_run)), f)
        return 0

    monkeypatch.setattr(gpu_check, "probe", probe)
    monkeypatch.setattr(gpu_check.Check, "run", run)
    monkeypatch.setattr(gpu_check, "_capture", lambda cmd, env=None, timeout=60: "stub")
    return seen


def test_one_gpu_flow_and_its_files(gpu_check, monkeypatch, tmp_path):
    seen = _stub_machine(gpu_check, monkeypatch)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["env.txt", "build.log", "tests.log", "junit.xml", "bench.log", "bench.json", "bench.md", "summary.md"]
    )
    assert (tmp_path / "summary.md").read_text().startswith("# gpu-check: PASSED")
    build_cmd, build_env, build_limit = seen["build"]
    assert build_env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build_env["TRITON_INTERPRET"] == "0"
    assert build_env["MAX_JOBS"] == os.environ.get("MAX_JOBS", "16") and build_limit <= 300
    tests_cmd, tests_env, _ = seen["tests"]
    # one GPU: the tests that need two are deselected (a skipped test would fail the check)
    assert tests_cmd[1:5] == ["-m", "pytest", "-m", "gpu and not multi_gpu"] and tests_cmd[-1] == "tests"
    assert "--durations=30" in tests_cmd
    assert tests_env["TRITON_INTERPRET"] == "0" and tests_env["RESFUSED_REQUIRE_NATIVE"] == "1"
    # compiled kernels and autotuning results are kept for a second run, in the output folder
    cache = os.environ.get("TRITON_CACHE_DIR", str(tmp_path / "cache" / "triton"))
    assert tests_env["TRITON_CACHE_DIR"] == seen["benchmark"][1]["TRITON_CACHE_DIR"] == cache
    bench_cmd, _, bench_limit = seen["benchmark"]
    assert bench_cmd[1:3] == ["-m", "benchmarks.gpu"] and bench_cmd[3:7] == gpu_check.DEFAULT_BENCH_ARGS
    # the benchmark starts no row in the last BENCH_LAST_ROW_S seconds of its step
    budget = float(bench_cmd[bench_cmd.index("--budget") + 1])
    assert budget == pytest.approx(max(0, bench_limit - gpu_check.BENCH_LAST_ROW_S), abs=1)
    # each step gets what is left of the 480 s, less the reserve of the steps after it
    assert build_limit <= 480 - gpu_check.RESERVE_AFTER_BUILD
    assert seen["tests"][2] <= 480 - gpu_check.RESERVE_AFTER_TESTS and seen["benchmark"][2] <= 480
    assert "| b | t | fp16 | 32 |" in (tmp_path / "bench.md").read_text()


def test_a_skipped_gpu_test_fails_the_check(gpu_check, monkeypatch, tmp_path):
    _stub_machine(gpu_check, monkeypatch, skipped=1)
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert (tmp_path / "summary.md").read_text().startswith("# gpu-check: FAILED")


def test_two_gpus_run_the_multi_gpu_tests(gpu_check, monkeypatch, tmp_path):
    seen = _stub_machine(gpu_check, monkeypatch, devices=2)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert seen["tests"][0][1:5] == ["-m", "pytest", "-m", "gpu"]


def test_benchmark_rows_left_out_for_time_fail_the_check(gpu_check, monkeypatch, tmp_path):
    _stub_machine(gpu_check, monkeypatch, not_run=["fuse(resnet50) bf16 b32"])
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# gpu-check: FAILED") and "1 not run" in summary
    assert "Not run (1 rows): fuse(resnet50) bf16 b32" in (tmp_path / "bench.md").read_text()
