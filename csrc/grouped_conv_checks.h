// The argument contract of resfused::grouped_conv3x3 (schema in grouped_conv.cpp), checked the
// same way by every device's kernel; each kernel adds its own restrictions after this.
#pragma once

#include <optional>

#include "common.h"

namespace resfused {

inline void check_grouped_conv3x3_args(const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t stride) {
  check_float_tensor(x, "x");
  check_float_tensor(weight, "weight");
  check_same_device(x, "x", weight, "weight");
  check_same_dtype(x, "x", weight, "weight");
  TORCH_CHECK(x.dim() == 4, "resfused.grouped_conv3x3: 'x' must have shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.size(1) > 0,
              "resfused.grouped_conv3x3: 'weight' must have shape [C_out, C_in/groups, 3, 3], got ", weight.sizes());
  const int64_t C = x.size(1), cpg = weight.size(1);
  TORCH_CHECK(C > 0 && C % cpg == 0, "resfused.grouped_conv3x3: 'x' has ", C,
              " channels, which is not a multiple of weight.size(1) = ", cpg, " (input channels per group)");
  const int64_t groups = C / cpg;
  TORCH_CHECK(weight.size(0) > 0 && weight.size(0) % groups == 0, "resfused.grouped_conv3x3: 'weight' has ",
              weight.size(0), " output channels, which is not a multiple of the ", groups, " groups");
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "resfused.grouped_conv3x3: 'x' must have H >= 1 and W >= 1, got ",
              x.sizes());
  TORCH_CHECK(stride >= 1, "resfused.grouped_conv3x3: 'stride' must be >= 1, got ", stride);
  if (bias.has_value() && bias->defined()) {
    check_float_tensor(*bias, "bias");
    check_same_device(x, "x", *bias, "bias");
    check_same_dtype(x, "x", *bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "resfused.grouped_conv3x3: 'bias' must have shape [", weight.size(0), "], got ", bias->sizes());
  }
}

}  // namespace resfused
