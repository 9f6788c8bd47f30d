// Schemas of the run-time support ops. Kernels: cpu/buffer_cache.cpp, cpu/parallel_probe.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resfused, m) {
  // Enter (true) or leave (false) this thread's buffer-cache scope; returns the new nesting depth.
  m.def("buffer_cache_scope(bool enter) -> int");
  // [idle bytes, live bytes, hits, misses, limit bytes, installed] of the CPU buffer cache.
  m.def("buffer_cache_stats() -> int[]");
  // Frees every idle cached block.
  m.def("buffer_cache_clear() -> ()");
  // The number of distinct threads (highest thread index + 1) one at::parallel_for over 4096
  // items ran on, with ATen's current thread setting (1 means a build without OpenMP).
  m.def("parallel_for_threads() -> int");
}
