// What the convolutions with a fused eval-mode batch norm share (pointwise_conv.cc,
// stem_conv.cc): a register tile of 6 output pixels x 16 output channels that sums
// products over input segments and applies the norm, a residual add and a ReLU before
// storing, and the packing of the weights into panels of 16 output channels.

#ifndef RESNEXT_JAX_CPU_CONV_TILE_H_
#define RESNEXT_JAX_CPU_CONV_TILE_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace resnext_jax {

constexpr int kPanel = 16;              // output channels per register tile (two AVX vectors)
constexpr int kTileRows = 6;            // output pixels per register tile
// Input channels summed per pass over a tile (calls.MAX_STEM_FORWARD_WEIGHTS: the
// stem packs all its weights as one such block).
constexpr int64_t kDepthBlock = 256;

struct Epilogue {
  const float* scale;   // [CO]
  const float* offset;  // [CO]
  bool relu;
};

// Sums `segments` x `depth` products for `R` output pixels x 16 output channels into
// `c` (row stride `ldc`): pixel r's inputs of segment s are the `depth` floats at
// a[r] + s * segment_stride, the weights `b` are packed [segments * depth][16]. (A 1x1
// convolution has one segment; the stem one per kernel row.) The first depth block
// starts from zero, later ones from `c`; the last applies the epilogue to channels
// [column, column + 16), adding `residual` (laid out as `c`) unless it is null.
template <int R>
inline void Tile(const float* const* a, int64_t segments, int64_t segment_stride,
                 const float* b, int64_t depth, float* c, int64_t ldc, bool first,
                 bool last, const Epilogue& e, int64_t column, const float* residual) {
  if (last) {
    // The epilogue's memory, fetched while the products are summed: otherwise every
    // tile stalls on it (its rows are a stride apart, which hardware prefetch misses).
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(c + r * ldc, 1);
      if (residual) __builtin_prefetch(residual + r * ldc, 0);
    }
  }
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc);
    acc[r][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + r * ldc + 8);
  }
  for (int64_t s = 0; s < segments; ++s, b += depth * kPanel) {
    const int64_t shift = s * segment_stride;
    for (int64_t k = 0; k < depth; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + k * kPanel);
      const __m256 b1 = _mm256_loadu_ps(b + k * kPanel + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(a[r] + shift + k);
        acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
      }
    }
  }
  if (last) {
    const __m256 s0 = _mm256_loadu_ps(e.scale + column);
    const __m256 s1 = _mm256_loadu_ps(e.scale + column + 8);
    const __m256 t0 = _mm256_loadu_ps(e.offset + column);
    const __m256 t1 = _mm256_loadu_ps(e.offset + column + 8);
    const __m256 zero = _mm256_setzero_ps();
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_fmadd_ps(acc[r][0], s0, t0);
      acc[r][1] = _mm256_fmadd_ps(acc[r][1], s1, t1);
      if (residual) {
        acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(residual + r * ldc));
        acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(residual + r * ldc + 8));
      }
      if (e.relu) {  // max(0, NaN) is NaN, as in jnp.maximum: NaNs stay visible
        acc[r][0] = _mm256_max_ps(zero, acc[r][0]);
        acc[r][1] = _mm256_max_ps(zero, acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(c + r * ldc, acc[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, acc[r][1]);
  }
}

// Copies w [c][co] into panels: for each depth block (k0, depth), for each panel p,
// depth x 16 weights, contiguous.
inline void Pack(xla::ffi::ThreadPool& pool, const float* w, int64_t c, int64_t co, float* packed) {
  const int64_t panels = co / kPanel;
  ParallelFor(pool, panels, [&](int64_t p) {
    for (int64_t k0 = 0; k0 < c; k0 += kDepthBlock) {
      const int64_t depth = std::min(kDepthBlock, c - k0);
      float* out = packed + k0 * co + p * depth * kPanel;
      for (int64_t k = 0; k < depth; ++k)
        std::copy_n(w + (k0 + k) * co + p * kPanel, kPanel, out + k * kPanel);
    }
  });
}

// `w` packed as Pack does, into a buffer of the calling thread that the next call on it
// reuses (the pool's workers read it while the caller waits in ParallelFor).
inline const float* PackedWeights(xla::ffi::ThreadPool& pool, const float* w, int64_t c,
                                  int64_t co) {
  thread_local std::vector<float> packed;
  packed.resize(c * co);
  Pack(pool, w, c, co, packed.data());
  return packed.data();
}

// The binding both fused handlers start with: thread pool, x, w, the norm's scale and
// offset (float32).
inline auto NormalizedConvArgs() {
  return xla::ffi::Ffi::Bind()
      .Ctx<xla::ffi::ThreadPool>()
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // x
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // w
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()   // scale
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>();  // offset
}

}  // namespace resnext_jax

#endif  // RESNEXT_JAX_CPU_CONV_TILE_H_
