// Schema of the ResNet stem's max pool without indices (nn.MaxPool2d(3, stride=2, padding=1) as
// torchvision and timm build it). Kernel: cpu/max_pool3x3s2.cpp; module: resfused/pool.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resfused, m) {
  // y[n, c, i, j] = max of x[n, c, 2i-1 .. 2i+1, 2j-1 .. 2j+1] inside the image (NaN if any is
  // NaN), for an N x C x H x W input; channels_last output of ((H - 1) / 2 + 1) x ((W - 1) / 2 + 1).
  m.def("max_pool3x3s2(Tensor x) -> Tensor");
}
