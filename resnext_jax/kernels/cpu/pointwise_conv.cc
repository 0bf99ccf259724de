// A 1x1 convolution followed by its eval-mode batch norm, an optional residual add and
// an optional ReLU, in one pass, for x86-64 CPUs with AVX2 and FMA or AVX-512: an XLA
// FFI handler.
//
// Why: in a ResNeXt eval step XLA runs each 1x1 convolution as a matmul and then the
// batch norm, residual add and ReLU as separate loops over the output; those loops
// re-read and re-write tensors of up to 51 MB (batch 16), over a tenth of the step on
// a 2-core CPU. Here the norm, add and ReLU are applied to each block of outputs while
// it is still in registers. A strided 1x1 convolution (the downsample shortcut) reads
// its input rows in place instead of from a strided copy.
//
// The product is a register-tiled matmul: kTileRows output pixels x a panel of output
// channels (conv_tile.h: 6 x 16 in 12 AVX2 registers, 6 x 64 in 24 AVX-512 ones). The
// weights are copied once per call into panels ([C / kDepthBlock][CO / kPanel]
// [kDepthBlock][kPanel]). A work item is a block of
// pixels x kColumnBlock output channels; for each block of kDepthBlock input channels
// its panels (256 KB) stay in L2, and each tile of 6 pixels runs through all of them
// with its inputs in L1.
//
// Layouts: x is NHWC [N, H, W, C]; w is [C, CO]; scale and offset are [CO]; residual
// is NHWC [N, Ho, Wo, CO] or empty; the output is NHWC [N, Ho, Wo, CO] with
// Ho = ceil(H / stride), Wo = ceil(W / stride).

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "conv_tile.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using resnext_jax::Epilogue;
using resnext_jax::ForTiles;
using resnext_jax::kChannelBlock;
using resnext_jax::kDepthBlock;
using resnext_jax::kPanel;
using resnext_jax::kTileRows;
using resnext_jax::NormalizedConvArgs;
using resnext_jax::PackedWeights;
using resnext_jax::ParallelFor;
using resnext_jax::PanelTile;

namespace {

// Output pixels per work item: about 192, in whole tiles.
constexpr int64_t kRowBlock = (192 + kTileRows - 1) / kTileRows * kTileRows;
constexpr int64_t kColumnBlock = 256;  // output channels per work item

struct Geometry {
  int64_t n, h, w, c, stride, ho, wo, co;
  int64_t pixels() const { return n * ho * wo; }
  // Input row (pixel) of output pixel m.
  const float* InputRow(const float* x, int64_t m) const {
    const int64_t ow = m % wo, oh = (m / wo) % ho, image = m / (wo * ho);
    return x + ((image * h + oh * stride) * w + ow * stride) * c;
  }
};

// Output pixels [m0, m1) x channels [n0, n1) of `y`, input channels in depth blocks.
void Block(const float* x, const float* packed, const Geometry& g, const Epilogue& e,
           const float* residual, float* y, int64_t m0, int64_t m1, int64_t n0,
           int64_t n1) {
  for (int64_t k0 = 0; k0 < g.c; k0 += kDepthBlock) {
    const int64_t depth = std::min(kDepthBlock, g.c - k0);
    const bool first = k0 == 0, last = k0 + depth == g.c;
    // Panel p of depth block k0 starts at k0 * co + p * depth * kPanel (see Pack).
    const float* b0 = packed + k0 * g.co;
    ForTiles(m0, m1, [&](auto rows_per_tile, int64_t m) {
      constexpr int R = decltype(rows_per_tile)::value;
      const float* a[R];
      for (int r = 0; r < R; ++r) a[r] = g.InputRow(x, m + r) + k0;
      for (int64_t col = n0; col < n1; col += kPanel)
        PanelTile<R>(a, 1, 0, b0 + (col / kPanel) * depth * kPanel, depth,
                     y + m * g.co + col, g.co, first, last, e, col, g.co,
                     residual ? residual + m * g.co + col : nullptr);
    });
  }
}

ffi::Error PointwiseConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::F32> residual,
                         ffi::ResultBuffer<ffi::F32> y, int64_t stride, bool relu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 2 || yd.size() != 4)
    return ffi::Error::InvalidArgument(
        "pointwise conv: expected x [N,H,W,C], w [C,CO], y [N,Ho,Wo,CO]");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], stride, yd[1], yd[2], yd[3]};
  if (stride < 1 || g.c == 0 || wd[0] != g.c || wd[1] != g.co || yd[0] != g.n ||
      g.ho != (g.h + stride - 1) / stride || g.wo != (g.w + stride - 1) / stride ||
      scale.element_count() != g.co || offset.element_count() != g.co)
    return ffi::Error::InvalidArgument("pointwise conv: shapes do not match");
  if (g.co % kChannelBlock != 0)
    return ffi::Error::InvalidArgument(
        "pointwise conv: output channels must be a multiple of 16");
  const bool has_residual = residual.element_count() != 0;
  if (has_residual && residual.element_count() != g.pixels() * g.co)
    return ffi::Error::InvalidArgument("pointwise conv: residual must have y's shape");
  if (g.pixels() == 0 || g.co == 0) return ffi::Error::Success();

  const Epilogue e{scale.typed_data(), offset.typed_data(), relu};
  const int64_t row_blocks = (g.pixels() + kRowBlock - 1) / kRowBlock;
  const int64_t column_blocks = (g.co + kColumnBlock - 1) / kColumnBlock;
  const float* xp = x.typed_data();
  const float* rp = has_residual ? residual.typed_data() : nullptr;
  float* yp = y->typed_data();
  const float* wp = PackedWeights(pool, w.typed_data(), g.c, g.co);
  ParallelFor(pool, row_blocks * column_blocks, [&](int64_t item) {
    const int64_t m0 = (item / column_blocks) * kRowBlock;
    const int64_t n0 = (item % column_blocks) * kColumnBlock;
    Block(xp, wp, g, e, rp, yp, m0, std::min(m0 + kRowBlock, g.pixels()), n0,
          std::min(n0 + kColumnBlock, g.co));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextPointwiseConv, PointwiseConv,
                              NormalizedConvArgs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<bool>("relu"));
