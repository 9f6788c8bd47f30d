"""tools/gpu_check.py (`make gpu-check`) where no GPU is needed: the no-GPU exit, the verdict rules."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

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


def test_benchmark_markdown(gpu_check):
    row = dict(
        block="r50 s1 id",
        type="Bottleneck",
        dtype="fp16",
        batch=32,
        ms=dict(fused=0.5, eager_cl=0.8, eager_nchw=1.0),
        speedup_vs_eager_cl=1.6,
        speedup_vs_eager_nchw=2.0,
        tflops=100.0,
        roofline_fraction=0.25,
        kernels=["conv/triton"],
    )
    md = gpu_check.bench_markdown(dict(device="H200", torch="2.11.0", tf32=False, rows=[row]))
    assert "| r50 s1 id | Bottleneck | fp16 | 32 | 0.500 | 0.800 | 1.000 | 1.60 | 2.00 | 100.0 | 25% |" in md


def _stub_machine(gpu_check, monkeypatch, skipped=0):
    """A fake one-GPU machine: the probes answer, each step writes what the real one would."""
    seen = {}

    def probe(py, env, code=gpu_check.PROBE):
        if code == gpu_check.PROBE:
            versions = dict(python="3.12.3", torch="2.11.0", torch_cuda="13.0", triton="3.6.0", numpy="2.5.2")
            return dict(versions, device_count=1, device="NVIDIA H200", capability=[9, 0])
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
            with open(os.path.join(bench, "gpu_results.json"), "w") as f:
                f.write(
                    '{"device": "NVIDIA H200", "rows": [{"block": "b", "type": "t", "dtype": "fp16", "batch": 32, '
                    '"ms": {"fused": 1, "eager_cl": 2, "eager_nchw": 3}, "speedup_vs_eager_cl": 2, '
                    '"speedup_vs_eager_nchw": 3, "tflops": 9, "roofline_fraction": null, "kernels": ["k"]}]}'
                )
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
    assert tests_cmd[1:5] == ["-m", "pytest", "-m", "gpu"] and tests_cmd[-1] == "tests"
    assert tests_env["TRITON_INTERPRET"] == "0" and tests_env["RESFUSED_REQUIRE_NATIVE"] == "1"
    # each step gets what is left of the 480 s, less the reserve of the steps after it
    assert build_limit <= 480 - gpu_check.RESERVE_AFTER_BUILD
    assert seen["tests"][2] <= 480 - gpu_check.RESERVE_AFTER_TESTS and seen["benchmark"][2] <= 480
    assert "| b | t | fp16 | 32 |" in (tmp_path / "bench.md").read_text()


def test_a_skipped_gpu_test_fails_the_check(gpu_check, monkeypatch, tmp_path):
    _stub_machine(gpu_check, monkeypatch, skipped=1)
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert (tmp_path / "summary.md").read_text().startswith("# gpu-check: FAILED")
