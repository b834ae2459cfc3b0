// The tuned kernels compiled for AVX-512 (F, DQ, VL, BW) + FMA: 32 vector registers
// hold a 12-row tile (the registry runs them when the CPU has all of these).
#if defined(__x86_64__)  // the intrinsics exist on x86 only; elsewhere the portable body below
#include <immintrin.h>
#endif

#include "tuned/prelude.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
namespace twolayer::cpu::tuned_avx512 {
constexpr tuning::Isa kIsa = tuning::Isa::Avx512;
#include "tuned/simd_avx512.inc"
#include "tuned/body.inc"
}  // namespace twolayer::cpu::tuned_avx512
#pragma GCC pop_options
#else  // not x86-64: never chosen (the CPU lacks AVX-512); the portable body keeps the link whole
namespace twolayer::cpu::tuned_avx512 {
constexpr tuning::Isa kIsa = tuning::Isa::Portable;
#include "tuned/body.inc"
}  // namespace twolayer::cpu::tuned_avx512
#endif
