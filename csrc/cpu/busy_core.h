// When another process holds one of our cores, a parallel region that waits for every
// thread of its team (OpenMP's, which ATen's ops and the optimizer use) stalls for a
// scheduler time slice, milliseconds, where the step takes hundreds of microseconds. Our
// pool never waits for a worker that has not started (pool.h), so we watch how long the
// regions keep their caller waiting, and while a core looks busy:
//  - our loops run on our pool (pool.h) instead of OpenMP's threads;
//  - ATen's parallel regions called from this thread (the optimizer, gradient accumulation,
//    the user's own ops) run on one thread: torch.get_num_threads() reads 1 there, and the
//    count it had comes back at this thread's first op after the core is free again (a
//    torch.set_num_threads made in between is kept).
// Our kernels' results do not depend on the thread count (blas-mt's may: the BLAS's own
// partitioning), so nothing but the time changes.
// A core counts as busy only while other processes use one: this process's own threads
// (OpenMP's and OpenBLAS's spin for a while after each region) give signs too, briefly.
// TWOLAYER_BUSY_CORE=off turns this off.
#pragma once

#include <cstdint>

namespace twolayer::cpu::busy_core {

// A parallel region kept its caller waiting `wait_ns` at its end for another thread, after
// `work_ns` of the caller's own work in it.
void note_wait(int64_t wait_ns, int64_t work_ns);

// A job of our pool ran `job_ns` without any worker joining it: the caller did every chunk.
// `woken`: a worker had to be woken from sleep for it (a wake-up can take a while on a
// quiet machine too).
void note_no_worker(int64_t job_ns, bool woken);

// A call that hands whole GEMMs to the BLAS's own threads (the blas-mt variant) was
// `late_ns` late: its calling thread spent that long off its core, or the call took that much
// longer than auto measured for its problem. The BLAS's barriers waited for a thread that
// lost its core, which none of our regions sees.
void note_late_call(int64_t late_ns);

// This thread's CPU time, nanoseconds.
int64_t thread_cpu_ns();

// At the start of an op's outermost loop on this thread: lowers or restores ATen's thread
// count for this thread (above). Returns whether a core counts as busy now.
bool adapt();

// Whether a core counts as busy now.
bool busy();

// How many threads our loops use: torch's thread count as the user set it (not the 1 that
// adapt() sets while a core is busy).
int team_threads();

// Steady clock, nanoseconds.
int64_t now_ns();

// For tests: `n` signs now, as `n` late workers would give.
void note_signs(int n);

// For tests: count a core as busy for the next `ms` milliseconds (0: not busy).
void assume_busy_for(int64_t ms);

}  // namespace twolayer::cpu::busy_core
