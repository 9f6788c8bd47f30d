// CPU kernel of resfused::grouped_conv3x3 (schema in ../schemas/grouped_conv3x3_schema.cpp): a direct NHWC grouped
// 3x3 convolution, padding 1, stride 1 or 2, bias + ReLU in the epilogue, fp32 or bf16 in and out
// with fp32 accumulation.
//
// Why direct: with 4 or 8 channels per group a GEMM formulation wastes most of a 16-wide tile, so
// oneDNN reaches ~24 GFLOP/s on ResNeXt's first stage where a dense conv reaches ~200 (where this
// kernel wins: docs/measurements.md, Grouped 3x3 (CPU); resfused/kernels/conv_grouped.py). Here one
// vector of V lanes (V = 16 fp32 for AVX-512, 8 for AVX2) holds V contiguous NHWC channels, i.e.
// V/G whole groups of G channels, and every lane accumulates one output channel.
//
// The math of one vector. Output lane l = (group g, output channel j of the group) needs
//   sum over (kh, kw, ci < G) of x[ih, iw, g*G + ci] * w[g*G + j, ci, kh, kw].
// Instead of broadcasting each x[g*G + ci] across its group (G shuffles), we use G *rotations*
// r_s (s < G) of the input vector that keep every value inside its group: lane (g, j) of r_s holds
// x[g*G + rot(j, s)] with rot(j, s) = ((j/4 + s/4) mod G/4) * 4 + (j + s) mod 4. For a fixed lane,
// s -> rot(j, s) is a bijection onto 0..G-1, so
//   acc += sum_s r_s(x) * Wp[kh, kw, s]     with    Wp[kh, kw, s][(g, j)] = w[g*G + j, rot(j, s), kh, kw]
// is the whole group reduction. r_0 is x itself; the other rotations are in-128-bit-lane permutes
// (vpermilps, the "+ s mod 4" part) and 128-bit lane permutes (vshuff32x4 / vperm2f128, the
// "+ s/4" part): cheap single-cycle shuffles. The weights are packed into that lane order once per
// call (C*G*9 floats). A tile of P output pixels along a row keeps P accumulators in registers; each
// input pixel is loaded and rotated once per tile row and feeds the (up to 3) outputs that use it.
//
// ISA selection. The hot loop is written once (the second half of this file) and compiled twice,
// inside `#pragma GCC target` regions for AVX-512 and AVX2, by including this file into itself.
// Nothing from ATen is defined inside those regions, so no ATen inline function is ever compiled
// for a wider ISA than the build's. At run time at::get_cpu_capability() (which honours
// ATEN_CPU_CAPABILITY, like ATen's own kernels) picks the path; shapes the vector paths do not
// cover (channels per group not in {4, 8, 16}, C_out != C_in, a channel count that is not a
// multiple of V, stride > 2, float64/float16) run the portable scalar kernel at the bottom.

#ifndef RESFUSED_GC3_ISA_PASS

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "grouped_conv_checks.h"
#include "cpu/isa.h"
#include "cpu/vec_io.h"

namespace resfused::cpu {
#include "cpu/static_for.h"
}  // namespace resfused::cpu

namespace resfused::cpu::gc3 {

// Everything a vector kernel needs, as plain data (the ISA passes see no ATen types).
struct Args {
  const void* x;      // NHWC input, float or bf16 bits
  const float* w;     // packed weights [C/V][3][3][G][V]
  const float* bias;  // [C] (zeros when the op got no bias)
  void* y;            // NHWC output, same dtype as x
  int64_t H, W, C, Ho, Wo;
  int64_t rows;  // output rows per strip (see run_items_t)
  int stride, cpg;
  bool relu, bf16;
  bool stream;  // write the output with non-temporal stores (float32, 64-byte aligned)
};

// The lane rotation of the header comment: which input channel of the group lane j sees in r_s.
inline int rot_channel(int j, int s, int G) { return ((j / 4 + s / 4) % (G / 4)) * 4 + (j % 4 + s % 4) % 4; }

}  // namespace resfused::cpu::gc3

#ifdef RESFUSED_X86_TARGETS
#define RESFUSED_GC3_ISA_PASS 1

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
namespace resfused::cpu::gc3::avx512 {
// 16 fp32 lanes = four 128-bit lanes.
struct Isa {
  static constexpr int kLanes = 16;
  static constexpr int kTile = 8;  // output pixels per tile (accumulator registers)
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) {  // bf16 -> fp32 is a 16-bit left shift
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
  static void stream(uint16_t* p, V v) { store(p, v); }
  static void store(uint16_t* p, V v) {  // round to nearest even; NaN -> 0x7FC0, as c10::BFloat16
    __m512i i = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(i, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V relu(V v) { return _mm512_max_ps(zero(), v); }  // max(0, NaN) = NaN: NaN propagates
  // r_s for groups of G channels; a = s/4 rotates 128-bit lanes within a group, b = s%4 the
  // floats within each 128-bit lane.
  template <int G, int S>
  static V rotate(V x) {
    constexpr int a = S / 4, b = S % 4;
    constexpr int rot4_a = (a % 4) | ((1 + a) % 4) << 2 | ((2 + a) % 4) << 4 | ((3 + a) % 4) << 6;
    constexpr int rot4_b = (b % 4) | ((1 + b) % 4) << 2 | ((2 + b) % 4) << 4 | ((3 + b) % 4) << 6;
    if constexpr (a != 0) {
      static_assert(G == 8 || G == 16);
      x = G == 8 ? _mm512_shuffle_f32x4(x, x, 0xB1) : _mm512_shuffle_f32x4(x, x, rot4_a);
    }
    if constexpr (b != 0) x = _mm512_permute_ps(x, rot4_b);
    return x;
  }
  static constexpr bool handles(int G) { return G == 4 || G == 8 || G == 16; }
};
#include __FILE__
}  // namespace resfused::cpu::gc3::avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace resfused::cpu::gc3::avx2 {
// 8 fp32 lanes = two 128-bit lanes; 16 registers, so a shorter tile.
struct Isa {
  static constexpr int kLanes = 8;
  static constexpr int kTile = 6;
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
  static void stream(uint16_t* p, V v) { store(p, v); }
  static void store(uint16_t* p, V v) {
    __m256i i = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(i, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // values are < 2^16, so the unsigned-saturating pack is exact
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V relu(V v) { return _mm256_max_ps(zero(), v); }
  template <int G, int S>
  static V rotate(V x) {
    constexpr int a = S / 4, b = S % 4;
    constexpr int rot4_b = (b % 4) | ((1 + b) % 4) << 2 | ((2 + b) % 4) << 4 | ((3 + b) % 4) << 6;
    if constexpr (a != 0) {
      static_assert(G == 8);
      x = _mm256_permute2f128_ps(x, x, 0x01);
    }
    if constexpr (b != 0) x = _mm256_permute_ps(x, rot4_b);
    return x;
  }
  static constexpr bool handles(int G) { return G == 4 || G == 8; }
};
#include __FILE__
}  // namespace resfused::cpu::gc3::avx2
#pragma GCC pop_options

#undef RESFUSED_GC3_ISA_PASS
#endif  // x86 GCC/Clang

namespace resfused::cpu {
namespace {

using gc3::Args;

// Wp[cb][kh][kw][s][lane] = w[cb*V + lane, rot(lane % G, s), kh, kw] (see the header comment).
std::vector<float> pack_weights(const at::Tensor& weight, int64_t V, int G) {
  auto w = weight.to(at::kFloat).contiguous();
  const float* src = w.const_data_ptr<float>();
  const int64_t C = weight.size(0);
  std::vector<float> packed(static_cast<size_t>(C * 9 * G));
  for (int64_t cb = 0; cb < C / V; ++cb)
    for (int k = 0; k < 9; ++k)
      for (int s = 0; s < G; ++s)
        for (int64_t lane = 0; lane < V; ++lane) {
          const int64_t co = cb * V + lane;
          const int ci = gc3::rot_channel(static_cast<int>(lane % G), s, G);
          packed[static_cast<size_t>(((cb * 9 + k) * G + s) * V + lane)] = src[(co * G + ci) * 9 + k];
        }
  return packed;
}

// Portable kernel: any channels per group, C_out multiple of the groups, any stride, any float
// dtype, arithmetic in at::opmath_type. The inner loop runs over the input channels of one group.
template <typename T>
void grouped_conv3x3_scalar(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y,
                            int64_t stride, bool relu) {
  using Acc = at::opmath_type<T>;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = y.size(1), Ho = y.size(2), Wo = y.size(3);
  const int64_t cin_g = weight.size(1), groups = C / cin_g, cout_g = Co / groups;
  auto wc = weight.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
  const Acc* wp = wc.template const_data_ptr<Acc>();
  at::Tensor bc = bias.defined() ? bias.to(c10::CppTypeToScalarType<Acc>::value).contiguous() : at::Tensor();
  const Acc* bp = bc.defined() ? bc.template const_data_ptr<Acc>() : nullptr;
  const T* xp = x.template const_data_ptr<T>();
  T* yp = y.template data_ptr<T>();
  at::parallel_for(0, N * Ho, 1, [&](int64_t r0, int64_t r1) {
    std::vector<Acc> acc(static_cast<size_t>(Co));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / Ho, oh = r % Ho;
      for (int64_t ow = 0; ow < Wo; ++ow) {
        for (int64_t co = 0; co < Co; ++co) acc[co] = bp ? bp[co] : Acc(0);
        for (int64_t kh = 0; kh < 3; ++kh) {
          const int64_t ih = oh * stride - 1 + kh;
          if (ih < 0 || ih >= H) continue;
          for (int64_t kw = 0; kw < 3; ++kw) {
            const int64_t iw = ow * stride - 1 + kw;
            if (iw < 0 || iw >= W) continue;
            const T* px = xp + ((n * H + ih) * W + iw) * C;
            for (int64_t co = 0; co < Co; ++co) {
              const int64_t g = co / cout_g;
              const Acc* wrow = wp + co * cin_g * 9 + kh * 3 + kw;
              Acc sum = 0;
              for (int64_t ci = 0; ci < cin_g; ++ci) sum += static_cast<Acc>(px[g * cin_g + ci]) * wrow[ci * 9];
              acc[co] += sum;
            }
          }
        }
        T* py = yp + ((n * Ho + oh) * Wo + ow) * Co;
        for (int64_t co = 0; co < Co; ++co) py[co] = static_cast<T>(relu ? relu_scalar(acc[co]) : acc[co]);
      }
    }
  });
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t stride) {
  check_grouped_conv3x3_args(x, weight, bias, stride);
  TORCH_CHECK(x.device().is_cpu(), "resfused.grouped_conv3x3 (CPU kernel): 'x' must be a CPU tensor, got ", x.device());
}

at::Tensor grouped_conv3x3(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias_in,
                           int64_t stride, bool relu) {
  check_args(x_in, weight, bias_in, stride);
  const at::Tensor bias = bias_in.has_value() ? *bias_in : at::Tensor();
  auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Co = weight.size(0);
  const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;  // (H + 2*1 - 3) / stride + 1
  auto y = at::empty({N, Co, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;

  const int G = static_cast<int>(weight.size(1));
  Path path = best_path();
  const bool vec_dtype = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  int64_t V = 0;
  bool handles = false;
#ifdef RESFUSED_X86_TARGETS
  if (path == Path::kAvx512) V = gc3::avx512::Isa::kLanes, handles = gc3::avx512::Isa::handles(G);
  if (path == Path::kAvx2) V = gc3::avx2::Isa::kLanes, handles = gc3::avx2::Isa::handles(G);
#endif
  if (!(vec_dtype && handles && Co == C && C % V == 0 && (stride == 1 || stride == 2))) path = Path::kScalar;

  if (path == Path::kScalar) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_grouped_conv3x3_cpu",
                                    [&] { grouped_conv3x3_scalar<scalar_t>(x, weight, bias, y, stride, relu); });
    return y;
  }

  const std::vector<float> wp = pack_weights(weight, V, G);
  std::vector<float> bp(static_cast<size_t>(C), 0.f);
  if (bias.defined()) {
    auto bf = bias.to(at::kFloat).contiguous();
    std::copy(bf.const_data_ptr<float>(), bf.const_data_ptr<float>() + C, bp.begin());
  }
  // Strips of output rows whose input rows ((rows-1)*stride + 3 of them, all channels) take about
  // 384 KiB, a good part of L2: the strip is swept once per channel block.
  const int64_t row_bytes = W * C * static_cast<int64_t>(x.element_size());
  const int64_t in_rows = std::max<int64_t>(3, (384 << 10) / std::max<int64_t>(row_bytes, 1));
  const int64_t rows = std::min(Ho, (in_rows - 3) / stride + 1);
  // The output is written once and read by the next layer, not by this kernel: non-temporal stores
  // skip the read-for-ownership of every output line (measured on 8x128x56x56, 4 channels/group:
  // 4.9 -> 4.2 ms; docs/measurements.md, Grouped 3x3 (CPU)).
  const bool stream = x.scalar_type() == at::kFloat && reinterpret_cast<uintptr_t>(y.data_ptr()) % 64 == 0;
  const Args args{x.const_data_ptr(),
                  wp.data(),
                  bp.data(),
                  y.data_ptr(),
                  H,
                  W,
                  C,
                  Ho,
                  Wo,
                  rows,
                  static_cast<int>(stride),
                  G,
                  relu,
                  x.scalar_type() == at::kBFloat16,
                  stream};
  // Work items: (image, strip, block of V channels); one output row of a block is Wo*9*G vector FMAs.
  const int64_t items = N * ((Ho + rows - 1) / rows) * (C / V);
  const int64_t grain = std::max<int64_t>(1, 4096 / (rows * Wo * 9 * G));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
#ifdef RESFUSED_X86_TARGETS
    if (path == Path::kAvx512)
      gc3::avx512::run_items(args, begin, end);
    else
      gc3::avx2::run_items(args, begin, end);
#endif
  });
  return y;
}

// Which path a call with `channels_per_group` would take on this machine ("avx512", "avx2" or
// "scalar" for the vector-friendly shapes); read by the adapter and the tests.
std::string grouped_conv3x3_path(int64_t channels_per_group) {
  Path path = best_path();
#ifdef RESFUSED_X86_TARGETS
  const int G = static_cast<int>(channels_per_group);
  if (path == Path::kAvx512 && !gc3::avx512::Isa::handles(G)) path = Path::kScalar;
  if (path == Path::kAvx2 && !gc3::avx2::Isa::handles(G)) path = Path::kScalar;
#endif
  return path_name(path);
}

}  // namespace
}  // namespace resfused::cpu

// No tensor argument: a catch-all kernel (the dispatcher has no device to pick by).
TORCH_LIBRARY_IMPL(resfused, CatchAll, m) { m.impl("grouped_conv3x3_cpu_path", &resfused::cpu::grouped_conv3x3_path); }

TORCH_LIBRARY_IMPL(resfused, CPU, m) { m.impl("grouped_conv3x3", &resfused::cpu::grouped_conv3x3); }

#else  // RESFUSED_GC3_ISA_PASS: the vector kernel, compiled once per ISA inside its namespace.

// static_for: cpu/static_for.h (included into resfused::cpu, enclosing these namespaces, above).

// P output pixels (ow0 .. ow0+P-1) of row `oh`, one block of V channels. x points at (n, 0, 0, c0),
// y at (n, oh, ow0, c0), w at the block's packed weights. Fully unrolled: the P accumulators stay
// in registers; input pixel t of the tile is loaded once per kernel row and rotated G times, and
// each rotation feeds the outputs p with kw = t - p*S in 0..2.
// (Tried and dropped: "late rotation", G accumulators per pixel fed by the unrotated input and
// rotated once in the epilogue, which removes the shuffles from the hot loop but limits the tile
// to 24/G pixels; it measured up to 25% slower. Other variants tried: docs/measurements.md,
// Grouped 3x3 (CPU).)
template <int G, int S, int P, typename T>
__attribute__((flatten)) void row_tile(const T* x, const float* w, const float* bias, T* y, const Args& a, int64_t oh,
                                       int64_t ow0) {
  using V = typename Isa::V;
  constexpr int L = Isa::kLanes;
  V acc[P];
  static_for<P>([&](auto p_) { acc[decltype(p_)::value] = Isa::zero(); });
  for (int kh = 0; kh < 3; ++kh) {
    const int64_t ih = oh * S - 1 + kh;
    if (ih < 0 || ih >= a.H) continue;
    const T* xr = x + ih * a.W * a.C;
    const float* wk = w + kh * 3 * G * L;
    static_for<(P - 1) * S + 3>([&](auto t_) {
      constexpr int t = decltype(t_)::value;
      const int64_t iw = ow0 * S - 1 + t;
      const V xv = (iw >= 0 && iw < a.W) ? Isa::load(xr + iw * a.C) : Isa::zero();
      static_for<G>([&](auto s_) {
        constexpr int s = decltype(s_)::value;
        const V r = Isa::template rotate<G, s>(xv);
        static_for<P>([&](auto p_) {
          constexpr int p = decltype(p_)::value;
          constexpr int kw = t - p * S;
          if constexpr (kw >= 0 && kw < 3) acc[p] = Isa::fma(r, Isa::load(wk + (kw * G + s) * L), acc[p]);
        });
      });
    });
  }
  const V b = Isa::load(bias);
  static_for<P>([&](auto p_) {
    constexpr int p = decltype(p_)::value;
    V out = Isa::add(b, acc[p]);
    if (a.relu) out = Isa::relu(out);
    if (a.stream)
      Isa::stream(y + p * a.C, out);
    else
      Isa::store(y + p * a.C, out);
  });
}

// Tile widths 1..PMAX by a switch down the template chain.
template <int G, int S, typename T, int P>
inline void row_tile_n(int n, const T* x, const float* w, const float* bias, T* y, const Args& a, int64_t oh,
                       int64_t ow0) {
  if constexpr (P >= 1) {
    if (n == P) return row_tile<G, S, P, T>(x, w, bias, y, a, oh, ow0);
    row_tile_n<G, S, T, P - 1>(n, x, w, bias, y, a, oh, ow0);
  }
}

// Items [begin, end) of (image, strip of a.rows output rows, channel block): a strip is walked
// row by row in balanced tiles of at most PMAX pixels (56 -> 7 x 8, 28 -> 4 x 7). Consecutive
// items are consecutive channel blocks of one strip, so the strip's input rows stay in L2 while
// each block's packed weights (9*G*V floats) stay in L1 for the whole strip.
template <int G, int S, typename T>
void run_items_t(const Args& a, int64_t begin, int64_t end) {
  constexpr int L = Isa::kLanes;
  constexpr int PMAX = Isa::kTile;
  const int64_t CB = a.C / L;
  const int64_t strips = (a.Ho + a.rows - 1) / a.rows;
  const int64_t tiles = (a.Wo + PMAX - 1) / PMAX;
  const int64_t base = a.Wo / tiles, extra = a.Wo % tiles;
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t cb = item % CB, strip = (item / CB) % strips, n = item / CB / strips;
    const T* xn = x + n * a.H * a.W * a.C + cb * L;
    const float* w = a.w + cb * 9 * G * L;
    const float* bias = a.bias + cb * L;
    for (int64_t oh = strip * a.rows; oh < std::min(a.Ho, (strip + 1) * a.rows); ++oh) {
      T* yrow = y + (n * a.Ho + oh) * a.Wo * a.C + cb * L;
      int64_t ow0 = 0;
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int width = static_cast<int>(base + (tile < extra ? 1 : 0));
        row_tile_n<G, S, T, PMAX>(width, xn, w, bias, yrow + ow0 * a.C, a, oh, ow0);
        ow0 += width;
      }
    }
  }
}

template <int G>
void run_items_g(const Args& a, int64_t begin, int64_t end) {
  if constexpr (Isa::handles(G)) {
    if (a.bf16) {
      if (a.stride == 1) return run_items_t<G, 1, uint16_t>(a, begin, end);
      return run_items_t<G, 2, uint16_t>(a, begin, end);
    }
    if (a.stride == 1) return run_items_t<G, 1, float>(a, begin, end);
    return run_items_t<G, 2, float>(a, begin, end);
  }
}

void run_items(const Args& a, int64_t begin, int64_t end) {
  // Non-temporal stores are weakly ordered: fence them before the caller's threads join.
  struct Fence {
    ~Fence() { _mm_sfence(); }
  } fence;
  switch (a.cpg) {
    case 4:
      return run_items_g<4>(a, begin, end);
    case 8:
      return run_items_g<8>(a, begin, end);
    case 16:
      return run_items_g<16>(a, begin, end);
    default:
      return;  // not reached: the caller checks Isa::handles
  }
}

#endif  // RESFUSED_GC3_ISA_PASS
