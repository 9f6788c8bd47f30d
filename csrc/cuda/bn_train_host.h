// Host side of the CUDA training-mode BatchNorm(+ReLU): checks (the messages of
// cpu/bn_train.cpp), layout, allocation, dtype dispatch and launches. Shared by the real binding
// (bn_train.cu) and the emulated test build (csrc/emulation), so both are tested on the CPU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "common.h"
#include "cuda/kernels/bn_train_config.cuh"
#include "cuda/tails_host.h"  // check_launch, channel_inner, Native<>, kernel_ptr<>

namespace resfused::cuda {

inline void check_bn_train_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_activation(x, "x");
  check_channel_vector(weight, "weight", x, "x");
  check_channel_vector(bias, "bias", x, "x");
  TORCH_CHECK(eps >= 0, "resfused.bn_train_act: 'eps' must be >= 0, got ", eps);
}

// The fields common to forward and backward; weight/bias as double (the affine math is double).
template <class T, class S>
BnTrainArgs<T> bn_train_args(const at::Tensor& xc, const at::Tensor& w64, const at::Tensor& b64, double eps,
                             bool relu) {
  BnTrainArgs<T> a;
  a.x = kernel_ptr<const T, S>(xc, "x");
  a.weight = kernel_ptr<const double, double>(w64, "weight");
  a.bias = kernel_ptr<const double, double>(b64, "bias");
  a.n = xc.numel();
  a.C = xc.size(1);
  a.inner = channel_inner(xc);
  a.eps = eps;
  a.relu = relu;
  a.sms = device_sm_count(xc, "bn_train_act");
  return a;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_act_impl(const at::Tensor& x, const at::Tensor& weight,
                                                                        const at::Tensor& bias, double eps, bool relu,
                                                                        cudaStream_t stream) {
  check_bn_train_args(x, weight, bias, eps);
  const auto fmt = x.suggest_memory_format();
  const auto xc = x.contiguous(fmt);
  const int64_t C = xc.size(1);
  TORCH_CHECK(C > 0 && xc.numel() / C > 1, "Expected more than 1 value per channel when training, got input size ",
              x.sizes());
  const auto w64 = weight.to(at::kDouble).contiguous(), b64 = bias.to(at::kDouble).contiguous();
  at::Tensor y, mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "resfused_bn_train_act_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    using A = acc_t<scalar_t>;
    const auto stats_opts = xc.options().dtype(c10::CppTypeToScalarType<A>::value);
    auto a = bn_train_args<T, scalar_t>(xc, w64, b64, eps, relu);
    y = at::empty_like(xc, fmt);
    a.vec = aligned_to(xc.const_data_ptr(), 16) && aligned_to(y.const_data_ptr(), 16) &&
            scale_shift_vec_ok<T>(a.C, a.inner);
    bn_reduce_config(a);  // sets a.slots (the size of the partial-sum buffer) from a.vec and a.sms
    auto partial = at::empty({a.slots, 2, C}, stats_opts);
    auto coef = at::empty({2, C}, stats_opts);
    mean = at::empty({C}, stats_opts);
    var = at::empty({C}, stats_opts);
    a.partial = kernel_ptr<A, A>(partial, "partial sums");
    a.coef = kernel_ptr<A, A>(coef, "coef");
    a.mean = kernel_ptr<A, A>(mean, "mean");
    a.var = kernel_ptr<A, A>(var, "var");
    a.out = kernel_ptr<T, scalar_t>(y, "y");
    check_launch(launch_bn_train_forward(a, stream), "bn_train_act", x);
  });
  return {y, mean, var};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_act_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& var, double eps, bool relu, cudaStream_t stream) {
  check_bn_train_args(x, weight, bias, eps);
  check_channel_vector(mean, "mean", x, "x");
  check_channel_vector(var, "var", x, "x");
  check_like(x, "x", grad_out, "grad_out", "bn_train_act_backward");
  const auto fmt = x.suggest_memory_format();
  const auto xc = x.contiguous(fmt), gc = grad_out.contiguous(fmt);
  const int64_t C = xc.size(1);
  const auto w64 = weight.to(at::kDouble).contiguous(), b64 = bias.to(at::kDouble).contiguous();
  auto grad_x = at::empty_like(xc, fmt);
  at::Tensor grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "resfused_bn_train_act_backward_cuda", [&] {
        using T = typename Native<scalar_t>::type;
        using A = acc_t<scalar_t>;
        const auto stats_opts = xc.options().dtype(c10::CppTypeToScalarType<A>::value);
        const auto mean_a = mean.to(stats_opts.dtype()).contiguous(), var_a = var.to(stats_opts.dtype()).contiguous();
        auto a = bn_train_args<T, scalar_t>(xc, w64, b64, eps, relu);
        a.grad = kernel_ptr<const T, scalar_t>(gc, "grad_out");
        a.out = kernel_ptr<T, scalar_t>(grad_x, "grad_x");
        // The backward kernels only read mean/var (the forward's statistics).
        a.mean = kernel_ptr<A, A>(mean_a, "mean");
        a.var = kernel_ptr<A, A>(var_a, "var");
        a.vec = aligned_to(xc.const_data_ptr(), 16) && aligned_to(gc.const_data_ptr(), 16) &&
                aligned_to(grad_x.const_data_ptr(), 16) && scale_shift_vec_ok<T>(a.C, a.inner);
        bn_reduce_config(a);  // after a.vec: the vector width shapes the grid
        auto partial = at::empty({a.slots, 2, C}, stats_opts);
        auto coef = at::empty({4, C}, stats_opts);
        auto totals = at::empty({2, C}, stats_opts);
        a.partial = kernel_ptr<A, A>(partial, "partial sums");
        a.coef = kernel_ptr<A, A>(coef, "coef");
        a.totals = kernel_ptr<A, A>(totals, "totals");
        check_launch(launch_bn_train_backward(a, stream), "bn_train_act_backward", x);
        // Own storage for each output (outputs of an op must not alias one another).
        grad_weight = totals[0].to(weight.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
        grad_bias = totals[1].to(bias.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
      });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace resfused::cuda
