// The reference CPU kernels: plain loops, written to be read and trusted, not
// to be fast. Rows are split across threads; everything else is the textbook
// formula, in the tutorial's order.

#include <vector>

#include "../loss_value.h"
#include "cpu_impl.h"
#include "pool.h"

namespace twolayer::cpu::reference {

namespace {

// C[M, N] = A[M, K] @ B[K, N] into row-major C.
template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, View<T> A, View<T> B, T* C) {
  parallel_for(0, M, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* c = C + i * N;
      for (int64_t j = 0; j < N; ++j) c[j] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T a = A.p[i * A.rs + k * A.cs];
        for (int64_t j = 0; j < N; ++j) c[j] += a * B.p[k * B.rs + j * B.cs];
      }
    }
  });
}

template <typename T>
void column_sums(const T* g, int64_t rows, int64_t cols, T* out) {
  for (int64_t j = 0; j < cols; ++j) out[j] = T(0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j] += g[i * cols + j];
}

}  // namespace

template <typename T>
void forward(const ForwardArgs<T>& a) {
  const Dims d = a.d;
  matmul(d.N, d.H, d.D_in, a.x, a.w1, a.act);  // h = x @ w1
  for (int64_t i = 0; i < d.N; ++i)
    for (int64_t j = 0; j < d.H; ++j) {
      T& h = a.act[i * d.H + j];
      if (a.b1) h += a.b1[j];
      h = relu_with_sign_mask(h);
    }
  matmul(d.N, d.D_out, d.H, row_major<T>(a.act, d.H), a.w2, a.y);  // y = relu(h) @ w2
  add_bias(a.y, d.N, d.D_out, a.b2);
}

template <typename T>
void backward(const BackwardArgs<T>& a) {
  const Dims d = a.d;
  const View<T> act = row_major<T>(a.act, d.H);
  // A transposed gradient as the product of the transposes (the same sums, in the same order).
  if (a.gw2.store && a.gw2.transposed)
    matmul(d.D_out, d.H, d.N, a.grad_y.t(), act, a.gw2.store);
  else if (a.gw2.store)
    matmul(d.H, d.D_out, d.N, act.t(), a.grad_y, a.gw2.store);
  if (a.grad_b2)  // grad_y may be strided: summed through its view
    for (int64_t j = 0; j < d.D_out; ++j) {
      a.grad_b2[j] = T(0);
      for (int64_t i = 0; i < d.N; ++i)
        a.grad_b2[j] += a.grad_y.p[i * a.grad_y.rs + j * a.grad_y.cs];
    }
  if (!a.grad_x && !a.gw1.store && !a.grad_b1) return;
  std::vector<T> grad_h(d.N * d.H);
  matmul(d.N, d.H, d.D_out, a.grad_y, a.w2.t(), grad_h.data());  // grad_y @ w2^T
  for (int64_t i = 0; i < d.N * d.H; ++i)
    if (std::signbit(a.act[i])) grad_h[i] = T(0);  // grad_h[h < 0] = 0
  const View<T> gh = row_major<T>(grad_h.data(), d.H);
  if (a.gw1.store && a.gw1.transposed)
    matmul(d.H, d.D_in, d.N, gh.t(), a.x, a.gw1.store);
  else if (a.gw1.store)
    matmul(d.D_in, d.H, d.N, a.x.t(), gh, a.gw1.store);
  if (a.grad_b1) column_sums(grad_h.data(), d.N, d.H, a.grad_b1);
  if (a.grad_x) matmul(d.N, d.D_in, d.H, gh, a.w1.t(), a.grad_x);
}

// The tutorial's order: forward, loss and its gradient, backward, then the gradients go
// where s says (stored, or w -= lr * grad).
template <typename T>
double step(const StepArgs<T>& s) {
  const Dims d = s.d;
  const int64_t ny = d.N * d.D_out;
  std::vector<T> act(d.N * d.H), y(ny), t(ny), grad_y(ny);
  std::vector<T> gw1(d.D_in * d.H), gw2(d.H * d.D_out), gb1(d.H), gb2(d.D_out);
  forward<T>({d, s.x, s.w1, s.w2, s.b1, s.b2, act.data(), y.data()});
  for (int64_t i = 0; i < d.N; ++i)
    for (int64_t j = 0; j < d.D_out; ++j)
      t[i * d.D_out + j] = s.target.p[i * s.target.rs + j * s.target.cs];
  const L2Loss l2{double(ny), s.mean};
  const double total =
      squared_error_sum<T>(y.data(), t.data(), grad_y.data(), T(l2.grad_scale()), ny);
  if (s.wants_any_grad()) {
    auto want = [](const GradOut<T>& o, std::vector<T>& g) {
      return o.wanted() ? g.data() : nullptr;
    };
    backward<T>({d,
                 row_major<T>(grad_y.data(), d.D_out),
                 s.x,
                 s.w1,
                 s.w2,
                 act.data(),
                 s.grad_x,
                 {want(s.gw1, gw1)},
                 {want(s.gw2, gw2)},
                 want(s.gb1, gb1),
                 want(s.gb2, gb2)});
    if (s.grad_target)
      for (int64_t i = 0; i < ny; ++i) s.grad_target[i] = -grad_y[i];
    deliver(s.gw1, gw1.data(), d.D_in, d.H);
    deliver(s.gw2, gw2.data(), d.H, d.D_out);
    deliver(s.gb1, gb1.data(), 1, d.H);
    deliver(s.gb2, gb2.data(), 1, d.D_out);
  }
  return l2.value(total);
}

TWOLAYER_INSTANTIATE_VARIANT

}  // namespace twolayer::cpu::reference
