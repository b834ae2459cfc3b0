// The GEMM micro-kernels: an AVX2/FMA one compiled for that ISA alone (function
// target attributes, so the rest of the build stays baseline x86-64 and no
// -march flag is needed) and a portable one; the CPU is asked once at run time.
#include <immintrin.h>

#include <cstdlib>

#include "gemm.h"

namespace twolayer::cpu {

namespace {

template <typename T>
void micro_kernel_portable(int64_t kc, const T* a, const T* b, T* tile) {
  constexpr int MR = Tiles<T>::MR, NR = Tiles<T>::NR;
  T acc[MR * NR] = {};
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR)
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NR; ++c) acc[r * NR + c] += a[r] * b[c];
  for (int i = 0; i < MR * NR; ++i) tile[i] = acc[i];
}

#if defined(__x86_64__) || defined(_M_X64)
#define TWOLAYER_HAVE_AVX2_KERNELS 1

// 6 x 16 floats: two 8-wide B vectors per k, each row's A value broadcast.
__attribute__((target("avx2,fma"))) void micro_kernel_avx2_f32(int64_t kc, const float* a,
                                                                const float* b, float* tile) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, a += 6, b += 16) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40), c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50), c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  _mm256_store_ps(tile + 0, c00), _mm256_store_ps(tile + 8, c01);
  _mm256_store_ps(tile + 16, c10), _mm256_store_ps(tile + 24, c11);
  _mm256_store_ps(tile + 32, c20), _mm256_store_ps(tile + 40, c21);
  _mm256_store_ps(tile + 48, c30), _mm256_store_ps(tile + 56, c31);
  _mm256_store_ps(tile + 64, c40), _mm256_store_ps(tile + 72, c41);
  _mm256_store_ps(tile + 80, c50), _mm256_store_ps(tile + 88, c51);
}

// 6 x 8 doubles: two 4-wide B vectors per k.
__attribute__((target("avx2,fma"))) void micro_kernel_avx2_f64(int64_t kc, const double* a,
                                                                const double* b, double* tile) {
  __m256d c00 = _mm256_setzero_pd(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
          c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < kc; ++k, a += 6, b += 8) {
    const __m256d b0 = _mm256_load_pd(b), b1 = _mm256_load_pd(b + 4);
    __m256d x = _mm256_broadcast_sd(a + 0);
    c00 = _mm256_fmadd_pd(x, b0, c00), c01 = _mm256_fmadd_pd(x, b1, c01);
    x = _mm256_broadcast_sd(a + 1);
    c10 = _mm256_fmadd_pd(x, b0, c10), c11 = _mm256_fmadd_pd(x, b1, c11);
    x = _mm256_broadcast_sd(a + 2);
    c20 = _mm256_fmadd_pd(x, b0, c20), c21 = _mm256_fmadd_pd(x, b1, c21);
    x = _mm256_broadcast_sd(a + 3);
    c30 = _mm256_fmadd_pd(x, b0, c30), c31 = _mm256_fmadd_pd(x, b1, c31);
    x = _mm256_broadcast_sd(a + 4);
    c40 = _mm256_fmadd_pd(x, b0, c40), c41 = _mm256_fmadd_pd(x, b1, c41);
    x = _mm256_broadcast_sd(a + 5);
    c50 = _mm256_fmadd_pd(x, b0, c50), c51 = _mm256_fmadd_pd(x, b1, c51);
  }
  _mm256_store_pd(tile + 0, c00), _mm256_store_pd(tile + 4, c01);
  _mm256_store_pd(tile + 8, c10), _mm256_store_pd(tile + 12, c11);
  _mm256_store_pd(tile + 16, c20), _mm256_store_pd(tile + 20, c21);
  _mm256_store_pd(tile + 24, c30), _mm256_store_pd(tile + 28, c31);
  _mm256_store_pd(tile + 32, c40), _mm256_store_pd(tile + 36, c41);
  _mm256_store_pd(tile + 40, c50), _mm256_store_pd(tile + 44, c51);
}

// TWOLAYER_NO_AVX2=1 forces the portable kernel (to test the path a CPU without AVX2 takes).
bool cpu_has_avx2_fma() {
  static const bool has = [] {
    const char* off = std::getenv("TWOLAYER_NO_AVX2");
    if (off && off[0] == '1') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

}  // namespace

template <>
MicroKernel<float> micro_kernel<float>() {
#ifdef TWOLAYER_HAVE_AVX2_KERNELS
  if (cpu_has_avx2_fma()) return micro_kernel_avx2_f32;
#endif
  return micro_kernel_portable<float>;
}

template <>
MicroKernel<double> micro_kernel<double>() {
#ifdef TWOLAYER_HAVE_AVX2_KERNELS
  if (cpu_has_avx2_fma()) return micro_kernel_avx2_f64;
#endif
  return micro_kernel_portable<double>;
}

const char* micro_kernel_isa() {
#ifdef TWOLAYER_HAVE_AVX2_KERNELS
  if (cpu_has_avx2_fma()) return "avx2+fma";
#endif
  return "portable";
}

}  // namespace twolayer::cpu
