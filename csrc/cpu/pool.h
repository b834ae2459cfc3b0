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

// Our pool serves the loops inside a PoolScope: every CPU op entry point holds one, the ops
// of the autograd routes as well as sgd_step, so a busy core stalls none of them (measured on
// an Intel Xeon, 2 threads, one core busy: the fused loss's forward + backward at seed 384 us
// on our pool against 15.9 ms on OpenMP's). Idle workers spin for kSpin (pool.cpp), yielding
// the core, then sleep: long enough that the next op of a step finds them awake (quiet, seed,
// 2 threads: sgd_step 35% slower than on OpenMP with a 50 us spin, 14% with 500 us, the other
// sizes even), short enough not to hold a core.
// Elsewhere (a parallel_for outside any op) the loops run on ATen's OpenMP threads.
class PoolScope {
 public:
  PoolScope();
  ~PoolScope();
  PoolScope(const PoolScope&) = delete;
  PoolScope& operator=(const PoolScope&) = delete;

 private:
  bool previous_;
};

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
