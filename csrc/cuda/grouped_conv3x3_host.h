// Host side of the CUDA grouped 3x3 convolution: argument checks, output allocation, dtype
// dispatch and the launch. Shared by the real binding (grouped_conv3x3.cu) and the emulated
// test build (csrc/emulation), so the checks and the launch configuration are tested too.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>

#include "common.h"
#include "cuda/kernels/grouped_conv3x3_config.cuh"
#include "grouped_conv_checks.h"

namespace resfused::cuda {

// ATen element type -> the kernels' element type (cuda_fp16 types in CUDA, c10 types on host).
template <class S>
struct Native {
  using type = S;
};
#ifndef RESFUSED_EMULATION
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};
#endif

// A kernel pointer to the dense storage of `t` (raw in CUDA, bounds-checked on host).
template <class T, class S>
gptr<T> kernel_ptr(const at::Tensor& t, const char* name) {
  S* p;
  if constexpr (std::is_const_v<T>)
    p = const_cast<S*>(t.const_data_ptr<S>());  // read-only inputs
  else
    p = t.data_ptr<S>();
#ifdef RESFUSED_EMULATION
  return gptr<T>(reinterpret_cast<T*>(p), t.numel(), name);
#else
  (void)name;
  return reinterpret_cast<T*>(p);
#endif
}

inline bool grouped_cpg_supported(int64_t cpg) { return cpg == 4 || cpg == 8 || cpg == 16 || cpg == 32; }

inline void check_grouped_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               int64_t stride) {
  check_grouped_conv3x3_args(x, weight, bias, stride);
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "resfused.grouped_conv3x3 (CUDA kernel): 'x' must be float32, float16 or bfloat16, got float64");
  const int64_t C = x.size(1), cpg = weight.size(1);
  TORCH_CHECK(grouped_cpg_supported(cpg),
              "resfused.grouped_conv3x3 (CUDA kernel): channels per group (weight.size(1)) "
              "must be 4, 8, 16 or 32, got ",
              cpg);
  TORCH_CHECK(weight.size(0) == C, "resfused.grouped_conv3x3 (CUDA kernel): 'weight' must have C_out == C_in == ", C,
              " (as many output as input channels per group), got C_out = ", weight.size(0));
  TORCH_CHECK(stride == 1 || stride == 2, "resfused.grouped_conv3x3 (CUDA kernel): 'stride' must be 1 or 2, got ",
              stride);
}

inline at::Tensor grouped_conv3x3_impl(const at::Tensor& x_in, const at::Tensor& weight_in,
                                       const std::optional<at::Tensor>& bias_in, int64_t stride, bool relu,
                                       cudaStream_t stream) {
  check_grouped_args(x_in, weight_in, bias_in, stride);
  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);  // NHWC storage
  const auto w = weight_in.contiguous();                           // OIHW
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const auto bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t OH = (H - 1) / stride + 1, OW = (W - 1) / stride + 1;  // padding 1, kernel 3
  auto y = at::empty({N, C, OH, OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfused_grouped_conv3x3_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      using T = typename Native<scalar_t>::type;
      GroupedConvArgs<T> a;
      a.x = kernel_ptr<const T, scalar_t>(x, "x");
      a.w = kernel_ptr<const T, scalar_t>(w, "weight");
      if (has_bias) a.bias = kernel_ptr<const T, scalar_t>(bias, "bias");
      a.y = kernel_ptr<T, scalar_t>(y, "y");
      a.N = N, a.H = H, a.W = W, a.C = C, a.OH = OH, a.OW = OW;
      a.cpg = static_cast<int>(w.size(1));
      a.stride = static_cast<int>(stride);
      a.has_bias = has_bias;
      a.relu = relu;
      const cudaError_t err = launch_grouped_conv3x3<T>(a, stream);
      TORCH_CHECK(err == cudaSuccess, "resfused.grouped_conv3x3: CUDA launch failed for x of shape ", x.sizes(), " (",
                  cudaGetErrorString(err), ")");
    }
  });
  return y;
}

}  // namespace resfused::cuda
