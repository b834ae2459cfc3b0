// The tuned forward, backward and SGD step: every matmul is the GEMM of gemm.h,
// every elementwise step rides in one of its epilogues. sgd_step allocates
// nothing per call: its intermediates live in a per-thread workspace.
// Included inside an ISA namespace (see gemm.h); includes nothing itself.

// Per-thread arenas, grown on demand and reused across calls; one per use, so
// that no two live buffers share one.
enum Arena { kActivations, kLossPartials, kColumnSums, kGroupSums };
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

// grad_h [n, H] = grad_y @ w2^T, zeroed where the forward's ReLU blocked.
template <typename T>
void hidden_grad(int64_t n, const Dims& d, View<T> grad_y, View<T> w2, const T* act, T* grad_h) {
  auto e = into(grad_h, d.H, ReluMask<T>{act, d.H});
  gemm<T>(n, d.H, d.D_out, grad_y, w2.t(), e);
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
  hidden_grad(d.N, d, a.grad_y, a.w2, a.act, grad_h);
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

// y's gradient for rows [0, n) given act: grad_y = dL/dy of y = act @ w2 + b2, the
// squared errors of each row and column tile into sq (see LossGrad).
template <typename T>
void loss_grad(int64_t n, const Dims& d, const T* act, View<T> w2, const T* b2, View<T> target,
               T scale2, T* grad_y, double* sq, int64_t tiles) {
  if (b2) {
    LossGrad<T, true> e{grad_y, d.D_out, b2, target, scale2, sq, tiles};
    gemm<T>(n, d.D_out, d.H, row_major<T>(act, d.H), w2, e);
  } else {
    LossGrad<T, false> e{grad_y, d.D_out, nullptr, target, scale2, sq, tiles};
    gemm<T>(n, d.D_out, d.H, row_major<T>(act, d.H), w2, e);
  }
}

// A gradient C [M, N] = A @ B, delivered where `out` says: stored row-major, or applied
// as w -= lr * C in the GEMM's epilogue (the update is linear in the sum).
template <typename T>
void gradient_gemm(const GradOut<T>& out, int64_t M, int64_t N, int64_t K, View<T> A, View<T> B) {
  if (out.store) {
    auto e = into(out.store, N, Store<T>{});
    gemm<T>(M, N, K, A, B, e);
  } else if (out.update.p) {
    SgdUpdate<T> e{out.update, out.lr};
    gemm<T>(M, N, K, A, B, e);
  }
}

// A bias gradient: the column sums of a row-major [rows, cols] gradient, delivered.
template <typename T>
void bias_gradient(const GradOut<T>& out, const T* g, int64_t rows, int64_t cols) {
  if (out.store) column_sums<T>(g, rows, cols, [&](int64_t j, T s) { out.store[j] = s; });
  else if (out.update.p)
    column_sums<T>(g, rows, cols, [&](int64_t j, T s) { out.update(0, j) -= out.lr * s; });
}

template <typename T>
void negate(const T* g, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = -g[i];
}

// Narrow layers (small weights, many rows) take the row-blocked step below.
inline bool row_blocked_fits(const Dims& d) {
  return d.N >= 4096 && d.D_in * d.H + d.H * d.D_out <= (1 << 16);
}

// The whole step one block of rows at a time: a block's activations and
// gradients never leave L1/L2, and x and the target are read once. Row blocks
// are split into a fixed number of groups, each with its own gradient sums,
// added in group order at the end: the same bits for any thread count.
template <typename T>
double step_row_blocked(const StepArgs<T>& s, const T* b1, const T* b2) {
  const Dims d = s.d;
  constexpr int64_t kRows = 192, kGroups = 8;
  const int64_t tiles = (d.D_out + Tiles<T>::NR - 1) / Tiles<T>::NR;
  const int64_t blocks = (d.N + kRows - 1) / kRows;
  // Per group: grad_w1 [D_in, H], grad_w2 [H, D_out], grad_b1 [H], grad_b2 [D_out].
  const int64_t per_group = d.D_in * d.H + d.H * d.D_out + d.H + d.D_out;
  const bool hidden = s.wants_hidden_grad(), any = s.wants_any_grad();
  T* sums = workspace<T, kGroupSums>(kGroups * per_group);
  std::fill(sums, sums + kGroups * per_group, T(0));
  double group_loss[kGroups] = {};
  const double n = double(d.N * d.D_out);
  const T scale2 = T(s.mean ? 2.0 / n : 2.0);

  at::parallel_for(0, kGroups, 1, [&](int64_t g0, int64_t g1) {
    T* act = workspace<T, kActivations>(kRows * (2 * d.H + d.D_out));
    T* grad_h = act + kRows * d.H;
    T* grad_y = grad_h + kRows * d.H;
    double* sq = workspace<double, kLossPartials>(kRows * tiles);
    for (int64_t g = g0; g < g1; ++g) {
      T* gw1 = sums + g * per_group;
      T* gw2 = gw1 + d.D_in * d.H;
      T* gb1 = gw2 + d.H * d.D_out;
      T* gb2 = gb1 + d.H;
      for (int64_t blk = blocks * g / kGroups; blk < blocks * (g + 1) / kGroups; ++blk) {
        const int64_t r0 = blk * kRows, rows = std::min(kRows, d.N - r0);
        const View<T> x{s.x.p + r0 * s.x.rs, s.x.rs, s.x.cs};
        const View<T> t{s.target.p + r0 * s.target.rs, s.target.rs, s.target.cs};
        const Dims bd{rows, d.D_in, d.H, d.D_out};
        layer1(bd, x, s.w1, b1, act);
        loss_grad(rows, bd, act, s.w2, b2, t, scale2, grad_y, sq, tiles);
        group_loss[g] += pairwise_sum(sq, rows * tiles);
        if (!any) continue;
        if (s.grad_target) negate(grad_y, rows * d.D_out, s.grad_target + r0 * d.D_out);
        if (s.gw2.wanted()) {
          Accumulate<T> a2{gw2, d.D_out};
          gemm<T>(d.H, d.D_out, rows, row_major<T>(act, d.H).t(), row_major<T>(grad_y, d.D_out), a2);
        }
        if (s.gb2.wanted())
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < d.D_out; ++j) gb2[j] += grad_y[i * d.D_out + j];
        if (!hidden) continue;
        hidden_grad(rows, bd, row_major<T>(grad_y, d.D_out), s.w2, act, grad_h);
        const View<T> gh = row_major<T>(grad_h, d.H);
        if (s.gw1.wanted()) {
          Accumulate<T> a1{gw1, d.H};
          gemm<T>(d.D_in, d.H, rows, x.t(), gh, a1);
        }
        if (s.gb1.wanted())
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < d.H; ++j) gb1[j] += grad_h[i * d.H + j];
        if (s.grad_x) {
          auto e = into(s.grad_x + r0 * d.D_in, d.D_in, Store<T>{});
          gemm<T>(rows, d.D_in, d.H, gh, s.w1.t(), e);
        }
      }
    }
  });
  // Sum the groups in order into group 0, then deliver (every read of the weights is done).
  for (int64_t g = 1; g < kGroups && any; ++g)
    for (int64_t i = 0; i < per_group; ++i) sums[i] += sums[g * per_group + i];
  const T* gw1 = sums;
  const T* gw2 = gw1 + d.D_in * d.H;
  const T* gb1 = gw2 + d.H * d.D_out;
  const T* gb2 = gb1 + d.H;
  deliver(s.gw1, gw1, d.D_in, d.H);
  deliver(s.gw2, gw2, d.H, d.D_out);
  deliver(s.gb1, gb1, 1, d.H);
  deliver(s.gb2, gb2, 1, d.D_out);
  double total = 0.0;
  for (int64_t g = 0; g < kGroups; ++g) total += group_loss[g];
  return s.mean ? total / n : total;
}

template <typename T>
double step_impl(const StepArgs<T>& s) {
  const Dims d = s.d;
  const ContiguousBias<T> b1(s.b1.p, s.b1.stride, d.H), b2(s.b2.p, s.b2.stride, d.D_out);
  if (row_blocked_fits(d)) return step_row_blocked(s, b1.p, b2.p);
  const int64_t tiles = (d.D_out + Tiles<T>::NR - 1) / Tiles<T>::NR;
  // One arena: act [N, H], grad_h [N, H], grad_y [N, D_out]; the loss partials apart.
  T* act = workspace<T, kActivations>(2 * d.N * d.H + d.N * d.D_out);
  T* grad_h = act + d.N * d.H;
  T* grad_y = grad_h + d.N * d.H;
  double* sq = workspace<double, kLossPartials>(d.N * tiles);
  const double n = double(d.N * d.D_out);

  layer1(d, s.x, s.w1, b1.p, act);
  // grad_y = dL/dy for y = act @ w2 + b2, the loss summed on the way; y is never stored.
  loss_grad(d.N, d, act, s.w2, b2.p, s.target, T(s.mean ? 2.0 / n : 2.0), grad_y, sq, tiles);
  const double total = pairwise_sum(sq, d.N * tiles);
  const View<T> gy = row_major<T>(grad_y, d.D_out), gh = row_major<T>(grad_h, d.H);
  if (s.grad_target) negate(grad_y, d.N * d.D_out, s.grad_target);
  // grad_h = mask(grad_y @ w2^T), and grad_x from it, at the old weights: before any update.
  if (s.wants_hidden_grad()) hidden_grad(d.N, d, gy, s.w2, act, grad_h);
  if (s.grad_x) {
    auto e = into(s.grad_x, d.D_in, Store<T>{});
    gemm<T>(d.N, d.D_in, d.H, gh, s.w1.t(), e);
  }
  // grad_w2 = act^T @ grad_y;  grad_w1 = x^T @ grad_h  (an SGD update is the epilogue)
  gradient_gemm(s.gw2, d.H, d.D_out, d.N, row_major<T>(act, d.H).t(), gy);
  gradient_gemm(s.gw1, d.D_in, d.H, d.N, s.x.t(), gh);
  bias_gradient(s.gb2, grad_y, d.N, d.D_out);
  bias_gradient(s.gb1, grad_h, d.N, d.H);
  return s.mean ? total / n : total;
}
