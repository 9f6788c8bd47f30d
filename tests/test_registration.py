"""Every op, fake kernel and autograd formula is registered when `resfused` is imported, not when
a first forward happens to reach the module that registers it. Checked in fresh processes, where
nothing but `import resfused` has run."""

import os
import subprocess
import sys
import textwrap

import pytest

from resfused import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ops whose result is not a tensor, or depends on the data (all_finite), are never traced.
UNTRACED = {
    "all_finite",
    "buffer_cache_clear",
    "buffer_cache_scope",
    "buffer_cache_stats",
    "grouped_conv3x3_cpu_path",
    "parallel_for_threads",
    "winograd_f43_cpu_path",
}


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(not _native.loaded, reason="needs the compiled extension")
def test_every_traced_op_has_a_fake_kernel_right_after_import():
    done = _fresh_python(f"""
        import resfused
        from resfused import _native
        from torch._library.simple_registry import singleton
        triton_ops = {{"conv2d_triton", "scale_add_relu_triton", "channel_mean_triton"}}
        ops = set(_native.op_names()) | triton_ops
        missing = sorted(op for op in ops - set({sorted(UNTRACED)!r})
                         if singleton.find("resfused::" + op).fake_impl.kernel is None)
        assert not missing, missing
        assert all(singleton.find("resfused::" + op).fake_impl.kernel is not None for op in triton_ops)
        print(len(ops))
    """)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > len(UNTRACED)


@pytest.mark.skipif(not _native.loaded, reason="needs the compiled extension")
def test_opcheck_and_compile_work_before_any_forward():
    done = _fresh_python("""
        import torch, resfused
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 32, 7, 7, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(32, 4, 3, 3, generator=g), torch.randn(32, generator=g)
        torch.library.opcheck(torch.ops.resfused.grouped_conv3x3, (x, w, b, 1, True))
        torch.library.opcheck(torch.ops.resfused.add_relu, (x, torch.randn_like(x)))
        xt = torch.randn(1, 8, 5, 5, generator=g)
        wt = torch.randn(3, 3, 8, 4, generator=g)
        torch.library.opcheck(torch.ops.resfused.conv2d_triton,
                              (xt, wt, None, None, None, None, [1, 1], [1, 1], True, False),
                              test_utils=("test_schema", "test_faketensor"))
        block = resfused.ResNeXtBottleneck(32, 32, 1, 8, 4).eval()
        compiled = torch.compile(block, fullgraph=True)
        with torch.no_grad():
            y = compiled(x)
            torch.testing.assert_close(y, block.reference_forward(x), rtol=1e-4, atol=1e-4)
        print("ok")
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "ok"
