// What the CPU kernel variants share: raw strided views of the op arguments and
// the argument structs of their three kernels (forward, backward, the fused step).
// The op entry points (two_layer_cpu.cpp) check arguments, allocate outputs and
// hand these to the variant the registry picks (variants.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../checks.h"

namespace twolayer::cpu {

template <typename T>
struct View {  // a read-only strided 2-D view: element (i, j) is p[i * rs + j * cs]
  const T* p;
  int64_t rs, cs;
  View t() const { return {p, cs, rs}; }
};

template <typename T>
struct MutView {  // a writable strided 2-D view
  T* p;
  int64_t rs, cs;
  T& operator()(int64_t i, int64_t j) const { return p[i * rs + j * cs]; }
  View<T> view() const { return {p, rs, cs}; }
};

template <typename T>
View<T> row_major(const T* p, int64_t cols) {
  return {p, cols, 1};
}

// Sums v[0, n) pairwise, in place, in a fixed order: O(log n) error growth, the
// same bits for any thread count.
inline double pairwise_sum(double* v, int64_t n) {
  for (int64_t width = 1; width < n; width *= 2)
    for (int64_t i = 0; i + width < n; i += 2 * width) v[i] += v[i + width];
  return n ? v[0] : 0.0;
}

template <typename T>
struct Bias {  // an optional strided vector (p == nullptr: absent)
  T* p;
  int64_t stride;
  explicit operator bool() const { return p != nullptr; }
  T& operator[](int64_t j) const { return p[j * stride]; }
};

template <typename T>
struct ForwardArgs {
  Dims d;
  View<T> x, w1, w2;
  Bias<const T> b1, b2;
  T* act;  // [N, H] row-major: ReLU output, mask in the sign bit (kernels.h)
  T* y;    // [N, D_out] row-major
};

// Where one weight's gradient goes in a fused step (or a backward, which only stores): stored
// (row-major), applied as w -= lr * grad in place (SGD), or nowhere (not wanted, or a frozen
// weight).
template <typename T>
struct GradOut {
  T* store = nullptr;  // row-major gradient
  // store holds the gradient's transpose ([cols, rows] row-major): the layout of a weight that
  // is itself a transposed view (TwoLayerNet's w1, w2 over nn.Linear-layout parameters), so
  // autograd hands the gradient to the parameter without a copy.
  bool transposed = false;
  MutView<T> update{nullptr, 0, 0};  // the weight itself (a bias: one row, cs = its stride)
  T lr = T(0);
  bool wanted() const { return store || update.p; }
};

template <typename T>
struct BackwardArgs {
  Dims d;
  View<T> grad_y, x, w1, w2;  // x, w1 only read when gw1 / grad_x are wanted
  const T* act;               // [N, H] row-major
  T* grad_x;                  // row-major; nullptr: not wanted
  GradOut<T> gw1, gw2;        // stored only (row-major or transposed); no store: not wanted
  T *grad_b1, *grad_b2;       // nullptr: not wanted
};

// The fused step: forward, L2 loss, and the gradients each GradOut asks for, all at
// the weights as they were on entry (updates are applied after every read of them).
// sgd_step updates; the fused loss stores. grad_x / grad_target: row-major or nullptr.
template <typename T>
struct StepArgs {
  Dims d;
  View<T> x, target, w1, w2;
  Bias<const T> b1, b2;
  bool mean;  // reduction "mean" (else "sum")
  T *grad_x, *grad_target;
  GradOut<T> gw1, gw2, gb1, gb2;
  bool wants_hidden_grad() const { return grad_x || gw1.wanted() || gb1.wanted(); }
  bool wants_any_grad() const {
    return wants_hidden_grad() || grad_target || gw2.wanted() || gb2.wanted();
  }
};

// The kernels every CPU variant provides (a namespace per variant; the table that
// names them is in variants.cpp).
#define TWOLAYER_DECLARE_VARIANT(ns)       \
  namespace ns {                           \
  template <typename T>                    \
  void forward(const ForwardArgs<T>& a);   \
  template <typename T>                    \
  void backward(const BackwardArgs<T>& a); \
  template <typename T>                    \
  double step(const StepArgs<T>& a);       \
  }

// Inside a variant's namespace, after its templates: their float and double builds.
#define TWOLAYER_INSTANTIATE_VARIANT                           \
  template void forward<float>(const ForwardArgs<float>&);     \
  template void forward<double>(const ForwardArgs<double>&);   \
  template void backward<float>(const BackwardArgs<float>&);   \
  template void backward<double>(const BackwardArgs<double>&); \
  template double step<float>(const StepArgs<float>&);         \
  template double step<double>(const StepArgs<double>&);

// The sum of squares of (p - t) over n contiguous elements, in double, the same
// bits for any thread count; if g != nullptr also g = scale2 * (p - t).
template <typename T>
double squared_error_sum(const T* p, const T* t, T* g, T scale2, int64_t n);

// Delivers a finished row-major gradient g [rows, cols] to where `out` says.
template <typename T>
void deliver(const GradOut<T>& out, const T* g, int64_t rows, int64_t cols) {
  if (out.store && out.transposed) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) out.store[j * rows + i] = g[i * cols + j];
  } else if (out.store) {
    std::copy(g, g + rows * cols, out.store);
  }
  if (out.update.p)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) out.update(i, j) -= out.lr * g[i * cols + j];
}

// y [rows, cols] row-major += b (broadcast over rows), when b is given.
template <typename T>
void add_bias(T* y, int64_t rows, int64_t cols, Bias<const T> b) {
  if (!b) return;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) y[i * cols + j] += b[j];
}

// The ReLU with its mask in the sign bit: h < 0 ? -0.0 : |h| (NaN kept, sign cleared).
template <typename T>
inline T relu_with_sign_mask(T h) {
  return h < T(0) ? -T(0) : std::abs(h);
}

}  // namespace twolayer::cpu
