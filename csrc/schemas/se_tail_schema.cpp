// Schema of the squeeze-excitation tail. Kernel: cpu/se_tail.cpp. Fake kernel and autograd:
// resfused/kernels/se_tail.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resfused, m) {
  // relu(y * gate[n, c] + residual): the tail of an SE / ECA block (y, residual [N, C, H, W]; gate [N, C]).
  m.def("scale_add_relu(Tensor y, Tensor gate, Tensor residual) -> Tensor");
}
