// Schemas of the elementwise tail ops. Kernels: cpu/tails.cpp, cuda/tails.cu. Fake kernels and
// autograd: resfused/kernels/tails.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resfused, m) {
  // relu(x + residual): the residual tail of a block.
  m.def("add_relu(Tensor x, Tensor residual) -> Tensor");
  // grad * (out > 0): the backward of add_relu (the same tensor is the grad of x and of residual).
  m.def("add_relu_backward(Tensor grad_out, Tensor out) -> Tensor");
  // y = x * scale[c] + shift[c], then ReLU if `relu`: an eval-mode BatchNorm (+ReLU), channels in dim 1.
  m.def("scale_shift_act(Tensor x, Tensor scale, Tensor shift, bool relu) -> Tensor");
  // Returns (grad_x, grad_scale, grad_shift); the ReLU mask is recomputed from x, scale and shift.
  m.def(
      "scale_shift_act_backward(Tensor grad_out, Tensor x, Tensor scale, Tensor shift, bool relu) -> (Tensor, Tensor, "
      "Tensor)");
}
