// Device code of training-mode BatchNorm(+ReLU), free of torch headers (see grouped_conv3x3_kernels.cu).
#include "cuda/kernels/bn_train.cuh"

namespace resfused::cuda {
#define RESFUSED_BN_TRAIN_INSTANTIATE(T)                                         \
  template cudaError_t launch_bn_train_forward<T>(BnTrainArgs<T>, cudaStream_t); \
  template cudaError_t launch_bn_train_backward<T>(BnTrainArgs<T>, cudaStream_t);
RESFUSED_BN_TRAIN_INSTANTIATE(float)
RESFUSED_BN_TRAIN_INSTANTIATE(double)
RESFUSED_BN_TRAIN_INSTANTIATE(half_t)
RESFUSED_BN_TRAIN_INSTANTIATE(bf16_t)
#undef RESFUSED_BN_TRAIN_INSTANTIATE
}  // namespace resfused::cuda
