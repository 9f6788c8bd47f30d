// Schemas of the training-mode BatchNorm(+ReLU) ops. CPU kernels: cpu/bn_train.cpp. Fake
// kernels and autograd: resfused/kernels/batchnorm_train.py; the running-statistics update:
// resfused/ops/batchnorm.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resfused, m) {
  // Batch statistics of x per channel (dim 1) and y = [relu]((x - mean) / sqrt(var + eps) * weight + bias),
  // in one fused kernel. Returns (y, mean, var) with var the biased batch variance; mean and var
  // are float32 (float64 for float64 x), for the caller's running-statistics update.
  m.def("bn_train_act(Tensor x, Tensor weight, Tensor bias, float eps, bool relu) -> (Tensor, Tensor, Tensor)");
  // Backward of bn_train_act with respect to (x, weight, bias), the ReLU mask recomputed from x.
  m.def(
      "bn_train_act_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor var, float "
      "eps, bool relu) -> (Tensor, Tensor, Tensor)");
}
