"""Backend choice, the package's behaviour without _C, and resfused.info."""

import os
import subprocess
import sys

import pytest
import torch

import resfused
from resfused import backend


def test_default_is_auto_and_cpu_tensors_resolve_to_cpu():
    assert resfused.get_backend() == "auto"
    assert backend.resolve(torch.device("cpu")) == "cpu"


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        resfused.set_backend("tpu")


def test_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(resfused.BackendUnavailable, match="'cuda' is unavailable: .*(CUDA|built without)"):
        resfused.set_backend("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(
        resfused.BackendUnavailable, match="'triton' is unavailable: no CUDA device .* TRITON_INTERPRET"
    ):
        resfused.set_backend("triton")


def test_use_backend_restores_previous():
    with resfused.use_backend("reference"):
        assert resfused.get_backend() == "reference"
    assert resfused.get_backend() == "auto"


def test_forced_cpu_backend_refuses_other_devices():
    resfused.set_backend("cpu")
    with pytest.raises(resfused.BackendUnavailable, match="'cpu' cannot run on meta"):
        backend.resolve(torch.device("meta"))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_env_variable_selects_backend():
    out = _run("import resfused; print(resfused.get_backend())", RESFUSED_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"


def test_package_imports_without_extension_and_falls_back():
    # Simulate a missing/broken _C: the package imports, warns once, and the tails use the reference.
    code = (
        "import sys, warnings; sys.modules['resfused._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import resfused, torch\n"
        "from resfused import ops\n"
        "msgs = [str(x.message) for x in w if 'resfused._C' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "x = torch.randn(2, 3, 4, 4); r = torch.randn(2, 3, 4, 4)\n"
        "with ops.trace_kernels() as ran: y = ops.add_relu(x, r)\n"
        "assert [c[:2] for c in ran] == [('add_relu', 'reference')], ran\n"
        "assert torch.equal(y, torch.relu(x + r))\n"
        "ok, why = resfused.backend.availability('cpu'); assert not ok and 'not loaded' in why, why\n"
        "print('ok')\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_info_reports_backends():
    out = _run("import resfused.info as i; i.main()")
    assert out.returncode == 0, out.stderr
    for needle in ("torch", "triton", "resfused._C", "backends:", "selected backend", "CPU: ATen capability"):
        assert needle in out.stdout


@pytest.mark.skipif(not resfused._native.has_op("parallel_for_threads"), reason="resfused._C is not built")
def test_cpu_kernels_run_on_every_torch_thread():
    # at::parallel_for in a file built without OpenMP runs serially and silently; every resfused
    # CPU kernel did until setup.py added -fopenmp. This catches that build regression.
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.resfused.parallel_for_threads() == 2
        torch.set_num_threads(1)
        assert torch.ops.resfused.parallel_for_threads() == 1
    finally:
        torch.set_num_threads(previous)
