// Grouped 3x3 convolution, NHWC, padding 1, stride 1 or 2: arguments, tile shapes and the launch
// configuration. No kernel code here: the host binding includes this file alone, the kernel TU
// (grouped_conv3x3_kernels.cu) and the emulation include grouped_conv3x3.cuh on top of it.
//
// Work split. A block owns one image n, a TH x TW tile of output pixels and a slab of CB
// consecutive channels (CB / CPG whole groups; output channels per group == input channels per
// group == CPG). It stages the (TH-1)*S+3 x (TW-1)*S+3 input halo of its slab and the slab's
// weights in shared memory as float, then each thread computes P consecutive output columns x V
// consecutive output channels (one group) in registers: P*V fp32 accumulators, inputs read four
// channels at a time (LDS.128), weights V at a time, each input value reused for 3 kw taps x V
// channels and each weight for P pixels.
//
// Block size. V = 4 at every group width: 16 threads per tile row for 8/16/32 channels per group
// (CB = 32), 32 for 4 (CB = 64), so up to 128 / 256 threads per block. (V = 8 for 16/32 gave 8
// threads per row, blocks of at most 64 threads: with 37-49 KiB of shared memory per block that
// left 4-8 warps per SM to hide the shared-memory latency.) The kernel is selected on CUDA only
// at 4 and 8 channels per group until it is measured on a GPU (resfused/kernels/conv_grouped.py).
#pragma once

#include "cuda/kernels/platform.cuh"

namespace resfused::cuda {

template <int CPG>
struct GroupedConvTile {
  static_assert(CPG == 4 || CPG == 8 || CPG == 16 || CPG == 32, "channels per group must be 4, 8, 16 or 32");
  static constexpr int V = 4;                    // output channels per thread
  static constexpr int P = 4;                    // output columns per thread
  static constexpr int CB = CPG == 4 ? 64 : 32;  // channels per block (CB / CPG groups)
  static constexpr int TW = 8;                   // output tile width
  static constexpr int kMaxTH = 8;               // output tile height (chosen per shape, <= this)
  static constexpr int kThreadsPerRow = (CB / V) * (TW / P);
  static constexpr int kMaxThreads = kThreadsPerRow * kMaxTH;
};

template <class T>
struct GroupedConvArgs {
  gptr<const T> x;     // [N, H, W, C] (channels_last storage)
  gptr<const T> w;     // [C, CPG, 3, 3] (OIHW, contiguous)
  gptr<const T> bias;  // [C] or null (has_bias false)
  gptr<T> y;           // [N, OH, OW, C]
  int64_t N = 0, H = 0, W = 0, C = 0, OH = 0, OW = 0;
  int cpg = 0, stride = 1;
  bool has_bias = false, relu = false;
  bool vec_io = false;  // 16-byte loads of x / V-wide stores of y are aligned (set by the config)
  bool vec_w = false;   // 4-element loads of w are aligned (set by the config)
  int tile_h = 1;       // TH, set by the config
  int64_t tiles_h = 0, tiles_w = 0;
};

// Input halo rows/cols for an output tile.
RESFUSED_HOST_DEVICE int grouped_halo(int out_tile, int stride) { return (out_tile - 1) * stride + 3; }

template <int CPG>
inline size_t grouped_conv_smem_bytes(int tile_h, int stride) {
  using Tile = GroupedConvTile<CPG>;
  const size_t w = size_t(CPG) * 9 * Tile::CB;
  const size_t in = size_t(grouped_halo(tile_h, stride)) * grouped_halo(Tile::TW, stride) * Tile::CB;
  return (w + in) * sizeof(float);
}

constexpr size_t kGroupedSmemBudget = 96 * 1024;  // two blocks per SM on sm_80/sm_90 at most

// Tile height: among the TH <= 8 whose shared memory fits the budget and whose block is whole
// warps (a partial warp idles lanes just as a partial tile does), the one with the least work +
// halo per image column, tiles * (TH + 2) rows.
template <int CPG>
inline int grouped_conv_tile_h(int64_t OH, int stride) {
  int best = 0;
  int64_t best_cost = 0;
  for (int th = GroupedConvTile<CPG>::kMaxTH; th >= 1; --th) {
    if (grouped_conv_smem_bytes<CPG>(th, stride) > kGroupedSmemBudget) continue;
    if ((GroupedConvTile<CPG>::kThreadsPerRow * th) % 32 != 0) continue;
    const int64_t cost = ceil_div(OH, th) * (th + 2);
    if (best == 0 || cost < best_cost) best = th, best_cost = cost;
  }
  return best;
}

// Fills the tile fields of `a` and returns the launch configuration; ok=false when the shape
// exceeds the grid limits (the caller reports it).
template <int CPG, class T>
inline bool grouped_conv_config(GroupedConvArgs<T>& a, LaunchConfig& cfg, const void* x_raw, const void* w_raw,
                                const void* y_raw) {
  using Tile = GroupedConvTile<CPG>;
  a.tile_h = grouped_conv_tile_h<CPG>(a.OH, a.stride);
  a.tiles_h = ceil_div(a.OH, a.tile_h);
  a.tiles_w = ceil_div(a.OW, Tile::TW);
  // Vector accesses: x rows read 16 bytes at a time, y written V elements at a time.
  const size_t vin = 16, vout = sizeof(T) * Tile::V;
  a.vec_io = a.C % int64_t(vin / sizeof(T)) == 0 && aligned_to(x_raw, vin) && aligned_to(y_raw, vout);
  // Weight rows are CPG*9 elements, a multiple of 4: 4-tap vectors stay aligned if the start is.
  a.vec_w = aligned_to(w_raw, 4 * sizeof(T));
  const int64_t blocks_x = a.N * a.tiles_h * a.tiles_w;
  const int64_t blocks_y = ceil_div(a.C, Tile::CB);
  cfg.grid = dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y), 1);
  cfg.block = dim3(static_cast<unsigned>(Tile::kThreadsPerRow * a.tile_h), 1, 1);
  cfg.smem_bytes = grouped_conv_smem_bytes<CPG>(a.tile_h, a.stride);
  return a.tile_h > 0 && blocks_x >= 1 && blocks_x <= kMaxGridX && blocks_y <= kMaxGridYZ;
}

// Defined in grouped_conv3x3.cuh; compiled for float/half/bfloat16 in grouped_conv3x3_kernels.cu.
// Returns cudaErrorInvalidConfiguration for a shape outside the grid limits or an unsupported
// (cpg, stride).
template <class T>
cudaError_t launch_grouped_conv3x3(GroupedConvArgs<T> a, cudaStream_t stream);

#ifndef RESFUSED_EMULATION
extern template cudaError_t launch_grouped_conv3x3<float>(GroupedConvArgs<float>, cudaStream_t);
extern template cudaError_t launch_grouped_conv3x3<half_t>(GroupedConvArgs<half_t>, cudaStream_t);
extern template cudaError_t launch_grouped_conv3x3<bf16_t>(GroupedConvArgs<bf16_t>, cudaStream_t);
#endif

}  // namespace resfused::cuda
