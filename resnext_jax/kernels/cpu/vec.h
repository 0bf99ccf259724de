// The vector operations the kernels are written in, for the instruction set they are
// built for: one source serves AVX2 + FMA (256-bit vectors, 16 registers) and AVX-512
// (512-bit vectors, 32 registers). build.py defines RESNEXT_JAX_VECTOR_BITS (256 or 512)
// with the matching -m flags, from what the CPU has.
//
// A kernel names the lanes it wants (`Simd<8>`, `Simd<16>`) or asks for the widest vector
// that divides a block of channels (`SimdFor<N>`). On AVX-512, `Simd<8>` still serves
// 8-wide blocks (the grouped convolution's 8-channel groups), now with 32 registers.

#ifndef RESNEXT_JAX_CPU_VEC_H_
#define RESNEXT_JAX_CPU_VEC_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#ifndef RESNEXT_JAX_VECTOR_BITS
#error "RESNEXT_JAX_VECTOR_BITS must be 256 or 512 (build.py sets it)"
#endif

namespace resnext_jax {

constexpr int kVectorBits = RESNEXT_JAX_VECTOR_BITS;
static_assert(kVectorBits == 256 || kVectorBits == 512, "RESNEXT_JAX_VECTOR_BITS");
constexpr int kLanes = kVectorBits / 32;                  // floats in the widest vector
constexpr int kVectorRegisters = kVectorBits == 512 ? 32 : 16;

template <int Lanes>
struct Simd;

template <>
struct Simd<8> {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V Zero() { return _mm256_setzero_ps(); }
  static V Load(const float* p) { return _mm256_loadu_ps(p); }
  static void Store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  // p[0], p[1] repeated across the lanes: one 64-bit broadcast (a load, no shuffle).
  static V BroadcastPair(const float* p) {
    double pair;
    std::memcpy(&pair, p, sizeof(pair));
    return _mm256_castpd_ps(_mm256_set1_pd(pair));
  }
  // Lane i of the result is lane index[i] of v.
  static V Permute(V v, const int32_t* index) {
    return _mm256_permutevar8x32_ps(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index)));
  }
  static V Fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c
  static V Add(V a, V b) { return _mm256_add_ps(a, b); }
  // max(a, b) returns b where either is NaN: Max(Zero(), x) keeps x's NaNs.
  static V Max(V a, V b) { return _mm256_max_ps(a, b); }
};

#if RESNEXT_JAX_VECTOR_BITS == 512
template <>
struct Simd<16> {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V Zero() { return _mm512_setzero_ps(); }
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V Broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V BroadcastPair(const float* p) {
    double pair;
    std::memcpy(&pair, p, sizeof(pair));
    return _mm512_castpd_ps(_mm512_set1_pd(pair));
  }
  // p[0..3] repeated across the lanes (a load, no shuffle).
  static V BroadcastQuad(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  static V Permute(V v, const int32_t* index) {
    return _mm512_permutexvar_ps(_mm512_loadu_si512(index), v);
  }
  static V Fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V Add(V a, V b) { return _mm512_add_ps(a, b); }
  static V Max(V a, V b) { return _mm512_max_ps(a, b); }
};
#endif

// The widest vector whose lanes divide `Channels` (a multiple of 8).
template <int Channels>
using SimdFor = Simd<Channels % kLanes == 0 ? kLanes : 8>;

}  // namespace resnext_jax

#endif  // RESNEXT_JAX_CPU_VEC_H_
