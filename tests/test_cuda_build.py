"""The CUDA kernels compile with nvcc for sm_80 and sm_90 with no register spills (docs/design.md,
"Checking GPU code without a GPU").

All device code lives in the torch-free translation units csrc/cuda/*_kernels.cu (the bindings
csrc/cuda/<op>.cu are host code only), so each compiles in seconds here, with the flags of
setup.py, exactly as the package build compiles it. `-Xptxas -v` reports every kernel's
registers and spill bytes; any spill store or load fails the test.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]  # setup.py's nvcc flags
ARCHS = ["80", "90"]


def _nvcc() -> str | None:
    for candidate in ("/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if candidate and pathlib.Path(candidate).exists():
            return candidate
    return None


def _kernel_units() -> list[pathlib.Path]:
    return sorted(CUDA_DIR.glob("*_kernels.cu"))


def test_device_code_only_in_kernel_units():
    # A __global__ in a binding would escape the spill check (and the fast compile).
    for cu in CUDA_DIR.glob("*.cu"):
        if not cu.name.endswith("_kernels.cu"):
            assert "__global__" not in cu.read_text() and "kernels/" not in cu.read_text().replace(
                "kernels/grouped_conv3x3_config.cuh", ""
            ).replace("kernels/tails_config.cuh", ""), cu
    assert {p.name for p in _kernel_units()} >= {
        "grouped_conv3x3_kernels.cu",
        "tails_kernels.cu",
        "bn_train_kernels.cu",
    }


def _compile(nvcc: str, cu: pathlib.Path, arch: str, out_dir: pathlib.Path) -> tuple[str, str, int, str]:
    cmd = [
        nvcc,
        "-c",
        str(cu),
        "-o",
        str(out_dir / f"{cu.stem}_sm{arch}.o"),
        f"-I{ROOT / 'csrc'}",
        *NVCC_FLAGS,
        "-Xptxas",
        "-v",
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        "-Xcompiler",
        "-fPIC",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return cu.name, arch, p.returncode, p.stdout + p.stderr


def test_kernels_compile_without_spills(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA toolkit not installed)")
    jobs = [(cu, arch) for cu in _kernel_units() for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: _compile(nvcc, j[0], j[1], tmp_path), jobs))
    for name, arch, rc, log in results:
        assert rc == 0, f"nvcc failed on {name} for sm_{arch}:\n{log[-4000:]}"
        entries = re.findall(r"Compiling entry function '(\S+)' for 'sm_" + arch, log)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert entries, f"{name} sm_{arch}: no kernels reported by ptxas -v:\n{log[-2000:]}"
        assert len(spills) >= len(entries), f"{name} sm_{arch}: unparsed ptxas output:\n{log[-2000:]}"
        spilled = [(e, s) for e, s in zip(entries, spills) if s != ("0", "0")]
        assert not spilled, f"{name} sm_{arch}: kernels spill registers: {spilled}"
