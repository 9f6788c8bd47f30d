// CUDA binding of resfused::grouped_conv3x3 (schema in ../schemas/grouped_conv3x3_schema.cpp). Host code only:
// the kernels are compiled in grouped_conv3x3_kernels.cu, the checks and launch live in
// grouped_conv3x3_host.h (shared with the emulated test build).
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs cusparse.h, absent from the toolkit
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/grouped_conv3x3_host.h"

namespace resfused::cuda {
namespace {

at::Tensor grouped_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t stride, bool relu) {
  TORCH_CHECK(x.is_cuda(), "resfused.grouped_conv3x3 (CUDA kernel): 'x' must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return grouped_conv3x3_impl(x, weight, bias, stride, relu, c10::cuda::getCurrentCUDAStream());
}

}  // namespace
}  // namespace resfused::cuda

TORCH_LIBRARY_IMPL(resfused, CUDA, m) { m.impl("grouped_conv3x3", &resfused::cuda::grouped_conv3x3); }
