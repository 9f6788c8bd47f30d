// The per-channel reduction kernels' bodies shared by the tails backward and the training
// BatchNorm (layout, order and launch shapes: channel_reduce_config.cuh). A kernel struct calls
// channel_reduce_block<Phase, VL>(op, ...) from its two phases, then channel_finalize_block from
// the two phases of its finalize kernel; `op` says what is summed:
//   struct Op {
//     using A = ...;                                   // the partial sums' type
//     struct Channel;                                  // per-channel constants, in registers
//     Channel channel(int64_t c) const;
//     // Elements i .. i + VL - 1 (one vector): element k has channel ch[S == 1 ? 0 : k] and adds
//     // its two terms to s[0][same], s[1][same]. S = VL in channels-last (VL channels), S = 1 in
//     // NC(spatial) (one channel). It may also write an output (the tails write grad_x).
//     template <int VL, int S> void visit(int64_t i, const Channel (&ch)[S], A (&s)[2][S]) const;
//   };
// Kernels that call channel_reduce_block set kWarpSync = true (it shuffles).
#pragma once

#include "cuda/kernels/channel_reduce_config.cuh"

namespace resfused::cuda {

// VL consecutive elements from p[i] in acc_t: one 16-byte load for VL > 1.
template <int VL, class T>
RESFUSED_DEVICE void load_acc(gptr<const T> p, int64_t i, acc_t<T> (&v)[VL]) {
  if constexpr (VL > 1) {
    const auto x = load_pack<VL>(p, i);
    RESFUSED_UNROLL
    for (int k = 0; k < VL; ++k) v[k] = to_acc(x.v[k]);
  } else {
    v[0] = to_acc(p[i]);
  }
}

// Pass 1 (launch: channel_reduce_config with the same vector width VL). Phase 0: each thread
// sums its elements in registers, a warp butterfly adds the lanes of one channel, one lane per
// warp and channel stores to shared memory `red`; phase 1: the warps' values added in warp
// order, one partial[blockIdx.y][which][c] per channel. Every element of the tensor is visited
// exactly once (an output written by visit covers the tensor).
template <int Phase, int VL, class Op>
RESFUSED_DEVICE void channel_reduce_block(const Op& op, int64_t n, int64_t C, int64_t inner, gptr<typename Op::A> red,
                                          gptr<typename Op::A> partial) {
  using A = typename Op::A;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int t = ty * bx + tx, warp = t / 32;
  if (inner == 1) {
    // channels-last: thread (tx, ty) owns channels (blockIdx.x * bx + tx) * VL + k.
    const int64_t c0 = (int64_t(blockIdx.x) * bx + tx) * VL;
    if constexpr (Phase == 0) {
      A s[2][VL];
      RESFUSED_UNROLL
      for (int k = 0; k < VL; ++k) s[0][k] = s[1][k] = A(0);
      if (c0 < C) {  // vectors never straddle C (VL > 1 only where C % VL == 0)
        typename Op::Channel ch[VL];
        RESFUSED_UNROLL
        for (int k = 0; k < VL; ++k) ch[k] = op.channel(c0 + k);
        const int64_t rows = n / C, step = int64_t(gridDim.y) * by;
        for (int64_t r = int64_t(blockIdx.y) * by + ty; r < rows; r += step)
          op.template visit<VL, VL>(r * C + c0, ch, s);
      }
      // Every lane reaches the butterfly (no early return): lanes tx, tx + bx, ... of a warp
      // hold the same channels on other rows.
      A flat[2 * VL];
      RESFUSED_UNROLL
      for (int k = 0; k < VL; ++k) flat[k] = s[0][k], flat[VL + k] = s[1][k];
      warp_sum_xor(flat, bx);
      if ((t % 32) < bx) {  // the first row of the warp: one lane per channel vector
        RESFUSED_UNROLL
        for (int k = 0; k < 2 * VL; ++k) {
          const int which = k / VL, j = tx * VL + k % VL;
          red[(warp * 2 + which) * (bx * VL) + j] = flat[k];
        }
      }
    } else {
      const int width = bx * VL;  // channels of this block
      for (int e = t; e < 2 * width; e += bx * by) {
        const int which = e / width, j = e - which * width;
        const int64_t c = int64_t(blockIdx.x) * width + j;
        if (c >= C) continue;
        A sum = red[which * width + j];
        for (int w = 1; w < kReduceWarps; ++w) sum += red[(w * 2 + which) * width + j];
        partial[(int64_t(blockIdx.y) * 2 + which) * C + c] = sum;
      }
    }
  } else {
    // NC(spatial): the block's channel is blockIdx.x; thread (tx, ty) walks vectors tx, tx + bx,
    // ... of the planes of images blockIdx.y * by + ty, + gridDim.y * by, ...
    const int64_t c = blockIdx.x;
    if constexpr (Phase == 0) {
      A s[2][1] = {{A(0)}, {A(0)}};
      const typename Op::Channel ch[1] = {op.channel(c)};
      const int64_t images = n / (C * inner), units = ceil_div(inner, VL);
      const int64_t step = int64_t(gridDim.y) * by;
      for (int64_t img = int64_t(blockIdx.y) * by + ty; img < images; img += step) {
        const int64_t base = (img * C + c) * inner;
        for (int64_t u = tx; u < units; u += bx)  // VL > 1 only where inner % VL == 0
          op.template visit<VL, 1>(base + u * VL, ch, s);
      }
      A flat[2] = {s[0][0], s[1][0]};
      warp_sum_xor(flat, 1);
      if (t % 32 == 0) red[warp * 2] = flat[0], red[warp * 2 + 1] = flat[1];
    } else if (t < 2) {
      A sum = red[t];
      for (int w = 1; w < kReduceWarps; ++w) sum += red[w * 2 + t];
      partial[(int64_t(blockIdx.y) * 2 + t) * C + c] = sum;
    }
  }
}

// Pass 2 (launch: channel_finalize_config): per channel, the slots of partial added in a fixed
// order in double (lane ty adds slots ty, ty + 8, ...; after the barrier thread ty == 0 adds the
// 8 lanes' sums in order), then finish(c, sum0, sum1) once per channel. smem: the kernel's
// dynamic shared memory.
template <int Phase, class A, class Finish>
RESFUSED_DEVICE void channel_finalize_block(gptr<A> partial, int64_t slots, int64_t C, gptr<float> smem,
                                            Finish&& finish) {
  gptr<double> red = smem_as<double>(smem);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = int64_t(blockIdx.x) * kFinalizeChannels + tx;
  if constexpr (Phase == 0) {
    double s0 = 0, s1 = 0;
    if (c < C)
      for (int64_t k = ty; k < slots; k += kFinalizeLanes) {
        s0 += static_cast<double>(partial[(k * 2 + 0) * C + c]);
        s1 += static_cast<double>(partial[(k * 2 + 1) * C + c]);
      }
    red[(ty * 2 + 0) * kFinalizeChannels + tx] = s0;
    red[(ty * 2 + 1) * kFinalizeChannels + tx] = s1;
  } else if (ty == 0 && c < C) {
    double s0 = red[tx], s1 = red[kFinalizeChannels + tx];
    for (int l = 1; l < kFinalizeLanes; ++l) {
      s0 += red[(l * 2 + 0) * kFinalizeChannels + tx];
      s1 += red[(l * 2 + 1) * kFinalizeChannels + tx];
    }
    finish(c, s0, s1);
  }
}

}  // namespace resfused::cuda
