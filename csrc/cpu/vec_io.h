// Load/store of float-precision vectors from any floating dtype, so one kernel body serves
// float32, float64, bfloat16 and float16: reduced types are widened to float on load and
// narrowed on store (arithmetic always in at::opmath_type, i.e. float or double).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace resfused::cpu {

template <typename T>
struct VecIO {
  using Acc = at::opmath_type<T>;
  using Vec = at::vec::Vectorized<Acc>;
  static constexpr bool kReduced = at::vec::is_reduced_floating_point_v<T>;
  static constexpr int64_t kSize = Vec::size();

  static Vec load(const T* p) {
    if constexpr (kReduced) {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    } else {
      return Vec::loadu(p);
    }
  }
  static void store(T* p, const Vec& v) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(v, v).store(p, kSize);
    } else {
      v.store(p);
    }
  }
};

// ReLU that lets NaN through, as torch.relu does.
template <typename Acc>
inline Acc relu_scalar(Acc v) {
  return v > Acc(0) || v != v ? v : Acc(0);
}

}  // namespace resfused::cpu
