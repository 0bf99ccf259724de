// What the C++ convolution kernels share: ParallelFor over XLA's FFI thread pool and
// the FFI binding of their handlers.

#ifndef RESNEXT_JAX_CPU_FFI_COMMON_H_
#define RESNEXT_JAX_CPU_FFI_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace resnext_jax {

// Runs fn(i) for i in [0, count) on the calling thread and on XLA's thread pool.
// Every thread takes items from a shared counter, so the caller never waits for a task
// that has not started: XLA may run several of these handlers at once, on all of the
// pool's threads, and a caller that waited for its queued tasks would then wait forever.
// A helper task that starts after all items are taken returns at once; the shared state
// is reference-counted, as such a task may outlive the call.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0}, finished{0};
    std::mutex mu;
    std::condition_variable all_finished;
  };
  auto state = std::make_shared<State>();
  const F* work = &fn;  // used only while items remain, i.e. while the caller waits
  auto drain = [state, work, count] {
    for (int64_t i; (i = state->next.fetch_add(1)) < count;) {
      (*work)(i);
      if (state->finished.fetch_add(1) + 1 == count) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->all_finished.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(drain)(drain));
  drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->all_finished.wait(lock, [&] { return state->finished.load() == count; });
}

// Every handler takes two float32 arrays, returns one, and reads the same attributes.
inline auto TwoArraysToOne() {
  return xla::ffi::Ffi::Bind()
      .Ctx<xla::ffi::ThreadPool>()
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
      .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_left");
}

}  // namespace resnext_jax

#endif  // RESNEXT_JAX_CPU_FFI_COMMON_H_
