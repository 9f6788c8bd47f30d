// Training-mode BatchNorm(+ReLU): arguments and launch configuration, no kernel code (see
// grouped_conv3x3_config.cuh for why the split). Kernels: bn_train.cuh; host: bn_train_host.h.
//
// Forward, three launches, no atomics, deterministic:
//   1. BnReduceKernel<T, StatsOp>: sums of d = x - K[c] and d^2 (K[c] = the channel's first value:
//      shifted data keeps var = (S2 - S1^2/M)/M accurate when |mean| >> std) per (slot, channel)
//      into partial[slot][2][C] (the reduction: see below);
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
// The reductions (passes 1 and 2 of both) are the per-channel reduction of
// channel_reduce_config.cuh (2-D blocks with vector loads and warp shuffles into about
// 2 x SM-count slots, then a parallel finalize in double), shared with the tails backward.
// Deterministic: every order of addition is fixed by the shape and the SM count.
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

// The reduction passes' launch (channel_reduce_config). Sets a.slots (the partial buffer is
// [slots][2][C]). a.vec (16-byte accesses allowed) and a.sms must be set first.
template <class T>
inline LaunchConfig bn_reduce_config(BnTrainArgs<T>& a) {
  return channel_reduce_config(a.n, a.C, a.inner, a.vec ? kTailVec<T> : 1, a.sms, sizeof(acc_t<T>), a.slots);
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
