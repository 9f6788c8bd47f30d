// Kernel of the grouped 3x3 convolution (tiling described in grouped_conv3x3_config.cuh).
//   y[n, oy, ox, co] = act(bias[co] + sum_{ci < CPG, kh, kw} x[n, oy*S+kh-1, ox*S+kw-1, g*CPG+ci]
//                                                          * w[co, ci, kh, kw]),   g = co / CPG
// with zero padding, fp32 accumulation, one rounding at the store.
#pragma once

#include "cuda/kernels/grouped_conv3x3_config.cuh"

namespace resfused::cuda {

template <class T, int CPG, int S>
struct GroupedConv3x3Kernel {
  using Params = GroupedConvArgs<T>;
  using Tile = GroupedConvTile<CPG>;
  static constexpr int kPhases = 2;
  static constexpr int kMaxThreads = Tile::kMaxThreads;
  static constexpr int V = Tile::V, P = Tile::P, CB = Tile::CB, TW = Tile::TW;
  static constexpr int IW = (TW - 1) * S + 3;  // halo width
  static constexpr int RUN = (P - 1) * S + 3;  // input columns one thread reads per row
  static constexpr int kWeightFloats = CPG * 9 * CB;
  static_assert(CPG % 4 == 0 && CB % CPG == 0 && CPG % V == 0, "tile shape");

  struct Block {  // which tile and slab this block owns
    int64_t n, oy0, ox0;
    int64_t c0, cvalid;
  };
  static RESFUSED_DEVICE Block block_of(const Params& a) {
    Block b;
    int64_t t = blockIdx.x;
    const int64_t tx = t % a.tiles_w;
    t /= a.tiles_w;
    const int64_t ty = t % a.tiles_h;
    b.n = t / a.tiles_h;
    b.oy0 = ty * a.tile_h;
    b.ox0 = tx * TW;
    b.c0 = int64_t(blockIdx.y) * CB;
    b.cvalid = a.C - b.c0 < CB ? a.C - b.c0 : CB;
    return b;
  }

  template <int Phase>
  static RESFUSED_DEVICE void run(const Params& a, gptr<float> smem) {
    if constexpr (Phase == 0)
      stage(a, smem);
    else
      compute(a, smem);
  }

  // Phase 0: weights -> smem[(ci*9 + tap)*CB + co], input halo -> smem[W + (r*IW + c)*CB + ch].
  //
  // Weight staging, channel index fastest. Work item i stages channel co = i % CB, taps
  // r0 = 4 * (i / CB) .. r0 + 3 (R = CPG*9 is a multiple of 4): one 4-element vector load of its
  // own OIHW row (8 or 16 bytes), four 4-byte shared stores at words (r0 + j)*CB + co.
  // Bank math: shared memory has 32 banks of 4 bytes, word w sits in bank w % 32. CB is a
  // multiple of 32, so the bank of (r0 + j)*CB + co is co % 32. Blocks are whole warps and the
  // loop starts at i = tid, so the 32 lanes of a warp hold 32 consecutive i: 32 consecutive co,
  // all with the same r0 (CB % 32 == 0: no wrap inside a warp), hence 32 different banks, one
  // wavefront per store. (With the tap index fastest, as the OIHW order would suggest, the lanes
  // hold consecutive r and one co: every address r*CB + co is in bank co % 32, a 32-way conflict.)
  // Global side: the CB rows of R elements a block reads are one contiguous slab of the weight
  // (channels c0 .. c0+CB-1), so the lines a warp touches are reused from L1 by the next items.
  static RESFUSED_DEVICE void stage(const Params& a, gptr<float> smem) {
    const Block b = block_of(a);
    const int tid = threadIdx.x, nthr = blockDim.x;
    constexpr int R = CPG * 9;
    static_assert(R % 4 == 0 && CB % 32 == 0, "weight staging: 4-tap vectors, a warp on 32 banks");
    for (int i = tid; i < CB * (R / 4); i += nthr) {
      const int co = i % CB, r0 = (i / CB) * 4;
      float f[4] = {0.f, 0.f, 0.f, 0.f};  // channels past C (last slab): zero weights
      if (co < b.cvalid) {
        const int64_t g = (b.c0 + co) * R + r0;
        if (a.vec_w) {
          const auto v = load_pack<4>(a.w, g);
          RESFUSED_UNROLL
          for (int j = 0; j < 4; ++j) f[j] = to_acc(v.v[j]);
        } else {
          RESFUSED_UNROLL
          for (int j = 0; j < 4; ++j) f[j] = to_acc(a.w[g + j]);
        }
      }
      RESFUSED_UNROLL
      for (int j = 0; j < 4; ++j) smem[(r0 + j) * CB + co] = f[j];
    }
    gptr<float> in_s = smem + kWeightFloats;
    const int IH = (a.tile_h - 1) * S + 3;
    const int64_t iy0 = b.oy0 * S - 1, ix0 = b.ox0 * S - 1;
    if (a.vec_io) {
      constexpr int VL = 16 / sizeof(T);  // elements per 16-byte load
      constexpr int KV = CB / VL;
      for (int i = tid; i < IH * IW * KV; i += nthr) {
        const int k = i % KV, pix = i / KV;
        const int r = pix / IW, c = pix - r * IW;
        const int64_t iy = iy0 + r, ix = ix0 + c;
        const int ch = k * VL;
        const bool inside = iy >= 0 && iy < a.H && ix >= 0 && ix < a.W && ch < b.cvalid;
        Pack<float, VL> f;
        if (inside) {
          const auto v = load_pack<VL>(a.x, ((b.n * a.H + iy) * a.W + ix) * a.C + b.c0 + ch);
          RESFUSED_UNROLL
          for (int j = 0; j < VL; ++j) f.v[j] = to_acc(v.v[j]);
        } else {
          RESFUSED_UNROLL
          for (int j = 0; j < VL; ++j) f.v[j] = 0.f;  // zero padding (and channels past C)
        }
        // 16-byte shared stores, VL/4 per item. A 16-byte store is served a quarter warp
        // (8 lanes, 128 bytes) at a time. For fp32 (one store) the 8 lanes write 8 consecutive
        // 16-byte chunks: all 32 banks. For fp16/bf16 (VL = 8, two stores) lane k's chunks are
        // 2k and 2k+1 of its pixel; storing the low halves first would put lanes k and k+4 on the
        // same banks (chunks 2k and 2k+8 are 128 bytes apart), a 2-way conflict. So lanes with
        // bit 2 of i set store their high half first: lanes 0-3 cover banks 0-3, 8-11, 16-19,
        // 24-27 and lanes 4-7 banks 4-7, ..., 28-31 (also when a quarter spans two pixels).
        const int64_t at = int64_t(pix) * CB + ch;
        if constexpr (VL == 4) {
          store_pack<4>(in_s, at, f);
        } else {
          static_assert(VL == 8, "16-byte loads of 2- or 4-byte elements");
          Pack<float, 4> lo, hi;
          RESFUSED_UNROLL
          for (int j = 0; j < 4; ++j) lo.v[j] = f.v[j], hi.v[j] = f.v[4 + j];
          // Selects, not a lane-dependent index into f (that would put f in local memory) and
          // not a branch (the two halves of a quarter warp would then store separately).
          const bool swz = (i >> 2) & 1;
          store_pack<4>(in_s, at + (swz ? 4 : 0), swz ? hi : lo);
          store_pack<4>(in_s, at + (swz ? 0 : 4), swz ? lo : hi);
        }
      }
    } else {
      for (int i = tid; i < IH * IW * CB; i += nthr) {
        const int ch = i % CB, pix = i / CB;
        const int r = pix / IW, c = pix - r * IW;
        const int64_t iy = iy0 + r, ix = ix0 + c;
        const bool inside = iy >= 0 && iy < a.H && ix >= 0 && ix < a.W && ch < b.cvalid;
        in_s[i] = inside ? to_acc(a.x[((b.n * a.H + iy) * a.W + ix) * a.C + b.c0 + ch]) : 0.f;
      }
    }
  }

  // Phase 1: thread -> (channel vector ct, output row r, column run cr); P x V accumulators.
  static RESFUSED_DEVICE void compute(const Params& a, gptr<float> smem) {
    const Block b = block_of(a);
    constexpr int CT = CB / V, RUNS = TW / P;
    const int tid = threadIdx.x;
    const int ct = tid % CT, pr = tid / CT;
    const int r = pr / RUNS, cr = pr - r * RUNS;
    const int co0 = ct * V;              // first output channel in the slab
    const int cin0 = (co0 / CPG) * CPG;  // first input channel of its group
    if (co0 >= b.cvalid) return;         // groups past C in the last slab
    gptr<float> in_s = smem + kWeightFloats;

    float acc[P][V];
    RESFUSED_UNROLL
    for (int p = 0; p < P; ++p) {
      RESFUSED_UNROLL
      for (int v = 0; v < V; ++v) acc[p][v] = 0.f;
    }
#ifndef RESFUSED_EMULATION
#pragma unroll 1
#endif
    for (int cc = 0; cc < CPG; cc += 4) {  // four input channels per step
      RESFUSED_UNROLL
      for (int kh = 0; kh < 3; ++kh) {
        Pack<float, 4> in[RUN];
        const int64_t row = int64_t(r * S + kh) * IW + cr * P * S;
        RESFUSED_UNROLL
        for (int j = 0; j < RUN; ++j) in[j] = load_pack<4>(in_s, (row + j) * CB + cin0 + cc);
        RESFUSED_UNROLL
        for (int kw = 0; kw < 3; ++kw) {
          RESFUSED_UNROLL
          for (int q = 0; q < 4; ++q) {
            // V weights as 16-byte loads (shared memory is only guaranteed 16-byte aligned).
            float wv[V];
            const int64_t widx = int64_t((cc + q) * 9 + kh * 3 + kw) * CB + co0;
            RESFUSED_UNROLL
            for (int h = 0; h < V; h += 4) {
              const Pack<float, 4> w4 = load_pack<4>(smem, widx + h);
              RESFUSED_UNROLL
              for (int j = 0; j < 4; ++j) wv[h + j] = w4.v[j];
            }
            RESFUSED_UNROLL
            for (int p = 0; p < P; ++p) {
              const float xv = in[p * S + kw].v[q];
              RESFUSED_UNROLL
              for (int v = 0; v < V; ++v) acc[p][v] = fmaf_(xv, wv[v], acc[p][v]);
            }
          }
        }
      }
    }

    // Epilogue: bias (folded BN shift), optional ReLU, one rounding, V-wide store.
    float bias[V];
    RESFUSED_UNROLL
    for (int v = 0; v < V; ++v) bias[v] = a.has_bias ? to_acc(a.bias[b.c0 + co0 + v]) : 0.f;
    const int64_t oy = b.oy0 + r;
    if (oy >= a.OH) return;
    RESFUSED_UNROLL
    for (int p = 0; p < P; ++p) {
      const int64_t ox = b.ox0 + cr * P + p;
      if (ox >= a.OW) break;
      Pack<T, V> o;
      RESFUSED_UNROLL
      for (int v = 0; v < V; ++v) {
        const float y = acc[p][v] + bias[v];
        o.v[v] = from_acc<T>(a.relu ? relu_nan(y) : y);
      }
      const int64_t off = ((b.n * a.OH + oy) * a.OW + ox) * a.C + b.c0 + co0;
      if (a.vec_io) {
        store_pack<V>(a.y, off, o);
      } else {
        RESFUSED_UNROLL
        for (int v = 0; v < V; ++v) a.y[off + v] = o.v[v];
      }
    }
  }

  static RESFUSED_DEVICE float fmaf_(float x, float w, float acc) {
#ifdef RESFUSED_EMULATION
    return std::fma(x, w, acc);  // the GPU's FFMA: one rounding
#else
    return __fmaf_rn(x, w, acc);
#endif
  }
};

template <class T, int CPG>
inline cudaError_t launch_grouped_cpg(GroupedConvArgs<T>& a, cudaStream_t stream) {
  LaunchConfig cfg;
#ifdef RESFUSED_EMULATION
  const void *xr = a.x.raw(), *wr = a.w.raw(), *yr = a.y.raw();
#else
  const void *xr = a.x, *wr = a.w, *yr = a.y;
#endif
  if (!grouped_conv_config<CPG>(a, cfg, xr, wr, yr)) return cudaErrorInvalidConfiguration;
  if (a.stride == 1) return launch_phased<GroupedConv3x3Kernel<T, CPG, 1>>(cfg, stream, a);
  if (a.stride == 2) return launch_phased<GroupedConv3x3Kernel<T, CPG, 2>>(cfg, stream, a);
  return cudaErrorInvalidConfiguration;
}

template <class T>
cudaError_t launch_grouped_conv3x3(GroupedConvArgs<T> a, cudaStream_t stream) {
  if (a.N == 0 || a.OH == 0 || a.OW == 0 || a.C == 0) return cudaSuccess;  // nothing to write
  switch (a.cpg) {
    case 4:
      return launch_grouped_cpg<T, 4>(a, stream);
    case 8:
      return launch_grouped_cpg<T, 8>(a, stream);
    case 16:
      return launch_grouped_cpg<T, 16>(a, stream);
    case 32:
      return launch_grouped_cpg<T, 32>(a, stream);
    default:
      return cudaErrorInvalidConfiguration;
  }
}

}  // namespace resfused::cuda
