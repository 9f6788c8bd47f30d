// CUDA bindings of training-mode BatchNorm(+ReLU) (schemas in ../schemas/bn_train_schema.cpp). Host code only:
// kernels in bn_train_kernels.cu, checks and launches in bn_train_host.h (shared with the
// emulated test build).
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cusparse.h, absent from the toolkit
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/bn_train_host.h"

namespace resfused::cuda {
namespace {

void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "resfused.", op, " (CUDA kernel): '", name, "' must be a CUDA tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_act(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& bias, double eps, bool relu) {
  check_cuda_tensor(x, "bn_train_act", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return bn_train_act_impl(x, weight, bias, eps, relu, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                     const at::Tensor& weight, const at::Tensor& bias,
                                                                     const at::Tensor& mean, const at::Tensor& var,
                                                                     double eps, bool relu) {
  check_cuda_tensor(x, "bn_train_act_backward", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return bn_train_act_backward_impl(grad_out, x, weight, bias, mean, var, eps, relu, c10::cuda::getCurrentCUDAStream());
}

}  // namespace
}  // namespace resfused::cuda

TORCH_LIBRARY_IMPL(resfused, CUDA, m) {
  m.impl("bn_train_act", &resfused::cuda::bn_train_act);
  m.impl("bn_train_act_backward", &resfused::cuda::bn_train_act_backward);
}
