// Device code of the elementwise tails, free of torch headers (see grouped_conv3x3_kernels.cu).
#include "cuda/kernels/tails.cuh"

namespace resfused::cuda {
#define RESFUSED_TAILS_INSTANTIATE(T)                                              \
  template cudaError_t launch_add_relu<T>(BinaryArgs<T>, cudaStream_t);            \
  template cudaError_t launch_add_relu_backward<T>(BinaryArgs<T>, cudaStream_t);   \
  template cudaError_t launch_scale_shift_act<T>(ScaleShiftArgs<T>, cudaStream_t); \
  template cudaError_t launch_scale_shift_act_backward<T>(ScaleShiftArgs<T>, cudaStream_t);
RESFUSED_TAILS_INSTANTIATE(float)
RESFUSED_TAILS_INSTANTIATE(double)
RESFUSED_TAILS_INSTANTIATE(half_t)
RESFUSED_TAILS_INSTANTIATE(bf16_t)
#undef RESFUSED_TAILS_INSTANTIATE
}  // namespace resfused::cuda
