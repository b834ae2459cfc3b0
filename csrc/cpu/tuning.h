// Every tuning constant of the CPU kernels, in one place: the GEMM's register
// tiles and cache blocks per instruction set, the thread and narrow-path cut-offs,
// and the shape rule of the "auto" variant. (Measurements behind them:
// docs/performance.md.)
#pragma once

#include <cstdint>

namespace twolayer::cpu::tuning {

enum class Isa { Portable, Avx2, Avx512 };

// MR rows x NR columns of C per micro-kernel call (NR = NV vectors of the ISA's
// width); KC x NR packed B panels; MC rows of A per block; NC columns per pass.
template <Isa, typename T>
struct Tiles;
template <>
struct Tiles<Isa::Portable, float> {
  static constexpr int MR = 6, NR = 16, NV = 1;
  static constexpr int64_t KC = 256, MC = 120, NC = 3072;
};
template <>
struct Tiles<Isa::Portable, double> {
  static constexpr int MR = 6, NR = 8, NV = 1;
  static constexpr int64_t KC = 256, MC = 120, NC = 1536;
};
template <>  // 12 ymm accumulators: 6 rows x 2 x 8 floats
struct Tiles<Isa::Avx2, float> {
  static constexpr int MR = 6, NR = 16, NV = 2;
  static constexpr int64_t KC = 256, MC = 120, NC = 3072;
};
template <>  // 12 ymm accumulators: 6 rows x 2 x 4 doubles
struct Tiles<Isa::Avx2, double> {
  static constexpr int MR = 6, NR = 8, NV = 2;
  static constexpr int64_t KC = 256, MC = 120, NC = 1536;
};
template <>  // 24 of the 32 zmm registers accumulate: 12 rows x 2 x 16 floats
struct Tiles<Isa::Avx512, float> {
  static constexpr int MR = 12, NR = 32, NV = 2;
  static constexpr int64_t KC = 512, MC = 240,
                           NC = 3072;  // B micro-panel 64 KiB in L2; 2 passes over C at K = 1024
};
template <>  // 12 rows x 2 x 8 doubles
struct Tiles<Isa::Avx512, double> {
  static constexpr int MR = 12, NR = 16, NV = 2;
  static constexpr int64_t KC = 512, MC = 240, NC = 1536;
};

// A GEMM below this many flops stays on one thread: at the tutorial's size a second
// thread costs more than it saves (and stalls if the other core is busy).
constexpr double kMinFlopsForThreads = 4e6;

// Narrow layers (small weights, many rows) take the row-blocked step: blocks of
// kRowBlock rows, their gradient sums in kRowGroups fixed groups.
constexpr int64_t kRowBlockedMinRows = 4096;
constexpr int64_t kRowBlockedMaxWeights = int64_t(1) << 16;  // D_in * H + H * D_out
constexpr int64_t kRowBlock = 192, kRowGroups = 8;
inline bool row_blocked(int64_t N, int64_t D_in, int64_t H, int64_t D_out) {
  return N >= kRowBlockedMinRows && D_in * H + H * D_out <= kRowBlockedMaxWeights;
}

// A kernel call's per-thread workspace above this size is freed when the call returns (the
// benchmark sizes stay below it, the large one in float64 at 75 MB, and reuse theirs).
constexpr int64_t kWorkspaceKeepBytes = int64_t(128) << 20;

// The worker pool (pool.cpp): chunks per thread, more than one, so that a late worker's share
// is small pieces the others pick up; how long an idle worker spins (yielding the core) before
// it sleeps.
constexpr int64_t kPoolChunksPerThread = 4;
constexpr int kPoolSpinMicroseconds = 50;
// A core counts as busy (busy_core.h) after kBusySigns signs within kBusyWindowMs while other
// processes use kBusyOthersCores or more (measured over kBusyLoadMs or more; an older
// start, over kBusyLoadStaleMs, begins a new interval), and for kBusyHoldMs after the last.
// A sign: a parallel region whose caller waited at its end over kBusyWaitMicroseconds (and
// over its own work) for another thread, a blas-mt call whose thread spent over
// kBusyWaitMicroseconds off its core or that took that much longer than auto measured its
// step take (tuner.h), or a job of our pool that ran
// kBusyNoWorkerMicroseconds without any awake worker joining (kBusyWaitMicroseconds where one
// had to be woken from sleep). Measured on an Intel Xeon (2 cores), 8 s of steps at seed and
// medium: quiet, 5 and 16 such no-worker jobs and 5 waits (a core's time slice is
// milliseconds; a quiet machine's wake-ups take tens of microseconds); one core busy,
// hundreds a second. Other processes' use over 100 ms intervals of nn.Sequential and
// sgd_step steps: quiet -0.15 to 0.14 cores, one busy-loop process 0.89 to 1.17.
constexpr int64_t kBusyWaitMicroseconds = 1000;
constexpr int64_t kBusyNoWorkerMicroseconds = 200;
constexpr int kBusySigns = 3;
constexpr int64_t kBusyWindowMs = 100;
constexpr int64_t kBusyHoldMs = 2000;
constexpr double kBusyOthersCores = 0.5;
constexpr int64_t kBusyLoadMs = 100;
constexpr int64_t kBusyLoadStaleMs = 1000;

// Elementwise passes: elements per thread task.
constexpr int64_t kElementwiseGrain = int64_t(1) << 15;

// "auto" measures its choice per problem (tuner.h); these bound what that costs. Below
// kTuneMinFlops per step (4 N D_in H + 6 N H D_out) it is not measured: call overhead
// dominates and our tuned kernels have the least. A step above kTuneMaxFlops is measured on
// fewer rows; a screen on 1/kTuneScreenFraction of the rows drops candidates more than
// kTuneDropRatio times slower than the best; then up to kTuneRounds interleaved rounds,
// within kTuneBudgetMs for the whole key.
constexpr double kTuneMinFlops = 2e6;
constexpr double kTuneMaxFlops = 2e8;
constexpr int64_t kTuneScreenFraction = 4;
constexpr double kTuneDropRatio = 2.5;
constexpr int kTuneRounds = 5;
constexpr double kTuneBudgetMs = 70;
// A step measured on fewer rows than it has can rank its candidates the other way round from
// the full size (AMD EPYC Zen 4): large float64, 2 threads, blas-mt 3.4 ms and tuned-avx512
// 5.5 ms on 16 rows, 349 and 278 ms on all 4,096 (the order settles from 512-1,024 rows, a
// quarter of a step per candidate); narrow float32, 1 thread, blas 3.37 and tuned-avx512
// 3.53 ms on 8,880 rows, 32.7 and 24.0 ms on all 65,536 (there the data outgrows the caches).
// A step of kTuneTrialMinFlops or more tries the candidates at full size in its first
// whole-step calls instead (tuner.h; their cost is small beside the steps that follow, and the
// medium size, 0.59 GFLOP, ranked right on 176 of its rows here and on an Intel Xeon),
// kTuneTrialRounds rounds (the first call of each is cold: blas 544 ms at large against 354
// warm), the fastest call of each deciding; the second round skips one over
// kTuneTrialDropRatio times the best.
constexpr double kTuneTrialMinFlops = 1e9;
constexpr int kTuneTrialRounds = 2;
constexpr double kTuneTrialDropRatio = 2.0;

// The blas variant's GEMMs run on our threads in row chunks fixed by the shape: at least
// kBlasChunkFlops each, at most kBlasMaxChunks.
constexpr double kBlasChunkFlops = 4e6;
constexpr int64_t kBlasMaxChunks = 8;

// The CPU's L2 loss sums its squared errors in chunks of this many elements (fixed, so the
// sum has the same bits for any thread count), the partial sums added pairwise.
constexpr int64_t kLossChunk = 4096;

}  // namespace twolayer::cpu::tuning
