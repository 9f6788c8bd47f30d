// CPU kernels of the elementwise tails (schemas in ../tails.cpp): vectorized with at::vec,
// parallel with at::parallel_for, arithmetic in float (double for float64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cpu/vec_io.h"

namespace resfused::cpu {
namespace {

constexpr int64_t kGrain = 32768;  // elements per parallel task for pure streaming loops

// out[i] = f(a[i], b[i]) over two equally laid-out dense buffers.
template <typename T, typename VecOp, typename ScalarOp>
void binary_map(T* out, const T* a, const T* b, int64_t n, VecOp vec_op, ScalarOp scalar_op) {
  using IO = VecIO<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + IO::kSize <= end; i += IO::kSize) IO::store(out + i, vec_op(IO::load(a + i), IO::load(b + i)));
    for (; i < end; ++i) out[i] = static_cast<T>(scalar_op(static_cast<typename IO::Acc>(a[i]), static_cast<typename IO::Acc>(b[i])));
  });
}

at::Tensor add_relu(const at::Tensor& x, const at::Tensor& residual) {
  check_activation(x, "x");
  check_same_device(x, "x", residual, "residual");
  check_same_dtype(x, "x", residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes(), "resfused.add_relu: 'residual' must have the shape of 'x' ", x.sizes(),
              ", got ", residual.sizes());
  // Both operands in x's memory format, so one flat loop covers them.
  const auto fmt = x.suggest_memory_format();
  auto xc = x.contiguous(fmt), rc = residual.contiguous(fmt);
  auto out = at::empty_like(xc, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_add_relu_cpu", [&] {
    using Vec = typename VecIO<scalar_t>::Vec;
    using Acc = typename VecIO<scalar_t>::Acc;
    binary_map(out.data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(), xc.numel(),
               [](Vec a, Vec b) { return at::vec::maximum(a + b, Vec(0)); },
               [](Acc a, Acc b) { return relu_scalar(a + b); });
  });
  return out;
}

at::Tensor add_relu_backward(const at::Tensor& grad_out, const at::Tensor& out) {
  check_activation(out, "out");
  check_same_device(out, "out", grad_out, "grad_out");
  check_same_dtype(out, "out", grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "resfused.add_relu_backward: 'grad_out' must have the shape of 'out' ",
              out.sizes(), ", got ", grad_out.sizes());
  const auto fmt = out.suggest_memory_format();
  auto gc = grad_out.contiguous(fmt), oc = out.contiguous(fmt);
  auto grad_in = at::empty_like(oc, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "resfused_add_relu_backward_cpu", [&] {
    using Vec = typename VecIO<scalar_t>::Vec;
    using Acc = typename VecIO<scalar_t>::Acc;
    binary_map(grad_in.data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), oc.const_data_ptr<scalar_t>(), oc.numel(),
               [](Vec g, Vec o) { return Vec::blendv(Vec(0), g, o > Vec(0)); },
               [](Acc g, Acc o) { return o > Acc(0) ? g : Acc(0); });
  });
  return grad_in;
}

// Geometry of a (N, C, spatial...) tensor as the kernels walk it. Channels innermost:
// `rows` = N*spatial rows of C values. Otherwise: `rows` = N*C planes of `inner` values each,
// plane p belonging to channel p % C.
struct ChannelGeometry {
  bool channels_last;
  int64_t channels, rows, inner;
  explicit ChannelGeometry(const at::Tensor& x) : channels_last(channels_innermost(x)), channels(x.size(1)) {
    int64_t spatial = 1;
    for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
    inner = channels_last ? channels : spatial;
    rows = inner == 0 ? 0 : x.numel() / inner;
  }
};

void check_scale_shift(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  check_activation(x, "x");
  check_channel_vector(scale, "scale", x, "x");
  check_channel_vector(shift, "shift", x, "x");
}

at::Tensor scale_shift_act(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  check_scale_shift(x, scale, shift);
  auto xc = x.contiguous(x.suggest_memory_format());
  auto out = at::empty_like(xc, x.suggest_memory_format());
  const ChannelGeometry geo(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_scale_shift_act_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using Acc = typename IO::Acc;
    using Vec = typename IO::Vec;
    // scale/shift in the arithmetic precision, whatever dtype they came in.
    auto sc = scale.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    auto sh = shift.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    const Acc* s = sc.const_data_ptr<Acc>();
    const Acc* b = sh.const_data_ptr<Acc>();
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t inner = geo.inner, C = geo.channels;
    const bool cl = geo.channels_last;
    at::parallel_for(0, geo.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* src = in + r * inner;
        scalar_t* dst = o + r * inner;
        int64_t i = 0;
        if (cl) {  // the channel varies along the row: vector scale/shift
          for (; i + IO::kSize <= inner; i += IO::kSize) {
            Vec v = IO::load(src + i) * Vec::loadu(s + i) + Vec::loadu(b + i);
            IO::store(dst + i, relu ? at::vec::maximum(v, Vec(0)) : v);
          }
          for (; i < inner; ++i) {
            Acc v = static_cast<Acc>(src[i]) * s[i] + b[i];
            dst[i] = static_cast<scalar_t>(relu ? relu_scalar(v) : v);
          }
        } else {  // one channel per plane: broadcast scale/shift
          const Acc sv = s[r % C], bv = b[r % C];
          for (; i + IO::kSize <= inner; i += IO::kSize) {
            Vec v = IO::load(src + i) * Vec(sv) + Vec(bv);
            IO::store(dst + i, relu ? at::vec::maximum(v, Vec(0)) : v);
          }
          for (; i < inner; ++i) {
            Acc v = static_cast<Acc>(src[i]) * sv + bv;
            dst[i] = static_cast<scalar_t>(relu ? relu_scalar(v) : v);
          }
        }
      }
    });
  });
  return out;
}

// grad_x = g' * scale[c]; grad_scale[c] = sum g' * x; grad_shift[c] = sum g',
// with g' = grad_out masked by (x*scale + shift > 0) when relu. Per-channel sums are accumulated
// per task in the arithmetic precision and added up at the end (deterministic for a thread count).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                        const at::Tensor& scale, const at::Tensor& shift,
                                                                        bool relu) {
  check_scale_shift(x, scale, shift);
  check_same_device(x, "x", grad_out, "grad_out");
  check_same_dtype(x, "x", grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "resfused.scale_shift_act_backward: 'grad_out' must have the shape of 'x' ",
              x.sizes(), ", got ", grad_out.sizes());
  const auto fmt = x.suggest_memory_format();
  auto xc = x.contiguous(fmt), gc = grad_out.contiguous(fmt);
  auto grad_x = at::empty_like(xc, fmt);
  const ChannelGeometry geo(xc);
  const int64_t C = geo.channels, inner = geo.inner;
  at::Tensor grad_scale, grad_shift;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_scale_shift_act_backward_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using Acc = typename IO::Acc;
    using Vec = typename IO::Vec;
    constexpr auto acc_type = c10::CppTypeToScalarType<Acc>::value;
    auto sc = scale.to(acc_type).contiguous(), sh = shift.to(acc_type).contiguous();
    const Acc* s = sc.const_data_ptr<Acc>();
    const Acc* b = sh.const_data_ptr<Acc>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    // Fixed task split (independent of the thread count) so the sums are reproducible.
    const int64_t rows = geo.rows;
    const int64_t rows_per_task = std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1));
    const int64_t tasks = rows == 0 ? 0 : (rows + rows_per_task - 1) / rows_per_task;
    std::vector<Acc> partial(static_cast<size_t>(tasks * 2 * C), Acc(0));  // [task][scale|shift][C]
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        Acc* ps = partial.data() + t * 2 * C;
        Acc* pb = ps + C;
        for (int64_t r = t * rows_per_task; r < std::min(rows, (t + 1) * rows_per_task); ++r) {
          const scalar_t* xr = xp + r * inner;
          const scalar_t* gr = gp + r * inner;
          scalar_t* gxr = gx + r * inner;
          int64_t i = 0;
          if (geo.channels_last) {
            for (; i + IO::kSize <= inner; i += IO::kSize) {
              Vec xv = IO::load(xr + i), sv = Vec::loadu(s + i), g = IO::load(gr + i);
              if (relu) g = Vec::blendv(Vec(0), g, xv * sv + Vec::loadu(b + i) > Vec(0));
              IO::store(gxr + i, g * sv);
              (Vec::loadu(ps + i) + g * xv).store(ps + i);
              (Vec::loadu(pb + i) + g).store(pb + i);
            }
            for (; i < inner; ++i) {
              Acc xv = xr[i], g = gr[i];
              if (relu && !(xv * s[i] + b[i] > Acc(0))) g = Acc(0);
              gxr[i] = static_cast<scalar_t>(g * s[i]);
              ps[i] += g * xv;
              pb[i] += g;
            }
          } else {
            const int64_t c = r % C;
            const Vec sv(s[c]), bv(b[c]);
            Vec acc_s(0), acc_b(0);
            for (; i + IO::kSize <= inner; i += IO::kSize) {
              Vec xv = IO::load(xr + i), g = IO::load(gr + i);
              if (relu) g = Vec::blendv(Vec(0), g, xv * sv + bv > Vec(0));
              IO::store(gxr + i, g * sv);
              acc_s = acc_s + g * xv;
              acc_b = acc_b + g;
            }
            Acc sum_s = at::vec::vec_reduce_all([](Vec p, Vec q) { return p + q; }, acc_s);
            Acc sum_b = at::vec::vec_reduce_all([](Vec p, Vec q) { return p + q; }, acc_b);
            for (; i < inner; ++i) {
              Acc xv = xr[i], g = gr[i];
              if (relu && !(xv * s[c] + b[c] > Acc(0))) g = Acc(0);
              gxr[i] = static_cast<scalar_t>(g * s[c]);
              sum_s += g * xv;
              sum_b += g;
            }
            ps[c] += sum_s;
            pb[c] += sum_b;
          }
        }
      }
    });
    auto totals = at::zeros({2, C}, xc.options().dtype(acc_type));
    Acc* tot = totals.data_ptr<Acc>();
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t j = 0; j < 2 * C; ++j) tot[j] += partial[t * 2 * C + j];
    grad_scale = totals[0].to(scale.scalar_type(), /*non_blocking=*/false, /*copy=*/true);  // own storage: outputs must not alias
    grad_shift = totals[1].to(shift.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  });
  return {grad_x, grad_scale, grad_shift};
}

}  // namespace
}  // namespace resfused::cpu

TORCH_LIBRARY_IMPL(resfused, CPU, m) {
  m.impl("add_relu", &resfused::cpu::add_relu);
  m.impl("add_relu_backward", &resfused::cpu::add_relu_backward);
  m.impl("scale_shift_act", &resfused::cpu::scale_shift_act);
  m.impl("scale_shift_act_backward", &resfused::cpu::scale_shift_act_backward);
}
