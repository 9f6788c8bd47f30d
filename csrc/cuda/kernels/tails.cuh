// Kernels of the elementwise tails (arguments and launch shapes in tails_config.cuh).
//   add_relu:          out = relu(a + b)
//   add_relu_backward: grad = out <= 0 ? 0 : grad_out   (NaN lets it through, as torch.relu's)
//   scale_shift_act:   y = [relu](x * scale[c] + shift[c])
//   its backward:      g' = grad, zeroed where x*scale+shift <= 0 if relu;
//                      grad_x = g' * scale[c], grad_scale[c] = sum g' x, grad_shift[c] = sum g'
// Arithmetic in acc_t<T> (float, or double for double); one rounding at each store.
#pragma once

#include "cuda/kernels/channel_slots.cuh"
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

// One element of the backward: writes grad_x, accumulates into (sum_gx, sum_g).
template <class T>
RESFUSED_DEVICE void scale_shift_backward_element(const ScaleShiftArgs<T>& a, int64_t i, int64_t c, acc_t<T>& sum_gx,
                                                  acc_t<T>& sum_g) {
  using A = acc_t<T>;
  const A xv = to_acc(a.x[i]), s = a.scale[c];
  A g = to_acc(a.grad[i]);
  if (a.relu && xv * s + a.shift[c] <= A(0)) g = A(0);
  a.out[i] = from_acc<T>(g * s);
  sum_gx += g * xv;
  sum_g += g;
}

template <class T>
struct ScaleShiftBackwardPartialKernel {
  using Params = ScaleShiftArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads > kPlaneThreads ? kTailThreads : kPlaneThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    using A = acc_t<T>;
    A sum_gx = 0, sum_g = 0;
    int64_t c = 0, slot = 0;
    const bool active =
        slot_walk(a, c, slot, [](int64_t) {}, [&](int64_t i) { scale_shift_backward_element(a, i, c, sum_gx, sum_g); });
    if (active) store_slot_pair(a.partial, slot, a.C, c, sum_gx, sum_g);
  }
};

template <class T>
struct ScaleShiftBackwardFinalizeKernel {
  using Params = ScaleShiftArgs<T>;
  static constexpr int kPhases = 1, kMaxThreads = kTailThreads;
  template <int>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float>) {
    const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // j = which * C + c
    if (j >= 2 * a.C) return;
    const int64_t which = j / a.C, c = j - which * a.C;
    a.totals[j] = sum_slots<acc_t<T>>(a.partial, a.slots, a.C, which, c);
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
    const cudaError_t e = launch_phased<ScaleShiftBackwardPartialKernel<T>>(part, s, sized);
    if (e != cudaSuccess) return e;
  }
  return launch_phased<ScaleShiftBackwardFinalizeKernel<T>>(finalize_config(a.C), s, sized);
}

}  // namespace resfused::cuda
