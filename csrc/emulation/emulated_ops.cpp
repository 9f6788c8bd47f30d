// TEST-ONLY extension: the CUDA kernel sources of csrc/cuda, compiled as host C++ under
// cuda_emulation.h, registered as torch.ops.resfused_emu.* on CPU tensors. The host code (checks,
// layout, launch configuration) is the very code of the CUDA bindings (csrc/cuda/*_host.h).
// Built by tests/test_cuda_emulation.py with torch.utils.cpp_extension.load; not in setup.py.
#include "emulation/cuda_emulation.h"

#include <torch/library.h>

#include "cuda/grouped_conv3x3_host.h"
#include "cuda/kernels/grouped_conv3x3.cuh"
#include "cuda/kernels/tails.cuh"
#include "cuda/kernels/bn_train.cuh"
#include "cuda/bn_train_host.h"
#include "cuda/tails_host.h"

namespace resfused::emu_ops {
namespace {

using namespace resfused::cuda;

// Checked-pointer failures become ordinary torch errors (RuntimeError in Python).
template <class F>
auto guarded(F f) {
  try {
    return f();
  } catch (const emu::BoundsError& e) {
    TORCH_CHECK(false, "resfused emulation: ", e.what());
  }
}

at::Tensor grouped_conv3x3(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t stride,
                           bool relu) {
  return guarded([&] { return grouped_conv3x3_impl(x, w, b, stride, relu, nullptr); });
}

// Shared-memory bank accounting of one grouped conv call (emulation/cuda_emulation.h, BankStats):
// [requests, wavefronts, ideal wavefronts, worst wavefronts of one 128-byte phase] for phase 0
// (staging) then phase 1 (compute).
std::vector<int64_t> grouped_conv3x3_bank_stats(const at::Tensor& x, const at::Tensor& w,
                                                const std::optional<at::Tensor>& b, int64_t stride, bool relu) {
  emu::BankStats st;
  emu::bank_stats = &st;
  struct Off {
    ~Off() { emu::bank_stats = nullptr; }
  } off;
  guarded([&] { return grouped_conv3x3_impl(x, w, b, stride, relu, nullptr); });
  return {st.requests[0], st.wavefronts[0], st.ideal[0], st.worst[0],
          st.requests[1], st.wavefronts[1], st.ideal[1], st.worst[1]};
}

// The launch configuration for a shape: [tile_h, grid.x, grid.y, block.x, smem_bytes, vec_io].
std::vector<int64_t> grouped_conv3x3_config(int64_t N, int64_t C, int64_t H, int64_t W, int64_t cpg, int64_t stride) {
  GroupedConvArgs<float> a;
  a.N = N, a.C = C, a.H = H, a.W = W, a.cpg = static_cast<int>(cpg), a.stride = static_cast<int>(stride);
  a.OH = (H - 1) / stride + 1, a.OW = (W - 1) / stride + 1;
  LaunchConfig cfg;
  alignas(16) static float dummy[4];
  bool ok = false;
  switch (cpg) {
    case 4:
      ok = grouped_conv_config<4>(a, cfg, dummy, dummy, dummy);
      break;
    case 8:
      ok = grouped_conv_config<8>(a, cfg, dummy, dummy, dummy);
      break;
    case 16:
      ok = grouped_conv_config<16>(a, cfg, dummy, dummy, dummy);
      break;
    case 32:
      ok = grouped_conv_config<32>(a, cfg, dummy, dummy, dummy);
      break;
    default:
      TORCH_CHECK(false, "cpg must be 4, 8, 16 or 32");
  }
  TORCH_CHECK(ok, "shape exceeds the launch limits");
  return {a.tile_h, cfg.grid.x, cfg.grid.y, cfg.block.x, static_cast<int64_t>(cfg.smem_bytes), a.vec_io};
}

at::Tensor add_relu(const at::Tensor& x, const at::Tensor& r) {
  return guarded([&] { return add_relu_impl(x, r, nullptr); });
}
at::Tensor add_relu_backward(const at::Tensor& g, const at::Tensor& o) {
  return guarded([&] { return add_relu_backward_impl(g, o, nullptr); });
}
at::Tensor scale_shift_act(const at::Tensor& x, const at::Tensor& s, const at::Tensor& b, bool relu) {
  return guarded([&] { return scale_shift_act_impl(x, s, b, relu, nullptr); });
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_act_backward(const at::Tensor& g, const at::Tensor& x,
                                                                        const at::Tensor& s, const at::Tensor& b,
                                                                        bool relu) {
  return guarded([&] { return scale_shift_act_backward_impl(g, x, s, b, relu, nullptr); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_act(const at::Tensor& x, const at::Tensor& w,
                                                            const at::Tensor& b, double eps, bool relu) {
  return guarded([&] { return bn_train_act_impl(x, w, b, eps, relu, nullptr); });
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_act_backward(const at::Tensor& g, const at::Tensor& x,
                                                                     const at::Tensor& w, const at::Tensor& b,
                                                                     const at::Tensor& mean, const at::Tensor& var,
                                                                     double eps, bool relu) {
  return guarded([&] { return bn_train_act_backward_impl(g, x, w, b, mean, var, eps, relu, nullptr); });
}

// The reduction launch of the training BN for a shape: [grid.x, grid.y, block.x, block.y,
// smem_bytes, slots]; elem_bytes picks the dtype (2: half, 4: float, 8: double).
std::vector<int64_t> bn_train_reduce_config(int64_t n, int64_t C, int64_t inner, bool vec, int64_t sms,
                                            int64_t elem_bytes) {
  auto get = [&](auto a) -> std::vector<int64_t> {
    a.n = n, a.C = C, a.inner = inner, a.vec = vec, a.sms = static_cast<int>(sms);
    const LaunchConfig c = bn_reduce_config(a);
    return {c.grid.x, c.grid.y, c.block.x, c.block.y, static_cast<int64_t>(c.smem_bytes), a.slots};
  };
  if (elem_bytes == 2) return get(BnTrainArgs<half_t>{});
  if (elem_bytes == 8) return get(BnTrainArgs<double>{});
  TORCH_CHECK(elem_bytes == 4, "elem_bytes must be 2, 4 or 8");
  return get(BnTrainArgs<float>{});
}

// The same for the tails backward's reduction (scale_shift_act_backward), which sizes its grid
// with the same channel_reduce_config.
std::vector<int64_t> scale_shift_backward_reduce_config(int64_t n, int64_t C, int64_t inner, bool vec, int64_t sms,
                                                        int64_t elem_bytes) {
  auto get = [&](auto a) -> std::vector<int64_t> {
    a.n = n, a.C = C, a.inner = inner, a.vec = vec, a.sms = static_cast<int>(sms);
    const LaunchConfig c = scale_shift_backward_config(a);
    return {c.grid.x, c.grid.y, c.block.x, c.block.y, static_cast<int64_t>(c.smem_bytes), a.slots};
  };
  if (elem_bytes == 2) return get(ScaleShiftArgs<half_t>{});
  if (elem_bytes == 8) return get(ScaleShiftArgs<double>{});
  TORCH_CHECK(elem_bytes == 4, "elem_bytes must be 2, 4 or 8");
  return get(ScaleShiftArgs<float>{});
}

// Sets the emulated device's SM count and the launch schedule seed (cuda_emulation.h); returns
// the previous [sm_count, schedule_seed].
std::vector<int64_t> emulator_configure(int64_t sm_count, int64_t schedule_seed) {
  TORCH_CHECK(sm_count >= 1 && schedule_seed >= 0, "sm_count >= 1, schedule_seed >= 0");
  std::vector<int64_t> old{emu::sm_count, static_cast<int64_t>(emu::schedule_seed)};
  emu::sm_count = static_cast<int>(sm_count);
  emu::schedule_seed = static_cast<uint64_t>(schedule_seed);
  return old;
}

// Self-test of the emulator itself, so that its checks are known to fire:
//   mode 0: block-reverse through shared memory across a barrier (correct kernel; returns it)
//   mode 1: global read one past the end   mode 2: misaligned 16-byte load
//   mode 3: shared write past the buffer   mode 4: phase 1 reads shared memory nobody wrote (NaN)
//   mode 5: out[0] = the index of the block that ran last (shows the schedule order)
struct SelfTestArgs {
  gptr<const float> in;
  gptr<float> out;
  int mode;
};
struct SelfTestKernel {
  using Params = SelfTestArgs;
  static constexpr int kPhases = 2, kMaxThreads = 32;
  template <int Phase>
  static void run(const Params& a, gptr<float> smem) {
    const int t = threadIdx.x, n = blockDim.x;
    const int64_t g = int64_t(blockIdx.x) * n + t;
    if (a.mode == 5) {  // a race: every block's thread 0 writes out[0]; the last block run wins
      if (Phase == 0 && t == 0) a.out[0] = static_cast<float>(blockIdx.x);
      return;
    }
    if constexpr (Phase == 0) {
      if (a.mode == 1 && t == n - 1)
        smem[t] = a.in[g + 1];
      else if (a.mode == 2)
        smem[t] = load_pack<4>(a.in, 1).v[0];
      else if (a.mode == 3)
        smem[t + 1] = a.in[g];
      else if (a.mode != 4)
        smem[t] = a.in[g];
    } else {
      a.out[g] = smem[n - 1 - t];
    }
  }
};

at::Tensor emulator_selftest(const at::Tensor& in, int64_t mode) {
  TORCH_CHECK(in.dim() == 1 && in.numel() % 32 == 0 && in.scalar_type() == at::kFloat, "in: float [k*32]");
  auto out = at::empty_like(in);
  SelfTestArgs a{gptr<const float>(in.const_data_ptr<float>(), in.numel(), "in"),
                 gptr<float>(out.data_ptr<float>(), out.numel(), "out"), static_cast<int>(mode)};
  return guarded([&] {
    const auto err = emu::launch<SelfTestKernel>(dim3(in.numel() / 32), dim3(32), 32 * sizeof(float), a);
    TORCH_CHECK(err == cudaSuccess, "launch failed");
    return out;
  });
}

// Warp shuffles: each thread takes in[g] and sums it over the lanes sharing (lane % first) with
// warp_sum_xor. mode 0: all lanes take part; mode 1: lane 5 of each warp exits first (a
// shuffle with an exited lane must throw); the block size is `block` (a partial warp throws).
struct ShuffleTestArgs {
  gptr<const float> in;
  gptr<float> out;
  int first, mode;
};
struct ShuffleTestKernel {
  using Params = ShuffleTestArgs;
  static constexpr int kPhases = 1, kMaxThreads = 1024;
  static constexpr bool kWarpSync = true;
  template <int>
  static void run(const Params& a, gptr<float>) {
    const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (a.mode == 1 && threadIdx.x % 32 == 5) return;
    float v[1] = {a.in[g]};
    warp_sum_xor(v, a.first);
    a.out[g] = v[0];
  }
};

at::Tensor emulator_shuffle_selftest(const at::Tensor& in, int64_t first, int64_t mode, int64_t block) {
  TORCH_CHECK(in.dim() == 1 && in.numel() % block == 0 && in.scalar_type() == at::kFloat, "in: float [k*block]");
  auto out = at::full_like(in, std::numeric_limits<float>::quiet_NaN());
  ShuffleTestArgs a{gptr<const float>(in.const_data_ptr<float>(), in.numel(), "in"),
                    gptr<float>(out.data_ptr<float>(), out.numel(), "out"), static_cast<int>(first),
                    static_cast<int>(mode)};
  return guarded([&] {
    const auto err = emu::launch<ShuffleTestKernel>(dim3(in.numel() / block), dim3(block), 0, a);
    TORCH_CHECK(err == cudaSuccess, "launch failed");
    return out;
  });
}

// Bank accounting: one warp, each lane accesses `width` floats at float index lane * stride.
struct BankTestArgs {
  int stride, width;
};
struct BankTestKernel {
  using Params = BankTestArgs;
  static constexpr int kPhases = 1, kMaxThreads = 32;
  template <int>
  static void run(const Params& a, gptr<float> smem) {
    const int64_t i = int64_t(threadIdx.x) * a.stride;
    if (a.width == 4)
      store_pack<4>(smem, i, Pack<float, 4>{{1.f, 1.f, 1.f, 1.f}});
    else if (a.width == 2)
      store_pack<2>(smem, i, Pack<float, 2>{{1.f, 1.f}});
    else
      smem[i] = 1.f;
  }
};

std::vector<int64_t> emulator_bank_selftest(int64_t stride, int64_t width) {
  emu::BankStats st;
  emu::bank_stats = &st;
  struct Off {
    ~Off() { emu::bank_stats = nullptr; }
  } off;
  BankTestArgs a{static_cast<int>(stride), static_cast<int>(width)};
  const size_t bytes = (32 * static_cast<size_t>(stride) + 4) * sizeof(float);
  guarded([&] { return emu::launch<BankTestKernel>(dim3(1), dim3(32), bytes, a); });
  return {st.requests[0], st.wavefronts[0], st.ideal[0], st.worst[0]};
}

}  // namespace
}  // namespace resfused::emu_ops

TORCH_LIBRARY(resfused_emu, m) {
  using namespace resfused::emu_ops;
  m.def("grouped_conv3x3(Tensor x, Tensor weight, Tensor? bias, int stride, bool relu) -> Tensor", &grouped_conv3x3);
  m.def("grouped_conv3x3_bank_stats(Tensor x, Tensor weight, Tensor? bias, int stride, bool relu) -> int[]",
        &grouped_conv3x3_bank_stats);
  m.def("grouped_conv3x3_config(int N, int C, int H, int W, int cpg, int stride) -> int[]", &grouped_conv3x3_config);
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor", &add_relu);
  m.def("add_relu_backward(Tensor grad_out, Tensor out) -> Tensor", &add_relu_backward);
  m.def("scale_shift_act(Tensor x, Tensor scale, Tensor shift, bool relu) -> Tensor", &scale_shift_act);
  m.def(
      "scale_shift_act_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, bool relu) -> (Tensor, Tensor, "
      "Tensor)",
      &scale_shift_act_backward);
  m.def("bn_train_act(Tensor x, Tensor weight, Tensor bias, float eps, bool relu) -> (Tensor, Tensor, Tensor)",
        &bn_train_act);
  m.def(
      "bn_train_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor var, float "
      "eps, bool relu) -> (Tensor, Tensor, Tensor)",
      &bn_train_act_backward);
  m.def("emulator_selftest(Tensor input, int mode) -> Tensor", &emulator_selftest);
  m.def("emulator_configure(int sm_count, int schedule_seed) -> int[]", &emulator_configure);
  m.def("bn_train_reduce_config(int n, int C, int inner, bool vec, int sms, int elem_bytes) -> int[]",
        &bn_train_reduce_config);
  m.def("scale_shift_backward_reduce_config(int n, int C, int inner, bool vec, int sms, int elem_bytes) -> int[]",
        &scale_shift_backward_reduce_config);
  m.def("emulator_shuffle_selftest(Tensor input, int first, int mode, int block) -> Tensor",
        &emulator_shuffle_selftest);
  m.def("emulator_bank_selftest(int stride, int width) -> int[]", &emulator_bank_selftest);
}
