// Schema of the direct grouped 3x3 convolution (ResNeXt's small groups). Kernels:
// cpu/grouped_conv3x3.cpp, cuda/grouped_conv3x3.cu. Adapter and fake kernel:
// resfused/kernels/conv_grouped.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resfused, m) {
  // y = [relu](conv2d(x, weight, bias, stride, padding=1, groups)) with a 3x3 kernel;
  // groups = x.size(1) / weight.size(1); weight is OIHW [C_out, C_in/groups, 3, 3].
  // Output is channels_last (the kernels' native layout); x may be NCHW or channels_last.
  m.def("grouped_conv3x3(Tensor x, Tensor weight, Tensor? bias, int stride, bool relu) -> Tensor");
  // The CPU kernel's vector path for a channels-per-group count on this machine: "avx512", "avx2"
  // or "scalar" (given C_out == C_in, C a multiple of the vector width, stride <= 2).
  m.def("grouped_conv3x3_cpu_path(int channels_per_group) -> str");
}
