// Grouped 2-D convolution, forward and weight gradient, for x86-64 CPUs with AVX2 and
// FMA or AVX-512: XLA FFI handlers.
//
// Why: XLA's CPU grouped convolution, and any formulation of it in XLA ops, leaves the
// cores mostly idle (resnext_jax/ops/grouped_conv.py). Here each block of output pixels x
// output channels of one group keeps its accumulators in vector registers while the
// input and weights stream from L1 (docs/performance.md has the per-layer timings).
//
// Layouts: x is NHWC, [N, H, W, G * width]; the kernel is pre-arranged as
// [G, width / CO, kh, kw, width, CO] (CO = min(width, kGroupBlock) output channels per
// block, calls.py's _group_block()) so that one block's weights are contiguous and fit
// L1; y is NHWC, [N, Ho, Wo, G * width]. Groups have as many output as input channels
// (width 8, 16 or 32).

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ffi_common.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using resnext_jax::kVectorBits;
using resnext_jax::kVectorRegisters;
using resnext_jax::ParallelFor;
using resnext_jax::SimdFor;
using resnext_jax::TwoArraysToOne;

namespace {

// Output channels per block of a group: two of the widest vectors (16 with AVX2, 32 with
// AVX-512); calls.py arranges the weights for it.
constexpr int kGroupBlock = kVectorBits / 16;

// Vectors of `CO` output channels, and how many of them span the block.
template <int CO>
using BlockSimd = SimdFor<CO>;
template <int CO>
constexpr int kVectorsPerBlock = CO / BlockSimd<CO>::kLanes;

// How many rows of V accumulators fit the vector registers beside V more vectors and a
// broadcast input, but no more than `most`.
constexpr int RegisterRows(int v, int most) {
  return std::min((kVectorRegisters - v - 1) / v, most);
}

struct Geometry {
  Geometry(int64_t groups, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ho,
           int64_t wo)
      : groups(groups), kh(kh), kw(kw), sh(sh), sw(sw),
        hp((ho - 1) * sh + kh), wp((wo - 1) * sw + kw), ho(ho), wo(wo) {}
  int64_t groups, kh, kw, sh, sw;
  int64_t hp, wp;  // extent of the zero-padded input that the outputs read
  int64_t ho, wo;
};

// P output pixels x CO output channels of one group from WI input channels. `xs[p]`
// points at pixel p's top-left input in the group's dense, padded [hp][wp][WI] copy; the
// P outputs are consecutive NHWC pixels, `yc` floats apart.
template <int WI, int CO, int P>
inline void Block(const float* const* xs, const float* kb, float* yp, int64_t yc,
                  const Geometry& g) {
  using S = BlockSimd<CO>;
  constexpr int V = kVectorsPerBlock<CO>, L = S::kLanes;
  typename S::V acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < V; ++j) acc[p][j] = S::Zero();
  for (int64_t dh = 0; dh < g.kh; ++dh) {
    for (int64_t dw = 0; dw < g.kw; ++dw) {
      const float* kt = kb + (dh * g.kw + dw) * WI * CO;
      const int64_t offset = (dh * g.wp + dw) * WI;
#pragma GCC unroll 32
      for (int ci = 0; ci < WI; ++ci) {
        typename S::V w[V];
        for (int j = 0; j < V; ++j) w[j] = S::Load(kt + ci * CO + L * j);
        for (int p = 0; p < P; ++p) {
          const typename S::V xv = S::Broadcast(xs[p] + offset + ci);
          for (int j = 0; j < V; ++j) acc[p][j] = S::Fmadd(xv, w[j], acc[p][j]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < V; ++j) S::Store(yp + p * yc + L * j, acc[p][j]);
}

// Output pixels [q, end) of one group in blocks of P, the rest in blocks of P / 2, ...
// Pixels run across row ends so that few fall in a (slower) partial block; the row and
// column are stepped, not divided out (a division per pixel costs as much as a block).
template <int WI, int CO, int P>
inline void Blocks(const float* xg, const float* kb, float* yb, int64_t yc,
                   const Geometry& g, int64_t q, int64_t row, int64_t col, int64_t end) {
  for (; q + P <= end; q += P) {
    const float* xs[P];
    for (int p = 0; p < P; ++p) {
      xs[p] = xg + (row * g.sh * g.wp + col * g.sw) * WI;
      if (++col == g.wo) {
        col = 0;
        ++row;
      }
    }
    Block<WI, CO, P>(xs, kb, yb + q * yc, yc, g);
  }
  if constexpr (P > 1) Blocks<WI, CO, P / 2>(xg, kb, yb, yc, g, q, row, col, end);
}

// Copies channels [group * W, group * W + W) of image n of NHWC `src` ([n][h][w][c])
// into a dense [rows][cols][W] buffer, shifted down and right by (top, left) with zeros
// around. In NHWC a group's pixels lie a power-of-two stride apart, map onto a few cache
// sets and keep missing; the dense copy stays in cache while it is read many times.
template <int W>
void PackGroup(const float* src, int64_t n, int64_t group, int64_t h, int64_t w, int64_t c,
               int64_t top, int64_t left, int64_t rows, int64_t cols,
               std::vector<float>& buffer) {
  using S = SimdFor<W>;
  buffer.resize(rows * cols * W);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src_r = r - top;
    for (int64_t col = 0; col < cols; ++col) {
      const int64_t src_c = col - left;
      float* dst = buffer.data() + (r * cols + col) * W;
      if (src_r < 0 || src_r >= h || src_c < 0 || src_c >= w) {
        for (int j = 0; j < W; j += S::kLanes) S::Store(dst + j, S::Zero());
      } else {
        const float* from = src + ((n * h + src_r) * w + src_c) * c + group * W;
        for (int j = 0; j < W; j += S::kLanes) S::Store(dst + j, S::Load(from + j));
      }
    }
  }
}

// Forward: all outputs of one group of one image.
template <int W>
void ForwardGroupOfImage(const float* x, const float* k, float* y, int64_t h, int64_t w,
                         int64_t pad_top, int64_t pad_left, const Geometry& g, int64_t n,
                         int64_t group, std::vector<float>& buffer) {
  constexpr int CO = std::min(W, kGroupBlock);
  // Pixels per block: with AVX2, 7 of one vector measured fastest.
  constexpr int PB = RegisterRows(kVectorsPerBlock<CO>, kVectorRegisters == 16 ? 7 : 14);
  const int64_t c = g.groups * W;
  PackGroup<W>(x, n, group, h, w, c, pad_top, pad_left, g.hp, g.wp, buffer);
  for (int64_t cb = 0; cb < W / CO; ++cb) {
    const float* kb = k + (group * (W / CO) + cb) * g.kh * g.kw * W * CO;
    float* yb = y + n * g.ho * g.wo * c + group * W + cb * CO;
    Blocks<W, CO, PB>(buffer.data(), kb, yb, c, g, 0, 0, 0, g.ho * g.wo);
  }
}

// Weight gradient, one tap: acc[i][co] += sum over output pixels of
// x[pixel's input under the tap][ci0 + i] * dy[pixel][co0 + co], for CI input channels
// and CO output channels, all in registers. `xt` and `dyb` are dense packed groups.
template <int W, int CI, int CO>
inline void KernelGradTile(const float* xt, const float* dyb, float* dk, const Geometry& g) {
  using S = BlockSimd<CO>;
  constexpr int V = kVectorsPerBlock<CO>, L = S::kLanes;
  typename S::V acc[CI][V];
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < V; ++j) acc[i][j] = S::Zero();
  for (int64_t q = 0; q < g.ho; ++q) {
    const float* xrow = xt + q * g.sh * g.wp * W;
    const float* dyrow = dyb + q * g.wo * W;
    for (int64_t r = 0; r < g.wo; ++r) {
      typename S::V d[V];
      for (int j = 0; j < V; ++j) d[j] = S::Load(dyrow + r * W + L * j);
      const float* xp = xrow + r * g.sw * W;
      for (int i = 0; i < CI; ++i) {
        const typename S::V xv = S::Broadcast(xp + i);
        for (int j = 0; j < V; ++j) acc[i][j] = S::Fmadd(xv, d[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < V; ++j) {
      float* out = dk + i * W + L * j;
      S::Store(out, S::Add(S::Load(out), acc[i][j]));
    }
}

// Input channels [ci, W) of one tap in tiles of CI, the rest in tiles of CI / 2, ...
template <int W, int CI, int CO>
inline void KernelGradTiles(const float* xt, const float* dyb, float* dk, const Geometry& g,
                            int ci) {
  for (; ci + CI <= W; ci += CI) KernelGradTile<W, CI, CO>(xt + ci, dyb, dk + ci * W, g);
  if constexpr (CI > 1) KernelGradTiles<W, CI / 2, CO>(xt, dyb, dk, g, ci);
}

// Weight gradient of one group ([kh][kw][W in][W out], zeroed here), summed over images.
template <int W>
void KernelGradOfGroup(const float* x, const float* dy, float* dk, int64_t n_images,
                       int64_t h, int64_t w, int64_t pad_top, int64_t pad_left,
                       const Geometry& g, int64_t group, std::vector<float>& x_buffer,
                       std::vector<float>& dy_buffer) {
  constexpr int CO = std::min(W, kGroupBlock);
  constexpr int CI = RegisterRows(kVectorsPerBlock<CO>, W);
  const int64_t c = g.groups * W;
  float* dkg = dk + group * g.kh * g.kw * W * W;
  std::fill(dkg, dkg + g.kh * g.kw * W * W, 0.f);
  for (int64_t n = 0; n < n_images; ++n) {
    PackGroup<W>(x, n, group, h, w, c, pad_top, pad_left, g.hp, g.wp, x_buffer);
    PackGroup<W>(dy, n, group, g.ho, g.wo, c, 0, 0, g.ho, g.wo, dy_buffer);
    for (int64_t dh = 0; dh < g.kh; ++dh)
      for (int64_t dw = 0; dw < g.kw; ++dw)
        for (int cb = 0; cb < W; cb += CO)
          KernelGradTiles<W, CI, CO>(x_buffer.data() + (dh * g.wp + dw) * W,
                                     dy_buffer.data() + cb,
                                     dkg + (dh * g.kw + dw) * W * W + cb, g, 0);
  }
}

template <int W>
void RunForward(ffi::ThreadPool& pool, const float* x, const float* k, float* y,
                int64_t n_images, int64_t h, int64_t w, int64_t pad_top, int64_t pad_left,
                const Geometry& g) {
  ParallelFor(pool, n_images * g.groups, [&](int64_t i) {
    thread_local std::vector<float> buffer;
    ForwardGroupOfImage<W>(x, k, y, h, w, pad_top, pad_left, g, i / g.groups,
                           i % g.groups, buffer);
  });
}

template <int W>
void RunKernelGrad(ffi::ThreadPool& pool, const float* x, const float* dy, float* dk,
                   int64_t n_images, int64_t h, int64_t w, int64_t pad_top,
                   int64_t pad_left, const Geometry& g) {
  ParallelFor(pool, g.groups, [&](int64_t group) {
    thread_local std::vector<float> x_buffer, dy_buffer;
    KernelGradOfGroup<W>(x, dy, dk, n_images, h, w, pad_top, pad_left, g, group, x_buffer,
                         dy_buffer);
  });
}

// Calls fn(std::integral_constant<int, W>()) for the group widths the kernels are
// compiled for; false for any other width.
template <typename Fn>
bool WithWidth(int64_t width, const Fn& fn) {
  switch (width) {
    case 8: fn(std::integral_constant<int, 8>()); return true;
    case 16: fn(std::integral_constant<int, 16>()); return true;
    case 32: fn(std::integral_constant<int, 32>()); return true;
    default: return false;
  }
}

const char kWidthError[] = "grouped conv: group width must be 8, 16 or 32";

ffi::Error GroupedConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                              int64_t stride_h, int64_t stride_w, int64_t pad_top,
                              int64_t pad_left) {
  const auto xd = x.dimensions();
  const auto kd = kernel.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 6 || yd.size() != 4)
    return ffi::Error::InvalidArgument("grouped conv: expected x [N,H,W,C], kernel "
                                       "[G,W/CO,kh,kw,W,CO] and y [N,Ho,Wo,C]");
  const int64_t width = kd[4];
  const Geometry g(kd[0], kd[2], kd[3], stride_h, stride_w, yd[1], yd[2]);
  if (xd[3] != g.groups * width || yd[3] != xd[3] || yd[0] != xd[0] ||
      kd[1] * kd[5] != width)
    return ffi::Error::InvalidArgument("grouped conv: channels do not match the kernel");
  if (g.ho == 0 || g.wo == 0) return ffi::Error::Success();  // nothing to compute
  const bool known_width = WithWidth(width, [&](auto w) {
    RunForward<decltype(w)::value>(pool, x.typed_data(), kernel.typed_data(),
                                   y->typed_data(), xd[0], xd[1], xd[2], pad_top, pad_left, g);
  });
  return known_width ? ffi::Error::Success() : ffi::Error::InvalidArgument(kWidthError);
}

ffi::Error GroupedConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                                 int64_t stride_h, int64_t stride_w, int64_t pad_top,
                                 int64_t pad_left) {
  const auto xd = x.dimensions();
  const auto yd = dy.dimensions();
  const auto kd = dk->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || kd.size() != 5)
    return ffi::Error::InvalidArgument("grouped conv kernel grad: expected x [N,H,W,C], "
                                       "dy [N,Ho,Wo,C] and dk [G,kh,kw,W,W]");
  const int64_t width = kd[3];
  const Geometry g(kd[0], kd[1], kd[2], stride_h, stride_w, yd[1], yd[2]);
  if (xd[3] != g.groups * width || yd[3] != xd[3] || yd[0] != xd[0] || kd[4] != width)
    return ffi::Error::InvalidArgument("grouped conv kernel grad: channels do not match");
  float* dkp = dk->typed_data();
  if (g.ho == 0 || g.wo == 0) {  // no output, so no gradient (and no input extent to copy)
    std::fill(dkp, dkp + dk->element_count(), 0.f);
    return ffi::Error::Success();
  }
  const bool known_width = WithWidth(width, [&](auto w) {
    RunKernelGrad<decltype(w)::value>(pool, x.typed_data(), dy.typed_data(), dkp, xd[0],
                                      xd[1], xd[2], pad_top, pad_left, g);
  });
  return known_width ? ffi::Error::Success() : ffi::Error::InvalidArgument(kWidthError);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextGroupedConvForward, GroupedConvForward,
                              TwoArraysToOne());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextGroupedConvKernelGrad, GroupedConvKernelGrad,
                              TwoArraysToOne());
