// GEMM epilogues for the tuned kernels (see gemm.h for the protocol). Each one
// finishes a tile of sums where it lands: bias, ReLU with its sign-bit mask,
// the backward's ReLU mask, the loss and its gradient, the SGD update.
#pragma once

#include <cmath>

#include "cpu_impl.h"

namespace twolayer::cpu::epilogue {

// Partial sums accumulate in the row-major output; the last K block writes
// finish(i, j, sum) there.
template <typename T, typename Finish>
struct IntoOutput {
  T* out;
  int64_t ld;
  Finish finish;

  void partial(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool first) {
    constexpr int NR = Tiles<T>::NR;
    for (int r = 0; r < mr; ++r) {
      T* o = out + (i0 + r) * ld + j0;
      const T* t = tile + r * NR;
      if (first) for (int c = 0; c < nr; ++c) o[c] = t[c];
      else for (int c = 0; c < nr; ++c) o[c] += t[c];
    }
  }
  void last(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool first) {
    constexpr int NR = Tiles<T>::NR;
    for (int r = 0; r < mr; ++r) {
      T* o = out + (i0 + r) * ld + j0;
      const T* t = tile + r * NR;
      for (int c = 0; c < nr; ++c) o[c] = finish(i0 + r, j0 + c, first ? t[c] : o[c] + t[c]);
    }
  }
};

template <typename T, typename Finish>
IntoOutput<T, Finish> into(T* out, int64_t ld, Finish f) {
  return {out, ld, f};
}

template <typename T>
auto store() {
  return [](int64_t, int64_t, T s) { return s; };
}

// h = sum + b1; act = h < 0 ? -0.0 : |h|.
template <typename T>
auto bias_relu(Bias<const T> b) {
  return [b](int64_t, int64_t j, T s) { return relu_with_sign_mask(b ? s + b[j] : s); };
}

template <typename T>
auto bias(Bias<const T> b) {
  return [b](int64_t, int64_t j, T s) { return b ? s + b[j] : s; };
}

// grad_h = sum, zeroed where the forward's ReLU blocked (numpy: grad_h[h < 0] = 0).
template <typename T>
auto relu_mask(const T* act, int64_t ld) {
  return [act, ld](int64_t i, int64_t j, T s) { return std::signbit(act[i * ld + j]) ? T(0) : s; };
}

// grad_y = scale2 * (y - t) with y = sum + b2; (y - t)^2 summed per row and per
// column tile into sq[i * tiles + j / NR] (each slot written by one tile only,
// in a fixed order: the loss is the same for any thread count).
template <typename T>
struct LossGrad {
  Bias<const T> b2;
  View<T> target;
  T scale2;
  double* sq;
  int64_t tiles;
  T operator()(int64_t i, int64_t j, T s) const {
    const T d = (b2 ? s + b2[j] : s) - target.p[i * target.rs + j * target.cs];
    sq[i * tiles + j / Tiles<T>::NR] += double(d) * double(d);
    return scale2 * d;
  }
};

// w -= lr * sum, applied per K block (the update is linear in the sum).
template <typename T>
struct SgdUpdate {
  MutView<T> w;
  T lr;
  void partial(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool) {
    constexpr int NR = Tiles<T>::NR;
    for (int r = 0; r < mr; ++r)
      for (int c = 0; c < nr; ++c) w(i0 + r, j0 + c) -= lr * tile[r * NR + c];
  }
  void last(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool first) {
    partial(i0, j0, mr, nr, tile, first);
  }
};

}  // namespace twolayer::cpu::epilogue
