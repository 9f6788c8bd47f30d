"""Measured kernel selection (resfused.tune / set_tuning, ops/selection.select_measured) and its
per-machine cache (runtime/tuning_cache.py): tuned models still match the float64 reference, the
trace says which choices were measured, the cache carries choices to a fresh process, a corrupt or
foreign cache is warned about and rebuilt, and concurrent writers leave a whole file. Every test
keeps its cache in a temporary directory.

Where the test needs a particular kernel to win, the timing is replaced by fixed figures
(`_fixed_timing`): what is tested is that the fastest candidate runs, whichever it is.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import resfused
from resfused import _native
from resfused import reference as R
from resfused.kernels.base import ConvParams
from resfused.ops import conv_bias_act, selection, trace_kernels
from resfused.runtime import tuning_cache

from harness import compare_modules, randomize_bn

CL = torch.channels_last
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_native = pytest.mark.skipif(
    not (_native.has_kernel("grouped_conv3x3", "cpu") and _native.has_kernel("winograd_f43_input", "cpu")),
    reason="needs resfused._C's CPU conv kernels",
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Tuning off and a fresh cache directory for each test; both restored after."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("RESFUSED_CACHE_DIR", str(directory))
    monkeypatch.delenv("RESFUSED_TUNING", raising=False)
    tuning_cache.forget()
    with tuning_cache.enabled_as(False):
        yield directory
    tuning_cache.forget()


def _fixed_timing(monkeypatch, ms: dict[str, float], default: float = 5.0):
    """Replace the trials' timing by fixed figures (ms per kernel name); each candidate still runs
    once, so a candidate that fails fails the test. Returns the list of trial sets timed."""
    trials = []

    def fake(fns):
        for fn in fns.values():
            fn()
        trials.append(sorted(fns))
        return {name: ms.get(name, default) / 1e3 for name in fns}

    monkeypatch.setattr(selection, "time_candidates", fake)
    return trials


def _conv(c_in=64, c_out=64, k=3, groups=1, stride=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g) / (k * (c_in // groups) ** 0.5)
    return ConvParams(w, torch.randn(c_out, generator=g), (stride,) * 2, (k // 2,) * 2, (1, 1), groups)


def _input(n, c, hw, seed=1):
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed)).contiguous(memory_format=CL)


def _expected(x, p, relu=True):
    y = torch.nn.functional.conv2d(x.double(), p.weight.double(), p.bias.double(), p.stride, p.padding, 1, p.groups)
    return torch.relu(y) if relu else y


def _traced_call(x, p, **kw):
    with torch.no_grad(), trace_kernels() as ran:
        y = conv_bias_act(x, p, relu=True, inputs_finite=True, **kw)
    (choice,) = [c for c in ran if c.op == "conv"]
    return y, choice


def _tuned_pair():
    """A small fused model of a ResNeXt block (grouped 3x3) and a bottleneck, and its reference."""
    ref = torch.nn.Sequential(R.ResNeXtBottleneck(64, 32, 1, 8, 8), R.Bottleneck(128, 16, 2))
    ref = randomize_bn(ref).eval()
    return resfused.fuse(ref), ref


@needs_native
def test_tuning_off_runs_the_table_choice_even_with_a_cache(monkeypatch):
    p, x = _conv(64, 64, 3), _input(1, 64, 14)
    _, table = _traced_call(x, p)
    assert (table.kernel, table.source) == ("winograd_f43", "table")
    _fixed_timing(monkeypatch, {"library+tail": 1.0})
    with tuning_cache.enabled_as(True):
        _, tuned = _traced_call(x, p)
    assert (tuned.kernel, tuned.source) == ("library+tail", "measured")
    assert tuning_cache.entries()  # the cache now says library+tail ...
    _, off = _traced_call(x, _conv(64, 64, 3))  # ... but tuning is off: the table chooses, and says so
    assert (off.kernel, off.source) == ("winograd_f43", "table")
    _, off = _traced_call(x, p)  # a conv that chose while tuning was on too
    assert (off.kernel, off.source) == ("winograd_f43", "table")


@needs_native
@pytest.mark.parametrize(
    "conv, x, table, forced",
    [
        # 16 channels per group, stride 1, batch 1: the table gives it to oneDNN (a measured rule)
        (dict(c_in=64, c_out=64, groups=4), (1, 64, 14), "onednn", "grouped3x3"),
        # 64 channels at 7x7: the table's Winograd rule says the direct conv is faster
        (dict(c_in=64, c_out=64), (1, 64, 7), "onednn", "winograd_f43"),
        (dict(c_in=32, c_out=32, groups=8), (2, 32, 14), "grouped3x3", "onednn"),
        (dict(c_in=64, c_out=128, k=1), (2, 64, 9), "onednn", "library+tail"),
    ],
)
def test_the_fastest_candidate_runs_and_matches_the_reference(monkeypatch, conv, x, table, forced):
    """A candidate ruled out only by a table's speed rule is timed too; one with a real reason
    against it is not; whichever wins, the result meets the float32 tolerance."""
    p, x = _conv(**conv), _input(*x)
    _, choice = _traced_call(x, p)
    assert choice.kernel == table
    trials = _fixed_timing(monkeypatch, {forced: 1.0})
    with tuning_cache.enabled_as(True):
        y, choice = _traced_call(x, p)
    assert (choice.kernel, choice.source) == (forced, "measured")
    assert forced in trials[0] and table in trials[0]
    if p.groups > 1:
        assert "winograd_f43" not in trials[0]  # not a dense conv: a real reason, never timed
        assert dict(choice.skipped)["winograd_f43"].startswith("not a 3x3")
    expected = _expected(x, p)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


@needs_native
def test_tuned_model_matches_the_reference_and_the_trace_says_measured(cache_dir):
    fused, ref = _tuned_pair()
    x = torch.randn(4, 64, 16, 16).contiguous(memory_format=CL)
    result = resfused.tune(fused, x)
    assert result.batch_sizes == (1, 4) and result.seconds > 0
    assert result.choices and result.measured == len(result.choices)  # every CPU conv has >= 2 candidates
    assert resfused.tuning.tuning_enabled()  # tune() leaves tuning on
    assert os.path.exists(result.cache_path) and str(cache_dir) in result.cache_path
    for n in (1, 4):
        with trace_kernels() as ran:
            compare_modules(fused, ref, x[:n], f"tuned model, batch {n}")
        convs = [c for c in ran if c.op == "conv"]
        assert convs and all(c.source == "measured" for c in convs), convs
    with torch.no_grad():  # untraced calls (the remembered choices, plans) match too
        for n in (1, 4):
            compare_modules(fused, ref, x[:n], f"tuned model, untraced, batch {n}")


@needs_native
def test_tuned_model_with_every_conv_on_the_library_kernel_matches(monkeypatch):
    """Choices that the table never makes still compute the same block."""
    _fixed_timing(monkeypatch, {"library+tail": 0.5})
    fused, ref = _tuned_pair()
    x = torch.randn(2, 64, 16, 16)
    resfused.tune(fused, x)
    with trace_kernels() as ran:
        compare_modules(fused, ref, x, "every conv on library+tail")
    assert {(c.kernel, c.source) for c in ran if c.op == "conv"} == {("library+tail", "measured")}


def test_tune_names_its_bad_arguments():
    fused, _ = _tuned_pair()
    with pytest.raises(TypeError, match="'model'"):
        resfused.tune(lambda x: x, torch.randn(1, 64, 8, 8))
    with pytest.raises(ValueError, match="training mode"):
        resfused.tune(fused.train(), torch.randn(1, 64, 8, 8))
    with pytest.raises(TypeError, match="'example_input'"):
        resfused.tune(fused.eval(), 3)
    with pytest.raises(ValueError, match="'batch_sizes'"):
        resfused.tune(fused, torch.randn(2, 64, 8, 8), batch_sizes=[4])
    with pytest.raises(TypeError, match="'on'"):
        resfused.set_tuning(1)


_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads({threads})
    sys.path.insert(0, {tests!r})
    import resfused
    from resfused.ops import selection
    from test_tuning import _conv, _input, _traced_call

    def no_timing(fns):
        raise AssertionError("timed although the cache has the choice")

    selection.time_candidates = no_timing
    _, choice = _traced_call(_input(1, 64, 14), _conv(64, 64, 3))
    print(json.dumps([choice.kernel, choice.source, resfused.tuning.tuning_enabled()]))
    """
)


def _run_child(code: str, cache_dir, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "RESFUSED_CACHE_DIR": str(cache_dir), **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300
    )


@needs_native
def test_cache_round_trip_in_a_fresh_process(monkeypatch, cache_dir):
    """A choice measured here (library+tail, which the table never picks) is what a fresh process
    with RESFUSED_TUNING=1 runs, read from the file without timing anything."""
    _fixed_timing(monkeypatch, {"library+tail": 1.0})
    with tuning_cache.enabled_as(True):
        _, choice = _traced_call(_input(1, 64, 14), _conv(64, 64, 3))
    assert choice.kernel == "library+tail"
    code = _CHILD.format(threads=torch.get_num_threads(), tests=os.path.join(ROOT, "tests"))
    done = _run_child(code, cache_dir, RESFUSED_TUNING="1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["library+tail", "measured", True]
    assert "ignoring tuning cache" not in done.stderr


def _valid_file(path) -> dict:
    with open(path) as f:
        data = json.load(f)
    assert data["format"] == tuning_cache.FORMAT and data["signature"] == tuning_cache.signature()
    return data["entries"]


def _corrupt(kind: str, good: str) -> str:
    data = json.loads(good)
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "not json":
        return "\x00\x01 not a cache"
    if kind == "another machine":
        data["signature"]["cpu"] = "Some Other CPU @ 1.0GHz"
    elif kind == "another resfused version":
        data["signature"]["resfused"] = "0.0.1"
    elif kind == "another thread count":
        data["signature"]["threads"] += 7
    elif kind == "another format":
        data["format"] = tuning_cache.FORMAT + 1
    elif kind == "malformed entry":
        data["entries"] = {"x": {"kernel": 3}}
    return json.dumps(data)


@needs_native
@pytest.mark.parametrize(
    "kind",
    [
        "truncated", "not json", "another machine", "another resfused version", "another thread count",
        "another format", "malformed entry",
    ],
)  # fmt: skip
def test_a_corrupt_or_foreign_cache_is_warned_about_and_rebuilt(monkeypatch, kind):
    """The bad file says library+tail; it must not be trusted: a one-line warning, the candidates
    timed again (onednn wins here), and the file rewritten whole with this machine's signature."""
    p, x = _conv(64, 64, 3), _input(1, 64, 7)
    _fixed_timing(monkeypatch, {"library+tail": 1.0})
    with tuning_cache.enabled_as(True):
        _traced_call(x, p)
    path = tuning_cache.cache_path()
    with open(path) as f:
        good = f.read()
    with open(path, "w") as f:
        f.write(_corrupt(kind, good))
    tuning_cache.forget()
    trials = _fixed_timing(monkeypatch, {"onednn": 1.0})
    p = _conv(64, 64, 3)  # a fresh conv: nothing remembered
    with tuning_cache.enabled_as(True), pytest.warns(RuntimeWarning, match="ignoring tuning cache") as caught:
        _, choice = _traced_call(x, p)
    messages = [str(w.message) for w in caught if "tuning cache" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and "rebuilt" in messages[0], messages
    assert (choice.kernel, choice.source) == ("onednn", "measured") and len(trials) == 1
    entries = _valid_file(path)
    assert [e["kernel"] for e in entries.values()] == ["onednn"]
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")]


_WRITER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads({threads})
    sys.path.insert(0, {tests!r})
    from resfused.ops import selection
    from resfused.runtime import tuning_cache
    from test_tuning import _conv, _input, _traced_call

    # Fixed figures: the test is about the file, and each call writes it once.
    selection.time_candidates = lambda fns: {{name: 1e-3 * (name != {winner!r}) for name in fns}}
    tuning_cache.set_enabled(True)
    p = _conv(16, 16, 3)
    for hw in range({first}, {first} + {count}):
        _traced_call(_input(1, 16, hw), p)
    """
)


@needs_native
def test_concurrent_writers_leave_a_whole_file_with_both_sets_of_choices(cache_dir):
    """Two processes tune different shapes at the same time, each rewriting the file after every
    choice; the file parses at every moment read here and ends up holding both sets."""
    count, tests = 15, os.path.join(ROOT, "tests")
    codes = [
        _WRITER.format(threads=torch.get_num_threads(), tests=tests, first=first, count=count, winner=winner)
        for first, winner in ((4, "onednn"), (4 + count, "library+tail"))
    ]
    environ = {**os.environ, "RESFUSED_CACHE_DIR": str(cache_dir)}
    procs = [
        subprocess.Popen([sys.executable, "-c", c], cwd=ROOT, env=environ, stderr=subprocess.PIPE, text=True)
        for c in codes
    ]
    path, reads = tuning_cache.cache_path(), 0
    while any(proc.poll() is None for proc in procs):
        if os.path.exists(path):
            with open(path) as f:
                json.loads(f.read())  # a reader never sees a partial file
            reads += 1
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    entries = _valid_file(path)
    assert len(entries) == 2 * count
    assert sorted(e["kernel"] for e in entries.values()) == ["library+tail"] * count + ["onednn"] * count
    assert not [n for n in os.listdir(cache_dir) if n.endswith(".tmp")]


def test_clear_removes_the_files(cache_dir):
    tuning_cache.store("conv|test", "onednn", "onednn", {"onednn": 1.0})
    assert os.path.exists(tuning_cache.cache_path())
    removed = resfused.tuning.clear_cache()
    assert tuning_cache.cache_path() in removed and not os.path.exists(tuning_cache.cache_path())
    assert tuning_cache.entries() == {}


def test_an_unwritable_cache_dir_keeps_choices_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    tuning_cache.set_cache_dir(blocker / "cache")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tuning_cache.store("conv|a", "onednn", "onednn", {"onednn": 1.0})
            tuning_cache.store("conv|b", "onednn", "onednn", {"onednn": 1.0})
        assert len([w for w in caught if "cannot write the tuning cache" in str(w.message)]) == 1
        assert set(tuning_cache.entries()) == {"conv|a", "conv|b"}
    finally:
        tuning_cache.set_cache_dir(None)


@needs_native
def test_info_says_which_choices_were_measured(monkeypatch, capsys):
    from resfused import info

    _fixed_timing(monkeypatch, {"library+tail": 1.0})
    with tuning_cache.enabled_as(True):
        _traced_call(_input(1, 64, 14), _conv(64, 64, 3))
    info.main([])
    out = capsys.readouterr().out
    assert "kernel tuning: off" in out and "1 measured choices" in out
    assert "library+tail measured (table: winograd_f43)" in out
    info.main(["--tuning"])
    assert "library+tail measured (table: winograd_f43) [library+tail 1, " in capsys.readouterr().out
    info.main(["--clear-tuning-cache"])
    assert "removed 1 tuning cache file(s)" in capsys.readouterr().out
    assert not os.path.exists(tuning_cache.cache_path())


@needs_native
@pytest.mark.parametrize("winner", ["grouped3x3", "onednn"])
def test_grouped_benchmark_used_column_is_the_measured_choice(monkeypatch, winner):
    from benchmarks import grouped_cpu

    _fixed_timing(monkeypatch, {winner: 1.0})
    shape = grouped_cpu.Shape(64, 16, 8, 1)  # 4 channels per group: the table picks ours
    (row,) = grouped_cpu.run((2,), ("fp32",), shapes=[shape], rounds=1, tune=True)
    assert row["selection"] == "measured" and row["tuned_kernel"] == winner
    assert row["adapter_selects"] == (winner == "grouped3x3")
    assert set(row["tuned_ms"]) >= {"grouped3x3", "onednn"}
    (row,) = grouped_cpu.run((2,), ("fp32",), shapes=[shape], rounds=1)
    assert row["selection"] == "table" and row["adapter_selects"]


@needs_native
@pytest.mark.parametrize("winner", ["winograd_f43", "onednn"])
def test_winograd_benchmark_used_column_is_the_measured_choice(monkeypatch, winner):
    from benchmarks import winograd_cpu

    _fixed_timing(monkeypatch, {winner: 1.0})
    monkeypatch.setattr(winograd_cpu, "SHAPES", [(8, 9)])  # the shipped rule: too small for Winograd
    (row,) = winograd_cpu.run(batch_sizes=(2,), rounds=1, tune=True)
    assert row["selection"] == "measured" and row["tuned_kernel"] == winner
    assert row["used"] == (winner == "winograd_f43")
    (row,) = winograd_cpu.run(batch_sizes=(2,), rounds=1)
    assert row["selection"] == "table" and not row["used"]


@needs_native
def test_tuning_after_untuned_forwards_reaches_the_untraced_calls(monkeypatch):
    """A model that already ran (its choices remembered, its calls planned) takes the measured
    choices once tuned, in untraced calls too; set_tuning(False) brings the table back."""
    from resfused.kernels.conv_library import LibraryConv

    calls = []
    real_run = LibraryConv.run
    monkeypatch.setattr(LibraryConv, "run", lambda self, *a: calls.append(1) or real_run(self, *a))
    fused, ref = _tuned_pair()
    x = torch.randn(2, 64, 16, 16).contiguous(memory_format=CL)
    with torch.no_grad():
        fused(x), fused(x)
    assert not calls  # the table never picks the ATen conv here
    _fixed_timing(monkeypatch, {"library+tail": 0.5})
    resfused.tune(fused, x)
    calls.clear()
    compare_modules(fused, ref, x, "tuned, untraced")
    compare_modules(fused, ref, x, "tuned, untraced, again")
    # A block's plan recorded before tuning was on holds the table's kernels: its key must say
    # whether tuning was on (runtime/tuning_cache.enabled()), as _choose's memo key does.
    assert len(calls) == 2 * sum(isinstance(m, torch.nn.Conv2d) for m in ref.modules()), "a stale plan ran"
    resfused.set_tuning(False)
    calls.clear()
    compare_modules(fused, ref, x, "tuning off again")
    assert not calls


@needs_native
def test_threads_tuning_the_same_model_at_once_get_correct_results():
    import threading

    fused, ref = _tuned_pair()
    xs = [torch.randn(n, 64, 12, 12, generator=torch.Generator().manual_seed(n)) for n in (1, 2, 3)]
    with torch.no_grad():
        expected = [ref.double()(x.double()) for x in xs]
    results, errors = {}, []

    def worker(i):
        try:
            with torch.no_grad():
                results[i] = [fused(x) for x in xs]
        except Exception as e:  # reported below, with the thread that raised it
            errors.append((i, e))

    with tuning_cache.enabled_as(True):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i in range(3):
        for y, e in zip(results[i], expected):
            torch.testing.assert_close(y.double(), e, rtol=0, atol=1e-4 * e.abs().max().item())
    assert len(tuning_cache.entries()) > 0
