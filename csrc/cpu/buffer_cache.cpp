// A cache of large CPU activation buffers, active only inside the forward of a fused module.
//
// Why: a fresh 25 MB activation from glibc comes from mmap (or from heap memory that was trimmed
// back to the OS), so the first write to each 4 KiB page faults and the kernel zeroes it: a fused
// ResNet-50 forward at batch 8 took ~11,500 page faults (45 MB of fresh pages), where
// torch.compile's graph reuses its buffers and takes none (measured, with and without the cache
// and against THP: docs/measurements.md, CPU buffer cache). ATen's conv ops allocate their own
// outputs, so the buffers are reused at the allocator: while a thread is inside a scope
// (buffer_cache_scope(true) ... (false), entered by resfused.runtime.buffer_cache), allocations of at
// least kMinBytes are served from blocks of exactly that size that earlier scoped tensors freed.
//
// Scope: the CPU allocator is wrapped once, on the first scope entry (c10::SetCPUAllocator).
// Outside a scope, and on other threads, every call goes straight to the allocator that was
// installed before (the wrapper adds one thread-local read). A cached block is returned to the
// cache whenever its tensor dies, scope or not; idle blocks are kept up to a limit
// (RESFUSED_BUFFER_CACHE_MB, default 2048; 0 turns the cache off) and buffer_cache_clear()
// frees them. Blocks keep data == context, so raw_allocate / raw_deallocate work as with the
// default allocator.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace resfused::cpu {
namespace {

// Smaller allocations come from glibc's heap without faults; caching them would only add locking.
constexpr size_t kMinBytes = size_t(1) << 18;

size_t limit_from_env() {
  const char* env = std::getenv("RESFUSED_BUFFER_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(2048) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0,
              "resfused: RESFUSED_BUFFER_CACHE_MB must be a non-negative integer (MiB), got '", env, "'");
  return static_cast<size_t>(mb) << 20;
}

struct State {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;               // cached-path blocks in use: size
  std::unordered_map<size_t, std::vector<void*>> idle;  // free blocks by exact size
  size_t idle_bytes = 0;
  const size_t limit = limit_from_env();
  int64_t hits = 0, misses = 0;
  c10::Allocator* fallback = nullptr;  // the CPU allocator before ours
};

// Leaked on purpose: tensors may release blocks during interpreter shutdown.
State& state() {
  static State* s = new State();
  return *s;
}

thread_local int scope_depth = 0;

void release(void* ptr) {
  State& s = state();
  enum { kKept, kFreed, kForeign } what = kForeign;
  {
    std::lock_guard<std::mutex> guard(s.mu);
    auto it = s.live.find(ptr);
    if (it != s.live.end()) {
      const size_t size = it->second;
      s.live.erase(it);
      what = kFreed;
      if (s.idle_bytes + size <= s.limit) {
        s.idle[size].push_back(ptr);
        s.idle_bytes += size;
        what = kKept;
      }
    }
  }
  if (what == kFreed) c10::free_cpu(ptr);
  // A block of the previous allocator, handed out by raw_allocate outside a scope.
  if (what == kForeign) s.fallback->raw_deleter()(ptr);
}

class ScopedCachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    State& s = state();
    if (scope_depth == 0 || nbytes < kMinBytes || s.limit == 0) return s.fallback->allocate(nbytes);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> guard(s.mu);
      auto it = s.idle.find(nbytes);
      if (it != s.idle.end() && !it->second.empty()) {  // a hit: taken and marked live in one lock
        ptr = it->second.back();
        it->second.pop_back();
        s.idle_bytes -= nbytes;
        s.live.emplace(ptr, nbytes);
        ++s.hits;
        return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
      }
      ++s.misses;
    }
    ptr = c10::alloc_cpu(nbytes);  // outside the lock: it may fault or mmap
    {
      std::lock_guard<std::mutex> guard(s.mu);
      s.live.emplace(ptr, nbytes);
    }
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

// Wraps the CPU allocator once. If another allocator of higher priority is installed, ours is
// not, and scopes simply change nothing (stats report installed = 0).
bool install_once() {
  static const bool installed = [] {
    State& s = state();
    s.fallback = c10::GetCPUAllocator();
    static ScopedCachingAllocator* allocator = new ScopedCachingAllocator();
    // Priority 0 is the default allocator's; SetCPUAllocator replaces an equal priority.
    c10::SetCPUAllocator(allocator, /*priority=*/0);
    return c10::GetCPUAllocator() == allocator;
  }();
  return installed;
}

// Enter (true) or leave (false) a scope on this thread; returns the new depth.
int64_t buffer_cache_scope(bool enter) {
  if (enter) {
    install_once();
    return ++scope_depth;
  }
  TORCH_CHECK(scope_depth > 0, "resfused.buffer_cache_scope(false): not inside a scope");
  return --scope_depth;
}

// [idle bytes, live cached bytes, hits, misses, limit bytes, installed]
std::vector<int64_t> buffer_cache_stats() {
  const bool installed = install_once();
  State& s = state();
  std::lock_guard<std::mutex> guard(s.mu);
  size_t live = 0;
  for (const auto& kv : s.live) live += kv.second;
  return {static_cast<int64_t>(s.idle_bytes),
          static_cast<int64_t>(live),
          s.hits,
          s.misses,
          static_cast<int64_t>(s.limit),
          installed};
}

// Frees every idle block; blocks in use return to the cache when their tensors die.
void buffer_cache_clear() {
  State& s = state();
  std::vector<void*> blocks;
  {
    std::lock_guard<std::mutex> guard(s.mu);
    for (auto& kv : s.idle) blocks.insert(blocks.end(), kv.second.begin(), kv.second.end());
    s.idle.clear();
    s.idle_bytes = 0;
  }
  for (void* p : blocks) c10::free_cpu(p);
}

}  // namespace
}  // namespace resfused::cpu

// No tensor arguments: catch-all kernels (the dispatcher has no device to pick by).
TORCH_LIBRARY_IMPL(resfused, CatchAll, m) {
  m.impl("buffer_cache_scope", &resfused::cpu::buffer_cache_scope);
  m.impl("buffer_cache_stats", &resfused::cpu::buffer_cache_stats);
  m.impl("buffer_cache_clear", &resfused::cpu::buffer_cache_clear);
}
