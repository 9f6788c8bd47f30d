"""Build of resfused._C: C++ CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Whether to build CUDA is decided from `torch.version.cuda` and the presence of nvcc, never from
whether a GPU is present. Environment:
  RESFUSED_SKIP_CUDA_BUILD=1   build the CPU kernels only
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default "8.0;9.0+PTX": A100 and H100, plus PTX)
  MAX_JOBS                     parallel compile jobs (ninja)
  RESFUSED_CPU_BASELINE=none   x86: compile the CPU kernels without the AVX2+FMA baseline
"""

import glob
import os
import platform
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _find_cuda_home():
    """CUDA_HOME if set, else the toolkit that the nvcc on PATH belongs to (resolving wrapper scripts)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


cuda_home = _find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_decision():
    if os.environ.get("RESFUSED_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False, "RESFUSED_SKIP_CUDA_BUILD is set"
    if not torch.version.cuda:
        return False, "torch is not a CUDA build"
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return False, "nvcc was not found (set CUDA_HOME)"
    return True, ""


build_cuda, why_not = _cuda_decision()
cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/schemas/*.cpp") + _sources("csrc/cpu/*.cpp")
cuda_sources = _sources("csrc/cuda/*.cu") if build_cuda else []
cxx_flags = ["-O3", "-std=c++20", "-fdiagnostics-color=always"]
# at::vec picks its vector width from CPU_CAPABILITY at compile time; without these flags it is a
# generic loop emulation (measured: add_relu's backward 43 ms instead of ~3 ms on 6.4M floats).
# The baseline is AVX2+FMA (x86-64-v3); resfused._native refuses to load _C on CPUs without it.
# The grouped 3x3 kernel adds its own AVX-512 path behind a run-time check.
cpu_baseline = "none"
if platform.machine() in ("x86_64", "AMD64") and os.environ.get("RESFUSED_CPU_BASELINE", "avx2") == "avx2":
    cpu_baseline = "avx2"
    cxx_flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
# at::parallel_for is a header template: it runs on ATen's OpenMP thread pool only where the
# including file is compiled with OpenMP, and is silently serial otherwise (measured: every kernel
# here ran on one thread at torch.set_num_threads(2)). The extension links the libgomp that torch
# already loaded (same soname), so torch.set_num_threads governs both.
openmp_flags = ["-fopenmp"] if platform.system() == "Linux" else []
cxx_flags += openmp_flags
# Read by resfused._native before it imports _C (a generated file, not tracked by git).
with open(os.path.join(ROOT, "resfused", "_build_config.py"), "w") as f:
    f.write(f'"""Written by setup.py."""\nCPU_BASELINE = "{cpu_baseline}"\n')

if build_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
    if os.environ.get("RESFUSED_PTXAS_VERBOSE"):
        nvcc_flags.append("-Xptxas=-v")
    ext = CUDAExtension(
        "resfused._C",
        cpu_sources + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=[("RESFUSED_WITH_CUDA", "1"), ("RESFUSED_CUDA_ARCHS", f'"{archs}"')],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=openmp_flags,
    )
    print(
        f"resfused: building C++ CPU kernels ({len(cpu_sources)} files) and CUDA kernels "
        f"({len(cuda_sources)} files) for TORCH_CUDA_ARCH_LIST={archs}"
    )
else:
    ext = CppExtension(
        "resfused._C",
        cpu_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=openmp_flags,
    )
    print(f"resfused: building C++ CPU kernels ({len(cpu_sources)} files); CUDA kernels skipped: {why_not}")

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
