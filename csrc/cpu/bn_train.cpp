// CPU kernels of training-mode BatchNorm(+ReLU) (schemas in ../schemas/bn_train_schema.cpp).
//
// Forward, two passes over x:
//   1. per-channel sums of d = x - K[c] and d^2, K[c] = the channel's first value (shifted data:
//      var = (S2 - S1^2/M) / M stays accurate when |mean| >> std), tasks added up in double;
//   2. y = act(x * s + b), s = weight / sqrt(var + eps), b = bias - mean * s.
// Backward (g' = grad, zeroed where y <= 0 when relu; xhat = (x - mean) * invstd; M values per channel):
//   grad_bias = sum g',  grad_weight = sum g' * xhat = invstd * (sum g'x - mean * sum g'),
//   grad_x = s * (g' - grad_bias / M - xhat * grad_weight / M) = g' * s + k1 * x + k0,
//   k1 = -s * invstd * grad_weight / M,  k0 = -s * grad_bias / M - k1 * mean;
//   pass 1 accumulates the two sums (reading g and x), pass 2 writes grad_x (reading g and x).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"
#include "cpu/affine_act.h"

namespace resfused::cpu {
namespace {

void check_bn_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_activation(x, "x");
  check_channel_vector(weight, "weight", x, "x");
  check_channel_vector(bias, "bias", x, "x");
  TORCH_CHECK(eps >= 0, "resfused.bn_train_act: 'eps' must be >= 0, got ", eps);
}

// (s, b) of the normalization in the arithmetic precision: s = w / sqrt(var + eps), b = bias - mean * s.
template <typename Acc>
void normalization_affine(const double* mean, const double* var, const at::Tensor& weight, const at::Tensor& bias,
                          double eps, Acc* s, Acc* b, int64_t C) {
  auto w = weight.to(at::kDouble).contiguous(), bb = bias.to(at::kDouble).contiguous();
  const double* wp = w.const_data_ptr<double>();
  const double* bp = bb.const_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    const double scale = wp[c] / std::sqrt(var[c] + eps);
    s[c] = static_cast<Acc>(scale);
    b[c] = static_cast<Acc>(bp[c] - mean[c] * scale);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_act(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& bias, double eps, bool relu) {
  check_bn_args(x, weight, bias, eps);
  const auto fmt = x.suggest_memory_format();
  auto xc = x.contiguous(fmt);
  auto y = at::empty_like(xc, fmt);
  const ChannelGeometry geo(xc);
  const int64_t C = geo.channels, M = geo.per_channel();
  TORCH_CHECK(M > 1, "Expected more than 1 value per channel when training, got input size ", x.sizes());
  at::Tensor mean_out, var_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_bn_train_act_cpu", [&] {
    using IO = VecIO<scalar_t>;
    using Acc = typename IO::Acc;
    using Vec = typename IO::Vec;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    // K[c]: the first value of channel c (row 0 holds every channel in channels_last; plane c otherwise).
    std::vector<Acc> K(C);
    for (int64_t c = 0; c < C; ++c) {
      const Acc first = static_cast<Acc>(geo.channels_last ? xp[c] : xp[c * geo.inner]);
      // Not an Inf or NaN: it would turn a channel of +Inf's mean into Inf - Inf = NaN (torch: Inf).
      K[c] = std::isfinite(first) ? first : Acc(0);
    }
    const Acc* k = K.data();
    const int64_t inner = geo.inner;
    auto sums = per_channel_sums<Acc>(geo, 2, [&](int64_t r, Acc* ps) {
      const scalar_t* xr = xp + r * inner;
      int64_t i = 0;
      if (geo.channels_last) {
        for (; i + IO::kSize <= inner; i += IO::kSize) {
          Vec d = IO::load(xr + i) - Vec::loadu(k + i);
          (Vec::loadu(ps + i) + d).store(ps + i);
          (Vec::loadu(ps + C + i) + d * d).store(ps + C + i);
        }
        for (; i < inner; ++i) {
          Acc d = static_cast<Acc>(xr[i]) - k[i];
          ps[i] += d;
          ps[C + i] += d * d;
        }
      } else {
        const int64_t c = r % C;
        const Vec kv(k[c]);
        Vec s1(0), s2(0);
        for (; i + IO::kSize <= inner; i += IO::kSize) {
          Vec d = IO::load(xr + i) - kv;
          s1 = s1 + d;
          s2 = s2 + d * d;
        }
        Acc a1 = at::vec::vec_reduce_all([](Vec p, Vec q) { return p + q; }, s1);
        Acc a2 = at::vec::vec_reduce_all([](Vec p, Vec q) { return p + q; }, s2);
        for (; i < inner; ++i) {
          Acc d = static_cast<Acc>(xr[i]) - k[c];
          a1 += d;
          a2 += d * d;
        }
        ps[c] += a1;
        ps[C + c] += a2;
      }
    });
    std::vector<double> mean(C), var(C);
    for (int64_t c = 0; c < C; ++c) {
      const double s1 = sums[c], s2 = sums[C + c];
      mean[c] = static_cast<double>(k[c]) + s1 / M;
      const double v = (s2 - s1 * s1 / M) / M;
      var[c] = v < 0 ? 0.0 : v;  // rounding can go below 0; a NaN (NaN or Inf in the channel) stays
    }
    std::vector<Acc> s(C), b(C);
    normalization_affine(mean.data(), var.data(), weight, bias, eps, s.data(), b.data(), C);
    affine_act_forward(geo, xp, y.data_ptr<scalar_t>(), s.data(), b.data(), relu);
    auto stats_opts = xc.options().dtype(c10::CppTypeToScalarType<Acc>::value);
    mean_out = at::from_blob(mean.data(), {C}, at::kDouble).to(stats_opts, false, /*copy=*/true);
    var_out = at::from_blob(var.data(), {C}, at::kDouble).to(stats_opts, false, /*copy=*/true);
  });
  return {y, mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_train_act_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                     const at::Tensor& weight, const at::Tensor& bias,
                                                                     const at::Tensor& mean, const at::Tensor& var,
                                                                     double eps, bool relu) {
  check_bn_args(x, weight, bias, eps);
  check_channel_vector(mean, "mean", x, "x");
  check_channel_vector(var, "var", x, "x");
  check_like(x, "x", grad_out, "grad_out", "bn_train_act_backward");
  const auto fmt = x.suggest_memory_format();
  auto xc = x.contiguous(fmt), gc = grad_out.contiguous(fmt);
  auto grad_x = at::empty_like(xc, fmt);
  const ChannelGeometry geo(xc);
  const int64_t C = geo.channels;
  const double M = static_cast<double>(geo.per_channel());
  at::Tensor grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_bn_train_act_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    auto mean64 = mean.to(at::kDouble).contiguous(), var64 = var.to(at::kDouble).contiguous();
    const double* mp = mean64.const_data_ptr<double>();
    const double* vp = var64.const_data_ptr<double>();
    std::vector<Acc> s(C), b(C), k1(C), k0(C);
    normalization_affine(mp, vp, weight, bias, eps, s.data(), b.data(), C);
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    auto sums = affine_act_backward(geo, gp, xp, s.data(), b.data(), relu, static_cast<scalar_t*>(nullptr), nullptr,
                                    nullptr, /*want_sums=*/true);
    std::vector<double> gw(C), gb(C);
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(vp[c] + eps);
      gb[c] = sums[C + c];
      gw[c] = invstd * (sums[c] - mp[c] * sums[C + c]);
      const double sc = static_cast<double>(s[c]);
      const double c1 = M > 0 ? -sc * invstd * gw[c] / M : 0.0;
      k1[c] = static_cast<Acc>(c1);
      k0[c] = static_cast<Acc>(M > 0 ? -sc * gb[c] / M - c1 * mp[c] : 0.0);
    }
    affine_act_backward(geo, gp, xp, s.data(), b.data(), relu, grad_x.data_ptr<scalar_t>(), k1.data(), k0.data(),
                        /*want_sums=*/false);
    grad_weight = at::from_blob(gw.data(), {C}, at::kDouble).to(weight.scalar_type(), false, /*copy=*/true);
    grad_bias = at::from_blob(gb.data(), {C}, at::kDouble).to(bias.scalar_type(), false, /*copy=*/true);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace
}  // namespace resfused::cpu

TORCH_LIBRARY_IMPL(resfused, CPU, m) {
  m.impl("bn_train_act", &resfused::cpu::bn_train_act);
  m.impl("bn_train_act_backward", &resfused::cpu::bn_train_act_backward);
}
