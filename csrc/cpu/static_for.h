// Compile-time loop for unrolled kernel code: static_for<N>(f) calls f(integral_constant<int, 0>),
// ..., f(integral_constant<int, N - 1>), so the index can be used in constant expressions.
#pragma once

#include <type_traits>
#include <utility>

namespace resfused::cpu {

template <int... I, class F>
__attribute__((always_inline)) inline void static_for_impl(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}

template <int N, class F>
__attribute__((always_inline)) inline void static_for(F&& f) {
  static_for_impl(std::make_integer_sequence<int, N>{}, f);
}

}  // namespace resfused::cpu
