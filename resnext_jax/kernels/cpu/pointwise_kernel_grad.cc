// The weight gradient of a 1x1 convolution, dw[C, CO] = sum over pixels p of
// x[p, c] * g[p, co], for x86-64 CPUs with AVX2 and FMA or AVX-512: an XLA FFI handler.
//
// Why: XLA's CPU backend runs this contraction over the pixel axis as a plain dot, not
// one of its fast matmuls; on the shapes of a ResNeXt's first two stages (50176 or 12544
// pixels, 64-512 channels) it ran at half to three quarters of the speed of the same
// layers' forward matmuls.
//
// A register tile holds kTileRows input channels x one panel of output channels
// (conv_tile.h's shape: 6 x 64 in 24 AVX-512 registers, 6 x 16 in 12 AVX2 ones) and sums
// over a block of kPixelBlock pixels: per pixel one broadcast of x per row and the
// panel's vectors of g. A row tile's x values of the block stay in L1 while the tile
// passes over every panel of the block's g (in L2); the other order (one panel of g in
// L1, every row tile over it) ran up to 1.4x slower. Each work item takes a contiguous
// share of the pixels and sums into its own copy of dw; the copies are added in a fixed
// order, so results are deterministic for a given number of threads.
//
// Layouts: x is [..., C] and g is [..., CO] with the same leading (pixel) dimensions;
// the result is [C, CO]. CO is a multiple of 16 (calls.py checks).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_tile.h"
#include "ffi_common.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using resnext_jax::ForTiles;
using resnext_jax::kLanes;
using resnext_jax::kPanel;
using resnext_jax::kPanelVectors;
using resnext_jax::ParallelFor;
using resnext_jax::Simd;

namespace {

constexpr int64_t kPixelBlock = 128;   // pixels per pass of a tile
constexpr int64_t kItemsPerThread = 2;  // work items (each with its own dw) per thread

struct Geometry {
  int64_t pixels, c, co;
};

// dw[c0, c0 + R) x [col, col + V * kLanes) += x[p0:p1, c0:c0+R]^T g[p0:p1, col:...].
template <int R, int V>
inline void Tile(const float* x, const float* g, const Geometry& s, int64_t p0, int64_t p1,
                 int64_t c0, int64_t col, float* dw) {
  using S = Simd<kLanes>;
  typename S::V acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) acc[r][j] = S::Load(dw + (c0 + r) * s.co + col + j * kLanes);
  const float* xr = x + p0 * s.c + c0;
  const float* gr = g + p0 * s.co + col;
  for (int64_t p = p0; p < p1; ++p, xr += s.c, gr += s.co) {
    typename S::V gv[V];
    for (int j = 0; j < V; ++j) gv[j] = S::Load(gr + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const typename S::V xv = S::Broadcast(xr + r);
      for (int j = 0; j < V; ++j) acc[r][j] = S::Fmadd(xv, gv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < V; ++j) S::Store(dw + (c0 + r) * s.co + col + j * kLanes, acc[r][j]);
}

// The tile for the panel at `col`: a full one, or the narrower one that ends the row.
template <int R, int V = kPanelVectors>
inline void PanelTile(const float* x, const float* g, const Geometry& s, int64_t p0,
                      int64_t p1, int64_t c0, int64_t col, float* dw) {
  if constexpr (V > 1) {
    if (s.co - col < V * kLanes) return PanelTile<R, V - 1>(x, g, s, p0, p1, c0, col, dw);
  }
  Tile<R, V>(x, g, s, p0, p1, c0, col, dw);
}

// Adds the pixels [p0, p1) into dw, a block of kPixelBlock pixels at a time.
void SumPixels(const float* x, const float* g, const Geometry& s, int64_t p0, int64_t p1,
               float* dw) {
  for (int64_t b0 = p0; b0 < p1; b0 += kPixelBlock) {
    const int64_t b1 = std::min(b0 + kPixelBlock, p1);
    ForTiles(0, s.c, [&](auto rows_per_tile, int64_t c0) {
      constexpr int R = decltype(rows_per_tile)::value;
      for (int64_t col = 0; col < s.co; col += kPanel)
        PanelTile<R>(x, g, s, b0, b1, c0, col, dw);
    });
  }
}

ffi::Error PointwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw) {
  const auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (xd.size() < 1 || gd.size() != xd.size() || wd.size() != 2 ||
      !std::equal(xd.begin(), xd.end() - 1, gd.begin(), gd.end() - 1) ||
      wd[0] != xd.back() || wd[1] != gd.back())
    return ffi::Error::InvalidArgument(
        "pointwise kernel grad: expected x [..., C], g [..., CO] and a result [C, CO]");
  const Geometry s{xd.back() ? x.element_count() / xd.back() : 0, xd.back(), gd.back()};
  if (s.co % 16 != 0)
    return ffi::Error::InvalidArgument(
        "pointwise kernel grad: output channels must be a multiple of 16");
  float* result = dw->typed_data();
  const int64_t size = s.c * s.co;
  std::fill(result, result + size, 0.0f);
  if (s.pixels == 0 || size == 0) return ffi::Error::Success();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t items = std::min<int64_t>(kItemsPerThread * threads,
                                          (s.pixels + kPixelBlock - 1) / kPixelBlock);
  const int64_t share = (s.pixels + items - 1) / items;
  std::vector<float> partial(items * size, 0.0f);
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  ParallelFor(pool, items, [&](int64_t item) {
    SumPixels(xp, gp, s, item * share, std::min((item + 1) * share, s.pixels),
              partial.data() + item * size);
  });
  for (int64_t item = 0; item < items; ++item) {
    const float* from = partial.data() + item * size;
    for (int64_t i = 0; i < size; ++i) result[i] += from[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextPointwiseKernelGrad, PointwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Ret<ffi::Buffer<ffi::F32>>());
