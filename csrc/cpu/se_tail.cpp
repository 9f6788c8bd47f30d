// CPU kernel of the squeeze-excitation tail (schema in ../schemas/se_tail_schema.cpp):
//   out = relu(y * gate[n, c] + residual)
// one pass over y and residual, vectorized with at::vec, parallel with at::parallel_for, arithmetic in
// float (double for float64 inputs), NCHW and channels_last. Its backward is written with existing ops
// (resfused/kernels/se_tail.py).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/channel_reduce.h"
#include "cpu/vec_io.h"

namespace resfused::cpu {
namespace {

void check_scale_add_relu(const at::Tensor& y, const at::Tensor& gate, const at::Tensor& residual) {
  check_activation(y, "y");
  TORCH_CHECK(y.dim() == 4, "resfused.scale_add_relu: 'y' must have shape (N, C, H, W), got rank ", y.dim());
  check_like(y, "y", residual, "residual", "scale_add_relu");
  check_float_tensor(gate, "gate");
  check_same_device(y, "y", gate, "gate");
  check_same_dtype(y, "y", gate, "gate");
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == y.size(0) && gate.size(1) == y.size(1),
              "resfused.scale_add_relu: 'gate' must have shape [", y.size(0), ", ", y.size(1),
              "] (one value per image and channel of 'y'), got ", gate.sizes());
}

at::Tensor scale_add_relu(const at::Tensor& y, const at::Tensor& gate, const at::Tensor& residual) {
  check_scale_add_relu(y, gate, residual);
  // y and residual in y's memory format, so one row walk covers both.
  const auto fmt = y.suggest_memory_format();
  auto yc = y.contiguous(fmt), rc = residual.contiguous(fmt);
  auto out = at::empty_like(yc, fmt);
  if (yc.numel() == 0) return out;
  const ChannelGeometry geo(yc);
  // channels_last: H*W rows of C values per image (row r is image r / rows_per_image);
  // NCHW: planes r = n * C + c, the gate's own flat index.
  const int64_t C = geo.channels, rows_per_image = geo.rows / yc.size(0), inner = geo.inner;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "resfused_scale_add_relu_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using Acc = typename IO::Acc;
    using Vec = typename IO::Vec;
    auto gate_acc = gate.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    const Acc* g = gate_acc.const_data_ptr<Acc>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const scalar_t* rp = rc.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_row(geo, [&](int64_t r) {
      const scalar_t* yr = yp + r * inner;
      const scalar_t* rr = rp + r * inner;
      scalar_t* orow = op + r * inner;
      int64_t i = 0;
      if (geo.channels_last) {  // the channel varies along the row: a vector of gates
        const Acc* gr = g + (r / rows_per_image) * C;
        for (; i + IO::kSize <= inner; i += IO::kSize) {
          Vec v = IO::load(yr + i) * Vec::loadu(gr + i) + IO::load(rr + i);
          IO::store(orow + i, at::vec::maximum(v, Vec(0)));
        }
        for (; i < inner; ++i)
          orow[i] = static_cast<scalar_t>(relu_scalar(static_cast<Acc>(yr[i]) * gr[i] + static_cast<Acc>(rr[i])));
      } else {  // one channel of one image per plane: a broadcast gate
        const Acc gs = g[r];
        const Vec gv(gs);
        for (; i + IO::kSize <= inner; i += IO::kSize) {
          Vec v = IO::load(yr + i) * gv + IO::load(rr + i);
          IO::store(orow + i, at::vec::maximum(v, Vec(0)));
        }
        for (; i < inner; ++i)
          orow[i] = static_cast<scalar_t>(relu_scalar(static_cast<Acc>(yr[i]) * gs + static_cast<Acc>(rr[i])));
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace resfused::cpu

TORCH_LIBRARY_IMPL(resfused, CPU, m) { m.impl("scale_add_relu", &resfused::cpu::scale_add_relu); }
