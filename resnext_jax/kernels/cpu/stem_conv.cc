// Weight gradient of a dense 2-D convolution with few input channels (the ResNeXt
// stem, 7x7/2 from RGB), and its eval-mode forward pass with the batch norm and ReLU
// after it, for x86-64 CPUs with AVX2 and FMA or AVX-512: XLA FFI handlers.
//
// Why: with 3 input channels XLA's weight gradient, and the same as im2col matmuls,
// leave the vector units mostly idle (~25 GFLOP/s on two cores). Here, for one output
// row, the kh input rows it reads are copied into a zero-padded buffer; an output
// pixel's inputs under kernel row dh are then kw * C consecutive floats of that buffer,
// and the gradient is a register-tiled sum of outer products of those floats with the
// pixel's output gradient. The eval forward pass reads the same buffer: a tile of
// kTileRows output pixels x a panel of output channels sums kh segments of kw * C
// consecutive inputs (conv_tile.h), then applies the norm and ReLU. (In training the
// forward pass runs with an identity norm: the batch norm needs the statistics of the
// whole output.)
//
// Layouts: x is NHWC [N, H, W, C]; dy and the forward output y are NHWC [N, Ho, Wo, CO];
// the weights and their gradient are HWIO [kh, kw, C, CO]; the norm's scale and offset
// are [CO].

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "conv_tile.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using resnext_jax::Epilogue;
using resnext_jax::ForTiles;
using resnext_jax::kChannelBlock;
using resnext_jax::kDepthBlock;
using resnext_jax::kPanel;
using resnext_jax::NormalizedConvArgs;
using resnext_jax::PackedWeights;
using resnext_jax::ParallelFor;
using resnext_jax::PanelTile;
using resnext_jax::Simd;
using resnext_jax::kLanes;
using resnext_jax::kVectorRegisters;
using resnext_jax::TwoArraysToOne;

namespace {

struct StemGeometry {
  int64_t n, h, w, c;        // input
  int64_t kh, kw, sh, sw;    // kernel and strides
  int64_t pad_top, pad_left;
  int64_t ho, wo, co;        // output
  int64_t row() const { return kw * c; }              // inputs of one kernel row
  int64_t padded_cols() const { return (wo - 1) * sw + kw; }
  int64_t padded_width() const { return padded_cols() * c; }
};

// Copies the kh input rows under output row `oh` of image `n` into `rows`
// ([kh][padded_width]), zero outside the image. Returns false if all are outside.
bool PackRows(const float* x, const StemGeometry& g, int64_t n, int64_t oh,
              std::vector<float>& rows) {
  const int64_t pw = g.padded_width();
  rows.assign(g.kh * pw, 0.f);
  bool any = false;
  for (int64_t dh = 0; dh < g.kh; ++dh) {
    const int64_t ih = oh * g.sh + dh - g.pad_top;
    if (ih < 0 || ih >= g.h) continue;
    any = true;
    const int64_t first = std::max<int64_t>(0, g.pad_left);  // padded column of input 0
    const int64_t skip = std::max<int64_t>(0, -g.pad_left);  // input columns cut off left
    const int64_t count = std::min(g.w - skip, g.padded_cols() - first);
    if (count > 0)
      std::copy_n(x + ((n * g.h + ih) * g.w + skip) * g.c, count * g.c,
                  rows.data() + dh * pw + first * g.c);
  }
  return any;
}

// Weight gradient of RT consecutive inputs (r0, r0 + 1, ...) of kernel row dh x V
// vectors of output channels, summed over one output row, added to `dk` ([kh][row][co]).
template <int RT, int V>
inline void KernelGradTile(const float* xr, const float* dyr, float* dk,
                           const StemGeometry& g) {
  using S = Simd<kLanes>;
  typename S::V acc[RT][V];
  for (int i = 0; i < RT; ++i)
    for (int j = 0; j < V; ++j) acc[i][j] = S::Zero();
  for (int64_t ow = 0; ow < g.wo; ++ow) {
    typename S::V d[V];
    for (int j = 0; j < V; ++j) d[j] = S::Load(dyr + ow * g.co + j * kLanes);
    const float* xp = xr + ow * g.sw * g.c;
    for (int i = 0; i < RT; ++i) {
      const typename S::V xv = S::Broadcast(xp + i);
      for (int j = 0; j < V; ++j) acc[i][j] = S::Fmadd(xv, d[j], acc[i][j]);
    }
  }
  for (int i = 0; i < RT; ++i)
    for (int j = 0; j < V; ++j) {
      float* out = dk + i * g.co + j * kLanes;
      S::Store(out, S::Add(S::Load(out), acc[i][j]));
    }
}

// Inputs per weight-gradient tile: two accumulators each, two output-gradient vectors
// and a broadcast input in the vector registers (6 with AVX2, 14 with AVX-512).
constexpr int kGradRows = (kVectorRegisters - 3) / 2;

// Inputs [r, row) of one kernel row in tiles of RT, the rest in tiles of RT / 2, ...
template <int RT, int V>
inline void KernelGradTiles(const float* xr, const float* dyr, float* dk,
                            const StemGeometry& g, int64_t r) {
  for (; r + RT <= g.row(); r += RT) KernelGradTile<RT, V>(xr + r, dyr, dk + r * g.co, g);
  if constexpr (RT > 1) KernelGradTiles<RT / 2, V>(xr, dyr, dk, g, r);
}

void KernelGradRow(const float* x, const float* dy, float* dk, const StemGeometry& g,
                   int64_t n, int64_t oh, std::vector<float>& rows) {
  if (!PackRows(x, g, n, oh, rows)) return;
  const float* dyr = dy + (n * g.ho + oh) * g.wo * g.co;
  const int64_t pw = g.padded_width();
  for (int64_t dh = 0; dh < g.kh; ++dh) {
    const int64_t ih = oh * g.sh + dh - g.pad_top;
    if (ih < 0 || ih >= g.h) continue;  // a zero row adds nothing
    for (int64_t col = 0; col < g.co; col += 2 * kLanes) {  // 2 vectors, or the last 16
      const float* xr = rows.data() + dh * pw;
      float* dkr = dk + dh * g.row() * g.co + col;
      if (g.co - col >= 2 * kLanes)
        KernelGradTiles<kGradRows, 2>(xr, dyr + col, dkr, g, 0);
      else
        KernelGradTiles<kGradRows, 1>(xr, dyr + col, dkr, g, 0);
    }
  }
}

// Output rows are split into this many chunks, each summing its own partial gradient:
// enough for the pool's threads to share the work when some run slower than others.
constexpr int64_t kGradChunks = 8;

ffi::Error StemConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                              int64_t stride_h, int64_t stride_w, int64_t pad_top,
                              int64_t pad_left) {
  const auto xd = x.dimensions(), yd = dy.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || kd.size() != 4)
    return ffi::Error::InvalidArgument(
        "stem conv kernel grad: expected x [N,H,W,C], dy [N,Ho,Wo,CO], dk [kh,kw,C,CO]");
  const StemGeometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], stride_h, stride_w,
                       pad_top, pad_left, yd[1], yd[2], yd[3]};
  if (g.co % kChannelBlock != 0)
    return ffi::Error::InvalidArgument("stem conv: output channels must be a multiple of 16");
  if (kd[2] != g.c || kd[3] != g.co || yd[0] != g.n)
    return ffi::Error::InvalidArgument("stem conv kernel grad: shapes do not match");
  const int64_t size = g.kh * g.row() * g.co;
  const int64_t rows_total = g.wo > 0 ? g.n * g.ho : 0;  // no output, no gradient
  const int64_t chunks = std::max<int64_t>(1, std::min(kGradChunks, rows_total));
  std::vector<float> partial(chunks * size, 0.f);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  ParallelFor(pool, chunks, [&](int64_t chunk) {
    thread_local std::vector<float> rows;
    for (int64_t i = chunk * rows_total / chunks; i < (chunk + 1) * rows_total / chunks; ++i)
      KernelGradRow(xp, dyp, partial.data() + chunk * size, g, i / g.ho, i % g.ho, rows);
  });
  float* out = dk->typed_data();
  std::copy_n(partial.data(), size, out);
  for (int64_t chunk = 1; chunk < chunks; ++chunk)
    for (int64_t j = 0; j < size; ++j) out[j] += partial[chunk * size + j];
  return ffi::Error::Success();
}

// One output row of the eval forward pass: kh input rows packed, then tiles of kTileRows
// pixels (the rest in shorter tiles) through every panel of output channels.
void ForwardRow(const float* x, const float* packed, const StemGeometry& g,
                const Epilogue& e, int64_t n, int64_t oh, std::vector<float>& rows,
                float* y) {
  PackRows(x, g, n, oh, rows);  // rows outside the image are zeros: they add nothing
  float* out = y + (n * g.ho + oh) * g.wo * g.co;
  const int64_t depth = g.row(), row_stride = g.padded_width();
  ForTiles(0, g.wo, [&](auto rows_per_tile, int64_t ow) {
    constexpr int R = decltype(rows_per_tile)::value;
    const float* a[R];
    for (int r = 0; r < R; ++r) a[r] = rows.data() + (ow + r) * g.sw * g.c;
    for (int64_t col = 0; col < g.co; col += kPanel)
      PanelTile<R>(a, g.kh, row_stride, packed + col * g.kh * depth, depth,
                   out + ow * g.co + col, g.co, true, true, e, col, g.co, nullptr);
  });
}

ffi::Error StemConvNormalized(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> scale,
                              ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> y,
                              int64_t stride_h, int64_t stride_w, int64_t pad_top,
                              int64_t pad_left, bool relu) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4)
    return ffi::Error::InvalidArgument(
        "stem conv: expected x [N,H,W,C], w [kh,kw,C,CO], y [N,Ho,Wo,CO]");
  const StemGeometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], stride_h, stride_w,
                       pad_top, pad_left, yd[1], yd[2], yd[3]};
  if (g.co % kChannelBlock != 0)
    return ffi::Error::InvalidArgument("stem conv: output channels must be a multiple of 16");
  if (wd[2] != g.c || wd[3] != g.co || yd[0] != g.n || scale.element_count() != g.co ||
      offset.element_count() != g.co)
    return ffi::Error::InvalidArgument("stem conv: shapes do not match");
  if (stride_h < 1 || stride_w < 1 || g.kh < 1 || g.kw < 1)
    return ffi::Error::InvalidArgument("stem conv: strides and kernel size must be >= 1");
  if (g.kh * g.row() > kDepthBlock)  // the weights must pack as one depth block
    return ffi::Error::InvalidArgument("stem conv: kernel too large for the forward kernel");
  const float* wp = PackedWeights(pool, w.typed_data(), g.kh * g.row(), g.co);
  const Epilogue e{scale.typed_data(), offset.typed_data(), relu};
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, g.wo > 0 ? g.n * g.ho : 0, [&](int64_t i) {
    thread_local std::vector<float> rows;
    ForwardRow(xp, wp, g, e, i / g.ho, i % g.ho, rows, yp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextStemConvNormalized, StemConvNormalized,
                              NormalizedConvArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextStemConvKernelGrad, StemConvKernelGrad,
                              TwoArraysToOne());
