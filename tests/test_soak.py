"""Soak test: a fused torchvision resnet50 served from 2 threads for many forwards, with the model
changed between rounds, every output compared with the original model, resident memory bounded.

    make soak                       2000 forwards (RESFUSED_SOAK_FORWARDS, default there 2000)
    RESFUSED_SOAK_FORWARDS=100 .venv/bin/python -m pytest -q -s tests/test_soak.py   a short run

Without RESFUSED_SOAK_FORWARDS the test is skipped (it is not part of `make test`).

What runs: rounds of 2-10 forwards split over 2 threads that call the one fused model at the same
time (as a thread pool serving it would; each thread runs 1 intra-op thread, so the 2 cores of
a small machine are both busy), each forward on one of 3 batch sizes (1, 2, 4) x 3 resolutions
(32, 48, 64) x 2 layouts (NCHW, channels_last): 6 oneDNN layout shapes per conv, more than the 4
packed copies a conv keeps (runtime/packing.py), so the copies are evicted and repacked
throughout. Between rounds, with both threads idle (PyTorch modules are not safe to change while
another thread runs them), one of: `load_state_dict` of one of two checkpoints, `.to(bfloat16)`,
`.float()` back, or a training-mode forward (`train()`, a forward that updates the running
statistics, `eval()`, an eval forward on those statistics, then a checkpoint reloaded).
Batches, resolutions and changes are drawn from RESFUSED_SOAK_SEED (printed).

Every output is compared with the original model on the same parameters (tests/harness.py:
float32 within 1e-4 * max|ref| of float64; bfloat16 within 2x eager bfloat16's error + one
rounding step). Parameters that went through bfloat16 and back are rounded: the reference is
the original model on the rounded checkpoint. All references are computed before the soak, so
that the test's own allocations do not blur the memory figures.

Memory: what the fused model's caches hold (`held_bytes`: folded weights, packed oneDNN copies,
Winograd copies, anything else a fused module keeps) is asserted below `cache_bound_bytes` (the
README's Memory section: the formula, per conv) at every check, and resident memory (RSS) after
warm-up may grow by at most what the caches may still add, `cache_bound_bytes - held at
warm-up`, plus what the activation buffer cache took on since warm-up (runtime/buffer_cache.py,
limited by RESFUSED_BUFFER_CACHE_MB), plus SLACK_MB for the allocator's fragmentation and
oneDNN's primitive cache.
"""

from __future__ import annotations

import copy
import functools
import os
import random
import threading
import time
import types

import pytest
import torch
import torch.nn as nn

import resfused
from resfused import blocks
from resfused.blocks import FusedModule
from resfused.kernels import winograd_f43
from resfused.runtime import buffer_cache

from harness import assert_matches_reference, randomize_bn

tv = pytest.importorskip("torchvision")

FORWARDS = int(os.environ.get("RESFUSED_SOAK_FORWARDS", "0") or 0)
SEED = int(os.environ.get("RESFUSED_SOAK_SEED", "20261130"))
BATCHES = (1, 2, 4)
RESOLUTIONS = (32, 48, 64)
TRAIN_INPUTS = ((2, 64), (4, 48))  # batch, resolution: >= 4 values per channel at layer4's BNs
PACKED_COPIES = 4  # runtime/packing.PackedByShape's `keep`
# A block's plans (at most MAX_PLANS input signatures) hold bound oneDNN calls, each with the packed
# copy for its shape (kernels/conv_onednn.bind): a copy the LRU above dropped lives on in a plan.
PINNED_COPIES = getattr(blocks, "MAX_PLANS", 0)
WINOGRAD_MAX_CHANNELS = 512  # kernels/conv_winograd.faster_than_direct: no Winograd above it
SLACK_MB = 160

_SOAK_ONLY = pytest.mark.skipif(FORWARDS <= 0, reason="the soak test runs under `make soak` (RESFUSED_SOAK_FORWARDS)")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fused_convs(model: nn.Module):
    """Every conv a fused module folds (each becomes one ConvParams per dtype)."""
    seen = set()
    for m in model.modules():
        if isinstance(m, FusedModule):
            for c in m.modules():
                if isinstance(c, nn.Conv2d) and id(c) not in seen:
                    seen.add(id(c))
                    yield c


def cache_bound_bytes(model: nn.Module, dtypes) -> int:
    """The most the fused modules' caches can hold, summed over the dtypes the model runs in
    (README, Memory): per conv with weight W (n elements, s bytes each, C_out output channels)

        (n + C_out) * s                   the folded weight and bias
      + (4 + 4) * n * s                   oneDNN packed copies: the 4 most recently used input
                                          shapes, plus one pinned by each of the block's plans
                                          (4 at most)
      + 4 * 36/9 * n * s                  Winograd packed copies (float32 3x3 stride-1 convs
                                          of at most 512 input channels only), 4 at most
    """
    total = 0
    for conv in _fused_convs(model):
        n = conv.weight.numel()
        winograd = winograd_f43.geometry_ok(
            conv.weight.shape, conv.stride, conv.padding, conv.dilation, conv.groups
        ) and (conv.in_channels <= WINOGRAD_MAX_CHANNELS)
        for dtype in dtypes:
            s = torch.empty((), dtype=dtype).element_size()
            total += (n + conv.out_channels) * s + (PACKED_COPIES + PINNED_COPIES) * n * s
            if winograd and dtype == torch.float32:
                total += PACKED_COPIES * (winograd_f43.POSITIONS // 9) * n * s
    return total


_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "training"}


def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a fused module keeps beyond its parameters and buffers (folded
    weights, oneDNN's opaque packed copies at their logical size, Winograd copies, whatever a
    plan holds), found by walking its attributes, the resfused objects they reach and the
    variables that functions (a plan's bound calls) close over; each tensor counted once."""
    own = set()
    for t in (*model.parameters(), *model.buffers()):
        own.add(t.data_ptr())
    seen, total = set(), 0

    def visit(obj) -> None:
        nonlocal total
        if id(obj) in seen or isinstance(obj, (nn.Module, str, bytes, int, float, bool, type(None))):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            try:
                if obj.data_ptr() in own:
                    return
            except RuntimeError:  # oneDNN's opaque tensors have no data pointer
                pass
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                visit(v)
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            for v in obj.__defaults__ or ():
                visit(v)
        elif isinstance(obj, functools.partial):
            visit(obj.func)
            visit(obj.args)
            visit(obj.keywords)
        elif type(obj).__module__.startswith("resfused"):
            for v in getattr(obj, "__dict__", {}).values():
                visit(v)
            for name in getattr(type(obj), "__slots__", ()):
                visit(getattr(obj, name, None))

    for m in model.modules():
        if isinstance(m, FusedModule):
            for name, value in vars(m).items():
                if name not in _MODULE_INTERNALS and "hook" not in name:
                    visit(value)
    return total


def _cached_activation_bytes() -> int:
    stats = buffer_cache.stats()
    return 0 if stats is None else stats.idle_bytes + stats.live_bytes


def _rounded(state: dict) -> dict:
    """`state` after .to(bfloat16) and back to float32."""
    return {k: v.to(torch.bfloat16).to(v.dtype) if v.is_floating_point() else v for k, v in state.items()}


class References:
    """The original model's outputs for every input, checkpoint and dtype the soak can reach,
    computed before it starts: float64 on the parameters the fused model holds (rounded through
    bfloat16 where they went through it), and eager bfloat16 for the bfloat16 tolerance."""

    def __init__(self, model: nn.Module, checkpoints: list[dict], inputs: dict, train_inputs: dict):
        self.eval, self.train = {}, {}
        buffer_names = {n for n, _ in model.named_buffers()}
        for base, checkpoint in enumerate(checkpoints):
            for rounded in (False, True):
                ref = copy.deepcopy(model)
                ref.load_state_dict(_rounded(checkpoint) if rounded else checkpoint)
                ref64 = copy.deepcopy(ref).double().eval()
                bf16 = copy.deepcopy(ref).to(torch.bfloat16).eval() if rounded else None
                with torch.no_grad():
                    for key, x in inputs.items():  # one per (batch, resolution): both layouts hold x
                        self.eval[(key, base, rounded, torch.float32)] = (ref64(x.double()), None)
                        if rounded:
                            xb = x.to(torch.bfloat16)
                            self.eval[(key, base, rounded, torch.bfloat16)] = (ref64(xb.double()), bf16(xb))
                    for key, (x, follow) in train_inputs.items():
                        trained = copy.deepcopy(ref64).train()
                        y = trained(x.double())
                        buffers = {n: b.clone() for n, b in trained.state_dict().items() if n in buffer_names}
                        self.train[(key, base, rounded)] = (y, buffers, trained.eval()(follow.double()))


def _draw_input(rng: random.Random):
    return rng.choice(BATCHES), rng.choice(RESOLUTIONS), rng.random() < 0.5


@pytest.mark.slow
@_SOAK_ONLY
def test_soak_fused_resnet50_from_two_threads():
    rng = random.Random(SEED)
    print(f"\nsoak: RESFUSED_SOAK_SEED={SEED}, {FORWARDS} forwards")
    torch.manual_seed(SEED)
    model = randomize_bn(tv.models.resnet50(weights=None, num_classes=10), torch.Generator().manual_seed(1)).eval()
    other = randomize_bn(tv.models.resnet50(weights=None, num_classes=10), torch.Generator().manual_seed(2))
    checkpoints = [copy.deepcopy(model.state_dict()), copy.deepcopy(other.state_dict())]
    del other
    inputs = {}
    for b in BATCHES:
        for r in RESOLUTIONS:
            x = torch.randn(b, 3, r, r)
            inputs[(b, r, False)] = x
            inputs[(b, r, True)] = x.contiguous(memory_format=torch.channels_last)
    train_inputs = {(b, r): (torch.randn(b, 3, r, r), torch.randn(2, 3, r, r)) for b, r in TRAIN_INPUTS}
    started = time.perf_counter()
    refs = References(model, checkpoints, {key[:2]: x for key, x in inputs.items() if not key[2]}, train_inputs)
    print(f"soak: references computed in {time.perf_counter() - started:.0f} s")

    fused = resfused.fuse(model)
    bound = cache_bound_bytes(fused, (torch.float32, torch.bfloat16))
    state = {"base": 0, "rounded": False, "dtype": torch.float32}

    def check_eval(key, y, what):
        expected, eager = refs.eval[(key[:2], state["base"], state["rounded"], state["dtype"])]
        assert_matches_reference(y, expected, state["dtype"], eager, what)

    def load(base: int) -> None:
        fused.load_state_dict(checkpoints[base])
        # Loaded into bfloat16 parameters, a checkpoint is rounded on the way in.
        state.update(base=base, rounded=state["dtype"] == torch.bfloat16)

    def set_dtype(dtype) -> None:
        fused.to(dtype)
        state["dtype"] = dtype
        state["rounded"] = state["rounded"] or dtype == torch.bfloat16

    def train_step(key, what):
        x, follow = train_inputs[key]
        expected, buffers, expected_follow = refs.train[(key, state["base"], state["rounded"])]
        fused.train()
        with torch.no_grad():
            y = fused(x)
        fused.eval()
        with torch.inference_mode():
            y_follow = fused(follow)
        assert_matches_reference(y, expected, torch.float32, what=f"{what}: train-mode output")
        for name, b in fused.state_dict().items():  # the original model's keys
            if name not in buffers:
                continue
            if name.endswith("num_batches_tracked"):
                assert torch.equal(b, buffers[name]), f"{what}: {name}"
            else:
                assert_matches_reference(b, buffers[name], torch.float32, what=f"{what}: {name}")
        assert_matches_reference(y_follow, expected_follow, torch.float32, what=f"{what}: eval after training")
        load(rng.randrange(2))  # back to a checkpoint the eval references know

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    errors = []

    def serve(jobs, outputs):
        try:
            torch.set_num_threads(1)
            with torch.inference_mode():
                for key in jobs:
                    x = inputs[key].to(state["dtype"])
                    outputs.append((key, fused(x)))
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    def round_of(jobs, what) -> int:
        outputs = [[], []]
        threads = [threading.Thread(target=serve, args=(jobs[i::2], outputs[i])) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for key, y in outputs[0] + outputs[1]:
            check_eval(key, y, f"{what}, input {key}, {state}")
        return len(jobs)

    try:
        # Warm-up: every input in both dtypes and a training step, so that each kind of cache
        # entry exists before the memory baseline.
        for dtype in (torch.float32, torch.bfloat16):
            set_dtype(dtype)
            round_of(list(inputs), f"warm-up {dtype}")
        set_dtype(torch.float32)
        load(0)
        train_step(TRAIN_INPUTS[0], "warm-up")
        round_of(list(inputs), "warm-up after training")
        warm_rss, warm_held, warm_cached = rss_bytes(), held_bytes(fused), _cached_activation_bytes()
        print(
            f"soak: after warm-up RSS {warm_rss / 2**20:.0f} MB, caches hold {warm_held / 2**20:.0f} MB "
            f"(bound {bound / 2**20:.0f} MB), activation buffer cache {warm_cached / 2**20:.0f} MB"
        )
        done, rounds, changes = 0, 0, {}
        peak_rss, peak_held = warm_rss, warm_held
        soak_started = time.perf_counter()
        while done < FORWARDS:
            rounds += 1
            what = f"round {rounds} (RESFUSED_SOAK_SEED={SEED})"
            jobs = [_draw_input(rng) for _ in range(min(rng.randint(2, 10), FORWARDS - done))]
            done += round_of(jobs, what)
            change = rng.choice(("load", "load", "dtype", "train", "none"))
            if change == "train" and state["dtype"] != torch.float32:
                change = "dtype"
            changes[change] = changes.get(change, 0) + 1
            if change == "load":
                load(rng.randrange(2))
            elif change == "dtype":
                set_dtype(torch.bfloat16 if state["dtype"] == torch.float32 else torch.float32)
            elif change == "train":
                train_step(rng.choice(TRAIN_INPUTS), what)
            rss, held, cached = rss_bytes(), held_bytes(fused), _cached_activation_bytes()
            peak_rss, peak_held = max(peak_rss, rss), max(peak_held, held)
            assert held <= bound, f"{what}: the caches hold {held / 2**20:.1f} MB, over the bound {bound / 2**20:.1f}"
            allowed = (bound - warm_held) + max(0, cached - warm_cached) + SLACK_MB * 2**20
            assert rss - warm_rss <= allowed, (
                f"{what}: RSS grew by {(rss - warm_rss) / 2**20:.1f} MB after warm-up, over the "
                f"{allowed / 2**20:.1f} MB the caches and {SLACK_MB} MB of slack allow"
            )
            if rounds % 50 == 0:
                print(
                    f"soak: {done} forwards in {time.perf_counter() - soak_started:.0f} s, RSS "
                    f"{rss / 2**20:.0f} MB, caches {held / 2**20:.0f} MB",
                    flush=True,
                )
        elapsed = time.perf_counter() - soak_started
        print(
            f"soak: {done} forwards in {rounds} rounds, {elapsed:.0f} s; changes {changes}; RSS after warm-up "
            f"{warm_rss / 2**20:.0f} MB, peak {peak_rss / 2**20:.0f} MB, final {rss / 2**20:.0f} MB "
            f"(growth allowed {allowed / 2**20:.0f} MB); caches at warm-up {warm_held / 2**20:.0f} MB, "
            f"peak {peak_held / 2**20:.0f} MB, bound {bound / 2**20:.0f} MB; activation buffer cache "
            f"{cached / 2**20:.0f} MB"
        )
        assert done == FORWARDS
    finally:
        torch.set_num_threads(previous_threads)


def test_first_calls_from_two_threads(monkeypatch):
    """Two threads' first calls after a parameter change, in the interleaving that once crashed
    (one thread's refresh dropped the derived state while the other was recording a plan into it),
    forced with events: thread B takes its snapshot of a
    fresh block before thread A has one, and finishes its refresh (dropping the derived state) while
    A, which made the folded weights meanwhile, is recording its plan. Each wait times out after 5 s,
    so a fix that serializes these steps passes instead of hanging."""
    from resfused import reference as R
    from resfused.runtime import finite, module_state

    ref = randomize_bn(R.BasicBlock(8, 8, 1)).eval()
    block = resfused.BasicBlock.from_reference(copy.deepcopy(ref))
    x = torch.randn(2, 8, 6, 6)
    b_snapshotting, a_recording, b_reset, a_done = (threading.Event() for _ in range(4))
    names = {}
    snapshot, signature, is_finite = module_state.Snapshot, module_state.signature, finite.is_finite

    def slow_snapshot(module):
        made = snapshot(module)
        if threading.current_thread() is names.get("B") and not b_snapshotting.is_set():
            b_snapshotting.set()
            a_recording.wait(5)
        return made

    def recording_signature(t):
        if threading.current_thread() is names.get("A"):
            a_recording.set()
            b_reset.wait(5)
        return signature(t)

    def finite_after_reset(t):
        if threading.current_thread() is names.get("B"):
            b_reset.set()
            a_done.wait(5)
        return is_finite(t)

    monkeypatch.setattr(module_state, "Snapshot", slow_snapshot)
    monkeypatch.setattr(module_state, "signature", recording_signature)
    monkeypatch.setattr(finite, "is_finite", finite_after_reset)
    results, errors = {}, []

    def call(name):
        try:
            with torch.inference_mode():
                results[name] = block(x)
        except BaseException as error:  # reported below
            errors.append(error)
        finally:
            if name == "A":
                a_done.set()

    names["B"] = threading.Thread(target=call, args=("B",))
    names["A"] = threading.Thread(target=call, args=("A",))
    names["B"].start()
    b_snapshotting.wait(5)
    names["A"].start()
    for t in (names["A"], names["B"]):
        t.join(30)
    assert not errors, f"a thread raised {errors[0]!r}"
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(x.double())
    for name in ("A", "B"):
        assert_matches_reference(results[name], expected, torch.float32, what=f"thread {name}")
