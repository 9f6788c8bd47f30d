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
//  * Warp shuffles (kernels that set `kWarpSync = true`): each lane of a warp runs as a fiber
//    (ucontext) with its own stack. A lane that reaches a shuffle posts its value and yields;
//    when every lane of the warp has posted, the values are exchanged and the lanes resume. That
//    is exactly the lock-step guarantee of __shfl_xor_sync with a full mask: every lane takes
//    part, each sees its partner's value from the same point of the program. A shuffle while a
//    lane of the warp has already exited (undefined on a GPU) throws, as does a partial warp.
//  * Bank-conflict accounting (optional, `BankStats`): every shared access is recorded per
//    thread; after each phase, the k-th accesses of the 32 lanes of a warp are taken as one
//    request and costed like the hardware does: 32 banks of 4 bytes, a request is served in
//    128-byte phases (32 lanes of 4 bytes, 16 of 8, 8 of 16), and each phase needs as many
//    wavefronts as the most distinct 4-byte words any one bank holds (same word = broadcast).
#pragma once
#define RESFUSED_EMULATION 1
#define RESFUSED_EMULATION_HEADER 1

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <set>
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

// Shared-memory access recording for the bank-conflict accounting (see the file comment).
struct SmemAccess {
  int64_t offset;  // bytes from the start of shared memory
  int64_t bytes;
};
inline thread_local std::vector<SmemAccess>* smem_record = nullptr;  // the running thread's list
inline thread_local const char* smem_base = nullptr;

// Per phase: warp requests, wavefronts they need, the ideal (one per 128-byte phase), the worst
// wavefronts of one 128-byte phase (1 = conflict-free, 32 = a whole warp on one bank).
struct BankStats {
  int64_t requests[2] = {0, 0}, wavefronts[2] = {0, 0}, ideal[2] = {0, 0}, worst[2] = {0, 0};
};
inline BankStats* bank_stats = nullptr;  // non-null: launches record and cost shared accesses

// The emulated device's SM count (what a host asks cudaDevAttrMultiProcessorCount for): 132, an
// H100 SXM. Tests change it to see grids sized for other GPUs.
inline int sm_count = 132;
// Non-zero: launches run blocks in an order shuffled with this seed, and the threads (warps, and
// lanes inside a warp) of each phase in reverse order. A kernel whose result depends on the
// order blocks or threads run in (atomics, races) then changes its bits; a deterministic one not.
inline uint64_t schedule_seed = 0;

// A pointer that knows the extent [0, extent) of the buffer it points into.
template <class T>
class checked_ptr {
 public:
  checked_ptr() = default;
  checked_ptr(T* base, int64_t extent, const char* name, bool shared = false)
      : base_(base), extent_(extent), name_(name), shared_(shared) {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  checked_ptr(const checked_ptr<U>& o)
      : base_(o.base_), extent_(o.extent_), off_(o.off_), name_(o.name_), shared_(o.shared_) {}
  // The same bytes seen as another element type (shared memory holding doubles).
  template <class U>
  checked_ptr<U> reinterpret() const {
    const int64_t bytes = (extent_ - off_) * int64_t(sizeof(T));
    return checked_ptr<U>(reinterpret_cast<U*>(base_ + off_), bytes / int64_t(sizeof(U)), name_, shared_);
  }

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
    if (shared_ && smem_record != nullptr)
      smem_record->push_back({reinterpret_cast<const char*>(base_ + lo) - smem_base, n * int64_t(sizeof(T))});
  }
  T* raw() const { return base_ + off_; }

 private:
  template <class>
  friend class checked_ptr;
  T* base_ = nullptr;
  int64_t extent_ = 0;
  int64_t off_ = 0;
  const char* name_ = "null";
  bool shared_ = false;
};

// Costs the recorded accesses of one block's phase, warp by warp (see BankStats).
inline void cost_bank_accesses(const std::vector<std::vector<SmemAccess>>& per_thread, int phase) {
  BankStats& st = *bank_stats;
  const size_t nthreads = per_thread.size();
  for (size_t w0 = 0; w0 < nthreads; w0 += 32) {
    const size_t w1 = std::min(nthreads, w0 + 32);
    size_t most = 0;
    for (size_t t = w0; t < w1; ++t) most = std::max(most, per_thread[t].size());
    for (size_t k = 0; k < most; ++k) {
      int64_t bytes = 4;
      for (size_t t = w0; t < w1; ++t)
        if (k < per_thread[t].size()) bytes = std::max(bytes, per_thread[t][k].bytes);
      const size_t lanes_per_phase = static_cast<size_t>(std::max<int64_t>(1, 128 / bytes));
      st.requests[phase] += 1;
      for (size_t g0 = w0; g0 < w1; g0 += lanes_per_phase) {
        std::set<int64_t> words[32];
        bool any = false;
        for (size_t t = g0; t < std::min(w1, g0 + lanes_per_phase); ++t) {
          if (k >= per_thread[t].size()) continue;
          any = true;
          const SmemAccess& acc = per_thread[t][k];
          for (int64_t wd = acc.offset / 4; wd < (acc.offset + acc.bytes + 3) / 4; ++wd) words[wd % 32].insert(wd);
        }
        if (!any) continue;
        int64_t wave = 1;
        for (const auto& b : words) wave = std::max<int64_t>(wave, static_cast<int64_t>(b.size()));
        st.ideal[phase] += 1;
        st.wavefronts[phase] += wave;
        st.worst[phase] = std::max(st.worst[phase], wave);
      }
    }
  }
}

// --- warp-synchronous lanes (fibers) for the shuffles ---

struct Lane {
  ucontext_t ctx;
  dim3 tid;
  enum State { kReady, kAtShuffle, kDone } state = kReady;
  const void* send = nullptr;  // the value this lane offers (a local of its suspended fiber)
  void* recv = nullptr;        // where the partner's value goes
  size_t bytes = 0;
  int src = 0;
  std::exception_ptr error;
};
struct WarpRun {
  ucontext_t scheduler;
  Lane* lanes = nullptr;
  int nlanes = 0;
  Lane* current = nullptr;
  const std::function<void()>* body = nullptr;
};
inline thread_local WarpRun* warp_run = nullptr;  // set while a warp-synchronous phase runs

inline void lane_entry() {
  WarpRun& w = *warp_run;
  Lane& l = *w.current;
  try {
    (*w.body)();
  } catch (...) {
    l.error = std::current_exception();
  }
  l.state = Lane::kDone;  // returns to uc_link: the scheduler
}

// A lane's side of a shuffle: post the value, yield, resume once the warp exchanged.
template <class V>
V shuffle_xor(unsigned mask, const V& v, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<V>);
  WarpRun* w = warp_run;
  if (w == nullptr) throw BoundsError("emulated warp shuffle in a kernel without kWarpSync");
  if (mask != 0xffffffffu) throw BoundsError("emulated warp shuffle: only full-warp masks are modelled");
  Lane& l = *w->current;
  const int me = static_cast<int>(&l - w->lanes);
  V mine = v, got{};
  l.send = &mine;
  l.recv = &got;
  l.bytes = sizeof(V);
  l.src = me ^ lane_mask;
  l.state = Lane::kAtShuffle;
  std::vector<SmemAccess>* const record = smem_record;  // the other lanes ran meanwhile
  swapcontext(&l.ctx, &w->scheduler);
  smem_record = record;
  return got;
}

// Runs one phase of one warp (lanes `tids`) as fibers until every lane has finished.
inline void run_warp_synchronous(const std::vector<dim3>& tids, const std::function<void()>& body,
                                 std::vector<std::unique_ptr<char[]>>& stacks, size_t stack_bytes) {
  const int n = static_cast<int>(tids.size());
  std::vector<Lane> lanes(n);
  WarpRun w;
  w.lanes = lanes.data();
  w.nlanes = n;
  w.body = &body;
  WarpRun* saved = warp_run;
  warp_run = &w;
  for (int i = 0; i < n; ++i) {
    lanes[i].tid = tids[i];
    getcontext(&lanes[i].ctx);
    lanes[i].ctx.uc_stack.ss_sp = stacks[i].get();
    lanes[i].ctx.uc_stack.ss_size = stack_bytes;
    lanes[i].ctx.uc_link = &w.scheduler;
    makecontext(&lanes[i].ctx, lane_entry, 0);
  }
  std::exception_ptr error;
  for (;;) {
    for (int j = 0; j < n; ++j) {
      const int i = schedule_seed != 0 ? n - 1 - j : j;
      if (lanes[i].state != Lane::kReady) continue;
      threadIdx = lanes[i].tid;
      w.current = &lanes[i];
      swapcontext(&w.scheduler, &lanes[i].ctx);
      if (lanes[i].error && !error) error = lanes[i].error;
    }
    if (error) break;
    int waiting = 0, done = 0;
    for (const Lane& l : lanes) (l.state == Lane::kDone ? done : waiting) += 1;
    if (waiting == 0) break;
    if (done > 0 || n != 32) {
      warp_run = saved;
      throw BoundsError("emulated warp shuffle with a lane that has exited or in a partial warp (undefined on a GPU)");
    }
    for (Lane& l : lanes) {
      const Lane& src = lanes[l.src];
      if (src.bytes != l.bytes) {
        warp_run = saved;
        throw BoundsError("emulated warp shuffle: lanes exchange values of different sizes");
      }
      std::memcpy(l.recv, src.send, l.bytes);
    }
    for (Lane& l : lanes) l.state = Lane::kReady;
  }
  warp_run = saved;
  // A lane left suspended at a shuffle after another threw is abandoned with its stack: only
  // trivially destructible locals live there in the kernels (values, packs, checked pointers).
  if (error) std::rethrow_exception(error);
}

template <class K, class = void>
struct UsesWarpSync : std::false_type {};
template <class K>
struct UsesWarpSync<K, std::void_t<decltype(K::kWarpSync)>> : std::bool_constant<K::kWarpSync> {};

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
  constexpr bool kFibers = UsesWarpSync<K>::value;
  constexpr size_t kStackBytes = 256 * 1024;
  std::vector<std::unique_ptr<char[]>> stacks;
  if constexpr (kFibers)
    for (int i = 0; i < 32; ++i) stacks.emplace_back(new char[kStackBytes]);
  std::vector<std::vector<SmemAccess>> record(bank_stats != nullptr ? threads : 0);
  smem_base = reinterpret_cast<const char*>(base);
  struct Unset {  // the recorder never outlives the launch, even when a check throws
    ~Unset() { smem_record = nullptr; }
  } unset;
  std::vector<dim3> blocks;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) blocks.push_back(dim3(bx, by, bz));
  if (schedule_seed != 0) std::shuffle(blocks.begin(), blocks.end(), std::mt19937_64(schedule_seed));
  std::vector<dim3> thread_order;  // linear order: x fastest, so warps are 32 consecutive ids
  for (unsigned tz = 0; tz < block.z; ++tz)
    for (unsigned ty = 0; ty < block.y; ++ty)
      for (unsigned tx = 0; tx < block.x; ++tx) thread_order.push_back(dim3(tx, ty, tz));
  for (const dim3& blk : blocks) {
    blockIdx = blk;
    std::fill(base, base + smem_floats, std::numeric_limits<float>::quiet_NaN());
    checked_ptr<float> sp(smem_floats ? base : nullptr, smem_floats, "shared memory", /*shared=*/true);
    auto run_phase = [&](auto phase) {
      for (auto& r : record) r.clear();
      auto body = [&] {
        const uint64_t t = threadIdx.x + uint64_t(block.x) * (threadIdx.y + uint64_t(block.y) * threadIdx.z);
        smem_record = record.empty() ? nullptr : &record[t];
        K::template run<decltype(phase)::value>(p, sp);
      };
      const size_t nt = thread_order.size();
      if constexpr (kFibers) {
        const std::function<void()> fn = body;
        const size_t warps = (nt + 31) / 32;
        for (size_t j = 0; j < warps; ++j) {
          const size_t w = schedule_seed != 0 ? warps - 1 - j : j;
          const std::vector<dim3> tids(thread_order.begin() + w * 32, thread_order.begin() + std::min(nt, w * 32 + 32));
          run_warp_synchronous(tids, fn, stacks, kStackBytes);
        }
      } else {
        for (size_t j = 0; j < nt; ++j) {
          threadIdx = thread_order[schedule_seed != 0 ? nt - 1 - j : j];
          body();
        }
      }
      smem_record = nullptr;
      if (!record.empty()) cost_bank_accesses(record, decltype(phase)::value);
    };
    run_phase(std::integral_constant<int, 0>{});
    if constexpr (K::kPhases == 2) run_phase(std::integral_constant<int, 1>{});
  }
  return cudaSuccess;
}

}  // namespace resfused::emu
