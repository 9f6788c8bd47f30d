// Host side of the CUDA tails: checks (the messages of cpu/tails.cpp), layout, allocation,
// dtype dispatch and launches. Shared by the real binding (tails.cu) and the emulated test
// build (csrc/emulation), so checks and launch configuration are tested on the CPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "common.h"
#include "cuda/grouped_conv3x3_host.h"  // Native<>, kernel_ptr<>
#include "cuda/kernels/tails_config.cuh"

namespace resfused::cuda {

inline void check_launch(cudaError_t err, const char* op, const at::Tensor& x) {
  TORCH_CHECK(err == cudaSuccess, "resfused.", op, ": CUDA launch failed for a tensor of shape ", x.sizes(), " (",
              cudaGetErrorString(err), ")");
}

// Elements between consecutive channels in a dense tensor of x's suggested memory format.
inline int64_t channel_inner(const at::Tensor& x) {
  if (channels_innermost(x)) return 1;
  int64_t spatial = 1;
  for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
  return spatial;
}

// The SM count of x's device: the per-channel reduction grids (channel_reduce_config) are sized
// to about two blocks per SM.
inline int device_sm_count(const at::Tensor& x, const char* op) {
#ifdef RESFUSED_EMULATION
  (void)x;
  (void)op;
  return emu::sm_count;
#else
  int sms = 0;
  const cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device());
  TORCH_CHECK(e == cudaSuccess, "resfused.", op, ": cannot query the SM count of ", x.device(), " (",
              cudaGetErrorString(e), ")");
  return sms;
#endif
}

template <class Launch>
at::Tensor binary_impl(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name, const char* op,
                       cudaStream_t stream, Launch launch) {
  check_activation(b, b_name);
  check_same_device(b, b_name, a, a_name);
  check_same_dtype(b, b_name, a, a_name);
  TORCH_CHECK(a.sizes() == b.sizes(), "resfused.", op, ": '", a_name, "' must have the shape of '", b_name, "' ",
              b.sizes(), ", got ", a.sizes());
  const auto fmt = b.suggest_memory_format();  // the layout of x (add_relu) / out (backward)
  const auto ac = a.contiguous(fmt), bc = b.contiguous(fmt);
  auto out = at::empty_like(bc, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "resfused_binary_tail", [&] {
    using T = typename Native<scalar_t>::type;
    BinaryArgs<T> args;
    args.a = kernel_ptr<const T, scalar_t>(ac, a_name);
    args.b = kernel_ptr<const T, scalar_t>(bc, b_name);
    args.out = kernel_ptr<T, scalar_t>(out, "out");
    args.n = bc.numel();
    args.vec = aligned_to(ac.const_data_ptr(), 16) && aligned_to(bc.const_data_ptr(), 16) &&
               aligned_to(out.const_data_ptr(), 16);
    check_launch(launch(args, stream), op, b);
  });
  return out;
}

inline at::Tensor add_relu_impl(const at::Tensor& x, const at::Tensor& residual, cudaStream_t stream) {
  // binary_impl(a, b): out = relu(a + b) with b's layout; x is the tensor that sets the layout.
  return binary_impl(residual, "residual", x, "x", "add_relu", stream,
                     [](auto args, cudaStream_t s) { return launch_add_relu(args, s); });
}

inline at::Tensor add_relu_backward_impl(const at::Tensor& grad_out, const at::Tensor& out, cudaStream_t stream) {
  return binary_impl(grad_out, "grad_out", out, "out", "add_relu_backward", stream,
                     [](auto args, cudaStream_t s) { return launch_add_relu_backward(args, s); });
}

inline void check_scale_shift(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_activation(x, "x");
  check_channel_vector(scale, "scale", x, "x");
  check_channel_vector(shift, "shift", x, "x");
}

// Fills the fields of ScaleShiftArgs common to forward and backward.
template <class T, class S>
ScaleShiftArgs<T> scale_shift_args(const at::Tensor& xc, const at::Tensor& sc, const at::Tensor& sh, bool relu) {
  ScaleShiftArgs<T> a;
  a.x = kernel_ptr<const T, S>(xc, "x");
  a.scale = kernel_ptr<const acc_t<T>, acc_t<T>>(sc, "scale");
  a.shift = kernel_ptr<const acc_t<T>, acc_t<T>>(sh, "shift");
  a.n = xc.numel();
  a.C = xc.size(1);
  a.inner = channel_inner(xc);
  a.relu = relu;
  return a;
}

inline at::Tensor scale_shift_act_impl(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                                       cudaStream_t stream) {
  check_scale_shift(x, scale, shift);
  const auto fmt = x.suggest_memory_format();
  const auto xc = x.contiguous(fmt);
  auto out = at::empty_like(xc, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_act", [&] {
    using T = typename Native<scalar_t>::type;
    constexpr auto acc_type = c10::CppTypeToScalarType<acc_t<scalar_t>>::value;
    const auto sc = scale.to(acc_type).contiguous(), sh = shift.to(acc_type).contiguous();
    auto a = scale_shift_args<T, scalar_t>(xc, sc, sh, relu);
    a.out = kernel_ptr<T, scalar_t>(out, "out");
    a.vec = aligned_to(xc.const_data_ptr(), 16) && aligned_to(out.const_data_ptr(), 16) &&
            scale_shift_vec_ok<T>(a.C, a.inner);
    check_launch(launch_scale_shift_act(a, stream), "scale_shift_act", x);
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_act_backward_impl(const at::Tensor& grad_out,
                                                                                    const at::Tensor& x,
                                                                                    const at::Tensor& scale,
                                                                                    const at::Tensor& shift, bool relu,
                                                                                    cudaStream_t stream) {
  check_scale_shift(x, scale, shift);
  check_same_device(x, "x", grad_out, "grad_out");
  check_same_dtype(x, "x", grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(),
              "resfused.scale_shift_act_backward: 'grad_out' must have the shape of 'x' ", x.sizes(), ", got ",
              grad_out.sizes());
  const auto fmt = x.suggest_memory_format();
  const auto xc = x.contiguous(fmt), gc = grad_out.contiguous(fmt);
  auto grad_x = at::empty_like(xc, fmt);
  at::Tensor grad_scale, grad_shift;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scale_shift_act_backward", [&] {
    using T = typename Native<scalar_t>::type;
    constexpr auto acc_type = c10::CppTypeToScalarType<acc_t<scalar_t>>::value;
    const auto sc = scale.to(acc_type).contiguous(), sh = shift.to(acc_type).contiguous();
    auto a = scale_shift_args<T, scalar_t>(xc, sc, sh, relu);
    a.grad = kernel_ptr<const T, scalar_t>(gc, "grad_out");
    a.out = kernel_ptr<T, scalar_t>(grad_x, "grad_x");
    a.vec = aligned_to(xc.const_data_ptr(), 16) && aligned_to(gc.const_data_ptr(), 16) &&
            aligned_to(grad_x.const_data_ptr(), 16) && scale_shift_vec_ok<T>(a.C, a.inner);
    a.sms = device_sm_count(xc, "scale_shift_act_backward");
    scale_shift_backward_config(a);  // sets a.slots (the partial buffer's size) from a.vec and a.sms
    auto partial = at::empty({a.slots, 2, a.C}, xc.options().dtype(acc_type));
    auto totals = at::empty({2, a.C}, xc.options().dtype(acc_type));
    a.partial = kernel_ptr<acc_t<T>, acc_t<scalar_t>>(partial, "partial sums");
    a.totals = kernel_ptr<acc_t<T>, acc_t<scalar_t>>(totals, "totals");
    check_launch(launch_scale_shift_act_backward(a, stream), "scale_shift_act_backward", x);
    // Own storage for each output (outputs of an op must not alias one another).
    grad_scale = totals[0].to(scale.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
    grad_shift = totals[1].to(shift.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  });
  return {grad_x, grad_scale, grad_shift};
}

}  // namespace resfused::cuda
