// Per-channel sums of a training batch norm, in one pass over the pixels: an XLA FFI
// handler for x86-64 CPUs.
//
// Why: a training batch norm needs two sums per channel forward (of x and of x * x) and
// two backward (of the output gradient g and of g * x). XLA's CPU backend makes each sum
// a separate reduction over the whole tensor (up to 51 MB at batch 16), so the batch
// norms of a ResNeXt train step read their tensors twice as often as needed, and
// those reductions took about a tenth of the step on a 2-core CPU. Here both sums
// come from one read.
//
// Layouts: a and b are [..., C] (NHWC flattened to pixels x channels); b is either
// empty (then the second sum is of a * a) or of a's shape. The result is [2, C]:
// row 0 sums a, row 1 sums a * b. Each work item sums a block of at most kMaxPixelBlock
// pixels (short runs of float32 additions keep the rounding small; fewer for small
// tensors, so that every thread gets work) into partial sums; the partials are added in
// a fixed order, so results are deterministic for a given number of threads.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using resnext_jax::ParallelFor;

namespace {

constexpr int64_t kMaxPixelBlock = 512;  // pixels per work item, at most
constexpr int64_t kMinPixelBlock = 64;   // ... and at least, for small tensors
constexpr int64_t kItemsPerThread = 4;   // small tensors still feed every thread

// Adds the pixels [p0, p1) of a (and b) into sums[0, C) and products[0, C).
void SumBlock(const float* __restrict__ a, const float* __restrict__ b, int64_t channels,
              int64_t p0, int64_t p1, float* __restrict__ sums,
              float* __restrict__ products) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* ar = a + p * channels;
    const float* br = (b ? b : a) + p * channels;
    for (int64_t c = 0; c < channels; ++c) {
      sums[c] += ar[c];
      products[c] += ar[c] * br[c];
    }
  }
}

ffi::Error ChannelSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                       ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  const auto ad = a.dimensions(), od = out->dimensions();
  if (ad.size() < 1 || od.size() != 2 || od[0] != 2 || od[1] != ad.back())
    return ffi::Error::InvalidArgument(
        "channel sums: expected a [..., C] and a result of shape [2, C]");
  const auto bd = b.dimensions();
  if (b.element_count() != 0 && !std::equal(ad.begin(), ad.end(), bd.begin(), bd.end()))
    return ffi::Error::InvalidArgument("channel sums: b must be empty or of a's shape");
  const int64_t channels = ad.back();
  const int64_t pixels = channels ? a.element_count() / channels : 0;
  float* result = out->typed_data();
  std::fill(result, result + 2 * channels, 0.0f);
  if (pixels == 0 || channels == 0) return ffi::Error::Success();

  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t block = std::clamp((pixels + kItemsPerThread * threads - 1) /
                                       (kItemsPerThread * threads),
                                   kMinPixelBlock, kMaxPixelBlock);
  const int64_t items = (pixels + block - 1) / block;
  std::vector<float> partial(items * 2 * channels, 0.0f);
  const float* ap = a.typed_data();
  const float* bp = b.element_count() ? b.typed_data() : nullptr;
  ParallelFor(pool, items, [&](int64_t item) {
    float* sums = partial.data() + item * 2 * channels;
    SumBlock(ap, bp, channels, item * block, std::min((item + 1) * block, pixels), sums,
             sums + channels);
  });
  for (int64_t item = 0; item < items; ++item)
    for (int64_t i = 0; i < 2 * channels; ++i) result[i] += partial[item * 2 * channels + i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnextChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b or empty
                                  .Ret<ffi::Buffer<ffi::F32>>());
