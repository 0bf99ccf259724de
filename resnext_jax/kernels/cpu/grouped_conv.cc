// Grouped 2-D convolution, forward and weight gradient, for x86-64 CPUs with AVX2 and
// FMA or AVX-512: XLA FFI handlers.
//
// Why: XLA's CPU grouped convolution, and any formulation of it in XLA ops, leaves the
// cores mostly idle (resnext_jax/ops/grouped_conv.py). Here each block of output pixels x
// output channels of one group keeps its accumulators in vector registers while the
// input and weights stream from L1 (docs/performance.md has the per-layer timings).
//
// Groups narrower than a vector (4- and 8-wide groups with AVX-512, 4-wide with AVX2)
// run G at a time, interleaved: lane co * G + g of a vector holds group g's channel co,
// so that one multiply-add serves G groups. A 64- or 128-bit broadcast (a plain load)
// puts input channel ci of the G groups in every such lane, and the outputs are put
// back in NHWC order as they are stored.
//
// Layouts: x is NHWC, [N, H, W, G * T * width]; the kernel is pre-arranged as
// [T, width / CO, kh, kw, width, CO * G] (T = groups / G; CO = width if G > 1, else
// min(width, kGroupBlock) output channels per block; calls.py's _arranged()) so that one
// block's weights are contiguous and fit L1; y is NHWC, [N, Ho, Wo, groups * width].
// Groups have as many output as input channels (width 4, 8, 16 or 32).

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ffi_common.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using resnext_jax::kLanes;
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
  int64_t groups, kh, kw, sh, sw;  // groups: T, the tuples of G interleaved groups
  int64_t hp, wp;  // extent of the zero-padded input that the outputs read
  int64_t ho, wo;
};

// Broadcasts input channel ci of G interleaved groups (at p) to every lane of S::V.
template <typename S, int G>
inline typename S::V BroadcastGroups(const float* p) {
  if constexpr (G == 1) return S::Broadcast(p);
  else if constexpr (G == 2) return S::BroadcastPair(p);
  else return S::BroadcastQuad(p);
}

// Lane orders between G interleaved groups of W channels (lane co * G + g) and NHWC
// (lane g * W + co): NhwcOrder puts an interleaved vector in NHWC order, PackedOrder the
// reverse.
template <int W, int G>
constexpr std::array<int32_t, W * G> NhwcOrder() {
  std::array<int32_t, W * G> index{};
  for (int j = 0; j < W * G; ++j) index[j] = (j % W) * G + j / W;
  return index;
}
template <int W, int G>
constexpr std::array<int32_t, W * G> PackedOrder() {
  std::array<int32_t, W * G> index{};
  for (int j = 0; j < W * G; ++j) index[j] = (j % G) * W + j / G;
  return index;
}

// P output pixels x CO output channels of G groups of W input channels. `xs[p]` points
// at pixel p's top-left input in the groups' dense, padded [hp][wp][W][G] copy; the P
// outputs are consecutive NHWC pixels, `yc` floats apart.
template <int W, int G, int CO, int P>
inline void Block(const float* const* xs, const float* kb, float* yp, int64_t yc,
                  const Geometry& g) {
  constexpr int kBlockLanes = CO * G;
  using S = BlockSimd<kBlockLanes>;
  constexpr int V = kVectorsPerBlock<kBlockLanes>, L = S::kLanes;
  static_assert(G == 1 || V == 1, "interleaved groups fill exactly one vector");
  typename S::V acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < V; ++j) acc[p][j] = S::Zero();
  for (int64_t dh = 0; dh < g.kh; ++dh) {
    for (int64_t dw = 0; dw < g.kw; ++dw) {
      const float* kt = kb + (dh * g.kw + dw) * W * kBlockLanes;
      const int64_t offset = (dh * g.wp + dw) * W * G;
#pragma GCC unroll 32
      for (int ci = 0; ci < W; ++ci) {
        typename S::V w[V];
        for (int j = 0; j < V; ++j) w[j] = S::Load(kt + ci * kBlockLanes + L * j);
        for (int p = 0; p < P; ++p) {
          const typename S::V xv = BroadcastGroups<S, G>(xs[p] + offset + ci * G);
          for (int j = 0; j < V; ++j) acc[p][j] = S::Fmadd(xv, w[j], acc[p][j]);
        }
      }
    }
  }
  if constexpr (G == 1) {
    for (int p = 0; p < P; ++p)
      for (int j = 0; j < V; ++j) S::Store(yp + p * yc + L * j, acc[p][j]);
  } else {
    static constexpr auto kOrder = NhwcOrder<W, G>();
    for (int p = 0; p < P; ++p) S::Store(yp + p * yc, S::Permute(acc[p][0], kOrder.data()));
  }
}

// Output pixels [q, end) of G groups in blocks of P, the rest in blocks of P / 2, ...
// Pixels run across row ends so that few fall in a (slower) partial block; the row and
// column are stepped, not divided out (a division per pixel costs as much as a block).
template <int W, int G, int CO, int P>
inline void Blocks(const float* xg, const float* kb, float* yb, int64_t yc,
                   const Geometry& g, int64_t q, int64_t row, int64_t col, int64_t end) {
  for (; q + P <= end; q += P) {
    const float* xs[P];
    for (int p = 0; p < P; ++p) {
      xs[p] = xg + (row * g.sh * g.wp + col * g.sw) * W * G;
      if (++col == g.wo) {
        col = 0;
        ++row;
      }
    }
    Block<W, G, CO, P>(xs, kb, yb + q * yc, yc, g);
  }
  if constexpr (P > 1) Blocks<W, G, CO, P / 2>(xg, kb, yb, yc, g, q, row, col, end);
}

// Copies channels [group * W, (group + G) * W) of image n of NHWC `src` ([n][h][w][c])
// into a dense [rows][cols][W][G] buffer (G > 1: the groups interleaved), shifted down
// and right by (top, left) with zeros around. In NHWC a group's pixels lie a
// power-of-two stride apart, map onto a few cache sets and keep missing; the dense copy
// stays in cache while it is read many times.
template <int W, int G = 1>
void PackGroups(const float* src, int64_t n, int64_t group, int64_t h, int64_t w,
                int64_t c, int64_t top, int64_t left, int64_t rows, int64_t cols,
                std::vector<float>& buffer) {
  using S = SimdFor<W * G>;
  buffer.resize(rows * cols * W * G);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src_r = r - top;
    for (int64_t col = 0; col < cols; ++col) {
      const int64_t src_c = col - left;
      float* dst = buffer.data() + (r * cols + col) * W * G;
      if (src_r < 0 || src_r >= h || src_c < 0 || src_c >= w) {
        for (int j = 0; j < W * G; j += S::kLanes) S::Store(dst + j, S::Zero());
      } else {
        const float* from = src + ((n * h + src_r) * w + src_c) * c + group * W;
        if constexpr (G == 1) {
          for (int j = 0; j < W; j += S::kLanes) S::Store(dst + j, S::Load(from + j));
        } else {
          static_assert(W * G == S::kLanes, "interleaved groups fill exactly one vector");
          static constexpr auto kOrder = PackedOrder<W, G>();
          S::Store(dst, S::Permute(S::Load(from), kOrder.data()));
        }
      }
    }
  }
}

// Output channels per weight block of G interleaved groups of W.
template <int W, int G>
constexpr int kBlockChannels = G == 1 ? std::min(W, kGroupBlock) : W;

// Forward: all outputs of G groups (the t-th such tuple) of one image.
template <int W, int G>
void ForwardGroupsOfImage(const float* x, const float* k, float* y, int64_t h, int64_t w,
                          int64_t pad_top, int64_t pad_left, const Geometry& g, int64_t n,
                          int64_t t, std::vector<float>& buffer) {
  constexpr int CO = kBlockChannels<W, G>;
  // Pixels per block: with AVX2, 7 of one vector measured fastest.
  constexpr int PB =
      RegisterRows(kVectorsPerBlock<CO * G>, kVectorRegisters == 16 ? 7 : 14);
  const int64_t c = g.groups * G * W;
  PackGroups<W, G>(x, n, t * G, h, w, c, pad_top, pad_left, g.hp, g.wp, buffer);
  for (int64_t cb = 0; cb < W / CO; ++cb) {
    const float* kb = k + (t * (W / CO) + cb) * g.kh * g.kw * W * CO * G;
    float* yb = y + n * g.ho * g.wo * c + t * G * W + cb * CO;
    Blocks<W, G, CO, PB>(buffer.data(), kb, yb, c, g, 0, 0, 0, g.ho * g.wo);
  }
}

// Weight gradient, one tap: acc[i][co] += sum over output pixels of
// x[pixel's input under the tap][ci0 + i] * dy[pixel][co0 + co], for CI input channels
// and CO output channels of G interleaved groups, all in registers. `xt` and `dyb` are
// dense packed groups ([..][W][G]); row i of `dk` holds lanes co * G + g.
template <int W, int G, int CI, int CO>
inline void KernelGradTile(const float* xt, const float* dyb, float* dk, const Geometry& g) {
  constexpr int kBlockLanes = CO * G;
  using S = BlockSimd<kBlockLanes>;
  constexpr int V = kVectorsPerBlock<kBlockLanes>, L = S::kLanes;
  typename S::V acc[CI][V];
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < V; ++j) acc[i][j] = S::Zero();
  for (int64_t q = 0; q < g.ho; ++q) {
    const float* xrow = xt + q * g.sh * g.wp * W * G;
    const float* dyrow = dyb + q * g.wo * W * G;
    for (int64_t r = 0; r < g.wo; ++r) {
      typename S::V d[V];
      for (int j = 0; j < V; ++j) d[j] = S::Load(dyrow + r * W * G + L * j);
      const float* xp = xrow + r * g.sw * W * G;
      for (int i = 0; i < CI; ++i) {
        const typename S::V xv = BroadcastGroups<S, G>(xp + i * G);
        for (int j = 0; j < V; ++j) acc[i][j] = S::Fmadd(xv, d[j], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < CI; ++i)
    for (int j = 0; j < V; ++j) {
      float* out = dk + i * W * G + L * j;
      S::Store(out, S::Add(S::Load(out), acc[i][j]));
    }
}

// Input channels [ci, W) of one tap in tiles of CI, the rest in tiles of CI / 2, ...
template <int W, int G, int CI, int CO>
inline void KernelGradTiles(const float* xt, const float* dyb, float* dk, const Geometry& g,
                            int ci) {
  for (; ci + CI <= W; ci += CI)
    KernelGradTile<W, G, CI, CO>(xt + ci * G, dyb, dk + ci * W * G, g);
  if constexpr (CI > 1) KernelGradTiles<W, G, CI / 2, CO>(xt, dyb, dk, g, ci);
}

// Weight gradient of G groups (the t-th such tuple; [kh][kw][W in][W out][G], zeroed
// here), summed over images.
template <int W, int G>
void KernelGradOfGroups(const float* x, const float* dy, float* dk, int64_t n_images,
                        int64_t h, int64_t w, int64_t pad_top, int64_t pad_left,
                        const Geometry& g, int64_t t, std::vector<float>& x_buffer,
                        std::vector<float>& dy_buffer) {
  constexpr int CO = kBlockChannels<W, G>;
  constexpr int CI = RegisterRows(kVectorsPerBlock<CO * G>, W);
  const int64_t c = g.groups * G * W;
  float* dkt = dk + t * g.kh * g.kw * W * W * G;
  std::fill(dkt, dkt + g.kh * g.kw * W * W * G, 0.f);
  for (int64_t n = 0; n < n_images; ++n) {
    PackGroups<W, G>(x, n, t * G, h, w, c, pad_top, pad_left, g.hp, g.wp, x_buffer);
    PackGroups<W, G>(dy, n, t * G, g.ho, g.wo, c, 0, 0, g.ho, g.wo, dy_buffer);
    for (int64_t dh = 0; dh < g.kh; ++dh)
      for (int64_t dw = 0; dw < g.kw; ++dw)
        for (int cb = 0; cb < W; cb += CO)  // G > 1: one block, CO = W
          KernelGradTiles<W, G, CI, CO>(x_buffer.data() + (dh * g.wp + dw) * W * G,
                                        dy_buffer.data() + cb,
                                        dkt + (dh * g.kw + dw) * W * W * G + cb, g, 0);
  }
}

template <int W, int G>
void RunForward(ffi::ThreadPool& pool, const float* x, const float* k, float* y,
                int64_t n_images, int64_t h, int64_t w, int64_t pad_top, int64_t pad_left,
                const Geometry& g) {
  ParallelFor(pool, n_images * g.groups, [&](int64_t i) {
    thread_local std::vector<float> buffer;
    ForwardGroupsOfImage<W, G>(x, k, y, h, w, pad_top, pad_left, g, i / g.groups,
                               i % g.groups, buffer);
  });
}

template <int W, int G>
void RunKernelGrad(ffi::ThreadPool& pool, const float* x, const float* dy, float* dk,
                   int64_t n_images, int64_t h, int64_t w, int64_t pad_top,
                   int64_t pad_left, const Geometry& g) {
  ParallelFor(pool, g.groups, [&](int64_t t) {
    thread_local std::vector<float> x_buffer, dy_buffer;
    KernelGradOfGroups<W, G>(x, dy, dk, n_images, h, w, pad_top, pad_left, g, t, x_buffer,
                             dy_buffer);
  });
}

// Whether the kernels are compiled for G interleaved groups of W channels: one group of
// at least 8, or groups that together fill a vector of 8 or 16 lanes.
template <int W, int G>
constexpr bool kCompiledLayout =
    G == 1 ? W >= 8 : (W * G == 8 || W * G == 16) && W * G <= kLanes;

// Calls fn(integral_constant W, integral_constant G) for a layout the kernels are
// compiled for; false for any other.
template <typename Fn>
bool WithLayout(int64_t width, int64_t per_vector, const Fn& fn) {
  auto with_width = [&](auto w) {
    constexpr int W = decltype(w)::value;
    auto with = [&](auto groups) {
      if constexpr (kCompiledLayout<W, decltype(groups)::value>) {
        fn(w, groups);
        return true;
      }
      return false;
    };
    switch (per_vector) {
      case 1: return with(std::integral_constant<int, 1>());
      case 2: return with(std::integral_constant<int, 2>());
      case 4: return with(std::integral_constant<int, 4>());
      default: return false;
    }
  };
  switch (width) {
    case 4: return with_width(std::integral_constant<int, 4>());
    case 8: return with_width(std::integral_constant<int, 8>());
    case 16: return with_width(std::integral_constant<int, 16>());
    case 32: return with_width(std::integral_constant<int, 32>());
    default: return false;
  }
}

const char kLayoutError[] =
    "grouped conv: no kernel for groups of this width, this many to a vector (calls.py's "
    "groups_per_vector)";

ffi::Error GroupedConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                              int64_t stride_h, int64_t stride_w, int64_t pad_top,
                              int64_t pad_left) {
  const auto xd = x.dimensions();
  const auto kd = kernel.dimensions();
  const auto yd = y->dimensions();
  if (xd.size() != 4 || kd.size() != 6 || yd.size() != 4)
    return ffi::Error::InvalidArgument("grouped conv: expected x [N,H,W,C], kernel "
                                       "[T,W/CO,kh,kw,W,CO*G] and y [N,Ho,Wo,C]");
  const int64_t width = kd[4], tuples = kd[0];
  const int64_t per_vector = tuples * width ? xd[3] / (tuples * width) : 0;
  const Geometry g(tuples, kd[2], kd[3], stride_h, stride_w, yd[1], yd[2]);
  if (per_vector == 0 || xd[3] != tuples * per_vector * width || yd[3] != xd[3] ||
      yd[0] != xd[0] || kd[1] * kd[5] != width * per_vector ||
      (per_vector > 1 && kd[1] != 1))
    return ffi::Error::InvalidArgument("grouped conv: channels do not match the kernel");
  if (g.ho == 0 || g.wo == 0) return ffi::Error::Success();  // nothing to compute
  const bool known = WithLayout(width, per_vector, [&](auto w, auto groups) {
    RunForward<decltype(w)::value, decltype(groups)::value>(
        pool, x.typed_data(), kernel.typed_data(), y->typed_data(), xd[0], xd[1], xd[2],
        pad_top, pad_left, g);
  });
  return known ? ffi::Error::Success() : ffi::Error::InvalidArgument(kLayoutError);
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
                                       "dy [N,Ho,Wo,C] and dk [T,kh,kw,W,W*G]");
  const int64_t width = kd[3], tuples = kd[0];
  const int64_t per_vector = width ? kd[4] / width : 0;
  const Geometry g(tuples, kd[1], kd[2], stride_h, stride_w, yd[1], yd[2]);
  if (per_vector == 0 || kd[4] != width * per_vector ||
      xd[3] != tuples * per_vector * width || yd[3] != xd[3] || yd[0] != xd[0])
    return ffi::Error::InvalidArgument("grouped conv kernel grad: channels do not match");
  float* dkp = dk->typed_data();
  if (g.ho == 0 || g.wo == 0) {  // no output, so no gradient (and no input extent to copy)
    std::fill(dkp, dkp + dk->element_count(), 0.f);
    return ffi::Error::Success();
  }
  const bool known = WithLayout(width, per_vector, [&](auto w, auto groups) {
    RunKernelGrad<decltype(w)::value, decltype(groups)::value>(
        pool, x.typed_data(), dy.typed_data(), dkp, xd[0], xd[1], xd[2], pad_top, pad_left,
        g);
  });
  return known ? ffi::Error::Success() : ffi::Error::InvalidArgument(kLayoutError);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextGroupedConvForward, GroupedConvForward,
                              TwoArraysToOne());

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextGroupedConvKernelGrad, GroupedConvKernelGrad,
                              TwoArraysToOne());
