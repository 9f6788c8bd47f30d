"""`make gpu-check`: the GPU checks in one command, on a machine with an NVIDIA GPU.

    make gpu-check [PYTHON=python3] [GPU_CHECK_OUT=gpu-check]
    python3 tools/gpu_check.py [--out DIR] [--budget SECONDS]

Made for a machine with no network and its own Python (torch, triton, pytest, setuptools and
ninja installed; no venv, nothing installed). The Python that runs this script runs every step:

1. environment: Python / torch / triton / numpy versions, the device, nvidia-smi, nvcc -> env.txt
2. build: resfused._C in place (`setup.py build_ext --inplace`, as `make build` does) with
   TORCH_CUDA_ARCH_LIST = the present GPU's compute capability only, MAX_JOBS=16 (the
   environment's MAX_JOBS wins) and ptxas -v in the log -> build.log; `python -m resfused.info`
   is added to env.txt. The CUDA kernels must have been built.
3. tests: every test marked `gpu` (on a one-GPU machine `gpu and not multi_gpu`: the tests that
   need two devices are deselected, not skipped), with TRITON_INTERPRET=0 and
   RESFUSED_REQUIRE_NATIVE=1, the 30 slowest listed -> junit.xml, tests.log. tests/test_gpu.py
   holds the production path: the `auto` backend on every block type and on fused ResNet-50 /
   ResNeXt-50 in fp16/bf16/fp32, the CUDA grouped 3x3 kernel (4/8/16/32 channels per group,
   stride 1/2, unaligned views), the CUDA tails and training BatchNorm, a training step of a fused
   resnet18, CUDA graphs, a side stream, cuda:1, torch.compile and torch.autocast, all against
   float64. Passes only if at least one test ran and none failed, errored or was skipped (a
   skipped GPU test is not a checked one).
4. benchmark: `python -m benchmarks.gpu --gpu-dtype fp16 --batch 32 --budget S` (the grouped
   3x3 op against cuDNN, every block at batch 32 fp16, fuse(resnet50) / fuse(resnext50_32x4d) at
   batch 32 fp16 and bf16, with and without CUDA graphs, each row checked against float64, the
   project's GPU targets with pass / FAIL; GPU_CHECK_BENCH_ARGS replaces the arguments before --budget,
   e.g. with `--compile` for torch.compile max-autotune, minutes per model). S is the step's time
   limit less BENCH_LAST_ROW_S: the benchmark starts no row after it and lists the rows left out.
   -> bench.log, bench.json (benchmarks/gpu.py's JSON, rewritten after every row), bench.md (the
   settings, the rows, the targets). Passes only when it finished, every row is within its
   error limit and none was left out for time; a missed speed target is reported, not failed.

Then summary.md: PASSED or FAILED on its first line, the environment, each step's result, its
command, and the benchmark table. Eight files in all (what a remote run can bring back), and
cache/: the Triton and inductor caches with the autotuning results (TRITON_CACHE_DIR,
TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_AUTOTUNING=1 unless the environment sets them), so that a
second run skips compiling and tuning.

Everything stays within --budget seconds (default 480): each step gets what is left, less a
reserve for the steps after it, and a step that runs out of time is stopped and counted as
failed (a benchmark cut short keeps the rows it wrote: bench.json, bench.md).
Exit status: 0 only when the build, the tests and the benchmark all succeeded; 2 without a GPU
(one line says why, nothing is built or run); 1 otherwise.

Note: the in-place build replaces resfused/_C*.so with one built against this Python's torch; on
a machine that also uses the Makefile's .venv, run `make clean build` afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BENCH_ARGS = ["--gpu-dtype", "fp16", "--batch", "32"]
# Seconds kept back for the steps that follow (a step may use what is left minus these).
RESERVE_AFTER_BUILD = 200  # tests + benchmark
RESERVE_AFTER_TESTS = 150  # benchmark
RESERVE_AFTER_BENCH = 5  # summary
# The benchmark starts no row later than this many seconds before its step's limit (its --budget):
# the longest row, a model at batch 32 with its first autotuning, should still finish.
BENCH_LAST_ROW_S = 60

PROBE = r"""
import json, platform
out = {"python": platform.python_version(), "executable": __import__("sys").executable}
try:
    import torch
except Exception as e:
    out["error"] = f"torch cannot be imported ({type(e).__name__}: {e})"
else:
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    for mod in ("triton", "numpy", "pytest", "setuptools", "ninja"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:
            out[mod] = None
    out["cuda_available"] = bool(torch.cuda.is_available())
    out["device_count"] = torch.cuda.device_count() if out["cuda_available"] else 0
    if out["device_count"]:
        out["device"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
print(json.dumps(out))
"""

NATIVE_PROBE = r"""
import json
from resfused import _native
print(json.dumps({"loaded": _native.loaded, "error": _native.load_error, "with_cuda": bool(_native.with_cuda),
                  "cuda_ops": [op for op in _native.op_names() if _native.has_kernel(op, "cuda")]}))
"""


def probe(py: str, env: dict, code: str = PROBE) -> dict:
    """Run `code` (PROBE or NATIVE_PROBE) with `py` in a child process; its JSON, or {"error": ...}."""
    run = subprocess.run([py, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": f"{py} could not run the probe: {run.stderr.strip()[-300:]}"}


def no_gpu_reason(found: dict) -> str | None:
    """Why this machine cannot run the GPU checks, or None when it can."""
    if "error" in found:
        return found["error"]
    if not found.get("torch_cuda"):
        return f"torch {found['torch']} is not a CUDA build"
    if not found.get("device_count"):
        return f"torch {found['torch']} (CUDA {found['torch_cuda']}) sees no CUDA device"
    return None


def arch_list(capability) -> str:
    """TORCH_CUDA_ARCH_LIST for one device: (9, 0) -> '9.0'."""
    major, minor = capability
    return f"{major}.{minor}"


def junit_counts(path: str) -> dict:
    """tests / failures / errors / skipped summed over a junit XML's test suites."""
    counts = dict(tests=0, failures=0, errors=0, skipped=0)
    if not os.path.exists(path):
        return counts
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        for key in counts:
            counts[key] += int(s.get(key, 0))
    return counts


def tests_passed(rc: int | None, counts: dict) -> bool:
    """A test step passes only when tests ran and none failed, errored or was skipped."""
    return rc == 0 and counts["tests"] > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0


def _cell(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def bench_markdown(results: dict) -> str:
    """benchmarks/gpu.py's JSON as Markdown: the settings, the rows (times without and with CUDA
    graphs, speedups, error against float64 and its limit), the targets and the rows not run."""
    tf32 = results.get("tf32") or {}
    lines = [
        f"GPU benchmark: {results.get('device')}, torch {results.get('torch')}, triton {results.get('triton')}; "
        f"TF32: {', '.join(f'{k}={v}' for k, v in tf32.items()) if isinstance(tf32, dict) else tf32}; "
        f"torch.compile: {results.get('compile_mode') or 'not run'}",
        "",
        "Times in ms (median; graph: the calls captured in one CUDA graph). Baseline: eager channels_last with "
        "cudnn.benchmark (cuDNN's grouped conv + ReLU for grouped rows). err: max|out - float64| / max|float64|.",
        "",
        "| row | type | dtype | batch | fused | baseline | x | fused graph | baseline graph | x graph | compile "
        "| x vs compile (graph) | TFLOP/s | roofline | err | limit | ok | kernels |",
        "|" + "---|" * 18,
    ]
    for r in results.get("rows", []):
        ms, graph, err = r["ms"], r.get("ms_graph") or {}, r.get("error") or {}
        roof = r.get("roofline_fraction")
        lines.append(
            f"| {r['block']} | {r['type']} | {r['dtype']} | {r['batch']} | {_cell(ms.get('fused'))} "
            f"| {_cell(ms.get('eager_cl'))} | {_cell(r.get('speedup_vs_eager_cl'), '.2f')} "
            f"| {_cell(graph.get('fused'))} | {_cell(graph.get('eager_cl'))} "
            f"| {_cell(r.get('speedup_graph_vs_eager_cl'), '.2f')} | {_cell(ms.get('compile'))} "
            f"| {_cell(r.get('speedup_graph_vs_compile'), '.2f')} | {_cell(r.get('tflops'), '.1f')} "
            f"| {'-' if roof is None else f'{roof:.0%}'} | {_cell(err.get('fused'), '.1e')} "
            f"| {_cell(err.get('limit'), '.1e')} | {'yes' if err.get('ok') else 'NO'} | {', '.join(r['kernels'])} |"
        )
    targets = results.get("targets", [])
    if targets:
        lines += ["", "Targets:", "", "| target | measured | needed | status |", "|---|---|---|---|"]
        for t in targets:
            measured = "-" if t["measured"] is None else f"x{t['measured']:.2f}"
            lines.append(f"| {t['target']} | {measured} | >= x{t['threshold']:.1f} | {t['status']} |")
    if results.get("not_run"):
        lines += ["", f"Not run ({len(results['not_run'])} rows): " + "; ".join(results["not_run"])]
    return "\n".join(lines) + "\n"


def bench_verdict(rc: int | None, results: dict | None) -> tuple[bool, str]:
    """(ok, details) of the benchmark step: it finished, every row is within its error limit,
    and no row was left out for time (a row not run is a row not checked)."""
    if results is None:
        return False, "no results"
    rows = results.get("rows", [])
    wrong = [r for r in rows if not (r.get("error") or {}).get("ok")]
    wrong += [r for r in rows if "compile_error" in r and not r["compile_error"].get("ok")]
    not_run = results.get("not_run", [])
    missed = [t for t in results.get("targets", []) if t["status"] == "FAIL"]
    details = f"{len(rows)} rows (bench.md), {len(wrong)} over their error limit, {len(not_run)} not run"
    details += f"; {len(missed)} targets missed" if missed else ""
    return rc == 0 and bool(rows) and not wrong and not not_run, details


class Check:
    def __init__(self, out: str, budget: float):
        self.out = out
        self.deadline = time.monotonic() + budget
        self.steps: dict[str, dict] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], log: str, env: dict, limit: float) -> int | None:
        """Run cmd (its own process group) with output to `log`, for at most `limit` seconds.

        Returns the exit status, or None when it was stopped at the limit."""
        t0 = time.monotonic()
        step = self.steps.setdefault(name, {})
        step.update(command=shlex.join(cmd), log=os.path.basename(log), limit_s=round(limit))
        if limit <= 0:
            step.update(rc=None, seconds=0, note="no time left")
            print(f"gpu-check: {name}: no time left in the budget", flush=True)
            return None
        print(f"gpu-check: {name}: {shlex.join(cmd)} (at most {limit:.0f} s, log {log})", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group this call started (ninja, nvcc, compile workers)
                proc.wait()
                rc = None
                f.write(f"\ngpu-check: stopped after {limit:.0f} s (the time budget)\n")
        step.update(rc=rc, seconds=round(time.monotonic() - t0, 1))
        if rc is None:
            step["note"] = f"stopped at its limit of {limit:.0f} s"
        print(f"gpu-check: {name}: {'timed out' if rc is None else f'exit {rc}'} in {step['seconds']} s", flush=True)
        if rc != 0:
            with open(log) as f:
                tail = f.readlines()[-25:]
            print("".join("    " + line for line in tail), end="", flush=True)
        return rc


def _capture(cmd: list[str], env: dict | None = None, timeout: float = 60) -> str:
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({shlex.join(cmd)}: {e})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "gpu-check"), help="output folder")
    p.add_argument("--budget", type=float, default=480, help="seconds for everything (default 480)")
    args = p.parse_args(argv)
    py = sys.executable
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")

    found = probe(py, env)
    why = no_gpu_reason(found)
    if why:
        print(f"gpu-check: no GPU: {why}; nothing was built, tested or timed (exit 2)")
        return 2

    out = os.path.abspath(os.path.join(ROOT, args.out))
    os.makedirs(out, exist_ok=True)
    check = Check(out, args.budget)
    # Compiled Triton kernels, autotuning results and inductor's code kept in the output folder, so
    # a second run skips the compiles and the tuning (the environment's own settings win).
    env.setdefault("TRITON_CACHE_DIR", os.path.join(out, "cache", "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(out, "cache", "inductor"))
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")

    # 1. environment
    environment = dict(
        found,
        platform=_capture(["uname", "-a"]),
        nvidia_smi=_capture(["nvidia-smi"]),
        nvcc=_capture(["nvcc", "--version"]),
        git=_capture(["git", "rev-parse", "HEAD"]),
        budget_s=args.budget,
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    env_txt = os.path.join(out, "env.txt")
    with open(env_txt, "w") as f:
        for k, v in environment.items():
            f.write(f"{k}: {v}\n" if "\n" not in str(v) else f"{k}:\n{v}\n\n")
    print(
        f"gpu-check: {found['device']} (sm_{''.join(map(str, found['capability']))}), Python {found['python']}, "
        f"torch {found['torch']}, triton {found['triton']}; output in {out}",
        flush=True,
    )

    # 2. build, for this GPU's arch only
    archs = arch_list(found["capability"])
    build_env = dict(env, TORCH_CUDA_ARCH_LIST=archs, MAX_JOBS=os.environ.get("MAX_JOBS", "16"))
    build_env.update(RESFUSED_PTXAS_VERBOSE="1")
    build_env.pop("RESFUSED_SKIP_CUDA_BUILD", None)
    limit = min(check.left() - RESERVE_AFTER_BUILD, 300)
    rc = check.run(
        "build", [py, "setup.py", "build_ext", "--inplace"], os.path.join(out, "build.log"), build_env, limit
    )
    native = {}
    if rc == 0:
        native = probe(py, env, NATIVE_PROBE)
        with open(env_txt, "a") as f:
            f.write("python -m resfused.info (after the build):\n" + _capture([py, "-m", "resfused.info"], env=env))
    build = check.steps["build"]
    build.update(arch_list=archs, native=native)
    build["ok"] = (
        rc == 0 and bool(native.get("loaded")) and bool(native.get("with_cuda")) and bool(native.get("cuda_ops"))
    )
    if rc == 0 and not build["ok"]:
        decided = [
            line.strip() for line in open(os.path.join(out, "build.log")) if line.lstrip().startswith("resfused:")
        ]
        build["note"] = f"_C loaded: {native.get('loaded')}, CUDA kernels: {native.get('with_cuda')}; " + " ".join(
            decided
        )
        print(f"gpu-check: build: the CUDA kernels are not usable: {build['note']}", flush=True)

    # 3. every gpu-marked test, launched for real
    junit = os.path.join(out, "junit.xml")
    if build["ok"]:
        test_env = dict(env, RESFUSED_REQUIRE_NATIVE="1")
        # One GPU: the multi_gpu tests are deselected, not skipped (a skip would fail the step).
        marks = "gpu" if found.get("device_count", 0) >= 2 else "gpu and not multi_gpu"
        cmd = [py, "-m", "pytest", "-m", marks, "-p", "no:cacheprovider", "-rfEs", "--durations=30"]
        cmd += [f"--junitxml={junit}", "tests"]
        rc = check.run("tests", cmd, os.path.join(out, "tests.log"), test_env, check.left() - RESERVE_AFTER_TESTS)
        counts = junit_counts(junit)
        check.steps["tests"].update(counts, ok=tests_passed(rc, counts))
    else:
        check.steps["tests"] = dict(ok=False, note="not run: the build failed")

    # 4. the benchmark (it needs the build; it runs even after a failed test, to report its times)
    if build["ok"]:
        bench_dir = os.path.join(out, "bench")
        extra = shlex.split(os.environ.get("GPU_CHECK_BENCH_ARGS", "")) or DEFAULT_BENCH_ARGS
        limit = check.left() - RESERVE_AFTER_BENCH
        if "--budget" not in extra:
            extra = [*extra, "--budget", f"{max(0.0, limit - BENCH_LAST_ROW_S):.0f}"]
        cmd = [py, "-m", "benchmarks.gpu", *extra, "--out", bench_dir]
        rc = check.run("benchmark", cmd, os.path.join(out, "bench.log"), env, limit)
        results_path = os.path.join(bench_dir, "gpu_results.json")
        results = None
        if os.path.exists(results_path):  # written after every row: a stopped run keeps its rows
            with open(results_path) as f:
                results = json.load(f)
            os.replace(results_path, os.path.join(out, "bench.json"))
            bench_md = bench_markdown(results)
            check.steps["benchmark"]["rows"] = len(results.get("rows", []))
        ok, details = bench_verdict(rc, results)
        check.steps["benchmark"]["note"] = (check.steps["benchmark"].get("note", "") + " " + details).strip()
        if results is None:  # stopped or failed before its first row: what it printed, as it is
            with open(os.path.join(out, "bench.log")) as f:
                printed = f.read()[-20000:]
            bench_md = f"The benchmark did not finish (see summary.md); the end of bench.log:\n\n```\n{printed}\n```\n"
        with open(os.path.join(out, "bench.md"), "w") as f:
            f.write(bench_md)
        try:
            os.rmdir(bench_dir)
        except OSError:
            pass
        check.steps["benchmark"]["ok"] = ok
    else:
        check.steps["benchmark"] = dict(ok=False, note="not run: the build failed")

    passed = all(s.get("ok") for s in check.steps.values())
    lines = [f"# gpu-check: {'PASSED' if passed else 'FAILED'}", ""]
    lines.append(
        f"{found['device']} (TORCH_CUDA_ARCH_LIST={archs}), Python {found['python']}, torch {found['torch']}, "
        f"triton {found['triton']}, numpy {found['numpy']}"
    )
    lines += ["", "| step | ok | seconds | details |", "|---|---|---|---|"]
    for name, s in check.steps.items():
        detail = s.get("note", "")
        if name == "tests" and "tests" in s:
            detail = (
                f"{s['tests']} tests, {s['failures']} failed, {s['errors']} errors, {s['skipped']} skipped " + detail
            )
        lines.append(f"| {name} | {'yes' if s.get('ok') else 'NO'} | {s.get('seconds', '-')} | {detail.strip()} |")
    table_end = len(lines)
    lines += ["", f"Revision: {environment['git']}; budget {args.budget:.0f} s.", "", "Commands:", ""]
    lines += [f"- {name} (log {s['log']}): `{s['command']}`" for name, s in check.steps.items() if "command" in s]
    bench_md_path = os.path.join(out, "bench.md")
    if os.path.exists(bench_md_path):
        with open(bench_md_path) as f:
            lines += ["", "## Benchmark", "", f.read()]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[3:table_end]))
    print(f"gpu-check: {'PASSED' if passed else 'FAILED'} ({out})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
