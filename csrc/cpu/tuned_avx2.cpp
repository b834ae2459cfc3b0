// The tuned kernels compiled for AVX2 + FMA (the registry runs them when the CPU has both).
#if defined(__x86_64__)  // the intrinsics exist on x86 only; elsewhere the portable body below
#include <immintrin.h>
#endif

#include "tuned/prelude.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace twolayer::cpu::tuned_avx2 {
constexpr tuning::Isa kIsa = tuning::Isa::Avx2;
#include "tuned/simd_avx2.inc"
#include "tuned/body.inc"
}  // namespace twolayer::cpu::tuned_avx2
#pragma GCC pop_options
#else  // not x86-64: never chosen (the CPU lacks AVX2); the portable body keeps the link whole
namespace twolayer::cpu::tuned_avx2 {
constexpr tuning::Isa kIsa = tuning::Isa::Portable;
#include "tuned/body.inc"
}  // namespace twolayer::cpu::tuned_avx2
#endif
