"""ResidualStage (blocks writing their last conv over a scratch shortcut) and the CPU buffer
cache: results match the float64 reference, the caller's tensors are never overwritten, hooks
and autograd turn the in-place path off, and cached buffers are reused only once freed."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import resfused
from resfused import reference as R
from resfused.runtime import buffer_cache

from harness import assert_matches_reference, compare_modules, randomize_bn

INTO = "onednn(into residual)"


def _stage(block_cls, specs):
    ref = randomize_bn(nn.Sequential(*[block_cls(*s) for s in specs])).eval()
    return resfused.fuse(ref), ref


def _conv_kernels(fn):
    with resfused.ops.trace_kernels() as ran:
        out = fn()
    return out, [c.kernel for c in ran if c.op == "conv"]


@pytest.mark.parametrize(
    "block_cls, specs",
    [
        (R.BasicBlock, [(16, 16), (16, 16), (16, 32, 2), (32, 32)]),
        (R.PreActBasicBlock, [(16, 16), (16, 16), (16, 32, 2), (32, 32)]),
        (R.Bottleneck, [(64, 16), (64, 16), (64, 32, 2), (128, 32)]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage_matches_reference_and_leaves_input_alone(block_cls, specs, dtype):
    fused, ref = _stage(block_cls, specs)
    assert type(fused) is resfused.ResidualStage
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, specs[0][0], 10, 10).to(dtype).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    _, kernels = _conv_kernels(lambda: compare_modules(fused.to(dtype), ref, x, f"stage of {block_cls.__name__}"))
    assert torch.equal(x, before), "the stage overwrote its caller's input"
    if dtype in resfused.kernels.conv_onednn.SUPPORTED_DTYPES:
        # block 0: identity of the caller's input (not scratch); 1: scratch input; 2: projection; 3: scratch
        assert kernels.count(INTO) == 3, kernels


def test_forward_hook_sees_an_output_that_is_not_overwritten():
    fused, ref = _stage(R.BasicBlock, [(8, 8)] * 3)
    seen = []
    fused[1].register_forward_hook(lambda m, i, o: seen.append(o.clone()) or seen.append(o))
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused(x)
        expected = ref[1](ref[0](x))
    copy_at_hook, held = seen
    assert torch.equal(held, copy_at_hook), "block 2 wrote over the output that block 1's hook holds"
    assert_matches_reference(held, expected.double(), what="hooked block output")


def test_hooks_and_autograd_use_the_allocating_path():
    fused, ref = _stage(R.BasicBlock, [(8, 8)] * 3)
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _, kernels = _conv_kernels(lambda: fused(x))
    assert kernels.count(INTO) == 2, kernels  # blocks 1 and 2 get scratch inputs
    handle = fused[1].register_forward_pre_hook(lambda m, i: None)
    with torch.no_grad():
        _, kernels = _conv_kernels(lambda: fused(x))
    assert INTO not in kernels, kernels  # block 1 runs through __call__; its output may be held
    handle.remove()
    x.requires_grad_(True)
    out, kernels = _conv_kernels(lambda: fused(x))
    assert INTO not in kernels and "onednn" not in kernels, kernels
    out.sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    copy.deepcopy(ref).double()(x64).sum().backward()
    assert_matches_reference(x.grad, x64.grad, torch.float32, what="input gradient through the stage")


def test_single_blocks_and_mixed_sequentials_are_not_stages():
    one, _ = _stage(R.BasicBlock, [(8, 8)])
    assert type(one) is nn.Sequential
    mixed = resfused.fuse(nn.Sequential(R.BasicBlock(8, 8), nn.ReLU(), R.BasicBlock(8, 8)).eval())
    assert type(mixed) is resfused.ResidualStage  # two fused blocks; the ReLU resets scratch
    x = torch.randn(1, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _, kernels = _conv_kernels(lambda: mixed(x))
    assert INTO not in kernels, kernels


needs_cache = pytest.mark.skipif(not buffer_cache._AVAILABLE, reason="resfused._C not built")


@needs_cache
def test_buffer_cache_reuses_freed_buffers_only():
    block = resfused.Bottleneck(256, 64).eval()
    x = torch.randn(2, 256, 32, 32).contiguous(memory_format=torch.channels_last)  # 2 MiB activations
    buffer_cache.clear()
    with torch.no_grad():
        first = block(x)
        kept = first.clone()
        s0 = buffer_cache.stats()
        second = block(x)
        s1 = buffer_cache.stats()
    assert s1.hits > s0.hits, (s0, s1)
    assert first.data_ptr() != second.data_ptr()
    assert torch.equal(first, kept), "a live output's buffer was handed out again"
    assert torch.equal(first, second)
    del first, second
    assert buffer_cache.stats().idle_bytes > 0
    buffer_cache.clear()
    assert buffer_cache.stats().idle_bytes == 0


@needs_cache
def test_buffer_cache_scope_only_caches_inside():
    buffer_cache.clear()
    before = buffer_cache.stats()
    torch.empty(1 << 20)  # outside any scope: the previous allocator
    assert buffer_cache.stats().misses == before.misses
    with buffer_cache.scope():
        torch.empty(1 << 20)
        torch.empty(1000)  # below 256 KiB: not cached
    after = buffer_cache.stats()
    assert after.misses == before.misses + 1 and after.idle_bytes == 4 << 20


@needs_cache
def test_buffer_cache_can_be_turned_off_at_run_time():
    block = resfused.Bottleneck(256, 64).eval()
    x = torch.randn(2, 256, 32, 32).contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="'enabled' must be a bool"):
        buffer_cache.set_enabled("no")
    buffer_cache.set_enabled(False)
    try:
        before = buffer_cache.stats()
        with torch.no_grad():
            block(x), block(x)
        after = buffer_cache.stats()
        assert (after.hits, after.misses) == (before.hits, before.misses), (before, after)
    finally:
        buffer_cache.set_enabled(True)
    with torch.no_grad():
        block(x)
    assert buffer_cache.stats().hits + buffer_cache.stats().misses > after.hits + after.misses


def _run_python(code: str, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


@needs_cache
def test_buffer_cache_limit_from_environment():
    code = (
        "import torch, resfused\nfrom resfused.runtime import buffer_cache as c\n"
        "with c.scope(): torch.empty(1 << 20)\nprint(c.stats().idle_bytes, c.stats().limit_bytes)"
    )
    off = _run_python(code, RESFUSED_BUFFER_CACHE_MB="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["0", "0"]
    bad = _run_python(code, RESFUSED_BUFFER_CACHE_MB="lots")
    assert bad.returncode != 0 and "RESFUSED_BUFFER_CACHE_MB must be a non-negative integer" in bad.stderr


def test_folded_key_survives_a_submodule_set_to_none():
    # Assigning None to a registered child leaves None in Module._modules.
    ref = randomize_bn(R.BasicBlock(8, 8)).eval()
    fused = resfused.BasicBlock.from_reference(ref)
    fused.extra = nn.Identity()
    fused.extra = None
    compare_modules(fused, ref, torch.randn(1, 8, 5, 5))


def test_training_conv_matches_aten_gradients():
    from resfused.kernels.conv_train import ScopedConv2d

    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ScopedConv2d.apply(x, w, b, [2, 2], [1, 1], [1, 1], 2), (x, conv.weight, conv.bias)
    )
    no_bias = nn.Conv2d(4, 6, 1, bias=False).double()
    assert torch.autograd.gradcheck(
        lambda x, w: ScopedConv2d.apply(x, w, None, [1, 1], [0, 0], [1, 1], 1), (x, no_bias.weight)
    )


@needs_cache
def test_train_step_backward_reuses_cached_buffers():
    block = resfused.Bottleneck(256, 64).train()
    x = torch.randn(2, 256, 32, 32).contiguous(memory_format=torch.channels_last)
    block(x).sum().backward()
    before = buffer_cache.stats()
    block(x).sum().backward()
    after = buffer_cache.stats()
    # the second step's forward and backward find blocks the first step freed
    assert after.hits - before.hits >= 10, (before, after)


class _PutNaN(nn.Module):
    """A module that is not a fused block and makes a NaN: the fused blocks after it must keep it."""

    def forward(self, x):
        x = x.clone()
        x[-1, 0, 2, 2] = float("nan")
        return x


@pytest.mark.parametrize("where", ["input", "between blocks"])
def test_nan_reaches_the_output_as_in_the_reference(where):
    ref_blocks = [randomize_bn(R.Bottleneck(64, 16)).eval() for _ in range(2)]
    middle = [_PutNaN()] if where == "between blocks" else []
    ref = nn.Sequential(ref_blocks[0], *middle, ref_blocks[1])
    fused = resfused.ResidualStage(
        *[resfused.Bottleneck.from_reference(b) if isinstance(b, R.Bottleneck) else b for b in ref]
    ).eval()
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    if where == "input":
        x[-1, 0, 2, 2] = float("nan")
    y = compare_modules(fused, ref, x, f"NaN {where}")
    assert y[-1].isnan().any() and not y[0].isnan().any()


def _inject_nan(module, args):
    z = args[0].clone()
    z[-1, 0, 2, 2] = float("nan")
    return (z,)


@pytest.mark.parametrize("hook", ["pre-hook on block 1", "forward hook on block 0"])
def test_a_hook_that_makes_a_nan_reaches_the_output(hook):
    """A hooked block is called normally; the blocks from it on check their own inputs (before, a
    NaN a hook put in came out of oneDNN's ReLU as 0: 4608 NaN in eager, 0 fused)."""
    ref = nn.Sequential(*[randomize_bn(R.Bottleneck(64, 16)).eval() for _ in range(3)])
    fused = resfused.ResidualStage(*[resfused.Bottleneck.from_reference(copy.deepcopy(b)) for b in ref]).eval()
    for model in (ref, fused):
        if hook.startswith("pre-hook"):
            model[1].register_forward_pre_hook(_inject_nan)
        else:
            model[0].register_forward_hook(lambda m, args, out: _inject_nan(m, (out,))[0])
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    y = compare_modules(fused, ref, x, hook)
    assert y[-1].isnan().any() and not y[0].isnan().any()
