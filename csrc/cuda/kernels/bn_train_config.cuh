// Training-mode BatchNorm(+ReLU): arguments and launch configuration, no kernel code (see
// grouped_conv3x3_config.cuh for why the split). Kernels: bn_train.cuh; host: bn_train_host.h.
//
// Forward, three launches, no atomics, deterministic:
//   1. BnReduceKernel<T, StatsOp>: sums of d = x - K[c] and d^2 (K[c] = the channel's first value:
//      shifted data keeps var = (S2 - S1^2/M)/M accurate when |mean| >> std) per (slot, channel)
//      into partial[slot][2][C] (the reduction layout below);
//   2. BnFinalizeKernel<T, StatsOp>: adds each channel's slots in a fixed order, in double, writes
//      mean/var (rounded to acc_t) and coef = (s, beta), s = w / sqrt(var + eps);
//   3. BnApplyKernel<T, false>: y = act((x - mean) * s + beta), rows x vectors like
//      scale_shift_act (centered, not x * s + (beta - mean * s): see bn_normalized).
// Backward (g' = grad, 0 where (x - mean) s + beta <= 0 when relu, xc = x - mean,
// invstd = 1/sqrt(var+eps)):
//   grad_bias = sum g',  grad_weight = invstd * sum g' xc   (centered: no cancellation),
//   grad_x = s g' + k1 xc + kb,  k1 = -s invstd grad_weight / M,  kb = -s grad_bias / M;
//   1. BnReduceKernel<T, BackwardOp>: per (slot, channel) (sum g' xc, sum g'), s recomputed with
//      the same bn_scale() and the same mean/var as the forward, so the ReLU mask is
//      bit-identical to the forward's;  2. BnFinalizeKernel<T, BackwardOp>: grad_weight,
//   grad_bias and coef = (s, beta, k1, kb);  3. BnApplyKernel<T, true>: grad_x.
//
// The reduction (both passes 1), 256-thread 2-D blocks, 16-byte vector loads where the layout
// allows (a.vec), about two blocks per SM:
//   channels-last (rows x C): threadIdx.x walks VL-channel vectors along a row (bx = the smallest
//     power of two >= the vectors of a row, <= 32), threadIdx.y rows (by = 256 / bx): at C = 64
//     in fp32 that is 16 x 16, every thread busy (one thread per channel walking rows left 192
//     of 256 idle). Block (gx, gy) takes vector column blockIdx.x and rows
//     blockIdx.y * by + ty + k * gridDim.y * by.
//   NC(spatial) (planes of inner = H*W): blockIdx.x = channel, threadIdx.x walks vectors of a
//     plane (bx <= 256), threadIdx.y images; blockIdx.y takes images blockIdx.y * by + ty + ...
//   In-block sum, fixed order: each thread's registers, then a warp butterfly over the lanes of
//   one channel (warp_sum_xor: lanes l ^ bx, l ^ 2bx, ... for channels-last, all 32 lanes for
//   NC(spatial)), then after the barrier the 8 warps' values added in warp order. The block writes
//   partial[blockIdx.y][2][C]: slots = gridDim.y = ceil(2 * SMs / gridDim.x), capped by the rows
//   (images) there are, so the buffer is at most ~2 * SMs * 2 * C values whatever N is (before:
//   N * 256 slots per channel in NC(spatial), 134 MB at N = 32, C = 2048).
//   The finalize: 32 channels x 8 slot-lanes per block, each lane adds slots ty, ty + 8, ... in
//   double, the 8 lanes' sums added in order after a barrier (before: one thread per channel
//   walking up to 1024 slots).
// Deterministic: which thread sums which element, the butterfly pairs and every order of
// addition depend only on the shape and the SM count, never on scheduling; two runs on one GPU
// give the same bits (tests/test_cuda_bn_train.py runs the emulation in shuffled block order).
#pragma once

#include "cuda/kernels/tails_config.cuh"

namespace resfused::cuda {

template <class T>
struct BnTrainArgs {
  gptr<const T> x;
  gptr<const T> grad;               // backward only
  gptr<T> out;                      // forward: y; backward: grad_x
  gptr<const double> weight, bias;  // [C], converted to double by the host (the affine math is double)
  gptr<acc_t<T>> mean, var;         // forward: written by the finalize; backward: read (the forward's)
  gptr<acc_t<T>> partial;           // [slots][2][C]
  gptr<acc_t<T>> coef;              // forward: [2][C] = (s, b); backward: [4][C] = (s, b, k1, kb)
  gptr<acc_t<T>> totals;            // backward: [2][C] = (grad_weight, grad_bias)
  int64_t n = 0, C = 0, inner = 1;  // element i has channel (i / inner) % C
  int64_t slots = 0;                // set by bn_reduce_config (= the reduction's gridDim.y)
  int sms = 1;                      // SM count of the device (the host sets it): grid sizing
  int64_t rows = 0, row_len = 0;    // the apply kernels: set by bn_apply_config
  double eps = 0;
  bool relu = false, vec = false;  // vec: 16-byte accesses allowed (apply kernels)
};

constexpr int kBnReduceThreads = 256;
constexpr int kBnReduceWarps = kBnReduceThreads / 32;
constexpr int kBnFinalizeChannels = 32, kBnFinalizeLanes = 8;  // finalize block: 32 x 8

// The reduction passes' launch (layout: the file comment). Sets a.slots (the partial buffer is
// [slots][2][C]). a.vec (16-byte accesses allowed) must be set first.
template <class T>
inline LaunchConfig bn_reduce_config(BnTrainArgs<T>& a) {
  const int vl = a.vec ? kTailVec<T> : 1;
  const int64_t target = 2 * int64_t(a.sms > 0 ? a.sms : 1);  // blocks: two per SM
  const bool cl = a.inner == 1;
  const int64_t units = ceil_div(cl ? a.C : a.inner, vl);  // vectors per row / plane
  const int max_bx = cl ? 32 : kBnReduceThreads;
  int bx = 1;
  while (bx < max_bx && bx < units) bx *= 2;
  const int by = kBnReduceThreads / bx;
  const int64_t gx = cl ? ceil_div(units, bx) : a.C;
  const int64_t lines = a.C == 0 || a.inner == 0 ? 0 : a.n / (a.C * a.inner);  // rows, or images
  int64_t gy = ceil_div(target, gx > 0 ? gx : 1);
  const int64_t enough = ceil_div(lines, by);
  gy = gy > enough ? enough : gy;
  gy = gy > kMaxGridYZ ? kMaxGridYZ : gy;
  a.slots = gy;  // 0 for an empty tensor: the sums are 0
  LaunchConfig c;
  c.grid = dim3(static_cast<unsigned>(gx > 0 ? gx : 1), static_cast<unsigned>(gy > 0 ? gy : 1));
  c.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  c.smem_bytes = size_t(kBnReduceWarps) * 2 * size_t(cl ? bx * vl : 1) * sizeof(acc_t<T>);
  return c;
}

inline LaunchConfig bn_finalize_config(int64_t C) {
  LaunchConfig c;
  c.grid = dim3(static_cast<unsigned>(ceil_div(C, kBnFinalizeChannels)));
  c.block = dim3(kBnFinalizeChannels, kBnFinalizeLanes);
  c.smem_bytes = size_t(kBnFinalizeLanes) * 2 * kBnFinalizeChannels * sizeof(double);
  return c;
}

// The elementwise apply kernels walk rows x vectors exactly like scale_shift_act.
template <class T>
inline LaunchConfig bn_apply_config(BnTrainArgs<T>& a) {
  ScaleShiftArgs<T> shape;
  shape.n = a.n, shape.C = a.C, shape.inner = a.inner;
  const LaunchConfig c = scale_shift_config(shape);
  a.rows = shape.rows, a.row_len = shape.row_len;
  return c;
}

// Defined in bn_train.cuh; compiled for float/double/half/bfloat16 in bn_train_kernels.cu.
// Forward: fills partial, mean, var, coef and out (y).
// Backward: fills partial, coef, totals and out (grad_x). `a.slots` must come from
// bn_reduce_config (with the same a.vec and a.sms) before `partial` is allocated.
template <class T>
cudaError_t launch_bn_train_forward(BnTrainArgs<T> a, cudaStream_t s);
template <class T>
cudaError_t launch_bn_train_backward(BnTrainArgs<T> a, cudaStream_t s);

#ifndef RESFUSED_EMULATION
#define RESFUSED_BN_TRAIN_EXTERN(T)                                                     \
  extern template cudaError_t launch_bn_train_forward<T>(BnTrainArgs<T>, cudaStream_t); \
  extern template cudaError_t launch_bn_train_backward<T>(BnTrainArgs<T>, cudaStream_t);
RESFUSED_BN_TRAIN_EXTERN(float)
RESFUSED_BN_TRAIN_EXTERN(double)
RESFUSED_BN_TRAIN_EXTERN(half_t)
RESFUSED_BN_TRAIN_EXTERN(bf16_t)
#undef RESFUSED_BN_TRAIN_EXTERN
#endif

}  // namespace resfused::cuda
