// Training-mode BatchNorm(+ReLU): arguments and launch configuration, no kernel code (see
// grouped_conv3x3_config.cuh for why the split). Kernels: bn_train.cuh; host: bn_train_host.h.
//
// Forward, three launches, no atomics, deterministic:
//   1. BnStatsPartialKernel: per-slot sums of d = x - K[c] and d^2 (K[c] = the channel's first
//      value: shifted data keeps var = (S2 - S1^2/M)/M accurate when |mean| >> std) into
//      partial[slot][2][C]; the slots and the grid are those of the scale_shift backward
//      (scale_shift_backward_config), so the two reductions share one tested launch shape;
//   2. BnStatsFinalizeKernel: one thread per channel adds its slots in order, in double, writes
//      mean/var (rounded to acc_t) and coef = (s, beta), s = w / sqrt(var + eps);
//   3. BnApplyKernel<T, false>: y = act((x - mean) * s + beta), rows x vectors like
//      scale_shift_act (centered, not x * s + (beta - mean * s): see bn_normalized).
// Backward (g' = grad masked by (x - mean) s + beta > 0 when relu, xc = x - mean,
// invstd = 1/sqrt(var+eps)):
//   grad_bias = sum g',  grad_weight = invstd * sum g' xc   (centered: no cancellation),
//   grad_x = s g' + k1 xc + kb,  k1 = -s invstd grad_weight / M,  kb = -s grad_bias / M;
//   1. BnBackwardPartialKernel: per-slot (sum g' xc, sum g'), s recomputed per thread with the
//      same bn_scale() and the same mean/var as the forward, so the ReLU mask is bit-identical
//      to the forward's;  2. BnBackwardFinalizeKernel: per channel, grad_weight, grad_bias and
//   coef = (s, beta, k1, kb);  3. BnApplyKernel<T, true>: grad_x.
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
  int64_t slots = 0;                // set by bn_reduce_config
  int64_t rows = 0, row_len = 0;    // the apply kernels: set by bn_apply_config
  double eps = 0;
  bool relu = false, vec = false;  // vec: 16-byte accesses allowed (apply kernels)
};

// The reduction passes use the launch shape of the scale_shift backward partial pass: sets
// a.slots (the partial buffer is [slots][2][C]) and returns the grid.
template <class T>
inline LaunchConfig bn_reduce_config(BnTrainArgs<T>& a) {
  ScaleShiftArgs<T> shape;
  shape.n = a.n, shape.C = a.C, shape.inner = a.inner;
  const LaunchConfig c = scale_shift_backward_config(shape);
  a.slots = shape.slots;
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
// bn_reduce_config before `partial` is allocated.
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
