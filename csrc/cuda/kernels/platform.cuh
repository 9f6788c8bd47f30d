// What the kernel sources need from the platform, in two builds of the same source:
//   nvcc (the real kernels)  and  host C++ under csrc/emulation/cuda_emulation.h (the tests).
// Kernels are written as a struct K with `kPhases` barrier-separated phases:
//   template <int Phase> static void run(const K::Params&, gptr<float> smem)
// CUDA runs the phases in one __global__ function with __syncthreads() between them; the
// emulation runs phase 0 for every thread of a block, then phase 1, ... - exactly the guarantee
// a barrier gives. Nothing but shared memory survives a phase (locals die in the emulation), so
// a kernel that forgot to stage a value through shared memory fails its host test.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#ifdef RESFUSED_EMULATION
#ifndef RESFUSED_EMULATION_HEADER
#error "include emulation/cuda_emulation.h before the kernel headers"
#endif
#define RESFUSED_HOST_DEVICE inline
#define RESFUSED_DEVICE inline
#define RESFUSED_UNROLL
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define RESFUSED_HOST_DEVICE __host__ __device__ __forceinline__
#define RESFUSED_DEVICE __device__ __forceinline__
#define RESFUSED_UNROLL _Pragma("unroll")
#endif

namespace resfused::cuda {

// Global/shared memory pointers: raw in CUDA, bounds- and alignment-checked in the emulation.
#ifdef RESFUSED_EMULATION
template <class T>
using gptr = emu::checked_ptr<T>;
using half_t = c10::Half;
using bf16_t = c10::BFloat16;
#else
template <class T>
using gptr = T*;
using half_t = __half;
using bf16_t = __nv_bfloat16;
#endif

// Arithmetic precision: float for float/half/bfloat16, double for double.
template <class T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <class T>
using acc_t = typename AccType<T>::type;

RESFUSED_DEVICE float to_acc(float v) { return v; }
RESFUSED_DEVICE double to_acc(double v) { return v; }
#ifdef RESFUSED_EMULATION
RESFUSED_DEVICE float to_acc(c10::Half v) { return static_cast<float>(v); }
RESFUSED_DEVICE float to_acc(c10::BFloat16 v) { return static_cast<float>(v); }
#else
RESFUSED_DEVICE float to_acc(__half v) { return __half2float(v); }
RESFUSED_DEVICE float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
#endif

// Round-to-nearest-even narrowing, the same in both builds (c10 and cuda_fp16 both round RNE).
template <class T>
RESFUSED_DEVICE T from_acc(acc_t<T> v) {
#ifdef RESFUSED_EMULATION
  return static_cast<T>(v);
#else
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return v;
#endif
}

// ReLU that lets NaN through, as torch.relu does (fmaxf would turn NaN into 0).
template <class A>
RESFUSED_DEVICE A relu_nan(A v) {
  return (v > A(0) || v != v) ? v : A(0);
}

// N consecutive elements moved as one aligned vector access (LDG/STG/LDS.64/.128).
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

#ifdef RESFUSED_EMULATION
template <int N, class T>
inline Pack<std::remove_const_t<T>, N> load_pack(gptr<T> p, int64_t i) {
  p.check(i, N, sizeof(Pack<std::remove_const_t<T>, N>));
  Pack<std::remove_const_t<T>, N> r;
  for (int k = 0; k < N; ++k) r.v[k] = p.raw()[i + k];
  return r;
}
template <int N, class T>
inline void store_pack(gptr<T> p, int64_t i, const Pack<T, N>& v) {
  p.check(i, N, sizeof(Pack<T, N>));
  for (int k = 0; k < N; ++k) p.raw()[i + k] = v.v[k];
}
#else
template <int N, class T>
RESFUSED_DEVICE Pack<std::remove_const_t<T>, N> load_pack(T* p, int64_t i) {
  return *reinterpret_cast<const Pack<std::remove_const_t<T>, N>*>(p + i);
}
template <int N, class T>
RESFUSED_DEVICE void store_pack(T* p, int64_t i, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p + i) = v;
}
#endif

// Shared memory (declared float) seen as another element type, e.g. double partial sums. The
// dynamic shared buffer is 16-byte aligned, so any A up to 16 bytes is aligned at offset 0.
template <class A>
RESFUSED_DEVICE gptr<A> smem_as(gptr<float> s) {
#ifdef RESFUSED_EMULATION
  return s.template reinterpret<A>();
#else
  return reinterpret_cast<A*>(s);
#endif
}

// Butterfly shuffle: the value of lane (lane ^ lane_mask), all 32 lanes taking part. Kernels
// that call it set `kWarpSync = true` (the emulation then runs the warp's lanes in lock-step).
template <class A>
RESFUSED_DEVICE A shfl_xor(A v, int lane_mask) {
#ifdef RESFUSED_EMULATION
  return emu::shuffle_xor(0xffffffffu, v, lane_mask);
#else
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
#endif
}

// Sums v over the lanes that share (lane % first): butterfly steps lane ^ first, lane ^ 2*first,
// ..., lane ^ 16. Deterministic and identical in every lane: at each step the two partners add
// the same two values (IEEE addition is commutative bit for bit), so they hold the same bits,
// and the association order is fixed by the lane numbers alone.
template <class A, int N>
RESFUSED_DEVICE void warp_sum_xor(A (&v)[N], int first) {
  for (int off = first; off < 32; off *= 2) {
    RESFUSED_UNROLL
    for (int k = 0; k < N; ++k) v[k] += shfl_xor(v[k], off);
  }
}

RESFUSED_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether a pointer allows `bytes`-wide vector accesses (host side, for the launch config).
inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Hardware limits the launch configuration must respect (sm_80 / sm_90).
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
constexpr size_t kDefaultSmemBytes = 48 * 1024;    // without the opt-in attribute
constexpr size_t kMaxOptInSmemBytes = 163 * 1024;  // sm_80's opt-in maximum (sm_90: 227 KiB)

struct LaunchConfig {
  dim3 grid, block;
  size_t smem_bytes = 0;
};

}  // namespace resfused::cuda

#ifndef RESFUSED_EMULATION
namespace resfused::cuda {

// One __global__ entry per kernel struct; __syncthreads() between the phases.
template <class K>
__global__ void __launch_bounds__(K::kMaxThreads) phased_kernel(const typename K::Params p) {
  extern __shared__ float4 resfused_smem_raw[];
  float* smem = reinterpret_cast<float*>(resfused_smem_raw);
  static_assert(K::kPhases >= 1 && K::kPhases <= 2, "kernels have one or two phases");
  K::template run<0>(p, smem);
  if constexpr (K::kPhases == 2) {
    __syncthreads();
    K::template run<1>(p, smem);
  }
}

template <class K>
inline cudaError_t launch_phased(const LaunchConfig& cfg, cudaStream_t stream, const typename K::Params& p) {
  if (cfg.smem_bytes > kDefaultSmemBytes) {
    cudaError_t e = cudaFuncSetAttribute(phased_kernel<K>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(cfg.smem_bytes));
    if (e != cudaSuccess) return e;
  }
  phased_kernel<K><<<cfg.grid, cfg.block, cfg.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace resfused::cuda
#else
namespace resfused::cuda {
template <class K>
inline cudaError_t launch_phased(const LaunchConfig& cfg, cudaStream_t, const typename K::Params& p) {
  return emu::launch<K>(cfg.grid, cfg.block, cfg.smem_bytes, p);
}
}  // namespace resfused::cuda
#endif
