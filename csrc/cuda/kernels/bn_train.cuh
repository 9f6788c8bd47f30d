// Kernels of training-mode BatchNorm(+ReLU): batch statistics and y, and the fused backward (the math,
// the passes and the launch shapes are in bn_train_config.cuh). Arithmetic in acc_t<T>; the
// per-channel finalizes (a few scalars per channel) in double.
#pragma once

#include "cuda/kernels/bn_train_config.cuh"
#include "cuda/kernels/channel_slots.cuh"

namespace resfused::cuda {

// s = w / sqrt(var + eps) in double, rounded once to A. The forward and every backward pass
// call this with the same (rounded) var, so the ReLU mask the backward recomputes is the
// forward's to the bit.
template <class A>
RESFUSED_DEVICE A bn_scale(A var, double w, double eps) {
  return static_cast<A>(w / ::sqrt(static_cast<double>(var) + eps));
}

// The pre-activation y = (x - mean) * s + beta. Not the folded x * s + (beta - mean * s): with
// |mean| >> std that form cancels catastrophically in float (|x * s| ~ |mean| / std), while
// x - mean is exact-ish and keeps y as accurate as eager PyTorch's (x - mean) * invstd * w + beta.
template <class A>
RESFUSED_DEVICE A bn_normalized(A xv, A mean, A s, A beta) {
  return (xv - mean) * s + beta;
}

// The shift K[c] of the statistics: channel c's first value (row 0 in channels-last, the start
// of plane c in NC(spatial)).
template <class T>
RESFUSED_DEVICE acc_t<T> bn_channel_shift(const BnTrainArgs<T>& a, int64_t c) {
  return to_acc(a.x[a.inner == 1 ? c : c * a.inner]);
}

template <class T>
struct BnStatsPartialKernel {
  using Params = BnTrainArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads > kPlaneThreads ? kTailThreads : kPlaneThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    using A = acc_t<T>;
    A s1 = 0, s2 = 0, k = 0;
    int64_t c = 0, slot = 0;
    const bool active = slot_walk(
        a, c, slot, [&](int64_t ch) { k = bn_channel_shift(a, ch); },
        [&](int64_t i) {
          const A d = to_acc(a.x[i]) - k;
          s1 += d;
          s2 += d * d;
        });
    if (active) store_slot_pair(a.partial, slot, a.C, c, s1, s2);
  }
};

template <class T>
struct BnStatsFinalizeKernel {
  using Params = BnTrainArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    using A = acc_t<T>;
    const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= a.C) return;
    const double s1 = sum_slots<double>(a.partial, a.slots, a.C, 0, c);
    const double s2 = sum_slots<double>(a.partial, a.slots, a.C, 1, c);
    const double M = static_cast<double>(a.n / a.C);
    double var = (s2 - s1 * s1 / M) / M;
    if (var < 0) var = 0;  // rounding can go below 0; NaN stays NaN
    const A mean = static_cast<A>(static_cast<double>(bn_channel_shift(a, c)) + s1 / M);
    const A v = static_cast<A>(var);
    a.mean[c] = mean;
    a.var[c] = v;
    a.coef[c] = bn_scale(v, a.weight[c], a.eps);
    a.coef[a.C + c] = static_cast<A>(a.bias[c]);
  }
};

// g' of one element: the gradient where the forward's pre-activation was > 0 (relu), else as is.
template <class A>
RESFUSED_DEVICE A bn_masked_grad(A g, A xv, A mean, A s, A beta, bool relu) {
  return (relu && !(bn_normalized(xv, mean, s, beta) > A(0))) ? A(0) : g;
}

template <class T>
struct BnBackwardPartialKernel {
  using Params = BnTrainArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads > kPlaneThreads ? kTailThreads : kPlaneThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    using A = acc_t<T>;
    A sum_gxc = 0, sum_g = 0, m = 0, s = 0, b = 0;
    int64_t c = 0, slot = 0;
    const bool active = slot_walk(
        a, c, slot,
        [&](int64_t ch) {
          m = a.mean[ch];
          s = bn_scale(a.var[ch], a.weight[ch], a.eps);
          b = static_cast<A>(a.bias[ch]);
        },
        [&](int64_t i) {
          const A xv = to_acc(a.x[i]);
          const A g = bn_masked_grad(to_acc(a.grad[i]), xv, m, s, b, a.relu);
          sum_gxc += g * (xv - m);
          sum_g += g;
        });
    if (active) store_slot_pair(a.partial, slot, a.C, c, sum_gxc, sum_g);
  }
};

template <class T>
struct BnBackwardFinalizeKernel {
  using Params = BnTrainArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    using A = acc_t<T>;
    const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= a.C) return;
    const double sgxc = sum_slots<double>(a.partial, a.slots, a.C, 0, c);
    const double sg = sum_slots<double>(a.partial, a.slots, a.C, 1, c);
    const A s = bn_scale(a.var[c], a.weight[c], a.eps), b = static_cast<A>(a.bias[c]);
    const double M = static_cast<double>(a.n / a.C);
    const double invstd = 1.0 / ::sqrt(static_cast<double>(a.var[c]) + a.eps);
    const double gw = invstd * sgxc, sd = static_cast<double>(s);
    a.totals[c] = static_cast<A>(gw);
    a.totals[a.C + c] = static_cast<A>(sg);
    a.coef[c] = s;
    a.coef[a.C + c] = b;
    a.coef[2 * a.C + c] = static_cast<A>(-sd * invstd * gw / M);
    a.coef[3 * a.C + c] = static_cast<A>(-sd * sg / M);
  }
};

// y = act((x - mean) s + beta) for one element of channel c (coef = (s, beta)).
template <class T>
RESFUSED_DEVICE T bn_y(const BnTrainArgs<T>& a, acc_t<T> xv, acc_t<T>, int64_t c) {
  using A = acc_t<T>;
  const A y = bn_normalized(xv, static_cast<A>(a.mean[c]), a.coef[c], a.coef[a.C + c]);
  return from_acc<T>(a.relu ? relu_nan(y) : y);
}

// grad_x = s g' + k1 (x - mean) + kb for one element of channel c (coef = (s, beta, k1, kb)).
template <class T>
RESFUSED_DEVICE T bn_grad_x(const BnTrainArgs<T>& a, acc_t<T> xv, acc_t<T> g, int64_t c) {
  using A = acc_t<T>;
  const A s = a.coef[c], beta = a.coef[a.C + c], k1 = a.coef[2 * a.C + c], kb = a.coef[3 * a.C + c];
  const A m = a.mean[c];
  const A gm = bn_masked_grad(g, xv, m, s, beta, a.relu);
  return from_acc<T>(gm * s + k1 * (xv - m) + kb);
}

// out = Elem(x, grad, channel) over rows x vectors, the loop of ScaleShiftActKernel (launch
// shape: scale_shift_config). kGrad: whether grad is read (the backward).
template <class T, bool kGrad>
struct BnApplyKernel {
  using Params = BnTrainArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads;
  static RESFUSED_DEVICE T elem(const Params& a, acc_t<T> xv, acc_t<T> g, int64_t c) {
    if constexpr (kGrad)
      return bn_grad_x(a, xv, g, c);
    else
      return bn_y(a, xv, g, c);
  }
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    using A = acc_t<T>;
    constexpr int VL = kTailVec<T>;
    const bool cl = a.inner == 1;
    const int64_t units = ceil_div(a.row_len, VL);
    const int64_t row0 = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
    const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
    const int64_t unit_step = int64_t(gridDim.x) * blockDim.x;
    int64_t c_row = cl ? 0 : row0 % a.C;  // NC(spatial): advanced by row_step mod C, no division in the loop
    const int64_t c_step = cl ? 0 : row_step % a.C;
    for (int64_t r = row0; r < a.rows; r += row_step) {
      const int64_t base = r * a.row_len;
      for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += unit_step) {
        const int64_t j0 = u * VL;
        if (a.vec && j0 + VL <= a.row_len) {
          const auto xv = load_pack<VL>(a.x, base + j0);
          Pack<T, VL> gv;
          if constexpr (kGrad) gv = load_pack<VL>(a.grad, base + j0);
          Pack<T, VL> o;
          RESFUSED_UNROLL
          for (int k = 0; k < VL; ++k)
            o.v[k] = elem(a, to_acc(xv.v[k]), kGrad ? to_acc(gv.v[k]) : A(0), cl ? j0 + k : c_row);
          store_pack<VL>(a.out, base + j0, o);
        } else {
          for (int64_t j = j0; j < j0 + VL && j < a.row_len; ++j)
            a.out[base + j] = elem(a, to_acc(a.x[base + j]), kGrad ? to_acc(a.grad[base + j]) : A(0), cl ? j : c_row);
        }
      }
      c_row += c_step;
      if (c_row >= a.C) c_row -= a.C;
    }
  }
};

template <class T>
cudaError_t launch_bn_train_forward(BnTrainArgs<T> a, cudaStream_t s) {
  if (a.C == 0) return cudaSuccess;
  BnTrainArgs<T> sized = a;
  const LaunchConfig part = bn_reduce_config(sized);
  if (sized.slots != a.slots) return cudaErrorInvalidConfiguration;  // partial sized for another config
  if (a.n > 0) {
    const cudaError_t e = launch_phased<BnStatsPartialKernel<T>>(part, s, sized);
    if (e != cudaSuccess) return e;
  }
  cudaError_t e = launch_phased<BnStatsFinalizeKernel<T>>(finalize_config(a.C), s, sized);
  if (e != cudaSuccess || a.n == 0) return e;
  const LaunchConfig apply = bn_apply_config(sized);
  return launch_phased<BnApplyKernel<T, false>>(apply, s, sized);
}

template <class T>
cudaError_t launch_bn_train_backward(BnTrainArgs<T> a, cudaStream_t s) {
  if (a.C == 0) return cudaSuccess;
  BnTrainArgs<T> sized = a;
  const LaunchConfig part = bn_reduce_config(sized);
  if (sized.slots != a.slots) return cudaErrorInvalidConfiguration;
  if (a.n > 0) {
    const cudaError_t e = launch_phased<BnBackwardPartialKernel<T>>(part, s, sized);
    if (e != cudaSuccess) return e;
  }
  cudaError_t e = launch_phased<BnBackwardFinalizeKernel<T>>(finalize_config(a.C), s, sized);
  if (e != cudaSuccess || a.n == 0) return e;
  const LaunchConfig apply = bn_apply_config(sized);
  return launch_phased<BnApplyKernel<T, true>>(apply, s, sized);
}

}  // namespace resfused::cuda
