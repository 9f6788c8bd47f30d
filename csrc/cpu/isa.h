// Run-time choice of a CPU kernel's vector path, shared by the kernels that compile a hot loop
// for several ISAs inside `#pragma GCC target` regions (grouped_conv3x3.cpp, winograd_f43.cpp).
#pragma once

#include <ATen/Context.h>

#include <string>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RESFUSED_X86_TARGETS 1  // GCC/Clang on x86: `#pragma GCC target` regions are available
#endif

namespace resfused::cpu {

enum class Path { kAvx512, kAvx2, kScalar };

inline const char* path_name(Path p) { return p == Path::kAvx512 ? "avx512" : p == Path::kAvx2 ? "avx2" : "scalar"; }

// The widest vector path this process may use: ATen's capability (so ATEN_CPU_CAPABILITY=avx2
// or =default narrows it, as for ATen's own kernels), confirmed against the CPU itself.
inline Path best_path() {
#ifdef RESFUSED_X86_TARGETS
  static const Path path = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
      return Path::kAvx512;
    if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Path::kAvx2;
    return Path::kScalar;
  }();
  return path;
#else
  return Path::kScalar;
#endif
}

}  // namespace resfused::cpu
