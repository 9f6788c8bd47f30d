// Kernels of the elementwise tails (arguments and launch shapes in tails_config.cuh).
//   add_relu:          out = relu(a + b)
//   add_relu_backward: grad = out <= 0 ? 0 : grad_out   (NaN lets it through, as torch.relu's)
//   scale_shift_act:   y = [relu](x * scale[c] + shift[c])
//   its backward:      g' = grad, zeroed where x*scale+shift <= 0 if relu;
//                      grad_x = g' * scale[c], grad_scale[c] = sum g' x, grad_shift[c] = sum g'
// Arithmetic in acc_t<T> (float, or double for double); one rounding at each store.
#pragma once

#include "cuda/kernels/channel_reduce.cuh"
#include "cuda/kernels/tails_config.cuh"

namespace resfused::cuda {

// Grid-stride loop over vector units [u*VL, u*VL+VL); full units use 16-byte accesses when
// `vec`, the last partial unit (and everything when !vec) goes element by element.
template <class T, class Op>
RESFUSED_DEVICE void flat_binary(const BinaryArgs<T>& a, Op op) {
  constexpr int VL = kTailVec<T>;
  const int64_t units = ceil_div(a.n, VL);
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += step) {
    const int64_t i0 = u * VL;
    if (a.vec && i0 + VL <= a.n) {
      const auto va = load_pack<VL>(a.a, i0), vb = load_pack<VL>(a.b, i0);
      Pack<T, VL> o;
      RESFUSED_UNROLL
      for (int k = 0; k < VL; ++k) o.v[k] = from_acc<T>(op(to_acc(va.v[k]), to_acc(vb.v[k])));
      store_pack<VL>(a.out, i0, o);
    } else {
      for (int64_t i = i0; i < i0 + VL && i < a.n; ++i) a.out[i] = from_acc<T>(op(to_acc(a.a[i]), to_acc(a.b[i])));
    }
  }
}

template <class T>
struct AddReluKernel {
  using Params = BinaryArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    flat_binary(a, [](acc_t<T> x, acc_t<T> r) { return relu_nan(x + r); });
  }
};

template <class T>
struct AddReluBackwardKernel {
  using Params = BinaryArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    flat_binary(a, [](acc_t<T> g, acc_t<T> o) { return o <= acc_t<T>(0) ? acc_t<T>(0) : g; });
  }
};

template <class T>
struct ScaleShiftActKernel {
  using Params = ScaleShiftArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    using A = acc_t<T>;
    constexpr int VL = kTailVec<T>;
    const bool cl = a.inner == 1;
    const int64_t units = ceil_div(a.row_len, VL);
    const int64_t row0 = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;
    const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
    const int64_t unit_step = int64_t(gridDim.x) * blockDim.x;
    // NC(spatial) channel of the row, advanced by row_step mod C without dividing in the loop.
    int64_t c_row = cl ? 0 : row0 % a.C;
    const int64_t c_step = cl ? 0 : row_step % a.C;
    for (int64_t r = row0; r < a.rows; r += row_step) {
      const int64_t base = r * a.row_len;
      for (int64_t u = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; u < units; u += unit_step) {
        const int64_t j0 = u * VL;
        if (a.vec && j0 + VL <= a.row_len) {
          const auto xv = load_pack<VL>(a.x, base + j0);
          Pack<T, VL> o;
          RESFUSED_UNROLL
          for (int k = 0; k < VL; ++k) {
            const int64_t c = cl ? j0 + k : c_row;
            const A y = to_acc(xv.v[k]) * a.scale[c] + a.shift[c];
            o.v[k] = from_acc<T>(a.relu ? relu_nan(y) : y);
          }
          store_pack<VL>(a.out, base + j0, o);
        } else {
          for (int64_t j = j0; j < j0 + VL && j < a.row_len; ++j) {
            const int64_t c = cl ? j : c_row;
            const A y = to_acc(a.x[base + j]) * a.scale[c] + a.shift[c];
            a.out[base + j] = from_acc<T>(a.relu ? relu_nan(y) : y);
          }
        }
      }
      c_row += c_step;
      if (c_row >= a.C) c_row -= a.C;
    }
  }
};

// What the backward's reduction visits (channel_reduce_block): per vector of x and grad,
// g' = grad (0 where x * scale + shift <= 0 if relu), grad_x = g' * scale stored as one vector,
// and the channel's sums g' x and g'.
template <class T>
struct ScaleShiftGradOp {
  using A = acc_t<T>;
  struct Channel {
    A scale, shift;
  };
  const ScaleShiftArgs<T>& a;
  RESFUSED_DEVICE Channel channel(int64_t c) const { return {a.scale[c], a.shift[c]}; }
  template <int VL, int S>
  RESFUSED_DEVICE void visit(int64_t i, const Channel (&ch)[S], A (&s)[2][S]) const {
    A xv[VL], gv[VL];
    load_acc<VL>(a.x, i, xv);
    load_acc<VL>(a.grad, i, gv);
    Pack<T, VL> o;
    RESFUSED_UNROLL
    for (int k = 0; k < VL; ++k) {
      const int j = S == 1 ? 0 : k;
      const A g = (a.relu && xv[k] * ch[j].scale + ch[j].shift <= A(0)) ? A(0) : gv[k];
      o.v[k] = from_acc<T>(g * ch[j].scale);
      s[0][j] += g * xv[k];
      s[1][j] += g;
    }
    if constexpr (VL > 1)
      store_pack<VL>(a.out, i, o);
    else
      a.out[i] = o.v[0];
  }
};

// Backward pass 1: channel_reduce_block (channel_reduce.cuh) over ScaleShiftGradOp, which also
// writes grad_x; every element is visited once.
template <class T>
struct ScaleShiftBackwardReduceKernel {
  using Params = ScaleShiftArgs<T>;
  using A = acc_t<T>;
  static constexpr int kPhases = 2, kMaxThreads = kReduceThreads;
  static constexpr bool kWarpSync = true;
  template <int Phase>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float> smem) {
    const ScaleShiftGradOp<T> op{a};
    if (a.vec)
      channel_reduce_block<Phase, kTailVec<T>>(op, a.n, a.C, a.inner, smem_as<A>(smem), a.partial);
    else
      channel_reduce_block<Phase, 1>(op, a.n, a.C, a.inner, smem_as<A>(smem), a.partial);
  }
};

// Backward pass 2: each channel's slots added in double (channel_finalize_block), rounded once
// to acc_t: totals = (grad_scale, grad_shift).
template <class T>
struct ScaleShiftBackwardFinalizeKernel {
  using Params = ScaleShiftArgs<T>;
  static constexpr int kPhases = 2, kMaxThreads = kFinalizeChannels * kFinalizeLanes;
  template <int Phase>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float> smem) {
    channel_finalize_block<Phase>(a.partial, a.slots, a.C, smem, [&](int64_t c, double sgx, double sg) {
      a.totals[c] = static_cast<acc_t<T>>(sgx);
      a.totals[a.C + c] = static_cast<acc_t<T>>(sg);
    });
  }
};

template <class T>
cudaError_t launch_add_relu(BinaryArgs<T> a, cudaStream_t s) {
  if (a.n == 0) return cudaSuccess;
  return launch_phased<AddReluKernel<T>>(flat_config<T>(a.n), s, a);
}

template <class T>
cudaError_t launch_add_relu_backward(BinaryArgs<T> a, cudaStream_t s) {
  if (a.n == 0) return cudaSuccess;
  return launch_phased<AddReluBackwardKernel<T>>(flat_config<T>(a.n), s, a);
}

template <class T>
cudaError_t launch_scale_shift_act(ScaleShiftArgs<T> a, cudaStream_t s) {
  if (a.n == 0) return cudaSuccess;
  const LaunchConfig cfg = scale_shift_config(a);
  return launch_phased<ScaleShiftActKernel<T>>(cfg, s, a);
}

template <class T>
cudaError_t launch_scale_shift_act_backward(ScaleShiftArgs<T> a, cudaStream_t s) {
  if (a.C == 0) return cudaSuccess;
  ScaleShiftArgs<T> sized = a;
  const LaunchConfig part = scale_shift_backward_config(sized);
  if (sized.slots != a.slots) return cudaErrorInvalidConfiguration;  // partial sized for another config
  if (a.n > 0) {
    const cudaError_t e = launch_phased<ScaleShiftBackwardReduceKernel<T>>(part, s, sized);
    if (e != cudaSuccess) return e;
  }
  return launch_phased<ScaleShiftBackwardFinalizeKernel<T>>(channel_finalize_config(a.C), s, sized);
}

}  // namespace resfused::cuda
