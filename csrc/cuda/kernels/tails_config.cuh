// Elementwise tails (add_relu, scale_shift_act and their backwards): arguments and launch
// configuration, no kernel code (see grouped_conv3x3_config.cuh for why the split).
//
// Layouts: every tensor is dense in one memory format; element i has channel (i / inner) % C,
// with inner = 1 for channels-last and inner = H*W (the spatial size) for NC(spatial).
// The per-channel sums of the backward (grad_scale, grad_shift) are the deterministic two-pass
// reduction of channel_reduce_config.cuh (shared with the training BatchNorm): 2-D blocks with
// vector loads and warp shuffles write about 2 x SM-count slots partial[slot][2][C] (grad_x is
// written by the same pass), then a parallel finalize adds each channel's slots in double.
#pragma once

#include "cuda/kernels/channel_reduce_config.cuh"

namespace resfused::cuda {

constexpr int kTailThreads = 256;
constexpr int64_t kTailMaxBlocks = 1024;  // grid-stride beyond ~one wave of an H100

template <class T>
struct BinaryArgs {  // out = f(a, b) elementwise
  gptr<const T> a, b;
  gptr<T> out;
  int64_t n = 0;
  bool vec = false;  // 16-byte accesses allowed for all three
};

template <class T>
struct ScaleShiftArgs {
  gptr<const T> x;
  gptr<const T> grad;  // backward only
  gptr<const acc_t<T>> scale, shift;
  gptr<T> out;             // forward: y; backward: grad_x
  gptr<acc_t<T>> partial;  // backward: [slots][2][C]
  gptr<acc_t<T>> totals;   // backward: [2][C]
  int64_t n = 0, C = 0, inner = 1;
  int64_t slots = 0;               // backward: set by scale_shift_backward_config (= gridDim.y)
  int sms = 1;                     // backward: SM count of the device (the host sets it): grid sizing
  int64_t rows = 0, row_len = 0;   // forward: rows of row_len elements (set by scale_shift_config)
  bool relu = false, vec = false;  // vec: 16-byte accesses allowed (and vectors within a channel)
};

template <class T>
inline constexpr int kTailVec = static_cast<int>(16 / sizeof(T));  // elements per 16-byte access

// Flat elementwise launch: one thread per vector of kTailVec<T> elements, grid-stride.
template <class T>
inline LaunchConfig flat_config(int64_t n) {
  const int64_t units = ceil_div(n, kTailVec<T>);
  int64_t blocks = ceil_div(units, kTailThreads);
  blocks = blocks < 1 ? 1 : (blocks > kTailMaxBlocks ? kTailMaxBlocks : blocks);
  LaunchConfig c;
  c.grid = dim3(static_cast<unsigned>(blocks));
  c.block = dim3(kTailThreads);
  return c;
}

// Whether 16-byte vectors never straddle two channels with different scale/shift.
template <class T>
inline bool scale_shift_vec_ok(int64_t C, int64_t inner) {
  const int64_t vl = kTailVec<T>;
  return inner == 1 ? C % vl == 0 : inner % vl == 0;
}

// Forward: the tensor as rows x row_len. Channels-last: row_len = C, the channel is the position
// in the row; NC(spatial): row_len = H*W, the channel is row % C. A 2-D block puts bx threads
// along a row (vectors of kTailVec) and 256/bx rows side by side, so short rows (C = 64 in
// fp16 is 8 vectors) still fill every lane; no integer division in the loop.
template <class T>
inline LaunchConfig scale_shift_config(ScaleShiftArgs<T>& a) {
  a.row_len = a.inner == 1 ? a.C : a.inner;
  a.rows = a.row_len == 0 ? 0 : a.n / a.row_len;
  const int64_t units = ceil_div(a.row_len, kTailVec<T>);
  int bx = 1;
  while (bx < kTailThreads && bx < units) bx *= 2;
  const int by = kTailThreads / bx;
  int64_t gx = ceil_div(units, bx);
  gx = gx > kTailMaxBlocks ? kTailMaxBlocks : (gx < 1 ? 1 : gx);
  int64_t gy = ceil_div(a.rows, by);
  const int64_t gy_max = kTailMaxBlocks / gx > 0 ? kTailMaxBlocks / gx : 1;
  gy = gy > gy_max ? gy_max : (gy < 1 ? 1 : gy);
  LaunchConfig c;
  c.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  c.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  return c;
}

// Backward, pass 1 (the sums and grad_x): channel_reduce_config. Sets a.slots (the partial
// buffer is [slots][2][C]); a.vec and a.sms must be set first. Pass 2: channel_finalize_config.
template <class T>
inline LaunchConfig scale_shift_backward_config(ScaleShiftArgs<T>& a) {
  return channel_reduce_config(a.n, a.C, a.inner, a.vec ? kTailVec<T> : 1, a.sms, sizeof(acc_t<T>), a.slots);
}

// Defined in tails.cuh; compiled for float/double/half/bfloat16 in tails_kernels.cu.
template <class T>
cudaError_t launch_add_relu(BinaryArgs<T> a, cudaStream_t s);
template <class T>
cudaError_t launch_add_relu_backward(BinaryArgs<T> a, cudaStream_t s);  // a = grad_out, b = out
template <class T>
cudaError_t launch_scale_shift_act(ScaleShiftArgs<T> a, cudaStream_t s);
// Fills out (grad_x), partial and totals; `a.slots` must be set by scale_shift_backward_config
// (with the same a.vec and a.sms) before `partial` is allocated (the host calls the config
// first, then this).
template <class T>
cudaError_t launch_scale_shift_act_backward(ScaleShiftArgs<T> a, cudaStream_t s);

#ifndef RESFUSED_EMULATION
#define RESFUSED_TAILS_EXTERN(T)                                                          \
  extern template cudaError_t launch_add_relu<T>(BinaryArgs<T>, cudaStream_t);            \
  extern template cudaError_t launch_add_relu_backward<T>(BinaryArgs<T>, cudaStream_t);   \
  extern template cudaError_t launch_scale_shift_act<T>(ScaleShiftArgs<T>, cudaStream_t); \
  extern template cudaError_t launch_scale_shift_act_backward<T>(ScaleShiftArgs<T>, cudaStream_t);
RESFUSED_TAILS_EXTERN(float)
RESFUSED_TAILS_EXTERN(double)
RESFUSED_TAILS_EXTERN(half_t)
RESFUSED_TAILS_EXTERN(bf16_t)
#undef RESFUSED_TAILS_EXTERN
#endif

}  // namespace resfused::cuda
