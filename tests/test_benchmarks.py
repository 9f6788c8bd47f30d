"""Smoke test of the benchmark entry (`python -m benchmarks --quick`) and of its helpers.

Nothing here judges speed (docs/design.md: speed targets live in the benchmark); it checks that the run
produces the expected rows, positive times, speedups computed as baseline / fused, and FLOP counts
that match the conv formula.
"""

import functools
import json
import math
import os
import time

import pytest
import torch
import torch.nn as nn

import resfused
from benchmarks import common, cpu, onnx_baselines
from benchmarks.__main__ import main
from benchmarks.isolation import WorkerPool

pytest.importorskip("tabulate")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    # One thread: with two, every parallel region of these tiny shapes waits on an OpenMP barrier,
    # which on a loaded shared machine costs a scheduler slice each time (seconds in all).
    rc = main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(out), "--no-progress", "--skip-grouped"])
    torch.set_num_threads(threads)  # the benchmark fixes the thread count process-wide
    with open(out / "results.json") as f:
        doc = json.load(f)
    return rc, doc, out


def test_quick_run_rows(quick_run):
    rc, doc, out = quick_run
    assert rc == 0
    assert doc["meta"]["threads"] == 1
    peak = doc["meta"]["peaks"]["fp32"]
    assert peak["peak_gflops"] == max(peak["gemm_gflops"], peak["conv_gflops"]) > 0

    blocks = [r for r in doc["results"] if r["kind"] == "block"]
    names = sorted({r["name"] for r in blocks})
    assert names == ["BasicBlock", "Bottleneck", "PreActBasicBlock", "ResNeXtBottleneck"]
    assert len(blocks) == 8  # each type: identity shortcut (s1) and projection (s2), batch 1
    assert {r["config"].split()[1] for r in blocks} == {"s1", "s2"}
    for r in blocks:
        assert set(r["times"]) == {"fused", "eager_nchw", "eager_cl"}, r["label"]
        assert r["flops"] > 0 and r["batch"] == 1 and r["dtype"] == "fp32"
        assert r["max_rel_diff"] < 1e-3, r["label"]  # the timed module computes the block
        assert "conv/reference" not in r["kernels"], r["label"]

    models = [r for r in doc["results"] if r["kind"] == "model"]
    if hasattr(resfused, "fuse"):
        assert [r["name"] for r in models] == ["resnet18"]
        assert models[0]["fuse_time_s"] > 0
        assert set(models[0]["times"]) == {"fused", "fused_nchw", "eager_nchw", "eager_cl"}
        assert models[0]["max_rel_diff"] < 1e-3
        assert models[0]["fuse_summary"].startswith("resfused.fuse(ResNet): converted")
    else:
        assert models == []
        assert any(s["what"] == "models" for s in doc["skipped"])
    assert (out / "speedups.png").stat().st_size > 0


def test_quick_run_times_and_speedups(quick_run):
    _, doc, _ = quick_run
    for r in doc["results"]:
        for variant, t in r["times"].items():
            assert t["median_s"] > 0 and t["rounds"] >= 3 and t["number"] >= 1, (r["label"], variant)
        fused = r["times"]["fused"]["median_s"]
        for baseline in ("eager_nchw", "eager_cl"):
            expect = r["times"][baseline]["median_s"] / fused
            assert math.isclose(r["speedup"][baseline], expect, rel_tol=1e-12), (r["label"], baseline)
            assert math.isclose(r["gflops"]["fused"], r["flops"] / fused / 1e9, rel_tol=1e-12)


def test_speedup_is_baseline_over_fused():
    r = common.Result("block", "X", "", 1, "fp32", [1, 1, 1, 1], flops=2_000_000_000)
    r.times = {"fused": common.Timing(0.5, 0.0, 5, 1), "eager_nchw": common.Timing(2.0, 0.0, 5, 1)}
    assert r.speedup("eager_nchw") == 4.0
    assert r.speedup("compile") is None
    assert r.gflops() == 4.0
    assert r.to_dict()["speedup"] == {"eager_nchw": 4.0}


def test_count_flops_matches_conv_formula():
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),  # -> 16 x 5 x 5 from 9 x 9
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False),  # grouped: 4 in-channels each
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    x = torch.randn(2, 8, 9, 9)
    expect = 2 * (2 * 5 * 5 * 16 * 8 * 9) + 2 * (2 * 5 * 5 * 16 * 4 * 9) + 2 * (2 * 10 * 16)
    assert common.count_flops(model, x) == expect


def test_side_by_side_timing_orders_variants():
    t = common.measure_side_by_side(
        {"short": lambda: time.sleep(0.001), "long": lambda: time.sleep(0.004)},
        threads=1,
        block_s=0.004,
        min_time_s=0.02,
        min_rounds=3,
        warmup_s=0.0,
    )
    assert t["long"].median_s >= 0.004 and t["short"].median_s >= 0.001
    assert t["long"].median_s > t["short"].median_s
    assert t["short"].number >= t["long"].number >= 1  # about block_s per round (>= : a preempted warm-up call)


def _sleep_recipe(seconds):
    return (lambda: time.sleep(seconds)), {"pid": os.getpid()}


def test_isolated_workers_time_in_processes_of_their_own():
    with WorkerPool(threads=1) as pool:
        pool.start(["short", "long"])
        infos = {n: pool[n].build(functools.partial(_sleep_recipe, s)) for n, s in (("short", 0.001), ("long", 0.004))}
        assert len({info["pid"] for info in infos.values()} | {os.getpid()}) == 3
        t = common.interleaved_rounds(
            {n: pool[n] for n in infos}, block_s=0.004, min_time_s=0.02, min_rounds=3, warmup_s=0.0
        )
    assert t["long"].median_s >= 0.004 and t["short"].median_s >= 0.001
    assert t["long"].median_s > t["short"].median_s


def test_worker_errors_carry_the_traceback():
    with (
        WorkerPool(threads=1) as pool,
        pytest.raises(RuntimeError, match="(?s)worker 'bad' failed on 'build'.*ZeroDivisionError"),
    ):
        pool["bad"].build(functools.partial(divmod, 1, 0))


@pytest.mark.skipif(not resfused._native.has_kernel("winograd_f43_input", "cpu"), reason="no CPU Winograd kernels")
@pytest.mark.parametrize("train", [False, True])
def test_winograd_micro_benchmark_runs_and_checks_results(monkeypatch, train):
    from benchmarks import winograd_cpu

    monkeypatch.setattr(winograd_cpu, "SHAPES", [(8, 9)])
    rows = winograd_cpu.run(batch_sizes=(2,), train=train, rounds=1)
    assert [(r["shape"], r["batch"], r["mode"]) for r in rows] == [("8->8 @9x9", 2, "train" if train else "inference")]
    assert rows[0]["direct_ms"] > 0 and rows[0]["winograd_ms"] > 0
    assert rows[0]["speedup"] == pytest.approx(rows[0]["direct_ms"] / rows[0]["winograd_ms"])


def test_floor_split_counts_every_conv_multiply_add():
    """The profile split of a fused ResNet-18 at 32x32 (no Winograd at these sizes): its convs'
    multiply-adds, read back from the profiler's shapes and arguments, are the model's (less the
    fc layer), and every kind of time adds up to what the profiler recorded."""
    import torchvision

    from benchmarks import floor_cpu

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    fused = resfused.fuse(model)
    with torch.inference_mode():
        fused(x.contiguous(memory_format=torch.channels_last))
        with torch.profiler.profile(record_shapes=True) as prof:
            fused(x.contiguous(memory_format=torch.channels_last))
    split = floor_cpu.split_profile(prof.events(), forwards=1)
    conv_macs = sum(split[k]["macs"] for k in floor_cpu.CONV_KINDS)
    fc_macs = 2 * 512 * 10
    assert 2 * conv_macs == common.count_flops(model, x) - 2 * fc_macs
    assert split["1x1 conv"]["calls"] == 3 and split["other conv"]["calls"] == 1  # downsamples, stem
    assert split["3x3 conv (direct)"]["calls"] == 16 and split["Winograd GEMMs"]["calls"] == 0
    total_ms = sum(e.self_cpu_time_total for e in prof.events()) / 1e3
    assert sum(r["ms"] for r in split.values()) == pytest.approx(total_ms)


def test_floor_is_the_convs_at_peak_plus_the_rest():
    from benchmarks import floor_cpu

    split = {k: {"ms": 0.0, "macs": 0, "calls": 0} for k in floor_cpu.CONV_KINDS + floor_cpu.OTHER_KINDS}
    split["1x1 conv"].update(ms=9.0, macs=50 * 10**9, calls=1)  # 100 GFLOP: 1 s at 100 GFLOP/s
    split["other ops"].update(ms=3.0, calls=2)
    assert floor_cpu.floor_ms({"split": split, "peak_gflops": 100.0}) == pytest.approx(1003.0)


@pytest.mark.skipif(not resfused._native.has_kernel("winograd_f43_input", "cpu"), reason="no CPU Winograd kernels")
def test_floor_split_counts_the_winograd_gemms_it_runs():
    """A 64-channel basic block at 16x16 runs both 3x3 convs through Winograd F(4x4, 3x3): 16
    tiles, each a 36-position GEMM of 64 x 64 per conv."""
    from benchmarks import floor_cpu

    block = resfused.BasicBlock(64, 64).eval()
    x = torch.randn(1, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        block(x)
        with torch.profiler.profile(record_shapes=True) as prof:
            block(x)
    split = floor_cpu.split_profile(prof.events(), forwards=1)
    assert split["Winograd GEMMs"]["calls"] == 2 and split["3x3 conv (direct)"]["calls"] == 0
    assert split["Winograd GEMMs"]["macs"] == 2 * 16 * 36 * 64 * 64
    assert split["Winograd transforms"]["calls"] == 4  # an input and an output transform per conv


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "0"], r"--batch sizes must be >= 1, got \[0\]"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--filter", "no-such-case"], "--filter no-such-case matches none of these cases:\n  BasicBlock"),
    ],
)
def test_bad_command_lines_say_what_is_wrong(argv, message, tmp_path):
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match=message):
            main(["--quick", "--device", "cpu", "--no-progress", "--out", str(tmp_path), *argv])
    finally:
        torch.set_num_threads(threads)


def test_compare_revisions_times_each_tree_in_its_own_process():
    from benchmarks import compare_revisions

    med = compare_revisions.time_trees(
        {"a": compare_revisions.ROOT, "b": compare_revisions.ROOT},
        "resnet18",
        batch=1,
        resolution=32,
        rounds=3,
        threads=1,
        block_s=0.01,
    )
    assert set(med) == {"a", "b"} and all(v > 0 for v in med.values())


def test_compare_revisions_refuses_a_bad_revision():
    from benchmarks import compare_revisions

    with pytest.raises(SystemExit, match="'no-such-revision' is not a revision"):
        compare_revisions.main(["no-such-revision"])


def test_host_overhead_row_times_the_forward_without_its_conv_kernels():
    pytest.importorskip("torchvision")
    _, info = cpu.host_overhead("resnet18", resolution=32, calls=5)
    assert info["model"] == "resnet18" and info["input"] == "1x3x32x32"
    # The stem and the two convs of each of the 8 blocks (3 with a projection): 20 plan calls,
    # none of which ran a oneDNN kernel while skipped; the real forward ran them.
    assert info["skipped_calls"] == 20 and info["convs_run"] == 0
    assert 0 < info["other_ops_ms"] < info["no_kernels_ms"]
    assert info["host_ms"] == pytest.approx(info["no_kernels_ms"] - info["other_ops_ms"])


def test_onnx_baselines_run_and_match_eager(tmp_path, monkeypatch):
    for name in ("onnx", "onnxruntime", "openvino"):
        pytest.importorskip(name)
    monkeypatch.setattr(onnx_baselines.tempfile, "gettempdir", lambda: str(tmp_path))
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected = model(x)
    for runtime in onnx_baselines.RUNTIMES:
        call, info = onnx_baselines.build(runtime, model, x, "tiny", threads=1)
        assert common.relative_difference(info["output"], expected) < 1e-5, runtime
        assert torch.allclose(torch.from_numpy(call()), info["output"])
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # exported once, reused by the second runtime
    with pytest.raises(ValueError, match="float32 only"):
        onnx_baselines.build("onnxruntime", model.double(), x.double(), "tiny64", threads=1)
    with pytest.raises(ValueError, match="'runtime' must be one of"):
        onnx_baselines.build("tvm", model, x, "tiny", threads=1)
