// Host emulation of the CUDA platform that the kernel sources use (csrc/cuda/kernels/*.cuh),
// so the SAME kernel source runs as host C++ in the tests (test-only; not part of setup.py).
//
//  * blockIdx/threadIdx/blockDim/gridDim are thread_local variables set by the launcher.
//  * launch<K>() walks the grid block by block; inside a block it runs phase 0 for every thread,
//    then phase 1 for every thread: the semantics of the __syncthreads() between the phases.
//  * Shared memory is a fresh buffer per block filled with NaN, so reading a value no thread
//    wrote shows up as NaN in the result.
//  * Every global and shared access goes through checked_ptr, which throws (with the buffer's
//    name, the index and the extent) on an out-of-bounds or misaligned vector access. This was
//    chosen over AddressSanitizer: ASan needs libasan LD_PRELOADed into the Python process that
//    loads torch, and it would not see overruns inside one allocation (a tile running into the
//    next image of the same tensor), which checked_ptr does, against the tensor's extent.
//  * The launch configuration is validated against the hardware limits (threads per block,
//    grid size, shared memory), returning an error like a failed CUDA launch would.
#pragma once
#define RESFUSED_EMULATION 1
#define RESFUSED_EMULATION_HEADER 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;  // the CUDA runtime's code
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "invalid configuration argument (emulated launch check)";
}

namespace resfused::emu {

struct BoundsError : std::out_of_range {
  using std::out_of_range::out_of_range;
};

// A pointer that knows the extent [0, extent) of the buffer it points into.
template <class T>
class checked_ptr {
 public:
  checked_ptr() = default;
  checked_ptr(T* base, int64_t extent, const char* name) : base_(base), extent_(extent), name_(name) {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  checked_ptr(const checked_ptr<U>& o) : base_(o.base_), extent_(o.extent_), off_(o.off_), name_(o.name_) {}

  T& operator[](int64_t i) const {
    check(i, 1, 1);
    return base_[off_ + i];
  }
  checked_ptr operator+(int64_t i) const {
    checked_ptr r = *this;
    r.off_ += i;
    return r;
  }
  // Throws unless elements [i, i+n) lie in the buffer and the address is `align` bytes aligned.
  void check(int64_t i, int64_t n, size_t align) const {
    const int64_t lo = off_ + i;
    if (base_ == nullptr || lo < 0 || lo + n > extent_) {
      std::ostringstream m;
      m << "emulated out-of-bounds access to '" << name_ << "': elements [" << lo << ", " << lo + n
        << ") of an extent of " << extent_;
      throw BoundsError(m.str());
    }
    if (reinterpret_cast<uintptr_t>(base_ + lo) % align != 0) {
      std::ostringstream m;
      m << "emulated misaligned " << align << "-byte vector access to '" << name_ << "' at element " << lo;
      throw BoundsError(m.str());
    }
  }
  T* raw() const { return base_ + off_; }

 private:
  template <class>
  friend class checked_ptr;
  T* base_ = nullptr;
  int64_t extent_ = 0;
  int64_t off_ = 0;
  const char* name_ = "null";
};

// Runs kernel struct K over the grid (see the file comment).
template <class K>
cudaError_t launch(dim3 grid, dim3 block, size_t smem_bytes, const typename K::Params& p) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || threads > uint64_t(K::kMaxThreads) || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u || smem_bytes > 227 * 1024)
    return cudaErrorInvalidConfiguration;
  std::vector<float> smem((smem_bytes + sizeof(float) - 1) / sizeof(float) + 16);
  // Exactly 16-byte aligned (and never 32): CUDA only promises 16 for dynamic shared memory, so a
  // wider vector access to it must fail here too.
  float* base = smem.data();
  while (reinterpret_cast<uintptr_t>(base) % 32 != 16) ++base;
  const int64_t smem_floats = static_cast<int64_t>(smem_bytes / sizeof(float));
  gridDim = grid;
  blockDim = block;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        std::fill(base, base + smem_floats, std::numeric_limits<float>::quiet_NaN());
        checked_ptr<float> sp(smem_floats ? base : nullptr, smem_floats, "shared memory");
        auto run_phase = [&](auto phase) {
          for (unsigned tz = 0; tz < block.z; ++tz)
            for (unsigned ty = 0; ty < block.y; ++ty)
              for (unsigned tx = 0; tx < block.x; ++tx) {
                threadIdx = dim3(tx, ty, tz);
                K::template run<decltype(phase)::value>(p, sp);
              }
        };
        run_phase(std::integral_constant<int, 0>{});
        if constexpr (K::kPhases == 2) run_phase(std::integral_constant<int, 1>{});
      }
  return cudaSuccess;
}

}  // namespace resfused::emu
