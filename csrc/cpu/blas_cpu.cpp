// The "blas" CPU variant: every GEMM through ATen (MKL, or whatever BLAS torch
// links), our fused elementwise work in vectorizable passes between them. Where the
// platform BLAS beats our GEMM this is the faster route; "auto" measures which
// (tuner.cpp).
//
// Each GEMM runs on our threads (pool.h), not the BLAS's own: its output rows are cut into
// chunks fixed by the shape alone, and each chunk is one BLAS call on one thread. So the
// results are the same bits for any thread count, and a descheduled thread never stalls a
// step at an OpenMP barrier (the caller takes its chunks instead).
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <dlfcn.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_impl.h"
#include "pool.h"
#include "tuning.h"

namespace twolayer::cpu::blas {

namespace {

// The BLAS on the calling thread alone while this lives. MKL (torch's x86-64 builds export
// it) has a thread-local setting, mkl_set_num_threads_local (Fortran ABI: an int*; it
// returns the previous value, 0 = none); elsewhere the BLAS follows OpenMP's thread-local
// nthreads setting.
class OneBlasThread {
 public:
  OneBlasThread() {
    if (mkl_local()) {
      int one = 1;
      previous_ = mkl_local()(&one);
    } else {
#ifdef _OPENMP
      previous_ = omp_get_max_threads();
      omp_set_num_threads(1);
#endif
    }
  }
  ~OneBlasThread() {
    if (mkl_local()) {
      mkl_local()(&previous_);
    } else {
#ifdef _OPENMP
      omp_set_num_threads(previous_);
#endif
    }
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  using SetLocal = int (*)(int*);
  static SetLocal mkl_local() {
    static const SetLocal f =
        reinterpret_cast<SetLocal>(dlsym(RTLD_DEFAULT, "mkl_set_num_threads_local"));
    return f;
  }
  int previous_ = 0;
};

// Set while a "blas-mt" kernel runs: its GEMMs are single BLAS calls on the BLAS's own threads.
thread_local bool blas_own_threads = false;

// out[M, N] = a @ b, or with accumulate out += alpha * a @ b, in row chunks on our threads.
// The chunks depend on the shape only: at least tuning::kBlasChunkFlops each, at most
// tuning::kBlasMaxChunks, rows a multiple of 16.
void mm_rows(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false,
             double alpha = 1.0) {
  if (blas_own_threads) {
    if (accumulate) out.addmm_(a, b, 1.0, alpha);
    else at::mm_out(out, a, b);
    return;
  }
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const double flops = 2.0 * double(M) * double(K) * double(N);
  const int64_t chunks = std::clamp<int64_t>(int64_t(flops / tuning::kBlasChunkFlops), 1,
                                             tuning::kBlasMaxChunks);
  const int64_t rows = std::max<int64_t>(16, ((M + chunks - 1) / chunks + 15) / 16 * 16);
  auto run = [&](int64_t i0, int64_t i1) {
    const OneBlasThread one;
    for (int64_t r0 = i0 * rows; r0 < std::min(M, i1 * rows); r0 += rows) {
      const int64_t n = std::min(rows, M - r0);
      at::Tensor o = out.narrow(0, r0, n);
      if (accumulate) o.addmm_(a.narrow(0, r0, n), b, 1.0, alpha);
      else at::mm_out(o, a.narrow(0, r0, n), b);
    }
  };
  parallel_for(0, (M + rows - 1) / rows, 1, run);
}

// A strided [rows, cols] view of our memory as a tensor (no copy, no ownership).
template <typename T>
at::Tensor as_tensor(const T* p, int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {rs, cs},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}
template <typename T>
at::Tensor as_tensor(View<T> v, int64_t rows, int64_t cols) {
  return as_tensor(v.p, rows, cols, v.rs, v.cs);
}
template <typename T>
at::Tensor as_tensor(const MutView<T>& v, int64_t rows, int64_t cols) {
  return as_tensor<T>(v.p, rows, cols, v.rs, v.cs);
}
template <typename T>
at::Tensor row_major_tensor(const T* p, int64_t rows, int64_t cols) {
  return as_tensor(p, rows, cols, cols, 1);
}

// f(i0, i1) over rows [0, rows) in fixed chunks of about kElementwiseGrain elements.
template <typename F>
void for_row_chunks(int64_t rows, int64_t cols, F f) {
  const int64_t chunk = std::max<int64_t>(1, tuning::kElementwiseGrain / std::max<int64_t>(cols, 1));
  parallel_for(0, rows, chunk, f);
}

// act = relu(act + b1) with the mask in the sign bit, in place.
template <typename T>
void bias_relu(T* act, int64_t rows, int64_t cols, Bias<const T> b) {
  std::vector<T> bias(cols, T(0));
  if (b) for (int64_t j = 0; j < cols; ++j) bias[j] = b[j];
  const T* bp = bias.data();
  for_row_chunks(rows, cols, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* r = act + i * cols;
      for (int64_t j = 0; j < cols; ++j) r[j] = relu_with_sign_mask(r[j] + bp[j]);
    }
  });
}

// grad_h zeroed where the forward's ReLU blocked (numpy: grad_h[h < 0] = 0), in place.
template <typename T>
void relu_mask(T* grad_h, const T* act, int64_t n) {
  parallel_for(0, n, tuning::kElementwiseGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      grad_h[i] = std::copysign(T(1), act[i]) > T(0) ? grad_h[i] : T(0);
  });
}

// y [rows, cols] row-major -> grad_y = scale2 * (y - target) in place; returns the sum of
// squared errors in double, over fixed row chunks added pairwise (thread-count independent).
template <typename T>
double loss_and_grad(T* y, View<T> target, int64_t rows, int64_t cols, T scale2) {
  constexpr int64_t kRows = 256;
  const int64_t chunks = (rows + kRows - 1) / kRows;
  std::vector<double> partial(std::max<int64_t>(chunks, 1), 0.0);
  parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double acc = 0.0;
      for (int64_t i = c * kRows; i < std::min(rows, (c + 1) * kRows); ++i) {
        T* g = y + i * cols;
        const T* t = target.p + i * target.rs;
        for (int64_t j = 0; j < cols; ++j) {
          const T d = g[j] - t[j * target.cs];
          acc += double(d) * double(d);
          g[j] = scale2 * d;
        }
      }
      partial[c] = acc;
    }
  });
  return pairwise_sum(partial.data(), chunks);
}

// Column sums of a row-major [rows, cols] matrix in double, rows in order.
template <typename T>
std::vector<T> column_sums(const T* g, int64_t rows, int64_t cols) {
  std::vector<double> s(cols, 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) s[j] += double(g[i * cols + j]);
  return std::vector<T>(s.begin(), s.end());
}

// C = A @ B delivered where `out` says: into a fresh row-major gradient, or w -= lr * C
// by the BLAS itself (addmm with beta 1, alpha -lr, on the weight in place).
void gradient_gemm_to(const at::Tensor& a, const at::Tensor& b, const at::Tensor& store,
                      const at::Tensor& weight, double lr) {
  if (store.defined()) mm_rows(store, a, b);
  else if (weight.defined()) mm_rows(weight, a, b, /*accumulate=*/true, -lr);
}

template <typename T>
void deliver_gemm(const GradOut<T>& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t rows = a.size(0), cols = b.size(1);
  const at::Tensor store = !out.store        ? at::Tensor()
                           : out.transposed ? row_major_tensor<T>(out.store, cols, rows).t()
                                            : row_major_tensor<T>(out.store, rows, cols);
  gradient_gemm_to(a, b, store,
                   out.update.p ? as_tensor(out.update, rows, cols) : at::Tensor(), double(out.lr));
}

}  // namespace

template <typename T>
void forward(const ForwardArgs<T>& a) {
  const Dims d = a.d;
  at::Tensor act = row_major_tensor<T>(a.act, d.N, d.H);
  mm_rows(act, as_tensor(a.x, d.N, d.D_in), as_tensor(a.w1, d.D_in, d.H));
  bias_relu(a.act, d.N, d.H, a.b1);
  mm_rows(row_major_tensor<T>(a.y, d.N, d.D_out), act, as_tensor(a.w2, d.H, d.D_out));
  add_bias(a.y, d.N, d.D_out, a.b2);
}

template <typename T>
void backward(const BackwardArgs<T>& a) {
  const Dims d = a.d;
  const at::Tensor act = row_major_tensor<T>(a.act, d.N, d.H);
  const at::Tensor gy = as_tensor(a.grad_y, d.N, d.D_out);
  if (a.grad_w2) mm_rows(row_major_tensor<T>(a.grad_w2, d.H, d.D_out), act.t(), gy);
  if (a.grad_b2)
    for (int64_t j = 0; j < d.D_out; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < d.N; ++i) s += double(a.grad_y.p[i * a.grad_y.rs + j * a.grad_y.cs]);
      a.grad_b2[j] = T(s);
    }
  if (!a.grad_x && !a.grad_w1 && !a.grad_b1) return;
  at::Tensor gh = at::empty({d.N, d.H}, act.options());
  mm_rows(gh, gy, as_tensor(a.w2, d.H, d.D_out).t());
  relu_mask(gh.data_ptr<T>(), a.act, d.N * d.H);
  if (a.grad_w1) mm_rows(row_major_tensor<T>(a.grad_w1, d.D_in, d.H), as_tensor(a.x, d.N, d.D_in).t(), gh);
  if (a.grad_b1) {
    const auto s = column_sums(gh.data_ptr<T>(), d.N, d.H);
    std::copy(s.begin(), s.end(), a.grad_b1);
  }
  if (a.grad_x) mm_rows(row_major_tensor<T>(a.grad_x, d.N, d.D_in), gh, as_tensor(a.w1, d.D_in, d.H).t());
}

template <typename T>
double step(const StepArgs<T>& s) {
  const Dims d = s.d;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor act = at::empty({d.N, d.H}, opts), gy = at::empty({d.N, d.D_out}, opts);
  const at::Tensor x = as_tensor(s.x, d.N, d.D_in), w1 = as_tensor(s.w1, d.D_in, d.H);
  const at::Tensor w2 = as_tensor(s.w2, d.H, d.D_out);
  mm_rows(act, x, w1);
  bias_relu(act.data_ptr<T>(), d.N, d.H, s.b1);
  mm_rows(gy, act, w2);  // y, turned into grad_y in place
  add_bias(gy.data_ptr<T>(), d.N, d.D_out, s.b2);
  const double n = double(d.N * d.D_out);
  const double total =
      loss_and_grad(gy.data_ptr<T>(), s.target, d.N, d.D_out, T(s.mean ? 2.0 / n : 2.0));
  T* g = gy.data_ptr<T>();
  if (s.grad_target)
    for (int64_t i = 0; i < d.N * d.D_out; ++i) s.grad_target[i] = -g[i];
  at::Tensor gh;
  if (s.wants_hidden_grad()) {  // at the old w2, before any update
    gh = at::empty({d.N, d.H}, opts);
    mm_rows(gh, gy, w2.t());
    relu_mask(gh.data_ptr<T>(), act.data_ptr<T>(), d.N * d.H);
  }
  if (s.grad_x) mm_rows(row_major_tensor<T>(s.grad_x, d.N, d.D_in), gh, w1.t());
  deliver_gemm(s.gw2, act.t(), gy);
  if (s.gw1.wanted()) deliver_gemm(s.gw1, x.t(), gh);
  if (s.gb2.wanted()) {
    const auto b = column_sums(g, d.N, d.D_out);
    deliver(s.gb2, b.data(), 1, d.D_out);
  }
  if (s.gb1.wanted()) {
    const auto b = column_sums(gh.data_ptr<T>(), d.N, d.H);
    deliver(s.gb1, b.data(), 1, d.H);
  }
  return s.mean ? total / n : total;
}

TWOLAYER_INSTANTIATE_VARIANT

}  // namespace twolayer::cpu::blas

// "blas-mt": the same, but each GEMM one BLAS call on the BLAS's own (OpenMP) threads. Where
// GEMMs are large, the BLAS's own partitioning beats row chunks (it shares its packed panels
// between threads); but its barriers wait for a descheduled thread, and its bits may depend
// on the thread count. auto offers it only for large steps (tuning::kBlasOwnThreadsMinFlops).
namespace twolayer::cpu::blas_mt {

namespace {
struct OwnThreads {
  OwnThreads() { blas::blas_own_threads = true; }
  ~OwnThreads() { blas::blas_own_threads = false; }
};
}  // namespace

template <typename T>
void forward(const ForwardArgs<T>& a) {
  const OwnThreads own;
  blas::forward(a);
}
template <typename T>
void backward(const BackwardArgs<T>& a) {
  const OwnThreads own;
  blas::backward(a);
}
template <typename T>
double step(const StepArgs<T>& s) {
  const OwnThreads own;
  return blas::step(s);
}

TWOLAYER_INSTANTIATE_VARIANT

}  // namespace twolayer::cpu::blas_mt
