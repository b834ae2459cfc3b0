// A blocked GEMM with packing and a register-blocked micro-kernel (the BLIS
// loop nest), whose results go through an epilogue functor while each
// micro-tile is still in L1: bias, ReLU, mask, loss and SGD update are written
// where the matmul result is, not in extra passes.
//
//   C[M, N] = A[M, K] @ B[K, N]    A and B are strided views (transposes are free)
//
// The epilogue sees each MR x NR tile of sums once per K block:
//   epi.partial(i0, j0, mr, nr, tile, first)  K blocks before the last
//   epi.last(i0, j0, mr, nr, tile, first)     the last one (first: also the first)
// and decides where partial sums live (usually its own output).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <new>

namespace twolayer::cpu {

template <typename T>
struct View {  // a strided 2-D view: element (i, j) is p[i * rs + j * cs]
  const T* p;
  int64_t rs, cs;
  View t() const { return {p, cs, rs}; }
};

template <typename T>
struct Tiles;
template <>
struct Tiles<float> {  // 12 ymm accumulators: 6 rows x 2 x 8 floats
  static constexpr int MR = 6, NR = 16;
  static constexpr int64_t KC = 256, MC = 96, NC = 2048;
};
template <>
struct Tiles<double> {  // 12 ymm accumulators: 6 rows x 2 x 4 doubles
  static constexpr int MR = 6, NR = 8;
  static constexpr int64_t KC = 256, MC = 96, NC = 1024;
};

// tile[MR][NR] = sum over k < kc of a[k][MR] (x) b[k][NR], from packed panels.
template <typename T>
using MicroKernel = void (*)(int64_t kc, const T* a, const T* b, T* tile);

// AVX2/FMA when this CPU has it (checked once at run time), else portable C++.
template <typename T>
MicroKernel<T> micro_kernel();
const char* micro_kernel_isa();

// Problems below this many flops stay on one thread: at the tutorial's size a
// second thread costs more than it saves (and collapses if the core is busy).
constexpr double kMinFlopsPerThread = 4e6;

namespace detail {

// Per-thread packing buffers, grown on demand and reused across calls.
template <typename T>
T* scratch(int slot, int64_t elems) {
  struct Buf {
    T* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[2];
  Buf& b = bufs[slot];
  if (b.n < elems) {
    std::free(b.p);
    const size_t bytes = ((size_t(elems) * sizeof(T) + 63) / 64) * 64;
    b.p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!b.p) throw std::bad_alloc();
    b.n = elems;
  }
  return b.p;
}

// A[ic:ic+mc, pc:pc+kc] into MR-row panels, k-major, zero-padded to MR rows.
template <typename T>
void pack_a(View<T> A, int64_t ic, int64_t mc, int64_t pc, int64_t kc, T* out) {
  constexpr int MR = Tiles<T>::MR;
  for (int64_t ir = 0; ir < mc; ir += MR) {
    const int64_t mr = std::min<int64_t>(MR, mc - ir);
    const T* src = A.p + (ic + ir) * A.rs + pc * A.cs;
    for (int64_t k = 0; k < kc; ++k) {
      int64_t r = 0;
      for (; r < mr; ++r) out[r] = src[r * A.rs + k * A.cs];
      for (; r < MR; ++r) out[r] = T(0);
      out += MR;
    }
  }
}

// B[pc:pc+kc, jc:jc+nc] into NR-column panels, k-major, zero-padded to NR columns.
template <typename T>
void pack_b_panel(View<T> B, int64_t pc, int64_t kc, int64_t j, int64_t nr, T* out) {
  constexpr int NR = Tiles<T>::NR;
  const T* src = B.p + pc * B.rs + j * B.cs;
  for (int64_t k = 0; k < kc; ++k) {
    const T* row = src + k * B.rs;
    int64_t c = 0;
    if (B.cs == 1) {
      for (; c < nr; ++c) out[c] = row[c];
    } else {
      for (; c < nr; ++c) out[c] = row[c * B.cs];
    }
    for (; c < NR; ++c) out[c] = T(0);
    out += NR;
  }
}

}  // namespace detail

template <typename T, typename Epi>
void gemm(int64_t M, int64_t N, int64_t K, View<T> A, View<T> B, Epi& epi) {
  using Tl = Tiles<T>;
  constexpr int MR = Tl::MR, NR = Tl::NR;
  if (M <= 0 || N <= 0) return;
  alignas(64) T zero_tile[MR * NR] = {};
  if (K <= 0) {  // an empty sum: the epilogue still sees every tile, as zeros
    for (int64_t i = 0; i < M; i += MR)
      for (int64_t j = 0; j < N; j += NR)
        epi.last(i, j, int(std::min<int64_t>(MR, M - i)), int(std::min<int64_t>(NR, N - j)),
                 zero_tile, true);
    return;
  }
  const MicroKernel<T> kernel = micro_kernel<T>();
  const bool threads = 2.0 * double(M) * double(N) * double(K) >= kMinFlopsPerThread;
  const int64_t m_blocks = (M + Tl::MC - 1) / Tl::MC;

  for (int64_t jc = 0; jc < N; jc += Tl::NC) {
    const int64_t nc = std::min(Tl::NC, N - jc);
    const int64_t n_panels = (nc + NR - 1) / NR;
    // Split the columns too when there are fewer row blocks than threads.
    const int64_t n_chunks = threads && m_blocks < at::get_num_threads()
                                 ? std::min<int64_t>(n_panels, at::get_num_threads())
                                 : 1;
    for (int64_t pc = 0; pc < K; pc += Tl::KC) {
      const int64_t kc = std::min(Tl::KC, K - pc);
      const bool first = pc == 0, last = pc + kc >= K;
      T* bp = detail::scratch<T>(0, n_panels * NR * kc);
      at::parallel_for(0, n_panels, threads ? 1 : n_panels, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          detail::pack_b_panel(B, pc, kc, jc + p * NR, std::min<int64_t>(NR, nc - p * NR),
                               bp + p * NR * kc);
      });
      const int64_t tasks = m_blocks * n_chunks;
      at::parallel_for(0, tasks, threads ? 1 : tasks, [&](int64_t t0, int64_t t1) {
        alignas(64) T tile[MR * NR];
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t ic = (t / n_chunks) * Tl::MC, mc = std::min(Tl::MC, M - ic);
          const int64_t chunk = t % n_chunks;
          const int64_t p_begin = n_panels * chunk / n_chunks;
          const int64_t p_end = n_panels * (chunk + 1) / n_chunks;
          T* ap = detail::scratch<T>(1, ((mc + MR - 1) / MR) * MR * kc);
          detail::pack_a(A, ic, mc, pc, kc, ap);
          for (int64_t p = p_begin; p < p_end; ++p) {
            const int64_t j = jc + p * NR;
            const int nr = int(std::min<int64_t>(NR, N - j));
            for (int64_t ir = 0; ir < mc; ir += MR) {
              kernel(kc, ap + ir * kc, bp + p * NR * kc, tile);
              const int mr = int(std::min<int64_t>(MR, mc - ir));
              if (last) epi.last(ic + ir, j, mr, nr, tile, first);
              else epi.partial(ic + ir, j, mr, nr, tile, first);
            }
          }
        }
      });
    }
  }
}

}  // namespace twolayer::cpu
