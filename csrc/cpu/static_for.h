// Compile-time loop for unrolled kernel code: static_for<N>(f) calls f(integral_constant<int, 0>),
// ..., f(integral_constant<int, N - 1>), so the index can be used in constant expressions.
//
// No include guard and no namespace of its own: a file includes this into the namespace that
// uses it, and a kernel compiled once per ISA (winograd_f43_tiles.h) into each instance's
// namespace. The instance inside a `#pragma GCC target` region then gets a static_for compiled
// for that target, which can inline the region's always_inline lambdas; one compiled outside
// the region cannot (GCC: "target specific option mismatch"). The includer includes <utility>.

template <int... I, class F>
__attribute__((always_inline)) inline void static_for_impl(std::integer_sequence<int, I...>, F&& f) {
  (f(std::integral_constant<int, I>{}), ...);
}

template <int N, class F>
__attribute__((always_inline)) inline void static_for(F&& f) {
  static_for_impl(std::make_integer_sequence<int, N>{}, f);
}
