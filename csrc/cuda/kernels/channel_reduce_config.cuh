// The per-channel reduction shared by the tails backward (scale_shift_act_backward: the sums for
// grad_scale / grad_shift) and the training BatchNorm (batch statistics, and the sums of its
// backward): launch shapes only, no kernel code (kernels: channel_reduce.cuh).
//
// Two passes, no atomics:
//   1. reduce: 256-thread 2-D blocks, 16-byte vector loads where the layout allows (vl > 1),
//      about two blocks per SM; each block writes one slot, partial[blockIdx.y][2][C]:
//   channels-last (rows x C): threadIdx.x walks vl-channel vectors along a row (bx = the smallest
//     power of two >= the vectors of a row, <= 32), threadIdx.y rows (by = 256 / bx): at C = 64
//     in fp32 that is 16 x 16, every thread busy. Block (gx, gy) takes vector column blockIdx.x
//     and rows blockIdx.y * by + ty + k * gridDim.y * by.
//   NC(spatial) (planes of inner = H*W): blockIdx.x = channel, threadIdx.x walks vectors of a
//     plane (bx <= 256), threadIdx.y images; blockIdx.y takes images blockIdx.y * by + ty + ...
//   In-block sum, fixed order: each thread's registers, then a warp butterfly over the lanes of
//   one channel (warp_sum_xor: lanes l ^ bx, l ^ 2bx, ... for channels-last, all 32 lanes for
//   NC(spatial)), then after the barrier the 8 warps' values added in warp order.
//   slots = gridDim.y = ceil(2 * SMs / gridDim.x), capped by the rows (images) there are, so the
//   buffer holds at most ~2 * SMs * 2 * C values whatever N is.
//   2. finalize: 32 channels x 8 slot-lanes per block, lane ty adds slots ty, ty + 8, ... in
//      double, the 8 lanes' sums are added in order after a barrier.
// Deterministic: which thread sums which element, the butterfly pairs and every order of
// addition depend only on the shape, the vector width and the SM count, never on scheduling;
// two runs on one GPU give the same bits (the emulation tests run the blocks shuffled).
#pragma once

#include "cuda/kernels/platform.cuh"

namespace resfused::cuda {

constexpr int kReduceThreads = 256;
constexpr int kReduceWarps = kReduceThreads / 32;
constexpr int kFinalizeChannels = 32, kFinalizeLanes = 8;  // finalize block: 32 x 8

// Pass 1's launch for n elements, C channels, `inner` elements between channels (1:
// channels-last), vectors of vl elements (1 where 16-byte accesses are not allowed), on a device
// with `sms` SMs; acc_bytes: the size of one partial sum. Sets slots (the partial buffer is
// [slots][2][C]; 0 for an empty tensor, whose sums are 0).
inline LaunchConfig channel_reduce_config(int64_t n, int64_t C, int64_t inner, int vl, int sms, size_t acc_bytes,
                                          int64_t& slots) {
  const int64_t target = 2 * int64_t(sms > 0 ? sms : 1);  // blocks: two per SM
  const bool cl = inner == 1;
  const int64_t units = ceil_div(cl ? C : inner, vl);  // vectors per row / plane
  const int max_bx = cl ? 32 : kReduceThreads;
  int bx = 1;
  while (bx < max_bx && bx < units) bx *= 2;
  const int by = kReduceThreads / bx;
  const int64_t gx = cl ? ceil_div(units, bx) : C;
  const int64_t lines = C == 0 || inner == 0 ? 0 : n / (C * inner);  // rows, or images
  int64_t gy = ceil_div(target, gx > 0 ? gx : 1);
  const int64_t enough = ceil_div(lines, by);
  gy = gy > enough ? enough : gy;
  gy = gy > kMaxGridYZ ? kMaxGridYZ : gy;
  slots = gy;
  LaunchConfig c;
  c.grid = dim3(static_cast<unsigned>(gx > 0 ? gx : 1), static_cast<unsigned>(gy > 0 ? gy : 1));
  c.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  c.smem_bytes = size_t(kReduceWarps) * 2 * size_t(cl ? bx * vl : 1) * acc_bytes;
  return c;
}

// Pass 2's launch.
inline LaunchConfig channel_finalize_config(int64_t C) {
  LaunchConfig c;
  c.grid = dim3(static_cast<unsigned>(ceil_div(C, kFinalizeChannels)));
  c.block = dim3(kFinalizeChannels, kFinalizeLanes);
  c.smem_bytes = size_t(kFinalizeLanes) * 2 * kFinalizeChannels * sizeof(double);
  return c;
}

}  // namespace resfused::cuda
