// Grouped 2-D convolution, forward, for x86-64 CPUs with AVX2 and FMA: an XLA FFI handler.
//
// Why: XLA's CPU grouped convolution, and any formulation of it in XLA ops, leaves the
// cores mostly idle (resnext_jax/grouped_conv.py). Here each block of output pixels x
// output channels of one group keeps its accumulators in vector registers while the
// input and weights stream from L1, which runs the layers of a ResNeXt-50 at 30-75
// GFLOP/s on two cores (README, "Speed").
//
// Layouts: x is NHWC, [N, H, W, G * width]; the kernel is pre-arranged as
// [G, width / CO, kh, kw, width, CO] (CO = min(width, 16) output channels per block) so
// that one block's weights are contiguous and fit L1; y is NHWC, [N, Ho, Wo, G * width].
// Groups have as many output as input channels (width 8, 16 or 32).

#include <immintrin.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
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
  constexpr int V = CO / 8;
  __m256 acc[P][V];
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < V; ++j) acc[p][j] = _mm256_setzero_ps();
  for (int64_t dh = 0; dh < g.kh; ++dh) {
    for (int64_t dw = 0; dw < g.kw; ++dw) {
      const float* kt = kb + (dh * g.kw + dw) * WI * CO;
      const int64_t offset = (dh * g.wp + dw) * WI;
#pragma GCC unroll 32
      for (int ci = 0; ci < WI; ++ci) {
        __m256 w[V];
        for (int j = 0; j < V; ++j) w[j] = _mm256_loadu_ps(kt + ci * CO + 8 * j);
        for (int p = 0; p < P; ++p) {
          const __m256 xv = _mm256_broadcast_ss(xs[p] + offset + ci);
          for (int j = 0; j < V; ++j) acc[p][j] = _mm256_fmadd_ps(xv, w[j], acc[p][j]);
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int j = 0; j < V; ++j) _mm256_storeu_ps(yp + p * yc + 8 * j, acc[p][j]);
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

// One group of one image. The group's input is first copied into a dense zero-padded
// buffer: in NHWC a group's pixels lie a power-of-two stride apart, map onto a few cache
// sets and keep missing; the dense copy stays in cache across the group's rows.
template <int W>
void GroupOfImage(const float* x, const float* k, float* y, int64_t h, int64_t w,
                  int64_t pad_top, int64_t pad_left, const Geometry& g, int64_t n,
                  int64_t group, std::vector<float>& buffer) {
  constexpr int CO = W < 16 ? W : 16;
  constexpr int PB = CO == 8 ? 7 : 6;  // accumulators + weights + 1 fit 16 registers
  const int64_t c = g.groups * W;
  buffer.resize(g.hp * g.wp * W);
  float* xg = buffer.data();
  for (int64_t r = 0; r < g.hp; ++r) {
    const int64_t src_r = r - pad_top;
    for (int64_t col = 0; col < g.wp; ++col) {
      const int64_t src_c = col - pad_left;
      float* dst = xg + (r * g.wp + col) * W;
      if (src_r < 0 || src_r >= h || src_c < 0 || src_c >= w) {
        for (int j = 0; j < W; j += 8) _mm256_storeu_ps(dst + j, _mm256_setzero_ps());
      } else {
        const float* src = x + ((n * h + src_r) * w + src_c) * c + group * W;
        for (int j = 0; j < W; j += 8) _mm256_storeu_ps(dst + j, _mm256_loadu_ps(src + j));
      }
    }
  }
  for (int64_t cb = 0; cb < W / CO; ++cb) {
    const float* kb = k + (group * (W / CO) + cb) * g.kh * g.kw * W * CO;
    float* yb = y + n * g.ho * g.wo * c + group * W + cb * CO;
    Blocks<W, CO, PB>(xg, kb, yb, c, g, 0, 0, 0, g.ho * g.wo);
  }
}

// Runs fn(i) for i in [0, count) on the thread pool XLA gives the handler, in contiguous
// chunks, the calling thread taking the first.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, const F& fn) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), count));
  std::mutex mu;
  std::condition_variable done;
  int64_t pending = chunks - 1;
  for (int64_t t = 1; t < chunks; ++t) {
    pool.Schedule([&, t] {
      for (int64_t i = t * count / chunks; i < (t + 1) * count / chunks; ++i) fn(i);
      std::lock_guard<std::mutex> lock(mu);
      if (--pending == 0) done.notify_one();
    });
  }
  for (int64_t i = 0; i < count / chunks; ++i) fn(i);
  std::unique_lock<std::mutex> lock(mu);
  done.wait(lock, [&] { return pending == 0; });
}

template <int W>
void Run(ffi::ThreadPool& pool, const float* x, const float* k, float* y, int64_t n_images,
         int64_t h, int64_t w, int64_t pad_top, int64_t pad_left, const Geometry& g) {
  ParallelFor(pool, n_images * g.groups, [&](int64_t i) {
    thread_local std::vector<float> buffer;
    GroupOfImage<W>(x, k, y, h, w, pad_top, pad_left, g, i / g.groups, i % g.groups,
                    buffer);
  });
}

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
  Geometry g{kd[0], kd[2], kd[3], stride_h, stride_w, 0, 0, yd[1], yd[2]};
  g.hp = (g.ho - 1) * g.sh + g.kh;
  g.wp = (g.wo - 1) * g.sw + g.kw;
  if (xd[3] != g.groups * width || yd[3] != xd[3] || yd[0] != xd[0] ||
      kd[1] * kd[5] != width)
    return ffi::Error::InvalidArgument("grouped conv: channels do not match the kernel");
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  switch (width) {
    case 8: Run<8>(pool, xp, kp, yp, xd[0], xd[1], xd[2], pad_top, pad_left, g); break;
    case 16: Run<16>(pool, xp, kp, yp, xd[0], xd[1], xd[2], pad_top, pad_left, g); break;
    case 32: Run<32>(pool, xp, kp, yp, xd[0], xd[1], xd[2], pad_top, pad_left, g); break;
    default:
      return ffi::Error::InvalidArgument("grouped conv: group width must be 8, 16 or 32");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextGroupedConvForward, GroupedConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left"));
