// CPU kernels of the elementwise tails (schemas in ../schemas/tails_schema.cpp): vectorized with at::vec,
// parallel with at::parallel_for, arithmetic in float (double for float64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "cpu/affine_act.h"

namespace resfused::cpu {
namespace {

// out[i] = f(a[i], b[i]) over two equally laid-out dense buffers.
template <typename T, typename VecOp, typename ScalarOp>
void binary_map(T* out, const T* a, const T* b, int64_t n, VecOp vec_op, ScalarOp scalar_op) {
  using IO = VecIO<T>;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + IO::kSize <= end; i += IO::kSize) IO::store(out + i, vec_op(IO::load(a + i), IO::load(b + i)));
    for (; i < end; ++i)
      out[i] = static_cast<T>(scalar_op(static_cast<typename IO::Acc>(a[i]), static_cast<typename IO::Acc>(b[i])));
  });
}

at::Tensor add_relu(const at::Tensor& x, const at::Tensor& residual) {
  check_activation(x, "x");
  check_like(x, "x", residual, "residual", "add_relu");
  // Both operands in x's memory format, so one flat loop covers them.
  const auto fmt = x.suggest_memory_format();
  auto xc = x.contiguous(fmt), rc = residual.contiguous(fmt);
  auto out = at::empty_like(xc, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_add_relu_cpu", [&] {
    using Vec = typename VecIO<scalar_t>::Vec;
    using Acc = typename VecIO<scalar_t>::Acc;
    binary_map(
        out.data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(), xc.numel(),
        [](Vec a, Vec b) { return at::vec::maximum(a + b, Vec(0)); }, [](Acc a, Acc b) { return relu_scalar(a + b); });
  });
  return out;
}

at::Tensor add_relu_backward(const at::Tensor& grad_out, const at::Tensor& out) {
  check_activation(out, "out");
  check_like(out, "out", grad_out, "grad_out", "add_relu_backward");
  const auto fmt = out.suggest_memory_format();
  auto gc = grad_out.contiguous(fmt), oc = out.contiguous(fmt);
  auto grad_in = at::empty_like(oc, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "resfused_add_relu_backward_cpu", [&] {
    using Vec = typename VecIO<scalar_t>::Vec;
    using Acc = typename VecIO<scalar_t>::Acc;
    binary_map(
        grad_in.data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), oc.const_data_ptr<scalar_t>(), oc.numel(),
        [](Vec g, Vec o) { return Vec::blendv(g, Vec(0), o <= Vec(0)); },
        [](Acc g, Acc o) { return o <= Acc(0) ? Acc(0) : g; });
  });
  return grad_in;
}

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
    using Acc = at::opmath_type<scalar_t>;
    // scale/shift in the arithmetic precision, whatever dtype they came in.
    auto sc = scale.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    auto sh = shift.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    const Acc* s = sc.const_data_ptr<Acc>();
    const Acc* b = sh.const_data_ptr<Acc>();
    affine_act_forward(geo, xc.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s, b, relu);
  });
  return out;
}

// grad_x = g' * scale[c]; grad_scale[c] = sum g' * x; grad_shift[c] = sum g',
// with g' = grad_out, zeroed where x*scale + shift <= 0 when relu. Per-channel sums are accumulated
// per task in the arithmetic precision and added up in double (see per_channel_sums).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_shift_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                        const at::Tensor& scale,
                                                                        const at::Tensor& shift, bool relu) {
  check_scale_shift(x, scale, shift);
  check_like(x, "x", grad_out, "grad_out", "scale_shift_act_backward");
  const auto fmt = x.suggest_memory_format();
  auto xc = x.contiguous(fmt), gc = grad_out.contiguous(fmt);
  auto grad_x = at::empty_like(xc, fmt);
  const ChannelGeometry geo(xc);
  const int64_t C = geo.channels;
  at::Tensor grad_scale, grad_shift;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_scale_shift_act_backward_cpu", [&] {
        using Acc = at::opmath_type<scalar_t>;
        constexpr auto acc_type = c10::CppTypeToScalarType<Acc>::value;
        auto sc = scale.to(acc_type).contiguous(), sh = shift.to(acc_type).contiguous();
        const Acc* s = sc.const_data_ptr<Acc>();
        const Acc* b = sh.const_data_ptr<Acc>();
        auto sums = affine_act_backward(geo, gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), s, b, relu,
                                        grad_x.data_ptr<scalar_t>(), nullptr, nullptr, /*want_sums=*/true);
        auto totals = at::from_blob(sums.data(), {2, C}, at::kDouble);
        // own storage per output (outputs must not alias), in the dtype of scale / shift
        grad_scale = totals[0].to(scale.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
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
