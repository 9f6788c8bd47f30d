// CPU kernel of resfused::max_pool3x3s2 (schema in ../pool.cpp): the 3x3, stride-2, padding-1 max
// pool of a ResNet stem, NHWC, one vector of channels at a time.
//
// Why not ATen's: on the CPU, F.max_pool2d always computes max_pool2d_with_indices and writes an
// int64 index per output beside it, twice the bytes of the float32 output, which inference never
// reads (2.5 ms of a ResNet-18 batch-8 forward).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"

namespace resfused::cpu {
namespace {

at::Tensor max_pool3x3s2(const at::Tensor& x_in) {
  check_float_tensor(x_in, "x");
  TORCH_CHECK(x_in.dim() == 4, "resfused.max_pool3x3s2: 'x' must be 4-D (N, C, H, W), got ", x_in.dim(), "-D");
  TORCH_CHECK(x_in.size(2) > 0 && x_in.size(3) > 0, "resfused.max_pool3x3s2: 'x' must have a non-empty height and width, got ",
              x_in.sizes());
  const auto x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H - 1) / 2 + 1, Wo = (W - 1) / 2 + 1;
  auto y = at::empty({N, C, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "resfused_max_pool3x3s2", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t kVec = Vec::size();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    // One output row per work item: its three input rows stay in cache across the row.
    at::parallel_for(0, N * Ho, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, i = r % Ho;
        const int64_t h0 = std::max<int64_t>(2 * i - 1, 0), h1 = std::min<int64_t>(2 * i + 1, H - 1);
        for (int64_t j = 0; j < Wo; ++j) {
          const int64_t w0 = std::max<int64_t>(2 * j - 1, 0), w1 = std::min<int64_t>(2 * j + 1, W - 1);
          scalar_t* out = yp + ((n * Ho + i) * Wo + j) * C;
          for (int64_t c0 = 0; c0 < C; c0 += kVec) {
            const int64_t count = std::min(kVec, C - c0);
            // (h0, w0) is inside the image (padding only clips the window), so the max starts
            // from a real value, never from -inf.
            Vec m = Vec::loadu(xp + ((n * H + h0) * W + w0) * C + c0, count);
            for (int64_t h = h0; h <= h1; ++h)
              for (int64_t w = w0; w <= w1; ++w)
                m = at::vec::maximum(m, Vec::loadu(xp + ((n * H + h) * W + w) * C + c0, count));  // NaN wins
            m.store(out + c0, count);
          }
        }
      }
    });
  });
  return y;
}

}  // namespace
}  // namespace resfused::cpu

TORCH_LIBRARY_IMPL(resfused, CPU, m) { m.impl("max_pool3x3s2", &resfused::cpu::max_pool3x3s2); }
