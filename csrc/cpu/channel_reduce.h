// How CPU kernels walk a (N, C, spatial...) tensor per channel, and per-channel sums over it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace resfused::cpu {

constexpr int64_t kGrain = 32768;  // elements per parallel task for streaming loops

// Channels innermost (channels_last): `rows` = N*spatial rows of C values, channel = column.
// Otherwise: `rows` = N*C planes of `inner` = prod(spatial) values, plane r is channel r % C.
struct ChannelGeometry {
  bool channels_last;
  int64_t channels, rows, inner;
  explicit ChannelGeometry(const at::Tensor& x) : channels_last(channels_innermost(x)), channels(x.size(1)) {
    int64_t spatial = 1;
    for (int64_t d = 2; d < x.dim(); ++d) spatial *= x.size(d);
    inner = channels_last ? channels : spatial;
    rows = inner == 0 ? 0 : x.numel() / inner;
  }
  int64_t rows_per_task() const { return std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)); }
  // Values per channel: the N in a BatchNorm's mean.
  int64_t per_channel() const { return channels == 0 ? 0 : rows * inner / channels; }
};

// `nsums` per-channel sums over all rows. row_fn(r, partial) adds row r's contribution into
// partial[k * C + c] (k < nsums), in the kernel's accumulation type Acc. Rows are split into
// fixed tasks (independent of the thread count, so results are reproducible); each task
// accumulates in Acc over at most kGrain elements and the tasks are added up in double.
template <typename Acc, typename RowFn>
std::vector<double> per_channel_sums(const ChannelGeometry& geo, int nsums, RowFn row_fn) {
  const int64_t C = geo.channels, width = nsums * C;
  const int64_t step = geo.rows_per_task();
  const int64_t tasks = geo.rows == 0 ? 0 : (geo.rows + step - 1) / step;
  std::vector<Acc> partial(static_cast<size_t>(tasks * width), Acc(0));
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      Acc* mine = partial.data() + t * width;
      for (int64_t r = t * step; r < std::min(geo.rows, (t + 1) * step); ++r) row_fn(r, mine);
    }
  });
  std::vector<double> total(static_cast<size_t>(width), 0.0);
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t j = 0; j < width; ++j) total[j] += static_cast<double>(partial[t * width + j]);
  return total;
}

// Row-parallel elementwise pass: row_fn(r) for every row.
template <typename RowFn>
void for_each_row(const ChannelGeometry& geo, RowFn row_fn) {
  at::parallel_for(0, geo.rows, geo.rows_per_task(), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_fn(r);
  });
}

}  // namespace resfused::cpu
