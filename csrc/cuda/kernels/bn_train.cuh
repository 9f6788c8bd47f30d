// Kernels of training-mode BatchNorm(+ReLU): batch statistics and y, and the fused backward (the math,
// the passes and the launch shapes are in bn_train_config.cuh). Arithmetic in acc_t<T>; the
// per-channel finalizes (a few scalars per channel) in double.
#pragma once

#include "cuda/kernels/bn_train_config.cuh"
#include "cuda/kernels/channel_reduce.cuh"

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
// of plane c in NC(spatial)), or 0 when that is not finite (an Inf shift would turn the mean of a
// channel holding only +Inf into Inf - Inf = NaN, where nn.BatchNorm2d's is Inf).
template <class T>
RESFUSED_DEVICE acc_t<T> bn_channel_shift(const BnTrainArgs<T>& a, int64_t c) {
  const acc_t<T> k = to_acc(a.x[a.inner == 1 ? c : c * a.inner]);
  return k - k == acc_t<T>(0) ? k : acc_t<T>(0);  // k - k is NaN for Inf and NaN
}

// g' of one element: 0 where the forward's pre-activation was <= 0 (relu), else as is (NaN passes,
// as through torch.relu's backward).
template <class A>
RESFUSED_DEVICE A bn_masked_grad(A g, A xv, A mean, A s, A beta, bool relu) {
  return (relu && bn_normalized(xv, mean, s, beta) <= A(0)) ? A(0) : g;
}

// What the forward reduction sums: d = x - K[c] and d^2 (shifted statistics).
template <class T>
struct StatsOp {
  static constexpr bool kGrad = false;
  struct Channel {
    acc_t<T> k;
  };
  static RESFUSED_DEVICE Channel channel(const BnTrainArgs<T>& a, int64_t c) { return {bn_channel_shift(a, c)}; }
  static RESFUSED_DEVICE void add(const Channel& ch, acc_t<T> xv, acc_t<T>, acc_t<T>& s0, acc_t<T>& s1) {
    const acc_t<T> d = xv - ch.k;
    s0 += d;
    s1 += d * d;
  }
};

// What the backward reduction sums: g' (x - mean) and g'.
template <class T>
struct BackwardOp {
  static constexpr bool kGrad = true;
  struct Channel {
    acc_t<T> m, s, b;
    bool relu;
  };
  static RESFUSED_DEVICE Channel channel(const BnTrainArgs<T>& a, int64_t c) {
    using A = acc_t<T>;
    return {a.mean[c], bn_scale(a.var[c], a.weight[c], a.eps), static_cast<A>(a.bias[c]), a.relu};
  }
  static RESFUSED_DEVICE void add(const Channel& ch, acc_t<T> xv, acc_t<T> g, acc_t<T>& s0, acc_t<T>& s1) {
    const acc_t<T> gm = bn_masked_grad(g, xv, ch.m, ch.s, ch.b, ch.relu);
    s0 += gm * (xv - ch.m);
    s1 += gm;
  }
};

// What channel_reduce_block visits for Op (StatsOp or BackwardOp): x (and grad) loaded as one
// vector, then Op::add per element into its channel's two sums.
template <class T, class Op>
struct BnSumOp {
  using A = acc_t<T>;
  using Channel = typename Op::Channel;
  const BnTrainArgs<T>& a;
  RESFUSED_DEVICE Channel channel(int64_t c) const { return Op::channel(a, c); }
  template <int VL, int S>
  RESFUSED_DEVICE void visit(int64_t i, const Channel (&ch)[S], A (&s)[2][S]) const {
    A xv[VL], gv[VL];
    load_acc<VL>(a.x, i, xv);
    if constexpr (Op::kGrad) {
      load_acc<VL>(a.grad, i, gv);
    } else {
      RESFUSED_UNROLL
      for (int k = 0; k < VL; ++k) gv[k] = A(0);
    }
    RESFUSED_UNROLL
    for (int k = 0; k < VL; ++k) {
      const int j = S == 1 ? 0 : k;
      Op::add(ch[j], xv[k], gv[k], s[0][j], s[1][j]);
    }
  }
};

// Pass 1 of both reductions: channel_reduce_block (channel_reduce.cuh) over BnSumOp.
template <class T, class Op>
struct BnReduceKernel {
  using Params = BnTrainArgs<T>;
  using A = acc_t<T>;
  static constexpr int kPhases = 2, kMaxThreads = kReduceThreads;
  static constexpr bool kWarpSync = true;

  template <int Phase>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float> smem) {
    const BnSumOp<T, Op> op{a};
    if (a.vec)
      channel_reduce_block<Phase, kTailVec<T>>(op, a.n, a.C, a.inner, smem_as<A>(smem), a.partial);
    else
      channel_reduce_block<Phase, 1>(op, a.n, a.C, a.inner, smem_as<A>(smem), a.partial);
  }
};

// Pass 2: channel_finalize_block adds each channel's slots in double, then Op's per-channel
// outputs.
template <class T, class Op>
struct BnFinalizeKernel {
  using Params = BnTrainArgs<T>;
  static constexpr int kPhases = 2, kMaxThreads = kFinalizeChannels * kFinalizeLanes;
  template <int Phase>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float> smem) {
    channel_finalize_block<Phase>(a.partial, a.slots, a.C, smem,
                                  [&](int64_t c, double s0, double s1) { finish(a, c, s0, s1, Op{}); });
  }

  static RESFUSED_DEVICE void finish(const Params& a, int64_t c, double s1, double s2, StatsOp<T>) {
    using A = acc_t<T>;
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

  static RESFUSED_DEVICE void finish(const Params& a, int64_t c, double sgxc, double sg, BackwardOp<T>) {
    using A = acc_t<T>;
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

// Reduce, finalize, apply (bn_train_config.cuh); Op picks the forward's or the backward's sums.
template <class T, class Op, bool kGrad>
cudaError_t launch_bn_train(BnTrainArgs<T> a, cudaStream_t s) {
  if (a.C == 0) return cudaSuccess;
  BnTrainArgs<T> sized = a;
  const LaunchConfig part = bn_reduce_config(sized);
  if (sized.slots != a.slots) return cudaErrorInvalidConfiguration;  // partial sized for another config
  if (a.n > 0) {
    const cudaError_t e = launch_phased<BnReduceKernel<T, Op>>(part, s, sized);
    if (e != cudaSuccess) return e;
  }
  cudaError_t e = launch_phased<BnFinalizeKernel<T, Op>>(channel_finalize_config(a.C), s, sized);
  if (e != cudaSuccess || a.n == 0) return e;
  const LaunchConfig apply = bn_apply_config(sized);
  return launch_phased<BnApplyKernel<T, kGrad>>(apply, s, sized);
}

template <class T>
cudaError_t launch_bn_train_forward(BnTrainArgs<T> a, cudaStream_t s) {
  return launch_bn_train<T, StatsOp<T>, false>(a, s);
}

template <class T>
cudaError_t launch_bn_train_backward(BnTrainArgs<T> a, cudaStream_t s) {
  return launch_bn_train<T, BackwardOp<T>, true>(a, s);
}

}  // namespace resfused::cuda
