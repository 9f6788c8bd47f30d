// The tile code of the Winograd F(4x4, 3x3) transforms (winograd_f43.cpp has the math, the ops
// and the dispatch), written once over a vector type and included once per instance: in
// namespace wf43::generic with at::vec::Vectorized (the build's baseline ISA; float32 and
// float64), and inside a `#pragma GCC target` region with the AVX-512 Vec16. So it names no ATen
// function (in a target region, an ATen inline function would be compiled for a wider ISA than
// the build's) and includes only static_for.h, into each instance (see there). No include guard,
// on purpose.
//
// From the includer: kBT, kAT, kA, kTile, kAlpha, Geometry, position_offset, <utility>, and a
// Vec with Vec(float), +, -, *, fmadd(a, b, c) and maximum(a, b) (found by argument-dependent
// lookup; maximum propagates NaN), Vec::size(), Vec::loadu(p, count), v.store(p, count) and
// v.has_inf_nan().

#include "cpu/static_for.h"

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
          acc = started ? fmadd(Vec(c), v, acc) : Vec(c) * v;
        }
        started = true;
      }
    });
    out[r * os] = acc;
  });
}

// N vectors left uninitialized: Vectorized's default constructor zeroes, and zeroing the tile
// arrays (every element of which is written before it is read) measured 11% of the input
// transform (docs/measurements.md, Winograd F(4x4, 3x3), Kernel-level figures). The vector types
// are trivially copyable, so the byte array provides storage for them (C++20 implicit object
// creation).
template <typename Vec, int N>
struct Uninit {
  alignas(Vec) unsigned char bytes[N * sizeof(Vec)];
  Vec* data() { return reinterpret_cast<Vec*>(bytes); }
  Vec& operator[](int i) { return data()[i]; }
};

// out = M in M^T (R x R) for a K x K input, streamed: row(i, v) writes input row i into v[0..K),
// sink(r, c, value) takes output (r, c). A row and a column are the units of work, so each stays
// in registers and only the K x R intermediate tmp = in M^T goes through memory. (Staging whole
// tiles in arrays took 3x the loads and stores and ran the input transform 2.4x slower;
// docs/measurements.md, Winograd F(4x4, 3x3), Kernel-level figures.)
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

// Loads the kIn pixels of x's row h from column w0 on into v, zero outside the image.
template <int kIn, typename Vec, typename T>
__attribute__((always_inline)) inline void load_row(const T* x, const Geometry& g, int64_t n, int64_t h, int64_t w0,
                                                    int64_t c0, int64_t count, Vec* v) {
  const bool row_inside = h >= 0 && h < g.h;
  const int64_t first = (n * g.h + h) * g.w + w0;  // the pixel index of (h, w0)
  static_for<kIn>([&](auto j) __attribute__((always_inline)) {
    v[j] = row_inside && w0 + j >= 0 && w0 + j < g.w ? Vec::loadu(x + (first + j) * g.c + c0, count) : Vec(0);
  });
}

// f(t, n, ti, tj, c0, count) for the tiles t0 .. t1 - 1 and every vector of channels.
template <typename Vec, class F>
__attribute__((always_inline)) inline void for_tile_vectors(const Geometry& g, int64_t t0, int64_t t1, F&& f) {
  constexpr int64_t kVec = Vec::size();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / (g.th * g.tw), ti = t / g.tw % g.th, tj = t % g.tw;
    for (int64_t c0 = 0; c0 < g.c; c0 += kVec) f(t, n, ti, tj, c0, g.c - c0 < kVec ? g.c - c0 : kVec);
  }
}

// The three kernels' work on tiles t0 .. t1 - 1 (winograd_f43.cpp runs tile ranges in parallel).
template <typename Vec>
struct Tiles {
  // V = B^T d B for 6x6 windows at stride 4, offset -1 (the conv's zero padding); false when some
  // input value is NaN or +-Inf.
  template <typename T>
  static bool input(const T* x, T* v, const Geometry& g, int64_t t0, int64_t t1) {
    // 0 * x is +-0 for finite x and NaN for NaN / +-Inf: the sums stay finite only if every input
    // is. Two accumulators, so that the FMAs are not one long chain of dependent ones.
    const Vec zero(0);
    Vec p0(0), p1(0);
    for_tile_vectors<Vec>(
        g, t0, t1,
        [&](int64_t t, int64_t n, int64_t ti, int64_t tj, int64_t c0, int64_t count) __attribute__((always_inline)) {
          T* vt = v + position_offset(g, t, 0, c0);
          transform2d<kBT, 6, 6, Vec>(
              [&](int i, Vec* row) __attribute__((always_inline)) {
                load_row<kAlpha>(x, g, n, ti * kTile - 1 + i, tj * kTile - 1, c0, count, row);
                static_for<kAlpha>([&](auto j) __attribute__((always_inline)) {
                  if constexpr (j % 2 == 0)
                    p0 = fmadd(row[j], zero, p0);
                  else
                    p1 = fmadd(row[j], zero, p1);
                });
              },
              [&](int r, int c, const Vec& value)
                  __attribute__((always_inline)) { value.store(vt + (r * kAlpha + c) * g.c, count); });
        });
    return !(p0 + p1).has_inf_nan();
  }

  // Z = A g A^T for 4x4 output-gradient tiles.
  template <typename T>
  static void grad_output(const T* grad, T* z, const Geometry& g, int64_t t0, int64_t t1) {
    for_tile_vectors<Vec>(
        g, t0, t1,
        [&](int64_t t, int64_t n, int64_t ti, int64_t tj, int64_t c0, int64_t count) __attribute__((always_inline)) {
          T* zt = z + position_offset(g, t, 0, c0);
          transform2d<kA, 6, 4, Vec>(
              [&](int i, Vec* row) __attribute__((always_inline)) {
                load_row<kTile>(grad, g, n, ti * kTile + i, tj * kTile, c0, count, row);
              },
              [&](int r, int c, const Vec& value)
                  __attribute__((always_inline)) { value.store(zt + (r * kAlpha + c) * g.c, count); });
        });
  }

  // y = act(A^T M A + bias [+ residual]) for the output pixels of each tile inside g.h x g.w;
  // bias and residual may be null.
  template <typename T>
  static void output(const T* m, const T* bias, const T* residual, bool relu, T* y, const Geometry& g, int64_t t0,
                     int64_t t1) {
    for_tile_vectors<Vec>(g, t0, t1,
                          [&](int64_t t, int64_t n, int64_t ti, int64_t tj, int64_t c0, int64_t count)
                              __attribute__((always_inline)) {
                                const T* mt = m + position_offset(g, t, 0, c0);
                                const Vec bv = bias ? Vec::loadu(bias + c0, count) : Vec(0);
                                transform2d<kAT, 4, 6, Vec>(
                                    [&](int i, Vec* row) __attribute__((always_inline)) {
                                      static_for<kAlpha>([&](auto k) __attribute__((always_inline)) {
                                        row[k] = Vec::loadu(mt + (i * kAlpha + k) * g.c, count);
                                      });
                                    },
                                    [&](int i, int j, const Vec& value) __attribute__((always_inline)) {
                                      const int64_t oh = ti * kTile + i, ow = tj * kTile + j;
                                      if (oh >= g.h || ow >= g.w) return;
                                      const int64_t at = ((n * g.h + oh) * g.w + ow) * g.c + c0;
                                      Vec val = value + bv;
                                      if (residual) val = val + Vec::loadu(residual + at, count);
                                      if (relu) val = maximum(val, Vec(0));  // NaN passes, as in torch.relu
                                      val.store(y + at, count);
                                    });
                              });
  }
};
