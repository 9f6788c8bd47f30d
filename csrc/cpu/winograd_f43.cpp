// CPU kernels of the Winograd F(4x4, 3x3) tile transforms (schemas in ../winograd.cpp; the math,
// the weight transforms and the GEMMs between these kernels: resfused/ops/winograd.py).
//
// A 3x3 stride-1 convolution of a 6x6 input window d gives a 4x4 output tile
//     Y = A^T [ (G w G^T) (.) (B^T d B) ] A          ((.) is the elementwise product)
// with the interpolation points 0, -1, 1, 1/2, -2 and infinity; measured against a float64 direct
// conv, these points give ~3x less float32 error than the usual 0, +-1, +-2 (about 3e-6 of the
// output's max at 64..512 channels). B^T's rows are scaled to small integers (exact in float32);
// G absorbs the inverse scales and is applied in float64 to the weights, once.
//
// Each kernel walks tiles in parallel, one vector of channels at a time (channels are innermost
// in both the NHWC activations and the [T, 36, C] transformed domain), so every load and store is
// a contiguous run of channels, and a tile's 36 positions lie together. The 1-D transforms are unrolled at compile time from the
// matrices below, skipping zero coefficients and multiplications by +-1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <optional>
#include <utility>

#include "common.h"
#include "cpu/static_for.h"

namespace resfused::cpu {
namespace {

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
constexpr Mat<4, 6> kAT{{{1, 1, 1, 1, 1, 0},
                         {0, -1, 1, 0.5f, -2, 0},
                         {0, 1, 1, 0.25f, 4, 0},
                         {0, -1, 1, 0.125f, -8, 1}}};

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

// out[r * os] = sum_k M[r][k] * in[k * is], with M's zeros and +-1s resolved at compile time.
template <auto M, int R, int K, typename Vec>
__attribute__((always_inline)) inline void apply(const Vec* in, int is, Vec* out, int os) {
  static_for<R>([&](auto r) __attribute__((always_inline)) {
    Vec acc(0);
    bool started = false;  // constant after unrolling: the first term initializes acc
    static_for<K>([&](auto k) __attribute__((always_inline)) {
      constexpr float c = M.m[r][k];
      if constexpr (c != 0.f) {
        const Vec& v = in[k * is];
        if constexpr (c == 1.f) {
          acc = started ? acc + v : v;
        } else if constexpr (c == -1.f) {
          acc = started ? acc - v : Vec(0) - v;
        } else {
          acc = started ? at::vec::fmadd(Vec(c), v, acc) : Vec(c) * v;
        }
        started = true;
      }
    });
    out[r * os] = acc;
  });
}

// N vectors left uninitialized: Vectorized's default constructor zeroes, and zeroing the tile
// arrays (every element of which is written before it is read) measured 11% of the input
// transform.
// Vectorized is trivially copyable, so the byte array provides storage for it (C++20 implicit
// object creation).
template <typename Vec, int N>
struct Uninit {
  alignas(Vec) unsigned char bytes[N * sizeof(Vec)];
  Vec* data() { return reinterpret_cast<Vec*>(bytes); }
  Vec& operator[](int i) { return data()[i]; }
};

// out = M in M^T (R x R) for a K x K input, streamed: row(i, v) writes input row i into v[0..K),
// sink(r, c, value) takes output (r, c). A row and a column are the units of work, so each stays
// in registers and only the K x R intermediate tmp = in M^T goes through memory. (Staging whole
// tiles in arrays took 3x the loads and stores: the input transform of a 64-channel 56x56 image
// ran 2.4x slower, the output transform 1.7x.)
//     tmp[i][c] = sum_k M[c][k] in[i][k]        out[r][c] = sum_i M[r][i] tmp[i][c]
template <auto M, int R, int K, typename Vec, class Row, class Sink>
__attribute__((always_inline)) inline void transform2d(Row&& row, Sink&& sink) {
  Uninit<Vec, K * R> tmp;
  static_for<K>([&](auto i) __attribute__((always_inline)) {
    Uninit<Vec, K> in;
    row(i, in.data());
    apply<M, R, K>(in.data(), 1, tmp.data() + i * R, 1);
  });
  static_for<R>([&](auto c) __attribute__((always_inline)) {
    Uninit<Vec, R> column;
    apply<M, R, K>(tmp.data() + c, R, column.data(), 1);
    static_for<R>([&](auto r) __attribute__((always_inline)) { sink(r, c, column[r]); });
  });
}

struct Geometry {
  int64_t n, h, w, c, th, tw;
  int64_t tiles() const { return n * th * tw; }
  static Geometry of(int64_t n, int64_t h, int64_t w, int64_t c) {
    return {n, h, w, c, (h + kTile - 1) / kTile, (w + kTile - 1) / kTile};
  }
};

// The tile loop shared by the three kernels: f(t, n, ti, tj, c0, count) for every tile t and
// every vector of channels c0 .. c0 + count - 1.
template <typename Vec, class F>
void for_each_tile_vector(const Geometry& g, F&& f) {
  constexpr int64_t kVec = Vec::size();
  const int64_t grain = std::max<int64_t>(1, 2048 / g.c);
  at::parallel_for(0, g.tiles(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (g.th * g.tw), ti = t / g.tw % g.th, tj = t % g.tw;
      for (int64_t c0 = 0; c0 < g.c; c0 += kVec) f(t, n, ti, tj, c0, std::min(kVec, g.c - c0));
    }
  });
}

// Loads the kIn pixels of x's row h from column w0 on into v, zero outside the image.
template <int kIn, typename T, typename Vec = at::vec::Vectorized<T>>
__attribute__((always_inline)) inline void load_row(const T* x, const Geometry& g, int64_t n, int64_t h, int64_t w0,
                                                    int64_t c0, int64_t count, Vec* v) {
  const bool row_inside = h >= 0 && h < g.h;
  const int64_t first = (n * g.h + h) * g.w + w0;  // the pixel index of (h, w0)
  static_for<kIn>([&](auto j) __attribute__((always_inline)) {
    v[j] = row_inside && w0 + j >= 0 && w0 + j < g.w ? Vec::loadu(x + (first + j) * g.c + c0, count) : Vec(0);
  });
}

// Tile t's position e in the [T, 36, C] transformed domain.
inline int64_t position_offset(const Geometry& g, int64_t t, int e, int64_t c0) { return (t * kPositions + e) * g.c + c0; }

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
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    for_each_tile_vector<Vec>(g, [&](int64_t t, int64_t n, int64_t ti, int64_t tj, int64_t c0, int64_t count) __attribute__((flatten)) {
      // 0 * x is +-0 for finite x and NaN for NaN / +-Inf: the sums stay finite only if every
      // input is. Two accumulators, so that the FMAs are not one long chain of dependent ones.
      const Vec zero(0);
      Vec p0(0), p1(0);
      scalar_t* vt = vp + position_offset(g, t, 0, c0);
      transform2d<kBT, 6, 6, Vec>(
          [&](int i, Vec* row) __attribute__((always_inline)) {
            load_row<kAlpha>(xp, g, n, ti * kTile - 1 + i, tj * kTile - 1, c0, count, row);
            static_for<kAlpha>([&](auto j) __attribute__((always_inline)) {
              if constexpr (j % 2 == 0) p0 = at::vec::fmadd(row[j], zero, p0);
              else p1 = at::vec::fmadd(row[j], zero, p1);
            });
          },
          [&](int r, int c, const Vec& value) __attribute__((always_inline)) {
            value.store(vt + (r * kAlpha + c) * g.c, count);
          });
      if ((p0 + p1).has_inf_nan()) finite.store(false, std::memory_order_relaxed);
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
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    for_each_tile_vector<Vec>(g, [&](int64_t t, int64_t n, int64_t ti, int64_t tj, int64_t c0, int64_t count) __attribute__((flatten)) {
      scalar_t* zt = zp + position_offset(g, t, 0, c0);
      transform2d<kA, 6, 4, Vec>(
          [&](int i, Vec* row) __attribute__((always_inline)) {
            load_row<kTile>(gp, g, n, ti * kTile + i, tj * kTile, c0, count, row);
          },
          [&](int r, int c, const Vec& value) __attribute__((always_inline)) {
            value.store(zt + (r * kAlpha + c) * g.c, count);
          });
    });
  });
  return z;
}

// Y = A^T M A per tile, then + bias, + residual, ReLU, written into y (N, C, H, W, channels_last
// contiguous); pixels beyond H x W are dropped.
void output_into(const at::Tensor& m, const at::Tensor& y, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& residual_in, bool relu) {
  check_float_tensor(m, "m");
  const int64_t n = y.size(0), h = y.size(2), w = y.size(3);
  TORCH_CHECK(n > 0 && h > 0 && w > 0, "resfused.winograd_f43_output: 'n', 'h', 'w' must be positive, got ", n, ", ",
              h, ", ", w);
  TORCH_CHECK(m.dim() == 3 && m.size(1) == kPositions, "resfused.winograd_f43_output: 'm' must have shape [T, 36, C], got ",
              m.sizes());
  const auto g = Geometry::of(n, h, w, m.size(2));
  TORCH_CHECK(m.size(0) == g.tiles(), "resfused.winograd_f43_output: 'm' has ", m.size(0), " tiles but an output of ", n,
              "x", h, "x", w, " has ", g.tiles());
  TORCH_CHECK(m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble,
              "resfused.winograd_f43_output: 'm' must be float32 or float64, got ", m.scalar_type());
  const auto mc = m.contiguous();
  at::Tensor b, res;
  if (bias.has_value()) {
    b = bias->contiguous();
    check_same_dtype(m, "m", b, "bias");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g.c, "resfused.winograd_f43_output: 'bias' must have shape [", g.c, "], got ",
                b.sizes());
  }
  if (residual_in.has_value()) {
    res = channels_last(*residual_in);
    check_same_dtype(m, "m", res, "residual");
    TORCH_CHECK(res.sizes() == y.sizes(), "resfused.winograd_f43_output: 'residual' must have the output's shape ",
                y.sizes(), ", got ", res.sizes());
  }
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "resfused_winograd_f43_output", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* mp = mc.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_each_tile_vector<Vec>(g, [&](int64_t t, int64_t n_, int64_t ti, int64_t tj, int64_t c0, int64_t count) __attribute__((flatten)) {
      const scalar_t* mt = mp + position_offset(g, t, 0, c0);
      const Vec bv = bp ? Vec::loadu(bp + c0, count) : Vec(0);
      transform2d<kAT, 4, 6, Vec>(
          [&](int i, Vec* row) __attribute__((always_inline)) {
            static_for<kAlpha>([&](auto k) __attribute__((always_inline)) {
              row[k] = Vec::loadu(mt + (i * kAlpha + k) * g.c, count);
            });
          },
          [&](int i, int j, const Vec& value) __attribute__((always_inline)) {
            const int64_t oh = ti * kTile + i, ow = tj * kTile + j;
            if (oh >= h || ow >= w) return;
            const int64_t at = ((n_ * h + oh) * w + ow) * g.c + c0;
            Vec val = value + bv;
            if (rp) val = val + Vec::loadu(rp + at, count);
            if (relu) val = at::vec::maximum(val, Vec(0));  // NaN passes, as in torch.relu
            val.store(yp + at, count);
          });
    });
  });
}

at::Tensor winograd_f43_output(const at::Tensor& m, int64_t n, int64_t h, int64_t w,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                               bool relu) {
  TORCH_CHECK(n > 0 && h > 0 && w > 0, "resfused.winograd_f43_output: 'n', 'h', 'w' must be positive, got ", n, ", ",
              h, ", ", w);
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

}  // namespace
}  // namespace resfused::cpu

TORCH_LIBRARY_IMPL(resfused, CPU, m) {
  m.impl("winograd_f43_input", &resfused::cpu::winograd_f43_input);
  m.impl("winograd_f43_grad_output", &resfused::cpu::winograd_f43_grad_output);
  m.impl("winograd_f43_output", &resfused::cpu::winograd_f43_output);
  m.impl("winograd_f43_output_into", &resfused::cpu::winograd_f43_output_into);
}
