// parallel_for(pool, n, fn): fn(i) for i in [0, n) on the calling thread and num_threads - 1 tasks of XLA's
// intra-op pool (one thread per core), indices claimed from one atomic counter; returns when every fn(i) is done.
//
// The counter is shared-owned, so a pool task that starts after the work is finished claims nothing and calls
// nothing; fn (and what it references) is only called for a claimed index, before the caller returns. The caller
// never waits on a task that has not started: it claims indices itself until none is left, then waits only for
// indices being run.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace llama_jax {

template <typename F>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, F fn) {
  struct Counter {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counter = std::make_shared<Counter>();
  auto run = [counter, n, fn] {
    for (int64_t i; (i = counter->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      fn(i);
      counter->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run] { run(); });
  run();
  while (counter->done.load(std::memory_order_acquire) < n) {
  }
}

}  // namespace llama_jax
