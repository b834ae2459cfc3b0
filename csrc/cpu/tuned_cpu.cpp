// The tuned CPU kernels: every matmul is the blocked GEMM of gemm.h, and every
// elementwise step rides in a GEMM epilogue. sgd_step allocates nothing per
// call: its intermediates live in a per-thread workspace that is reused.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_impl.h"
#include "epilogues.h"

namespace twolayer::cpu::tuned {

namespace {

template <typename T>
View<T> row_major(const T* p, int64_t cols) {
  return {p, cols, 1};
}

// Column sums of a row-major [rows, cols] matrix, then out[j] = combine(j, sum):
// partial sums over fixed row chunks, added in chunk order (same bits for any
// thread count).
template <typename T, typename Combine>
void column_sums(const T* g, int64_t rows, int64_t cols, Combine combine) {
  constexpr int64_t kRows = 512;
  const int64_t chunks = (rows + kRows - 1) / kRows;
  std::vector<double> partial(std::max<int64_t>(chunks, 1) * cols, 0.0);
  at::parallel_for(0, chunks, rows * cols >= (1 << 16) ? 1 : chunks, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double* p = partial.data() + c * cols;
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

double pairwise_sum(double* v, int64_t n) {
  for (int64_t width = 1; width < n; width *= 2)
    for (int64_t i = 0; i + width < n; i += 2 * width) v[i] += v[i + width];
  return n ? v[0] : 0.0;
}

// A per-thread arena for sgd_step's intermediates, grown on demand.
template <typename T>
T* workspace(int64_t elems) {
  thread_local std::vector<T> buf;
  if (int64_t(buf.size()) < elems) buf.resize(elems);
  return buf.data();
}

}  // namespace

template <typename T>
void forward(const ForwardArgs<T>& a) {
  const Dims d = a.d;
  auto first = epilogue::into(a.act, d.H, epilogue::bias_relu<T>(a.b1));
  gemm<T>(d.N, d.H, d.D_in, a.x, a.w1, first);
  auto second = epilogue::into(a.y, d.D_out, epilogue::bias<T>(a.b2));
  gemm<T>(d.N, d.D_out, d.H, row_major<T>(a.act, d.H), a.w2, second);
}

template <typename T>
void backward(const BackwardArgs<T>& a) {
  const Dims d = a.d;
  const View<T> act = row_major<T>(a.act, d.H);
  if (a.grad_w2) {
    auto e = epilogue::into(a.grad_w2, d.D_out, epilogue::store<T>());
    gemm<T>(d.H, d.D_out, d.N, act.t(), a.grad_y, e);
  }
  if (a.grad_b2) {
    // grad_y may be strided (even stride 0): sum it through its view.
    for (int64_t j = 0; j < d.D_out; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < d.N; ++i) s += double(a.grad_y.p[i * a.grad_y.rs + j * a.grad_y.cs]);
      a.grad_b2[j] = T(s);
    }
  }
  if (!a.grad_x && !a.grad_w1 && !a.grad_b1) return;
  T* grad_h = workspace<T>(d.N * d.H);
  auto masked = epilogue::into(grad_h, d.H, epilogue::relu_mask<T>(a.act, d.H));
  gemm<T>(d.N, d.H, d.D_out, a.grad_y, a.w2.t(), masked);
  const View<T> gh = row_major<T>(grad_h, d.H);
  if (a.grad_w1) {
    auto e = epilogue::into(a.grad_w1, d.H, epilogue::store<T>());
    gemm<T>(d.D_in, d.H, d.N, a.x.t(), gh, e);
  }
  if (a.grad_b1) column_sums<T>(grad_h, d.N, d.H, [&](int64_t j, T s) { a.grad_b1[j] = s; });
  if (a.grad_x) {
    auto e = epilogue::into(a.grad_x, d.D_in, epilogue::store<T>());
    gemm<T>(d.N, d.D_in, d.H, gh, a.w1.t(), e);
  }
}

template <typename T>
double sgd_step(const StepArgs<T>& s) {
  const Dims d = s.d;
  constexpr int NR = Tiles<T>::NR;
  const int64_t tiles = (d.D_out + NR - 1) / NR;
  // One arena: act [N, H], grad_h [N, H], grad_y [N, D_out], then the loss partials.
  const int64_t n_act = d.N * d.H, n_gy = d.N * d.D_out;
  const int64_t n_sq = (d.N * tiles * sizeof(double) + sizeof(T) - 1) / sizeof(T) + 1;
  T* act = workspace<T>(2 * n_act + n_gy + n_sq + 8);
  T* grad_h = act + n_act;
  T* grad_y = grad_h + n_act;
  double* sq = reinterpret_cast<double*>(
      (reinterpret_cast<uintptr_t>(grad_y + n_gy) + alignof(double) - 1) & ~(alignof(double) - 1));
  std::fill(sq, sq + d.N * tiles, 0.0);

  const View<T> w1{s.w1.p, s.w1.rs, s.w1.cs}, w2{s.w2.p, s.w2.rs, s.w2.cs};
  const Bias<const T> b1{s.b1.p, s.b1.stride}, b2{s.b2.p, s.b2.stride};
  const double n = double(d.N * d.D_out);

  // act = relu(x @ w1 + b1)
  auto e1 = epilogue::into(act, d.H, epilogue::bias_relu<T>(b1));
  gemm<T>(d.N, d.H, d.D_in, s.x, w1, e1);
  // grad_y = dL/dy from y = act @ w2 + b2, with the loss summed on the way; y is never stored.
  auto e2 = epilogue::into(grad_y, d.D_out, epilogue::LossGrad<T>{b2, s.target,
                                                                   T(s.mean ? 2.0 / n : 2.0), sq, tiles});
  gemm<T>(d.N, d.D_out, d.H, row_major<T>(act, d.H), w2, e2);
  // grad_h = mask(grad_y @ w2^T), at the old w2: before w2 is updated.
  auto e3 = epilogue::into(grad_h, d.H, epilogue::relu_mask<T>(act, d.H));
  gemm<T>(d.N, d.H, d.D_out, row_major<T>(grad_y, d.D_out), w2.t(), e3);
  // w2 -= lr * act^T @ grad_y;  w1 -= lr * x^T @ grad_h  (updates in the epilogues)
  epilogue::SgdUpdate<T> u2{s.w2, s.lr};
  gemm<T>(d.H, d.D_out, d.N, row_major<T>(act, d.H).t(), row_major<T>(grad_y, d.D_out), u2);
  epilogue::SgdUpdate<T> u1{s.w1, s.lr};
  gemm<T>(d.D_in, d.H, d.N, s.x.t(), row_major<T>(grad_h, d.H), u1);
  if (s.b2) column_sums<T>(grad_y, d.N, d.D_out, [&](int64_t j, T g) { s.b2[j] -= s.lr * g; });
  if (s.b1) column_sums<T>(grad_h, d.N, d.H, [&](int64_t j, T g) { s.b1[j] -= s.lr * g; });

  const double total = pairwise_sum(sq, d.N * tiles);
  return s.mean ? total / n : total;
}

#define TWOLAYER_INSTANTIATE(T)                              \
  template void forward<T>(const ForwardArgs<T>&);           \
  template void backward<T>(const BackwardArgs<T>&);         \
  template double sgd_step<T>(const StepArgs<T>&);
TWOLAYER_INSTANTIATE(float)
TWOLAYER_INSTANTIATE(double)
#undef TWOLAYER_INSTANTIATE

}  // namespace twolayer::cpu::tuned
