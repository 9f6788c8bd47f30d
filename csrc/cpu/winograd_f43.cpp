// CPU kernels of the Winograd F(4x4, 3x3) tile transforms (schemas in ../schemas/winograd_f43_schema.cpp; the math,
// the weight transforms and the GEMMs between these kernels: resfused/kernels/winograd_f43.py).
//
// A 3x3 stride-1 convolution of a 6x6 input window d gives a 4x4 output tile
//     Y = A^T [ (G w G^T) (.) (B^T d B) ] A          ((.) is the elementwise product)
// with the interpolation points 0, -1, 1, 1/2, -2 and infinity; measured against a float64 direct
// conv, these points give ~3x less float32 error than the usual 0, +-1, +-2 (docs/measurements.md,
// Winograd F(4x4, 3x3), Error study). B^T's rows are scaled to small integers (exact in float32);
// G absorbs the inverse scales and is applied in float64 to the weights, once.
//
// Each kernel walks tiles in parallel, one vector of channels at a time (channels are innermost
// in both the NHWC activations and the [T, 36, C] transformed domain), so every load and store is
// a contiguous run of channels, and a tile's 36 positions lie together. The 1-D transforms are
// unrolled at compile time from the matrices below, skipping zero coefficients and
// multiplications by +-1. The tile code (winograd_f43_tiles.h) is compiled twice: with at::vec
// (the build's AVX2 baseline, float32 and float64) and with 16-float AVX-512 vectors inside a
// `#pragma GCC target` region, which float32 calls take where the CPU and ATen's capability allow
// (cpu/isa.h): on one thread it measured 1.4-1.6x faster than the AVX2 instance
// (docs/measurements.md, Winograd F(4x4, 3x3), Kernel-level figures).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common.h"
#include "cpu/isa.h"

namespace resfused::cpu::wf43 {

template <int R, int K>
struct Mat {
  float m[R][K];
};

constexpr Mat<6, 6> kBT{{{2, -3, -4, 3, 2, 0},
                         {0, -2, 5, -1, -2, 0},
                         {0, -2, 1, 5, 2, 0},
                         {0, 2, 1, -2, -1, 0},
                         {0, 1, -2, -1, 2, 0},
                         {0, 2, -3, -4, 3, 2}}};
// A^T[i][j] = p_j^i for the finite points p_j; the last column is the point at infinity.
constexpr Mat<4, 6> kAT{
    {{1, 1, 1, 1, 1, 0}, {0, -1, 1, 0.5f, -2, 0}, {0, 1, 1, 0.25f, 4, 0}, {0, -1, 1, 0.125f, -8, 1}}};

template <int R, int K>
constexpr Mat<K, R> transpose(const Mat<R, K>& a) {
  Mat<K, R> t{};
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < K; ++k) t.m[k][r] = a.m[r][k];
  return t;
}
constexpr Mat<6, 4> kA = transpose(kAT);

constexpr int64_t kTile = 4;   // output pixels per tile side
constexpr int64_t kAlpha = 6;  // input window / transformed tile side
constexpr int64_t kPositions = kAlpha * kAlpha;

struct Geometry {
  int64_t n, h, w, c, th, tw;
  int64_t tiles() const { return n * th * tw; }
  static Geometry of(int64_t n, int64_t h, int64_t w, int64_t c) {
    return {n, h, w, c, (h + kTile - 1) / kTile, (w + kTile - 1) / kTile};
  }
};

// Tile t's position e in the [T, 36, C] transformed domain.
inline int64_t position_offset(const Geometry& g, int64_t t, int e, int64_t c0) {
  return (t * kPositions + e) * g.c + c0;
}

namespace generic {
#include "cpu/winograd_f43_tiles.h"
}  // namespace generic

}  // namespace resfused::cpu::wf43

#ifdef RESFUSED_X86_TARGETS
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace resfused::cpu::wf43::avx512 {

// 16 floats in an AVX-512 register, with what the tile code needs of at::vec's interface (which
// is fixed at the build's ISA, so it cannot serve here). Uninitialized by default.
struct Vec16 {
  __m512 v;
  Vec16() = default;
  Vec16(__m512 x) : v(x) {}
  Vec16(float s) : v(_mm512_set1_ps(s)) {}
  static constexpr int64_t size() { return 16; }
  static __mmask16 lanes(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }
  static Vec16 loadu(const float* p, int64_t count) {
    return count >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lanes(count), p);
  }
  void store(float* p, int64_t count) const {
    if (count >= 16)
      _mm512_storeu_ps(p, v);
    else
      _mm512_mask_storeu_ps(p, lanes(count), v);
  }
  bool has_inf_nan() const {  // x - x is NaN exactly for NaN and +-Inf
    const __m512 d = _mm512_sub_ps(v, v);
    return _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q) != 0;
  }
};

// Free functions rather than hidden friends: GCC does not give friends defined in the class the
// region's target, and then cannot inline the intrinsics into them.
inline Vec16 operator+(Vec16 a, Vec16 b) { return _mm512_add_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a, Vec16 b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec16 operator*(Vec16 a, Vec16 b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
// NaN where either is NaN, as at::vec::maximum (the bare max returns its second operand then).
inline Vec16 maximum(Vec16 a, Vec16 b) {
  return _mm512_mask_mov_ps(_mm512_max_ps(a.v, b.v), _mm512_cmp_ps_mask(a.v, b.v, _CMP_UNORD_Q), _mm512_set1_ps(NAN));
}

#include "cpu/winograd_f43_tiles.h"

}  // namespace resfused::cpu::wf43::avx512
#pragma GCC pop_options
#endif  // RESFUSED_X86_TARGETS

namespace resfused::cpu::wf43 {
namespace {

// Runs f(Tiles, t0, t1) on ranges of g's tiles in parallel, with the widest instance of the tile
// code that serves T on this machine: the AVX-512 one for float32 where the CPU and ATen's
// capability (ATEN_CPU_CAPABILITY narrows it, as for ATen's own kernels) allow, else at::vec's.
template <typename T, class F>
void parallel_tiles(const Geometry& g, F&& f) {
  const int64_t grain = std::max<int64_t>(1, 2048 / g.c);
  [[maybe_unused]] const bool wide = std::is_same_v<T, float> && best_path() == Path::kAvx512;
  at::parallel_for(0, g.tiles(), grain, [&](int64_t t0, int64_t t1) {
#ifdef RESFUSED_X86_TARGETS
    if constexpr (std::is_same_v<T, float>) {
      if (wide) return f(avx512::Tiles<avx512::Vec16>{}, t0, t1);
    }
#endif
    f(generic::Tiles<at::vec::Vectorized<T>>{}, t0, t1);
  });
}

at::Tensor channels_last(const at::Tensor& x) { return x.contiguous(at::MemoryFormat::ChannelsLast); }

void check_input(const at::Tensor& x, const char* name, const char* op) {
  check_float_tensor(x, name);
  TORCH_CHECK(x.device().is_cpu(), "resfused.", op, ": '", name, "' must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "resfused.", op, ": '", name, "' must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "resfused.", op, ": '", name,
              "' must be float32 or float64, got ", x.scalar_type());
}

// The transform of 6x6 input windows at stride 4, offset -1 (the conv's zero padding), and
// whether every input value was finite. Callers use the direct conv when one is not: Winograd
// spreads a NaN or Inf over every output of the tiles whose window holds it (up to 8x8 outputs,
// where a direct 3x3 conv touches 3x3), so only finite inputs give the reference's result.
std::tuple<at::Tensor, at::Tensor> winograd_f43_input(const at::Tensor& x_in) {
  check_input(x_in, "x", "winograd_f43_input");
  const auto x = channels_last(x_in);
  const auto g = Geometry::of(x.size(0), x.size(2), x.size(3), x.size(1));
  auto v = at::empty({g.tiles(), kPositions, g.c}, x.options().memory_format(at::MemoryFormat::Contiguous));
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "resfused_winograd_f43_input", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    parallel_tiles<scalar_t>(g, [&](auto tiles, int64_t t0, int64_t t1) {
      if (!tiles.input(xp, vp, g, t0, t1)) finite.store(false, std::memory_order_relaxed);
    });
  });
  return {v, at::scalar_tensor(finite.load(), x.options().dtype(at::kBool))};
}

// The transform of 4x4 output-gradient tiles into the 6x6 domain: Z = A g A^T.
at::Tensor winograd_f43_grad_output(const at::Tensor& grad_in) {
  check_input(grad_in, "grad", "winograd_f43_grad_output");
  const auto grad = channels_last(grad_in);
  const auto g = Geometry::of(grad.size(0), grad.size(2), grad.size(3), grad.size(1));
  auto z = at::empty({g.tiles(), kPositions, g.c}, grad.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "resfused_winograd_f43_grad_output", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    parallel_tiles<scalar_t>(g, [&](auto tiles, int64_t t0, int64_t t1) { tiles.grad_output(gp, zp, g, t0, t1); });
  });
  return z;
}

// Y = A^T M A per tile, then + bias, + residual, ReLU, written into y (N, C, H, W, channels_last
// contiguous); pixels beyond H x W are dropped.
void output_into(const at::Tensor& m, const at::Tensor& y, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& residual_in, bool relu) {
  check_float_tensor(m, "m");
  const int64_t n = y.size(0), h = y.size(2), w = y.size(3);
  TORCH_CHECK(n > 0 && h > 0 && w > 0, "resfused.winograd_f43_output: 'n', 'h', 'w' must be positive, got ", n, ", ", h,
              ", ", w);
  TORCH_CHECK(m.dim() == 3 && m.size(1) == kPositions,
              "resfused.winograd_f43_output: 'm' must have shape [T, 36, C], got ", m.sizes());
  const auto g = Geometry::of(n, h, w, m.size(2));
  TORCH_CHECK(m.size(0) == g.tiles(), "resfused.winograd_f43_output: 'm' has ", m.size(0), " tiles but an output of ",
              n, "x", h, "x", w, " has ", g.tiles());
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble,
              "resfused.winograd_f43_output: 'm' must be float32 or float64, got ", m.scalar_type());
  const auto mc = m.contiguous();
  at::Tensor b, res;
  if (bias.has_value()) {
    b = bias->contiguous();
    check_same_dtype(m, "m", b, "bias");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g.c, "resfused.winograd_f43_output: 'bias' must have shape [", g.c,
                "], got ", b.sizes());
  }
  if (residual_in.has_value()) {
    res = channels_last(*residual_in);
    check_same_dtype(m, "m", res, "residual");
    TORCH_CHECK(res.sizes() == y.sizes(), "resfused.winograd_f43_output: 'residual' must have the output's shape ",
                y.sizes(), ", got ", res.sizes());
  }
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "resfused_winograd_f43_output", [&] {
    const scalar_t* mp = mc.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    parallel_tiles<scalar_t>(
        g, [&](auto tiles, int64_t t0, int64_t t1) { tiles.output(mp, bp, rp, relu, yp, g, t0, t1); });
  });
}

at::Tensor winograd_f43_output(const at::Tensor& m, int64_t n, int64_t h, int64_t w,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                               bool relu) {
  TORCH_CHECK(n > 0 && h > 0 && w > 0, "resfused.winograd_f43_output: 'n', 'h', 'w' must be positive, got ", n, ", ", h,
              ", ", w);
  TORCH_CHECK(m.dim() == 3, "resfused.winograd_f43_output: 'm' must have shape [T, 36, C], got ", m.sizes());
  auto y = at::empty({n, m.size(2), h, w}, m.options().memory_format(at::MemoryFormat::ChannelsLast));
  output_into(m, y, bias, residual, relu);
  return y;
}

// winograd_f43_output writing into `out` (which may be a batch slice of a larger output).
void winograd_f43_output_into(const at::Tensor& m, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, bool relu, const at::Tensor& out) {
  TORCH_CHECK(m.dim() == 3, "resfused.winograd_f43_output_into: 'm' must have shape [T, 36, C], got ", m.sizes());
  TORCH_CHECK(out.dim() == 4 && out.size(1) == m.size(2),
              "resfused.winograd_f43_output_into: 'out' must have shape [N, ", m.size(2), ", H, W], got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resfused.winograd_f43_output_into: 'out' must be channels_last contiguous");
  check_same_dtype(m, "m", out, "out");
  output_into(m, out, bias, residual, relu);
}

// Which instance of the tile code float32 calls run on this machine: "avx512" or "baseline" (the
// build's at::vec ISA, AVX2 on x86; float64 calls always run there). Read by the tests.
std::string cpu_path() { return best_path() == Path::kAvx512 ? "avx512" : "baseline"; }

}  // namespace
}  // namespace resfused::cpu::wf43

// No tensor argument: a catch-all kernel (the dispatcher has no device to pick by).
TORCH_LIBRARY_IMPL(resfused, CatchAll, m) { m.impl("winograd_f43_cpu_path", &resfused::cpu::wf43::cpu_path); }

TORCH_LIBRARY_IMPL(resfused, CPU, m) {
  m.impl("winograd_f43_input", &resfused::cpu::wf43::winograd_f43_input);
  m.impl("winograd_f43_grad_output", &resfused::cpu::wf43::winograd_f43_grad_output);
  m.impl("winograd_f43_output", &resfused::cpu::wf43::winograd_f43_output);
  m.impl("winograd_f43_output_into", &resfused::cpu::wf43::winograd_f43_output_into);
}
