// Schema of the finiteness check that guards oneDNN's ReLU post-op, which maps NaN to 0 (see
// resfused/runtime/finite.py). Kernel: cpu/all_finite.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resfused, m) {
  // Whether no element of x is NaN or +-Inf.
  m.def("all_finite(Tensor x) -> bool");
}
