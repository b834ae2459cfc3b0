// The tuned forward, backward and SGD step: every matmul is the GEMM of gemm.h,
// every elementwise step rides in one of its epilogues. sgd_step allocates
// nothing per call: its intermediates live in a per-thread workspace.
// Included inside an ISA namespace (see gemm.h); includes nothing itself.

template <typename T>
View<T> row_major(const T* p, int64_t cols) {
  return {p, cols, 1};
}

// Per-thread arenas, grown on demand and reused across calls; one per use, so
// that no two live buffers share one.
enum Arena { kActivations, kLossPartials, kColumnSums };
template <typename T, Arena>
T* workspace(int64_t elems) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < elems) buf.resize(elems);
  return buf.data();
}

// The epilogues read biases contiguously: a strided one is copied (rare, tiny).
template <typename T>
struct ContiguousBias {
  std::vector<T> copy;
  const T* p = nullptr;
  ContiguousBias(const T* b, int64_t stride, int64_t n) {
    if (!b || stride == 1) {
      p = b;
      return;
    }
    copy.resize(n);
    for (int64_t j = 0; j < n; ++j) copy[j] = b[j * stride];
    p = copy.data();
  }
};

// Column sums of a row-major [rows, cols] matrix, then combine(j, sum): partial
// sums over fixed row chunks, added in chunk order (the same bits for any
// thread count), accumulated in double.
template <typename T, typename Combine>
void column_sums(const T* g, int64_t rows, int64_t cols, Combine combine) {
  constexpr int64_t kRows = 512;
  const int64_t chunks = std::max<int64_t>((rows + kRows - 1) / kRows, 1);
  double* partial = workspace<double, kColumnSums>(chunks * cols);
  std::fill(partial, partial + chunks * cols, 0.0);
  at::parallel_for(0, chunks, rows * cols >= (1 << 16) ? 1 : chunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* p = partial + c * cols;
      for (int64_t i = c * kRows; i < std::min(rows, (c + 1) * kRows); ++i)
        for (int64_t j = 0; j < cols; ++j) p[j] += double(g[i * cols + j]);
    }
  });
  for (int64_t j = 0; j < cols; ++j) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[c * cols + j];
    combine(j, T(s));
  }
}

inline double pairwise_sum(double* v, int64_t n) {
  for (int64_t width = 1; width < n; width *= 2)
    for (int64_t i = 0; i + width < n; i += 2 * width) v[i] += v[i + width];
  return n ? v[0] : 0.0;
}

// act = relu(x @ w1 + b1), the mask in the sign bit.
template <typename T>
void layer1(const Dims& d, View<T> x, View<T> w1, const T* b1, T* act) {
  if (b1) {
    auto e = into(act, d.H, BiasRelu<T, true>{b1});
    gemm<T>(d.N, d.H, d.D_in, x, w1, e);
  } else {
    auto e = into(act, d.H, BiasRelu<T, false>{nullptr});
    gemm<T>(d.N, d.H, d.D_in, x, w1, e);
  }
}

template <typename T>
void forward_impl(const ForwardArgs<T>& a) {
  const Dims d = a.d;
  const ContiguousBias<T> b1(a.b1.p, a.b1.stride, d.H), b2(a.b2.p, a.b2.stride, d.D_out);
  layer1(d, a.x, a.w1, b1.p, a.act);
  if (b2.p) {
    auto e = into(a.y, d.D_out, AddBias<T, true>{b2.p});
    gemm<T>(d.N, d.D_out, d.H, row_major<T>(a.act, d.H), a.w2, e);
  } else {
    auto e = into(a.y, d.D_out, AddBias<T, false>{nullptr});
    gemm<T>(d.N, d.D_out, d.H, row_major<T>(a.act, d.H), a.w2, e);
  }
}

template <typename T>
void backward_impl(const BackwardArgs<T>& a) {
  const Dims d = a.d;
  const View<T> act = row_major<T>(a.act, d.H);
  if (a.grad_w2) {
    auto e = into(a.grad_w2, d.D_out, Store<T>{});
    gemm<T>(d.H, d.D_out, d.N, act.t(), a.grad_y, e);
  }
  if (a.grad_b2) {
    // grad_y may be strided (even stride 0): summed through its view.
    for (int64_t j = 0; j < d.D_out; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < d.N; ++i) s += double(a.grad_y.p[i * a.grad_y.rs + j * a.grad_y.cs]);
      a.grad_b2[j] = T(s);
    }
  }
  if (!a.grad_x && !a.grad_w1 && !a.grad_b1) return;
  T* grad_h = workspace<T, kActivations>(d.N * d.H);
  auto masked = into(grad_h, d.H, ReluMask<T>{a.act, d.H});
  gemm<T>(d.N, d.H, d.D_out, a.grad_y, a.w2.t(), masked);
  const View<T> gh = row_major<T>(grad_h, d.H);
  if (a.grad_w1) {
    auto e = into(a.grad_w1, d.H, Store<T>{});
    gemm<T>(d.D_in, d.H, d.N, a.x.t(), gh, e);
  }
  if (a.grad_b1) column_sums<T>(grad_h, d.N, d.H, [&](int64_t j, T s) { a.grad_b1[j] = s; });
  if (a.grad_x) {
    auto e = into(a.grad_x, d.D_in, Store<T>{});
    gemm<T>(d.N, d.D_in, d.H, gh, a.w1.t(), e);
  }
}

template <typename T>
double sgd_step_impl(const StepArgs<T>& s) {
  const Dims d = s.d;
  const int64_t tiles = (d.D_out + Tiles<T>::NR - 1) / Tiles<T>::NR;
  // One arena: act [N, H], grad_h [N, H], grad_y [N, D_out]; the loss partials apart.
  T* act = workspace<T, kActivations>(2 * d.N * d.H + d.N * d.D_out);
  T* grad_h = act + d.N * d.H;
  T* grad_y = grad_h + d.N * d.H;
  double* sq = workspace<double, kLossPartials>(d.N * tiles);

  const View<T> w1{s.w1.p, s.w1.rs, s.w1.cs}, w2{s.w2.p, s.w2.rs, s.w2.cs};
  const ContiguousBias<T> b1(s.b1.p, s.b1.stride, d.H), b2(s.b2.p, s.b2.stride, d.D_out);
  const double n = double(d.N * d.D_out);

  layer1(d, s.x, w1, b1.p, act);
  // grad_y = dL/dy for y = act @ w2 + b2, the loss summed on the way; y is never stored.
  const T scale2 = T(s.mean ? 2.0 / n : 2.0);
  if (b2.p) {
    LossGrad<T, true> e2{grad_y, d.D_out, b2.p, s.target, scale2, sq, tiles};
    gemm<T>(d.N, d.D_out, d.H, row_major<T>(act, d.H), w2, e2);
  } else {
    LossGrad<T, false> e2{grad_y, d.D_out, nullptr, s.target, scale2, sq, tiles};
    gemm<T>(d.N, d.D_out, d.H, row_major<T>(act, d.H), w2, e2);
  }
  // grad_h = mask(grad_y @ w2^T), at the old w2: before w2 is updated.
  auto e3 = into(grad_h, d.H, ReluMask<T>{act, d.H});
  gemm<T>(d.N, d.H, d.D_out, row_major<T>(grad_y, d.D_out), w2.t(), e3);
  // w2 -= lr * act^T @ grad_y;  w1 -= lr * x^T @ grad_h  (the updates are the epilogues)
  SgdUpdate<T> u2{s.w2, s.lr};
  gemm<T>(d.H, d.D_out, d.N, row_major<T>(act, d.H).t(), row_major<T>(grad_y, d.D_out), u2);
  SgdUpdate<T> u1{s.w1, s.lr};
  gemm<T>(d.D_in, d.H, d.N, s.x.t(), row_major<T>(grad_h, d.H), u1);
  if (s.b2) column_sums<T>(grad_y, d.N, d.D_out, [&](int64_t j, T g) { s.b2[j] -= s.lr * g; });
  if (s.b1) column_sums<T>(grad_h, d.N, d.H, [&](int64_t j, T g) { s.b1[j] -= s.lr * g; });

  const double total = pairwise_sum(sq, d.N * tiles);
  return s.mean ? total / n : total;
}
