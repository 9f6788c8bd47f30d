// How many threads at::parallel_for reaches from inside this extension. at::parallel_for is a
// header template: compiled without OpenMP it silently runs serially (it did, in every kernel
// here, until setup.py added -fopenmp), so the build is checked by a test and by
// `python -m resfused.info` instead of being trusted.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

namespace resfused::cpu {
namespace {

int64_t parallel_for_threads() {
  std::atomic<int64_t> most{0};
  at::parallel_for(0, 1 << 12, 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (mine > seen && !most.compare_exchange_weak(seen, mine)) {
    }
  });
  return most.load();
}

}  // namespace
}  // namespace resfused::cpu

// No tensor argument: a catch-all kernel (the dispatcher has no device to pick by).
TORCH_LIBRARY_IMPL(resfused, CatchAll, m) { m.impl("parallel_for_threads", &resfused::cpu::parallel_for_threads); }
