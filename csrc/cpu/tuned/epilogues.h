// GEMM epilogues (see gemm.h for the protocol). Each finishes a tile of sums
// where it lands: bias, ReLU with its sign-bit mask, the backward's ReLU mask,
// the loss and its gradient, the SGD update. Full tiles run loops of constant
// length, which the compiler vectorizes for the ISA of the including file.
// Included inside an ISA namespace (see gemm.h); includes nothing itself.

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
    if (nr == Tiles<T>::NR) rows<Tiles<T>::NR>(i0, j0, mr, nr, tile, first);
    else rows<0>(i0, j0, mr, nr, tile, first);
  }
  template <int kCols>
  void rows(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool first) {
    const int cols = kCols ? kCols : nr;
    for (int r = 0; r < mr; ++r) {
      T* o = out + (i0 + r) * ld + j0;
      const T* t = tile + r * Tiles<T>::NR;
      if (first) for (int c = 0; c < cols; ++c) o[c] = finish(i0 + r, j0 + c, t[c]);
      else for (int c = 0; c < cols; ++c) o[c] = finish(i0 + r, j0 + c, o[c] + t[c]);
    }
  }
};

template <typename T, typename Finish>
IntoOutput<T, Finish> into(T* out, int64_t ld, Finish f) {
  return {out, ld, f};
}

// out += sum (an accumulator across calls).
template <typename T>
struct Accumulate {
  T* out;
  int64_t ld;
  void partial(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool) {
    for (int r = 0; r < mr; ++r) {
      T* o = out + (i0 + r) * ld + j0;
      const T* t = tile + r * Tiles<T>::NR;
      for (int c = 0; c < nr; ++c) o[c] += t[c];
    }
  }
  void last(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool first) {
    partial(i0, j0, mr, nr, tile, first);
  }
};

template <typename T>
struct Store {
  T operator()(int64_t, int64_t, T s) const { return s; }
};

// act = relu(sum + b1) with the mask in the sign bit. The bias is a template
// flag, not a null test, so that no load in the loop is conditional (which
// would keep the compiler from vectorizing it).
template <typename T, bool kBias>
struct BiasRelu {
  const T* b;
  T operator()(int64_t, int64_t j, T s) const {
    if constexpr (kBias) s += b[j];
    return relu_with_sign_mask(s);
  }
};

template <typename T, bool kBias>
struct AddBias {
  const T* b;
  T operator()(int64_t, int64_t j, T s) const {
    if constexpr (kBias) s += b[j];
    return s;
  }
};

// grad_h = sum, zeroed where the forward's ReLU blocked (numpy: grad_h[h < 0] = 0).
template <typename T>
struct ReluMask {
  const T* act;
  int64_t ld;
  T operator()(int64_t i, int64_t j, T s) const {
    // signbit(act) written as copysign: the same test, but one the compiler vectorizes.
    return std::copysign(T(1), act[i * ld + j]) > T(0) ? s : T(0);
  }
};

// grad_y = scale2 * (y - t) with y = sum + b2, into the row-major grad; the
// squared errors of each row of each tile are summed into sq[i * tiles + j / NR]:
// every slot is written by one tile, in a fixed order, so the loss has the same
// bits for any thread count.
template <typename T, bool kBias>
struct LossGrad {
  T* grad;
  int64_t ld;
  const T* b2;
  View<T> target;
  T scale2;
  double* sq;
  int64_t tiles;

  void partial(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool first) {
    IntoOutput<T, Store<T>>{grad, ld, {}}.partial(i0, j0, mr, nr, tile, first);
  }
  void last(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool first) {
    constexpr int NR = Tiles<T>::NR;
    for (int r = 0; r < mr; ++r) {
      const int64_t i = i0 + r;
      T* g = grad + i * ld + j0;
      const T* t = target.p + i * target.rs + j0 * target.cs;
      double acc = 0.0;
      for (int c = 0; c < nr; ++c) {
        T s = first ? tile[r * NR + c] : g[c] + tile[r * NR + c];
        if constexpr (kBias) s += b2[j0 + c];
        const T d = s - t[c * target.cs];
        acc += double(d) * double(d);
        g[c] = scale2 * d;
      }
      sq[i * tiles + j0 / NR] = acc;
    }
  }
};

// w -= lr * sum, applied per K block (the update is linear in the sum).
template <typename T>
struct SgdUpdate {
  MutView<T> w;
  T lr;
  void partial(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool) {
    constexpr int NR = Tiles<T>::NR;
    if (w.cs == 1 && nr == NR) {  // contiguous rows, full tile: vectorized
      for (int r = 0; r < mr; ++r) {
        T* row = w.p + (i0 + r) * w.rs + j0;
        for (int c = 0; c < NR; ++c) row[c] -= lr * tile[r * NR + c];
      }
      return;
    }
    for (int r = 0; r < mr; ++r)
      for (int c = 0; c < nr; ++c) w(i0 + r, j0 + c) -= lr * tile[r * NR + c];
  }
  void last(int64_t i0, int64_t j0, int mr, int nr, const T* tile, bool first) {
    partial(i0, j0, mr, nr, tile, first);
  }
};
