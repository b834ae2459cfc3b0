// Every tuning constant of the CPU kernels, in one place: the GEMM's register
// tiles and cache blocks per instruction set, the thread and narrow-path cut-offs,
// and the shape rule of the "auto" variant. (Measurements behind them: README,
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
  static constexpr int64_t KC = 512, MC = 240, NC = 3072;  // B micro-panel 64 KiB in L2; 2 passes over C at K = 1024
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

// Elementwise passes: elements per thread task.
constexpr int64_t kElementwiseGrain = int64_t(1) << 15;

// "auto": the platform BLAS ("blas") instead of our tuned GEMMs for this problem?
// Measured on AMD EPYC Zen 4, sgd_step medians (docs/performance.md): MKL's small float32
// GEMMs beat ours on one thread (seed 64,1000,100,10: 330 vs 397 us) and on two of a quiet
// machine (204 vs 244 us), but with another process on a core its OpenMP barriers made the
// two-thread step 2.8x slower than one thread (953 vs 337 us), where ours (pool.h) hold;
// so MKL only where it runs on one thread. At medium MKL's quiet edge was 3-6%; at large our
// AVX-512 kernels win (130 vs 140 ms); in float64 ours win or tie at every size; the narrow
// layers' row-blocked step is ours alone.
constexpr double kAutoBlasMaxFlops = 1e8;  // per step: 4 N D_in H + 6 N H D_out
inline bool auto_prefers_blas(int64_t N, int64_t D_in, int64_t H, int64_t D_out,
                              bool single_precision, int threads) {
  const double flops = 4.0 * double(N) * double(D_in) * double(H) + 6.0 * double(N) * double(H) * double(D_out);
  return single_precision && threads == 1 && !row_blocked(N, D_in, H, D_out) &&
         flops <= kAutoBlasMaxFlops;
}

}  // namespace twolayer::cpu::tuning
