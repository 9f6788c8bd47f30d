// Schemas of the Winograd F(4x4, 3x3) transforms: a 3x3, stride-1, padding-1 convolution done as
// tile transforms around a batched GEMM. Kernels: cpu/winograd_f43.cpp. The matrices, the weight
// transforms, the GEMMs and autograd: resfused/kernels/winograd_f43.py.
//
// Layouts. Activations are NCHW-shaped, channels_last in memory. The transformed domain is
// [T, 36, C] contiguous: for each of the T = N * ceil(H/4) * ceil(W/4) output tiles of 4x4
// pixels, its 6x6 transform positions e, each a run of C channels. The GEMMs between the
// transforms, M[:, e] = V[:, e] @ U[e] with U[e] the [C_in, C_out] transformed weights, are then
// one grouped 1x1 convolution (36 groups) over a 1 x T image of 36 * C channels, channels_last.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(resfused, m) {
  // V[t, e, c] = (B^T d_t B)[e] for the 6x6 input window d_t of tile t (zero padded by 1), and
  // a 0-dim bool tensor: whether every value of x was finite (Winograd spreads NaN/Inf further
  // than a direct conv, so callers use a direct conv when it is false).
  m.def("winograd_f43_input(Tensor x) -> (Tensor, Tensor)");
  // Z[t, e, c] = (A g_t A^T)[e] for the 4x4 window g_t of tile t (zero beyond the image):
  // the transform of an output gradient, for the weight gradient.
  m.def("winograd_f43_grad_output(Tensor grad) -> Tensor");
  // y[n, c, 4ti + i, 4tj + j] = act((A^T M_t A)[i, j] + bias[c] [+ residual]) for the N x H x W
  // output; `relu` applies after the residual add.
  m.def("winograd_f43_output(Tensor m, int n, int h, int w, Tensor? bias, Tensor? residual, bool relu) -> Tensor");
  // The same written into `out` ([N, C, H, W], channels_last contiguous: e.g. a batch slice of a
  // larger output, which conv3x3 fills a few images at a time).
  m.def("winograd_f43_output_into(Tensor m, Tensor? bias, Tensor? residual, bool relu, Tensor(a!) out) -> ()");
  // The instance of the tile code float32 calls take on this CPU: "avx512" or "baseline" (the
  // build's at::vec ISA). Read by the tests.
  m.def("winograd_f43_cpu_path() -> str");
}
