// The CPU kernels' own parallel_for: like at::parallel_for (torch.set_num_threads sets
// how many threads take part; a call inside a parallel region runs inline), but the
// range is cut into chunks that threads claim one at a time, and the caller claims
// them too. So the caller never waits for a worker that has not started: when another
// process holds a core and a worker waits for a time slice (milliseconds), the caller
// does that worker's share and returns. It only ever waits for chunks already running.
// (OpenMP's parallel regions end in a barrier that waits for every team thread.)
//
// Results do not depend on which thread runs a chunk: the kernels give every chunk its
// own output and combine partial sums in chunk order.
#pragma once

#include <cstdint>

namespace twolayer::cpu {

// Our pool serves the loops inside a PoolScope (sgd_step: the whole training step in one
// call), and all of them while a core is busy (busy_core.h); elsewhere the loops run on
// ATen's OpenMP threads. The ops of the autograd paths sit
// among ATen ops (the optimizer, gradient accumulation), and two pools on the same cores
// spin against each other: measured, the fused loss at 2 threads ran at half speed (again on
// an Intel Xeon: medium, 2 threads, fused loss + SGD 5.1 ms on our pool against 3.1 ms, while
// with one core busy our pool held 0.4 ms at seed where OpenMP took 16 ms).
class PoolScope {
 public:
  PoolScope();
  ~PoolScope();
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;

 private:
  bool previous_;
};

// Whether the loops outside a PoolScope run on our pool now, because OpenMP's team
// recently kept its callers waiting (pool.cpp).
bool openmp_contended();

using ChunkFn = void (*)(const void* f, int64_t begin, int64_t end);
void parallel_for_chunks(int64_t begin, int64_t end, int64_t grain, ChunkFn run, const void* f);

// f(b, e) over [begin, end) in chunks of at least `grain` items (the last may be smaller).
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for_chunks(
      begin, end, grain,
      [](const void* g, int64_t b, int64_t e) { (*static_cast<const F*>(g))(b, e); }, &f);
}

}  // namespace twolayer::cpu
