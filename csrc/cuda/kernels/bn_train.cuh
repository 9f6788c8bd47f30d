// Kernels of training-mode BatchNorm(+ReLU): batch statistics and y, and the fused backward (the math,
// the passes and the launch shapes are in bn_train_config.cuh). Arithmetic in acc_t<T>; the
// per-channel finalizes (a few scalars per channel) in double.
#pragma once

#include "cuda/kernels/bn_train_config.cuh"

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

// Pass 1 of both reductions (layout and order: bn_train_config.cuh). Phase 0: each thread sums
// its elements in registers, a warp butterfly adds the lanes of one channel, one lane per warp
// and channel stores to shared memory; phase 1: the warps' values added in warp order, one
// partial[blockIdx.y][which][c] per channel.
template <class T, class Op>
struct BnReduceKernel {
  using Params = BnTrainArgs<T>;
  using A = acc_t<T>;
  static constexpr int kPhases = 2, kMaxThreads = kBnReduceThreads;
  static constexpr bool kWarpSync = true;
  static constexpr int kVec = kTailVec<T>;

  template <int Phase>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float> smem) {
    if (a.vec)
      run_vl<Phase, kVec>(a, smem_as<A>(smem));
    else
      run_vl<Phase, 1>(a, smem_as<A>(smem));
  }

  template <int VL>
  static RESFUSED_DEVICE void load(const Params& a, int64_t i, A (&xv)[VL], A (&gv)[VL]) {
    if constexpr (VL > 1) {
      const auto x = load_pack<VL>(a.x, i);
      RESFUSED_UNROLL
      for (int k = 0; k < VL; ++k) xv[k] = to_acc(x.v[k]);
      if constexpr (Op::kGrad) {
        const auto g = load_pack<VL>(a.grad, i);
        RESFUSED_UNROLL
        for (int k = 0; k < VL; ++k) gv[k] = to_acc(g.v[k]);
      }
    } else {
      xv[0] = to_acc(a.x[i]);
      if constexpr (Op::kGrad) gv[0] = to_acc(a.grad[i]);
    }
  }

  template <int Phase, int VL>
  static RESFUSED_DEVICE void run_vl(const Params& a, gptr<A> red) {
    const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
    const int t = ty * bx + tx, warp = t / 32;
    if (a.inner == 1) {
      // channels-last: thread (tx, ty) owns channels (blockIdx.x * bx + tx) * VL + k.
      const int64_t c0 = (int64_t(blockIdx.x) * bx + tx) * VL;
      if constexpr (Phase == 0) {
        A s[2][VL];
        A xv[VL], gv[VL];
        typename Op::Channel ch[VL];
        RESFUSED_UNROLL
        for (int k = 0; k < VL; ++k) s[0][k] = s[1][k] = A(0), gv[k] = A(0);
        if (c0 < a.C) {  // vectors never straddle C (a.vec implies C % VL == 0)
          RESFUSED_UNROLL
          for (int k = 0; k < VL; ++k) ch[k] = Op::channel(a, c0 + k);
          const int64_t rows = a.n / a.C, step = int64_t(gridDim.y) * by;
          for (int64_t r = int64_t(blockIdx.y) * by + ty; r < rows; r += step) {
            load<VL>(a, r * a.C + c0, xv, gv);
            RESFUSED_UNROLL
            for (int k = 0; k < VL; ++k) Op::add(ch[k], xv[k], gv[k], s[0][k], s[1][k]);
          }
        }
        // Every lane reaches the butterfly (no early return): lanes tx, tx + bx, ... of a warp
        // hold the same channels on other rows.
        A flat[2 * VL];
        RESFUSED_UNROLL
        for (int k = 0; k < VL; ++k) flat[k] = s[0][k], flat[VL + k] = s[1][k];
        warp_sum_xor(flat, bx);
        if ((t % 32) < bx) {  // the first row of the warp: one lane per channel vector
          RESFUSED_UNROLL
          for (int k = 0; k < 2 * VL; ++k) {
            const int which = k / VL, j = tx * VL + k % VL;
            red[(warp * 2 + which) * (bx * VL) + j] = flat[k];
          }
        }
      } else {
        const int width = bx * VL;  // channels of this block
        for (int e = t; e < 2 * width; e += bx * by) {
          const int which = e / width, j = e - which * width;
          const int64_t c = int64_t(blockIdx.x) * width + j;
          if (c >= a.C) continue;
          A sum = red[which * width + j];
          for (int w = 1; w < kBnReduceWarps; ++w) sum += red[(w * 2 + which) * width + j];
          a.partial[(int64_t(blockIdx.y) * 2 + which) * a.C + c] = sum;
        }
      }
    } else {
      // NC(spatial): the block's channel is blockIdx.x; thread (tx, ty) walks vectors tx, tx + bx,
      // ... of the planes of images blockIdx.y * by + ty, + gridDim.y * by, ...
      const int64_t c = blockIdx.x;
      if constexpr (Phase == 0) {
        A s[2] = {A(0), A(0)};
        A xv[VL], gv[VL];
        RESFUSED_UNROLL
        for (int k = 0; k < VL; ++k) gv[k] = A(0);
        const typename Op::Channel ch = Op::channel(a, c);
        const int64_t images = a.n / (a.C * a.inner), units = ceil_div(a.inner, VL);
        const int64_t step = int64_t(gridDim.y) * by;
        for (int64_t img = int64_t(blockIdx.y) * by + ty; img < images; img += step) {
          const int64_t base = (img * a.C + c) * a.inner;
          for (int64_t u = tx; u < units; u += bx) {  // a.vec implies inner % VL == 0
            load<VL>(a, base + u * VL, xv, gv);
            RESFUSED_UNROLL
            for (int k = 0; k < VL; ++k) Op::add(ch, xv[k], gv[k], s[0], s[1]);
          }
        }
        warp_sum_xor(s, 1);
        if (t % 32 == 0) red[warp * 2] = s[0], red[warp * 2 + 1] = s[1];
      } else if (t < 2) {
        A sum = red[t];
        for (int w = 1; w < kBnReduceWarps; ++w) sum += red[w * 2 + t];
        a.partial[(int64_t(blockIdx.y) * 2 + t) * a.C + c] = sum;
      }
    }
  }
};

// Pass 2: per channel, the slots added in a fixed order in double (32 channels x 8 slot-lanes
// per block: lane ty adds slots ty, ty + 8, ...; after the barrier thread ty == 0 adds the 8
// lanes' sums in order), then Op's per-channel outputs.
template <class T, class Op>
struct BnFinalizeKernel {
  using Params = BnTrainArgs<T>;
  static constexpr int kPhases = 2, kMaxThreads = kBnFinalizeChannels * kBnFinalizeLanes;
  template <int Phase>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float> smem) {
    gptr<double> red = smem_as<double>(smem);
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int64_t c = int64_t(blockIdx.x) * kBnFinalizeChannels + tx;
    if constexpr (Phase == 0) {
      double s0 = 0, s1 = 0;
      if (c < a.C)
        for (int64_t k = ty; k < a.slots; k += kBnFinalizeLanes) {
          s0 += static_cast<double>(a.partial[(k * 2 + 0) * a.C + c]);
          s1 += static_cast<double>(a.partial[(k * 2 + 1) * a.C + c]);
        }
      red[(ty * 2 + 0) * kBnFinalizeChannels + tx] = s0;
      red[(ty * 2 + 1) * kBnFinalizeChannels + tx] = s1;
    } else if (ty == 0 && c < a.C) {
      double s0 = red[tx], s1 = red[kBnFinalizeChannels + tx];
      for (int l = 1; l < kBnFinalizeLanes; ++l) {
        s0 += red[(l * 2 + 0) * kBnFinalizeChannels + tx];
        s1 += red[(l * 2 + 1) * kBnFinalizeChannels + tx];
      }
      finish(a, c, s0, s1, Op{});
    }
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
  cudaError_t e = launch_phased<BnFinalizeKernel<T, Op>>(bn_finalize_config(a.C), s, sized);
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
