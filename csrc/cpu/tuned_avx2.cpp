// The tuned kernels compiled for AVX2 + FMA (chosen at run time when the CPU has them).
#include <immintrin.h>

#include "tuned/prelude.h"

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TWOLAYER_AVX2_KERNELS 1  // the pragma does not define __AVX2__ for #if
namespace twolayer::cpu::tuned_avx2 {
#include "tuned/isa_body.h"
const char* isa() { return "avx2+fma"; }
}  // namespace twolayer::cpu::tuned_avx2
#undef TWOLAYER_AVX2_KERNELS
#pragma GCC pop_options
#else
// Not x86-64: the portable build serves (two_layer_cpu.cpp never picks this one).
namespace twolayer::cpu::tuned_avx2 {
#include "tuned/isa_body.h"
const char* isa() { return "portable"; }
}  // namespace twolayer::cpu::tuned_avx2
#endif
