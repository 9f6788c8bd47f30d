// The per-channel reduction layout of the tails backward (scale_shift_act_backward; the training
// BatchNorm has its own 2-D block reduction, bn_train_config.cuh):
// partial sums go to "slots" (a partial buffer [slots][2][C], written without atomics), and a
// finalize adds each channel's slots up in slot order, so results are deterministic.
//
// The slot walk: channels-last (inner == 1), thread = channel and slot = block row, which takes
// rows slot, slot + slots, ... (coalesced over c); NC(spatial), block = plane and thread t takes
// elements t, t + blockDim, ... of it (coalesced over i), slot = image * blockDim + t. The launch
// shape is scale_shift_backward_config's.
#pragma once

#include "cuda/kernels/platform.cuh"

namespace resfused::cuda {

// Calls init(c) once, then f(i) for every element of this thread's slot; returns false for an
// idle thread. Args needs n, C, inner and slots.
template <class Args, class Init, class F>
RESFUSED_DEVICE bool slot_walk(const Args& a, int64_t& c, int64_t& slot, Init init, F f) {
  if (a.inner == 1) {
    c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    slot = blockIdx.y;
    if (c >= a.C) return false;
    init(c);
    const int64_t rows = a.n / a.C;
    for (int64_t r = slot; r < rows; r += a.slots) f(r * a.C + c);
  } else {
    const int64_t plane = blockIdx.x;
    c = plane % a.C;
    slot = (plane / a.C) * blockDim.x + threadIdx.x;
    init(c);
    const int64_t base = plane * a.inner;
    for (int64_t i = threadIdx.x; i < a.inner; i += blockDim.x) f(base + i);
  }
  return true;
}

template <class A>
RESFUSED_DEVICE void store_slot_pair(gptr<A> partial, int64_t slot, int64_t C, int64_t c, A v0, A v1) {
  partial[(slot * 2 + 0) * C + c] = v0;
  partial[(slot * 2 + 1) * C + c] = v1;
}

// Sum over the slots of partial[slot][which][c], accumulated in S, in slot order.
template <class S, class A>
RESFUSED_DEVICE S sum_slots(gptr<A> partial, int64_t slots, int64_t C, int64_t which, int64_t c) {
  S s = 0;
  for (int64_t k = 0; k < slots; ++k) s += static_cast<S>(partial[(k * 2 + which) * C + c]);
  return s;
}

}  // namespace resfused::cuda
