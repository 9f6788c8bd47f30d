// Shared by the CPU and CUDA halves of resfused: argument checks with messages that name the
// argument and say what was expected. Host-only code.
#pragma once

#include <ATen/ATen.h>

namespace resfused {

inline void check_float_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "resfused: '", name, "' is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "resfused: '", name,
              "' must be a floating-point tensor (float32, float16, bfloat16 or float64), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "resfused: '", b_name, "' is on ", b.device(), " but '", a_name, "' is on ",
              a.device(), "; move them to one device");
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "resfused: '", b_name, "' has dtype ", b.scalar_type(), " but '",
              a_name, "' has dtype ", a.scalar_type(), "; they must match");
}

// A per-channel vector (scale, shift, bias) for a tensor with `channels` channels in dim 1.
inline void check_channel_vector(const at::Tensor& v, const char* name, const at::Tensor& x, const char* x_name) {
  check_float_tensor(v, name);
  check_same_device(x, x_name, v, name);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(1), "resfused: '", name, "' must have shape [", x.size(1),
              "] (one value per channel of '", x_name, "'), got ", v.sizes());
}

// `other` (a residual, a gradient) must match `x` in device, dtype and shape.
inline void check_like(const at::Tensor& x, const char* x_name, const at::Tensor& other, const char* other_name,
                       const char* op) {
  check_same_device(x, x_name, other, other_name);
  check_same_dtype(x, x_name, other, other_name);
  TORCH_CHECK(other.sizes() == x.sizes(), "resfused.", op, ": '", other_name, "' must have the shape of '", x_name,
              "' ", x.sizes(), ", got ", other.sizes());
}

// Activations: rank >= 2 with channels in dim 1 (N, C, ...).
inline void check_activation(const at::Tensor& x, const char* name) {
  check_float_tensor(x, name);
  TORCH_CHECK(x.dim() >= 2, "resfused: '", name, "' must have shape (N, C, ...) with rank >= 2, got rank ", x.dim());
}

// The layout a kernel walks: channels innermost (channels_last / channels_last_3d) or NC(spatial).
inline bool channels_innermost(const at::Tensor& x) {
  auto fmt = x.suggest_memory_format();
  return fmt == at::MemoryFormat::ChannelsLast || fmt == at::MemoryFormat::ChannelsLast3d;
}

}  // namespace resfused
