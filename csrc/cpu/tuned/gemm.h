// A blocked GEMM (the BLIS loop nest: B packed into L1/L3-sized panels, a
// register-blocked micro-kernel reading A in place) whose results go through
// an epilogue while each micro-tile is still in L1.
//
//   C[M, N] = A[M, K] @ B[K, N]    A and B are strided views (transposes are free)
//
// The epilogue sees each MR x NR tile of sums once per K block:
//   epi.partial(i0, j0, mr, nr, tile, first)  K blocks before the last
//   epi.last(i0, j0, mr, nr, tile, first)     the last one (first: also the first)
// and decides where partial sums live (usually its own output).
//
// Included inside an ISA namespace by tuned_avx2.cpp / tuned_portable.cpp,
// after every header it needs: it includes nothing itself.

template <typename T>
struct Tiles;
template <>
struct Tiles<float> {  // 12 ymm accumulators: 6 rows x 2 x 8 floats
  static constexpr int MR = 6, NR = 16;
  static constexpr int64_t KC = 256, MC = 120, NC = 3072;
};
template <>
struct Tiles<double> {  // 12 ymm accumulators: 6 rows x 2 x 4 doubles
  static constexpr int MR = 6, NR = 8;
  static constexpr int64_t KC = 256, MC = 120, NC = 1536;
};

// Problems below this many flops stay on one thread: at the tutorial's size a
// second thread costs more than it saves (and stalls if the other core is busy).
constexpr double kMinFlopsForThreads = 4e6;

// tile[MR][NR] = sum over k < kc of A-panel (x) B-panel. The A panel is read in
// place: row r, step k at a[r][k] = rows[r] + k * ks. B is packed k-major.
#ifdef TWOLAYER_AVX2_KERNELS  // set by tuned_avx2.cpp, under its target pragma
template <typename T>
struct Ymm;  // the 256-bit vector operations the micro-kernel needs, per element type
template <>
struct Ymm<float> {
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }
};
template <>
struct Ymm<double> {
  using V = __m256d;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_load_pd(p); }
  static V broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static void store(double* p, V v) { _mm256_store_pd(p, v); }
};

// 6 rows x 2 vectors: 12 accumulators, two B vectors per k, each row's A value broadcast.
template <typename T>
inline void micro_kernel(int64_t kc, const T* const* rows, int64_t ks, const T* b, T* tile) {
  using Y = Ymm<T>;
  constexpr int W = Tiles<T>::NR / 2;  // elements per vector
  const T *a0 = rows[0], *a1 = rows[1], *a2 = rows[2], *a3 = rows[3], *a4 = rows[4], *a5 = rows[5];
  typename Y::V c00 = Y::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
                c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0, o = 0; k < kc; ++k, o += ks, b += 2 * W) {
    const typename Y::V b0 = Y::load(b), b1 = Y::load(b + W);
    typename Y::V x = Y::broadcast(a0 + o);
    c00 = Y::fma(x, b0, c00), c01 = Y::fma(x, b1, c01);
    x = Y::broadcast(a1 + o);
    c10 = Y::fma(x, b0, c10), c11 = Y::fma(x, b1, c11);
    x = Y::broadcast(a2 + o);
    c20 = Y::fma(x, b0, c20), c21 = Y::fma(x, b1, c21);
    x = Y::broadcast(a3 + o);
    c30 = Y::fma(x, b0, c30), c31 = Y::fma(x, b1, c31);
    x = Y::broadcast(a4 + o);
    c40 = Y::fma(x, b0, c40), c41 = Y::fma(x, b1, c41);
    x = Y::broadcast(a5 + o);
    c50 = Y::fma(x, b0, c50), c51 = Y::fma(x, b1, c51);
  }
  Y::store(tile + 0 * W, c00), Y::store(tile + 1 * W, c01);
  Y::store(tile + 2 * W, c10), Y::store(tile + 3 * W, c11);
  Y::store(tile + 4 * W, c20), Y::store(tile + 5 * W, c21);
  Y::store(tile + 6 * W, c30), Y::store(tile + 7 * W, c31);
  Y::store(tile + 8 * W, c40), Y::store(tile + 9 * W, c41);
  Y::store(tile + 10 * W, c50), Y::store(tile + 11 * W, c51);
}
#else
template <typename T>
void micro_kernel(int64_t kc, const T* const* rows, int64_t ks, const T* b, T* tile) {
  constexpr int MR = Tiles<T>::MR, NR = Tiles<T>::NR;
  T acc[MR * NR] = {};
  for (int64_t k = 0; k < kc; ++k, b += NR)
    for (int r = 0; r < MR; ++r) {
      const T a = rows[r][k * ks];
      for (int c = 0; c < NR; ++c) acc[r * NR + c] += a * b[c];
    }
  for (int i = 0; i < MR * NR; ++i) tile[i] = acc[i];
}
#endif

// Per-thread packing buffer, grown on demand and reused across calls.
template <typename T>
T* packing_buffer(int64_t elems) {
  struct Buf {
    T* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf buf;
  if (buf.n < elems) {
    std::free(buf.p);
    buf.p = static_cast<T*>(std::aligned_alloc(64, ((size_t(elems) * sizeof(T) + 63) / 64) * 64));
    if (!buf.p) throw std::bad_alloc();
    buf.n = elems;
  }
  return buf.p;
}

// B[pc:pc+kc, j:j+nr] into one NR-wide panel, k-major, zero-padded to NR columns.
template <typename T>
void pack_b_panel(View<T> B, int64_t pc, int64_t kc, int64_t j, int64_t nr, T* out) {
  constexpr int NR = Tiles<T>::NR;
  const T* src = B.p + pc * B.rs + j * B.cs;
  for (int64_t k = 0; k < kc; ++k, out += NR) {
    const T* row = src + k * B.rs;
    if (B.cs == 1 && nr == NR) {
      for (int c = 0; c < NR; ++c) out[c] = row[c];
      continue;
    }
    int64_t c = 0;
    for (; c < nr; ++c) out[c] = row[c * B.cs];
    for (; c < NR; ++c) out[c] = T(0);
  }
}

// One task: rows [ic, ic + mc) x B panels [p_begin, p_end) for the K blocks
// [pc_begin, pc_end), from packed panels at bp(pc, p).
template <typename T, typename Epi, typename PanelAt>
void gemm_task(int64_t N, int64_t K, View<T> A, Epi& epi, int64_t ic, int64_t mc, int64_t jc,
               int64_t p_begin, int64_t p_end, int64_t pc_begin, int64_t pc_end,
               PanelAt panel_at) {
  using Tl = Tiles<T>;
  constexpr int MR = Tl::MR, NR = Tl::NR;
  alignas(64) T tile[MR * NR];
  const T* rows[MR];
  for (int64_t pc = pc_begin; pc < pc_end; pc += Tl::KC) {
    const int64_t kc = std::min(Tl::KC, K - pc);
    const bool first = pc == 0, last = pc + kc >= K;
    // A B panel (NR x kc) stays in L1 while the A rows of this block stream by.
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t j = jc + p * NR;
      const int nr = int(std::min<int64_t>(NR, N - j));
      const T* bp = panel_at(pc, p);
      for (int64_t ir = 0; ir < mc; ir += MR) {
        const int mr = int(std::min<int64_t>(MR, mc - ir));
        // Rows past the edge re-read the last real row; their sums are ignored.
        for (int r = 0; r < MR; ++r)
          rows[r] = A.p + (ic + ir + std::min(r, mr - 1)) * A.rs + pc * A.cs;
        micro_kernel(kc, rows, A.cs, bp, tile);
        if (last) epi.last(ic + ir, j, mr, nr, tile, first);
        else epi.partial(ic + ir, j, mr, nr, tile, first);
      }
    }
  }
}

template <typename T, typename Epi>
void gemm(int64_t M, int64_t N, int64_t K, View<T> A, View<T> B, Epi& epi) {
  using Tl = Tiles<T>;
  constexpr int MR = Tl::MR, NR = Tl::NR;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum: the epilogue still sees every tile, as zeros
    alignas(64) T zero_tile[MR * NR] = {};
    for (int64_t i = 0; i < M; i += MR)
      for (int64_t j = 0; j < N; j += NR)
        epi.last(i, j, int(std::min<int64_t>(MR, M - i)), int(std::min<int64_t>(NR, N - j)),
                 zero_tile, true);
    return;
  }
  const bool threads = 2.0 * double(M) * double(N) * double(K) >= kMinFlopsForThreads;
  const int64_t nthreads = threads ? at::get_num_threads() : 1;
  // Row blocks of at most about MC rows, as many as a multiple of the thread
  // count, the MR-row panels dealt out evenly, so every thread gets the same work.
  const int64_t m_panels = (M + MR - 1) / MR;
  int64_t m_blocks = (M + Tl::MC - 1) / Tl::MC;
  m_blocks = std::min(m_panels, (m_blocks + nthreads - 1) / nthreads * nthreads);
  auto block_row = [&](int64_t b) { return std::min(M, MR * (m_panels * b / m_blocks)); };
  const int64_t k_blocks = (K + Tl::KC - 1) / Tl::KC;

  for (int64_t jc = 0; jc < N; jc += Tl::NC) {
    const int64_t nc = std::min(Tl::NC, N - jc);
    const int64_t n_panels = (nc + NR - 1) / NR;
    // Split the columns too when there are fewer row blocks than threads.
    const int64_t n_chunks = m_blocks < nthreads ? std::min<int64_t>(n_panels, nthreads) : 1;
    const int64_t tasks = m_blocks * n_chunks;
    auto run = [&](int64_t pc_begin, int64_t pc_end, auto panel_at) {
      at::parallel_for(0, tasks, threads ? 1 : tasks, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / n_chunks, chunk = t % n_chunks;
          const int64_t ic = block_row(b);
          gemm_task(N, K, A, epi, ic, block_row(b + 1) - ic, jc, n_panels * chunk / n_chunks,
                    n_panels * (chunk + 1) / n_chunks, pc_begin, pc_end, panel_at);
        }
      });
    };
    auto pack = [&](int64_t p_count, auto pack_one) {
      at::parallel_for(0, p_count, threads ? 4 : p_count, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) pack_one(p);
      });
    };
    if (k_blocks * n_panels * NR * Tl::KC <= (int64_t(1) << 18)) {
      // Small B: packed whole, then one parallel region for every K block (few
      // fork/joins, which is what small problems pay for).
      T* bp = packing_buffer<T>(k_blocks * n_panels * NR * Tl::KC);
      auto panel_at = [&](int64_t pc, int64_t p) { return bp + ((pc / Tl::KC) * n_panels + p) * NR * Tl::KC; };
      pack(k_blocks * n_panels, [&](int64_t q) {
        const int64_t pc = (q / n_panels) * Tl::KC, p = q % n_panels;
        pack_b_panel(B, pc, std::min(Tl::KC, K - pc), jc + p * NR, std::min<int64_t>(NR, nc - p * NR),
                     bp + q * NR * Tl::KC);
      });
      run(0, K, panel_at);
    } else {
      // Large B: one K block of it packed at a time (it stays in L2/L3), shared by all tasks.
      for (int64_t pc = 0; pc < K; pc += Tl::KC) {
        const int64_t kc = std::min(Tl::KC, K - pc);
        T* bp = packing_buffer<T>(n_panels * NR * kc);
        pack(n_panels, [&](int64_t p) {
          pack_b_panel(B, pc, kc, jc + p * NR, std::min<int64_t>(NR, nc - p * NR), bp + p * NR * kc);
        });
        run(pc, pc + kc, [&](int64_t, int64_t p) { return bp + p * NR * kc; });
      }
    }
  }
}
