// The per-channel affine(+ReLU) passes that the tails and BatchNorm kernels share.
//
//   forward:  y = act(x * s[c] + b[c])
//   backward: g' = 0 where x * s[c] + b[c] <= 0 if relu, else g (a NaN lets g through, as
//             torch.relu's backward does: it zeroes where its output <= 0)
//             gx = g' * s[c] + k1[c] * x + k0[c]           (k1 = k0 = 0 for a fixed affine)
//             sums: S_gx[c] = sum g' * x,  S_g[c] = sum g'
//
// A fixed affine (scale_shift_act) needs gx with k = 0 and the sums in one pass. A training
// BatchNorm, whose s and b depend on the batch, needs the sums first (pass 1, no gx) and then
// gx with the k terms that carry the gradient through the batch mean and variance (pass 2).
#pragma once

#include <vector>

#include "cpu/channel_reduce.h"
#include "cpu/vec_io.h"

namespace resfused::cpu {

template <typename scalar_t>
void affine_act_forward(const ChannelGeometry& geo, const scalar_t* x, scalar_t* y, const at::opmath_type<scalar_t>* s,
                        const at::opmath_type<scalar_t>* b, bool relu) {
  using IO = VecIO<scalar_t>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  const int64_t inner = geo.inner, C = geo.channels;
  for_each_row(geo, [&](int64_t r) {
    const scalar_t* src = x + r * inner;
    scalar_t* dst = y + r * inner;
    int64_t i = 0;
    if (geo.channels_last) {  // the channel varies along the row: vector scale/shift
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
  });
}

// One backward pass (see the top of the file). `gx` may be null (no grad written); `k1`/`k0`
// may be null (zero); with `want_sums` returns {S_gx[0..C), S_g[0..C)} in double, else {}.
template <typename scalar_t>
std::vector<double> affine_act_backward(const ChannelGeometry& geo, const scalar_t* g, const scalar_t* x,
                                        const at::opmath_type<scalar_t>* s, const at::opmath_type<scalar_t>* b,
                                        bool relu, scalar_t* gx, const at::opmath_type<scalar_t>* k1,
                                        const at::opmath_type<scalar_t>* k0, bool want_sums) {
  using IO = VecIO<scalar_t>;
  using Acc = typename IO::Acc;
  using Vec = typename IO::Vec;
  const int64_t inner = geo.inner, C = geo.channels;
  auto row = [&](int64_t r, Acc* ps) {  // ps: [S_gx | S_g] partial sums of this task, or null
    const scalar_t* xr = x + r * inner;
    const scalar_t* gr = g + r * inner;
    scalar_t* gxr = gx ? gx + r * inner : nullptr;
    int64_t i = 0;
    if (geo.channels_last) {
      for (; i + IO::kSize <= inner; i += IO::kSize) {
        Vec xv = IO::load(xr + i), sv = Vec::loadu(s + i), gv = IO::load(gr + i);
        if (relu) gv = Vec::blendv(gv, Vec(0), xv * sv + Vec::loadu(b + i) <= Vec(0));
        if (gxr) {
          Vec out = gv * sv;
          if (k1) out = out + Vec::loadu(k1 + i) * xv + Vec::loadu(k0 + i);
          IO::store(gxr + i, out);
        }
        if (ps) {
          (Vec::loadu(ps + i) + gv * xv).store(ps + i);
          (Vec::loadu(ps + C + i) + gv).store(ps + C + i);
        }
      }
      for (; i < inner; ++i) {
        Acc xv = xr[i], gv = gr[i];
        if (relu && xv * s[i] + b[i] <= Acc(0)) gv = Acc(0);
        if (gxr) gxr[i] = static_cast<scalar_t>(gv * s[i] + (k1 ? k1[i] * xv + k0[i] : Acc(0)));
        if (ps) {
          ps[i] += gv * xv;
          ps[C + i] += gv;
        }
      }
    } else {
      const int64_t c = r % C;
      const Vec sv(s[c]), bv(b[c]), k1v(k1 ? k1[c] : Acc(0)), k0v(k1 ? k0[c] : Acc(0));
      Vec acc_gx(0), acc_g(0);
      for (; i + IO::kSize <= inner; i += IO::kSize) {
        Vec xv = IO::load(xr + i), gv = IO::load(gr + i);
        if (relu) gv = Vec::blendv(gv, Vec(0), xv * sv + bv <= Vec(0));
        if (gxr) IO::store(gxr + i, k1 ? gv * sv + k1v * xv + k0v : gv * sv);
        acc_gx = acc_gx + gv * xv;
        acc_g = acc_g + gv;
      }
      Acc sum_gx = at::vec::vec_reduce_all([](Vec p, Vec q) { return p + q; }, acc_gx);
      Acc sum_g = at::vec::vec_reduce_all([](Vec p, Vec q) { return p + q; }, acc_g);
      for (; i < inner; ++i) {
        Acc xv = xr[i], gv = gr[i];
        if (relu && !(xv * s[c] + b[c] > Acc(0))) gv = Acc(0);
        if (gxr) gxr[i] = static_cast<scalar_t>(gv * s[c] + (k1 ? k1[c] * xv + k0[c] : Acc(0)));
        sum_gx += gv * xv;
        sum_g += gv;
      }
      if (ps) {
        ps[c] += sum_gx;
        ps[C + c] += sum_g;
      }
    }
  };
  if (want_sums) return per_channel_sums<Acc>(geo, 2, row);
  for_each_row(geo, [&](int64_t r) { row(r, nullptr); });
  return {};
}

}  // namespace resfused::cpu
