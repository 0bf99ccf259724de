// What the convolutions with a fused eval-mode batch norm share (pointwise_conv.cc,
// stem_conv.cc): a register tile of kTileRows output pixels x one panel of output
// channels that sums products over input segments and applies the norm, a residual add
// and a ReLU before storing, and the packing of the weights into panels.
//
// A panel is kPanelVectors of the widest vectors (vec.h): 6 pixels x 2 vectors (16
// channels) in 12 of AVX2's 16 registers; 6 x 4 vectors (64 channels) in 24 of
// AVX-512's 32, which loads 10 vectors per 24 multiply-adds where 14 x 2 vectors loaded
// 16 per 28 (and measured a few percent slower). The last panel of a row of output
// channels may be narrower, in whole vectors.

#ifndef RESNEXT_JAX_CPU_CONV_TILE_H_
#define RESNEXT_JAX_CPU_CONV_TILE_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ffi_common.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace resnext_jax {

constexpr int kPanelVectors = kVectorRegisters == 32 ? 4 : 2;
constexpr int kPanel = kPanelVectors * kLanes;  // output channels per full panel
// The output channel counts the kernels take are multiples of this (calls.py: blocks of
// 16), so that every panel is whole vectors.
constexpr int kChannelBlock = 16;
static_assert(kPanel % kChannelBlock == 0 && kChannelBlock % kLanes == 0, "panels");
// Output pixels per register tile: a panel of accumulators each, plus the panel's weight
// vectors and a broadcast input, in the vector registers there are.
constexpr int kTileRows = (kVectorRegisters - kPanelVectors - 1) / kPanelVectors;
// Input channels summed per pass over a tile (calls.MAX_STEM_FORWARD_WEIGHTS: the
// stem packs all its weights as one such block).
constexpr int64_t kDepthBlock = 256;

// Depth steps ahead that a tile asks for its weights: each step reads a panel's row (4
// cache lines with AVX-512) from L2, and fetched this far ahead the 1x1 convs ran about
// 5% faster (16 steps: no gain). A prefetch past the panel's end is harmless.
constexpr int64_t kPrefetchAhead = 8;

struct Epilogue {
  const float* scale;   // [CO]
  const float* offset;  // [CO]
  bool relu;
};

// Sums `segments` x `depth` products for `R` output pixels x V vectors of output
// channels into `c` (row stride `ldc`): pixel r's inputs of segment s are the `depth`
// floats at a[r] + s * segment_stride, the weights `b` are packed
// [segments * depth][V * kLanes]. (A 1x1 convolution has one segment; the stem one per
// kernel row.) The first depth block starts from zero, later ones from `c`; the last
// applies the epilogue to the channels from `column` on, adding `residual` (laid out as
// `c`) unless it is null.
template <int R, int V>
inline void Tile(const float* const* a, int64_t segments, int64_t segment_stride,
                 const float* b, int64_t depth, float* c, int64_t ldc, bool first,
                 bool last, const Epilogue& e, int64_t column, const float* residual) {
  using S = Simd<kLanes>;
  constexpr int kWidth = V * kLanes;
  if (last) {
    // The epilogue's memory, fetched while the products are summed: otherwise every
    // tile stalls on it (its rows are a stride apart, which hardware prefetch misses).
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(c + r * ldc, 1);
      if (residual) __builtin_prefetch(residual + r * ldc, 0);
    }
  }
  typename S::V acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = first ? S::Zero() : S::Load(c + r * ldc + j * kLanes);
  for (int64_t s = 0; s < segments; ++s, b += depth * kWidth) {
    const int64_t shift = s * segment_stride;
    for (int64_t k = 0; k < depth; ++k) {
      typename S::V w[V];
      for (int j = 0; j < V; ++j)
        __builtin_prefetch(b + (k + kPrefetchAhead) * kWidth + j * kLanes);
      for (int j = 0; j < V; ++j) w[j] = S::Load(b + k * kWidth + j * kLanes);
      for (int r = 0; r < R; ++r) {
        const typename S::V av = S::Broadcast(a[r] + shift + k);
        for (int j = 0; j < V; ++j) acc[r][j] = S::Fmadd(av, w[j], acc[r][j]);
      }
    }
  }
  if (last) {
    typename S::V scale[V], offset[V];
    for (int j = 0; j < V; ++j) {
      scale[j] = S::Load(e.scale + column + j * kLanes);
      offset[j] = S::Load(e.offset + column + j * kLanes);
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < V; ++j) {
        acc[r][j] = S::Fmadd(acc[r][j], scale[j], offset[j]);
        if (residual) acc[r][j] = S::Add(acc[r][j], S::Load(residual + r * ldc + j * kLanes));
        if (e.relu) acc[r][j] = S::Max(S::Zero(), acc[r][j]);  // NaNs stay visible
      }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) S::Store(c + r * ldc + j * kLanes, acc[r][j]);
}

// Calls tiles(std::integral_constant<int, R>(), start) for tiles of R rows that cover
// [begin, end): R = kTileRows, then R / 2, R / 4, ... for the rest. A tile of few rows
// reuses each weight vector less and runs short chains of dependent multiply-adds, so
// the rest goes in as few tiles as possible.
template <int R = kTileRows, typename F>
inline void ForTiles(int64_t begin, int64_t end, const F& tiles) {
  for (; begin + R <= end; begin += R) tiles(std::integral_constant<int, R>(), begin);
  if constexpr (R > 1) ForTiles<R / 2>(begin, end, tiles);
}

// Tile over the panel of output channels that starts at `column`: a full one, or the
// narrower one that ends a row of `co` channels.
template <int R, int V = kPanelVectors>
inline void PanelTile(const float* const* a, int64_t segments, int64_t segment_stride,
                      const float* b, int64_t depth, float* c, int64_t ldc, bool first,
                      bool last, const Epilogue& e, int64_t column, int64_t co,
                      const float* residual) {
  if constexpr (V > 1) {
    if (co - column < V * kLanes)
      return PanelTile<R, V - 1>(a, segments, segment_stride, b, depth, c, ldc, first, last,
                                 e, column, co, residual);
  }
  Tile<R, V>(a, segments, segment_stride, b, depth, c, ldc, first, last, e, column, residual);
}

// Copies w [c][co] into panels: for each depth block (k0, depth), for each panel p,
// depth x (its width) weights, contiguous; panel p starts at k0 * co + p * depth * kPanel.
inline void Pack(xla::ffi::ThreadPool& pool, const float* w, int64_t c, int64_t co, float* packed) {
  const int64_t panels = (co + kPanel - 1) / kPanel;
  ParallelFor(pool, panels, [&](int64_t p) {
    const int64_t width = std::min<int64_t>(kPanel, co - p * kPanel);
    for (int64_t k0 = 0; k0 < c; k0 += kDepthBlock) {
      const int64_t depth = std::min(kDepthBlock, c - k0);
      float* out = packed + k0 * co + p * depth * kPanel;
      for (int64_t k = 0; k < depth; ++k)
        std::copy_n(w + (k0 + k) * co + p * kPanel, width, out + k * width);
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
