// Device code of the grouped 3x3 convolution, free of torch headers so that nvcc compiles it in
// seconds (tests/test_cuda_build.py checks it for spills). One instantiation per dtype; each
// covers channels per group 4/8/16/32 x stride 1/2.
#include "cuda/kernels/grouped_conv3x3.cuh"

namespace resfused::cuda {
template cudaError_t launch_grouped_conv3x3<float>(GroupedConvArgs<float>, cudaStream_t);
template cudaError_t launch_grouped_conv3x3<half_t>(GroupedConvArgs<half_t>, cudaStream_t);
template cudaError_t launch_grouped_conv3x3<bf16_t>(GroupedConvArgs<bf16_t>, cudaStream_t);
}  // namespace resfused::cuda
