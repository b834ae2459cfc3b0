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

// Our pool serves the loops while a core is busy (busy_core.h); elsewhere they run on ATen's
// OpenMP threads, as the ATen ops around them do (the optimizer, gradient accumulation, a
// user's own torch code). Two pools on the same cores spin against each other: OpenMP's idle
// threads spin for milliseconds after each region, so a step on our pool right after ATen ops
// ran slow (AMD EPYC Zen 4, medium float32, 2 threads: sgd_step 3.3-3.8 ms alone, 4.6-5.9 ms
// after a block of nn.Sequential or fused-loss steps; on OpenMP 3.3-3.7 ms both ways), and on
// a quiet machine the two run a step alone equally fast (0.95-1.03x at every size).

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
