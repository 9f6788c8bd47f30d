// CUDA bindings of the elementwise tails (schemas in ../schemas/tails_schema.cpp). Host code only: kernels in
// tails_kernels.cu, checks and launches in tails_host.h (shared with the emulated test build).
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cusparse.h, absent from the toolkit
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/tails_host.h"

namespace resfused::cuda {
namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "resfused.", op, " (CUDA kernel): '", name, "' must be a CUDA tensor, got ", t.device());
}

at::Tensor add_relu(const at::Tensor& x, const at::Tensor& residual) {
  check_cuda(x, "add_relu", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return add_relu_impl(x, residual, c10::cuda::getCurrentCUDAStream());
}

at::Tensor add_relu_backward(const at::Tensor& grad_out, const at::Tensor& out) {
  check_cuda(out, "add_relu_backward", "out");
  const c10::cuda::CUDAGuard guard(out.device());
  return add_relu_backward_impl(grad_out, out, c10::cuda::getCurrentCUDAStream());
}

at::Tensor scale_shift_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  check_cuda(x, "scale_shift_act", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return scale_shift_act_impl(x, scale, shift, relu, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                        const at::Tensor& scale,
                                                                        const at::Tensor& shift, bool relu) {
  check_cuda(x, "scale_shift_act_backward", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return scale_shift_act_backward_impl(grad_out, x, scale, shift, relu, c10::cuda::getCurrentCUDAStream());
}

}  // namespace
}  // namespace resfused::cuda

TORCH_LIBRARY_IMPL(resfused, CUDA, m) {
  m.impl("add_relu", &resfused::cuda::add_relu);
  m.impl("add_relu_backward", &resfused::cuda::add_relu_backward);
  m.impl("scale_shift_act", &resfused::cuda::scale_shift_act);
  m.impl("scale_shift_act_backward", &resfused::cuda::scale_shift_act_backward);
}
