// The "blas" and "blas-mt" CPU variants: the composite step (composite/step.h) with the CPU
// policy (composite/cpu_policy.h), every GEMM through ATen (MKL, or whatever BLAS torch
// links). Where the platform BLAS beats our GEMM this is the faster route; "auto" measures
// which (tuner.cpp).
//
// "blas" runs each GEMM in row chunks on our threads (pool.h), the BLAS single-threaded
// (Gemms::RowChunks). "blas-mt" runs each as one BLAS call on the BLAS's own (OpenMP)
// threads: the BLAS's own partitioning can beat row chunks (it shares its packed panels
// between threads, and splits the summed dimension where the rows are few: MKL on an Intel
// Xeon, the tutorial's size, 2 threads, 147-161 against 204-233 us a step), but its bits may
// depend on the thread count. auto measures it beside the others, at every size; while a core
// is busy ATen's GEMMs run on the calling thread alone (busy_core.h), so no barrier waits for
// a descheduled thread.
#include <ATen/ops/from_blob.h>

#include <algorithm>

#include "../composite/cpu_policy.h"
#include "../composite/step.h"
#include "busy_core.h"
#include "cpu_impl.h"
#include "tuner.h"
#include "variants.h"

namespace twolayer::cpu {

namespace {

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
at::Tensor row_major_tensor(const T* p, int64_t rows, int64_t cols) {
  return as_tensor(p, rows, cols, cols, 1);
}
template <typename T>
OptTensor maybe_row_major(T* p, int64_t rows, int64_t cols) {
  return p ? OptTensor(row_major_tensor(p, rows, cols)) : std::nullopt;
}
template <typename T>
OptTensor vector_tensor(const T* p, int64_t n, int64_t stride) {
  if (!p) return std::nullopt;
  return at::from_blob(const_cast<T*>(p), {n}, {stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Where `out` sends the gradient of a [rows, cols] matrix, as the composite's sink.
template <typename T>
composite::Sink matrix_sink(const GradOut<T>& out, int64_t rows, int64_t cols) {
  composite::Sink k;
  if (out.store)
    k.store = out.transposed ? row_major_tensor<T>(out.store, cols, rows).t()
                             : row_major_tensor<T>(out.store, rows, cols);
  else if (out.update.p)
    k.weight = as_tensor(out.update.view(), rows, cols);
  return k;
}

// Where `out` sends the gradient of a bias of n elements (its update view: one row, cs = its
// stride).
template <typename T>
composite::Sink bias_sink(const GradOut<T>& out, int64_t n) {
  composite::Sink k;
  if (out.store)
    k.store = *vector_tensor<T>(out.store, n, 1);
  else if (out.update.p)
    k.weight = *vector_tensor<T>(out.update.p, n, out.update.cs);
  return k;
}

// blas-mt's calls: the BLAS's barriers wait for a thread that lost its core out of our
// sight. So a call whose thread spent a millisecond off its core, or that took a millisecond
// longer than auto measured a whole step of its problem take, is a busy-core sign
// (busy_core.h); and while a core is busy ATen's GEMMs from here run on this thread alone.
// The blas variant's regions are ours, and watched already.
template <Gemms kGemms, typename T>
class WatchLateCall {
 public:
  explicit WatchLateCall(const Dims& d) : d_(d) {
    if constexpr (kGemms == Gemms::Whole) {
      busy_core::adapt();
      wall_ns_ = busy_core::now_ns(), cpu_ns_ = busy_core::thread_cpu_ns();
    }
  }
  ~WatchLateCall() {
    if constexpr (kGemms == Gemms::Whole) {
      try {  // a watch never fails the call it watched
        static const int row = variant_row("blas-mt");
        const int64_t wall = busy_core::now_ns() - wall_ns_;
        const int64_t off_core = wall - (busy_core::thread_cpu_ns() - cpu_ns_);
        const double us = tuner::measured_step_us(d_, c10::CppTypeToScalarType<T>::value, row);
        const int64_t over = us > 0 ? wall - int64_t(us * 1e3) : 0;
        busy_core::note_late_call(std::max(off_core, over));
      } catch (...) {}
    }
  }
  WatchLateCall(const WatchLateCall&) = delete;
  WatchLateCall& operator=(const WatchLateCall&) = delete;

 private:
  Dims d_;
  int64_t wall_ns_ = 0, cpu_ns_ = 0;
};

template <Gemms kGemms, typename T>
void forward(const ForwardArgs<T>& a) {
  const WatchLateCall<kGemms, T> watch(a.d);
  const Dims d = a.d;
  composite::forward<CompositePolicy<kGemms>>(
      as_tensor(a.x, d.N, d.D_in), as_tensor(a.w1, d.D_in, d.H), as_tensor(a.w2, d.H, d.D_out),
      vector_tensor(a.b1.p, d.H, a.b1.stride), vector_tensor(a.b2.p, d.D_out, a.b2.stride),
      row_major_tensor<T>(a.act, d.N, d.H), row_major_tensor<T>(a.y, d.N, d.D_out));
}

template <Gemms kGemms, typename T>
void backward(const BackwardArgs<T>& a) {
  const WatchLateCall<kGemms, T> watch(a.d);
  const Dims d = a.d;
  auto stored = [](const GradOut<T>& out, int64_t rows, int64_t cols) {
    return out.store ? OptTensor(matrix_sink(out, rows, cols).store) : std::nullopt;
  };
  const composite::Grads g{maybe_row_major(a.grad_x, d.N, d.D_in), stored(a.gw1, d.D_in, d.H),
                           stored(a.gw2, d.H, d.D_out), vector_tensor<T>(a.grad_b1, d.H, 1),
                           vector_tensor<T>(a.grad_b2, d.D_out, 1)};
  const OptTensor x = a.gw1.store ? OptTensor(as_tensor(a.x, d.N, d.D_in)) : std::nullopt;
  const OptTensor w1 = a.grad_x ? OptTensor(as_tensor(a.w1, d.D_in, d.H)) : std::nullopt;
  composite::backward<CompositePolicy<kGemms>>(as_tensor(a.grad_y, d.N, d.D_out), x, w1,
                                               as_tensor(a.w2, d.H, d.D_out),
                                               row_major_tensor<T>(a.act, d.N, d.H), g);
}

template <Gemms kGemms, typename T>
double step(const StepArgs<T>& s) {
  const WatchLateCall<kGemms, T> watch(s.d);
  const Dims d = s.d;
  composite::StepOutputs o;
  o.mean = s.mean;
  for (const GradOut<T>* g : {&s.gw1, &s.gw2, &s.gb1, &s.gb2})
    if (g->update.p) o.lr = double(g->lr);
  o.grad_x = maybe_row_major(s.grad_x, d.N, d.D_in);
  o.grad_target = maybe_row_major(s.grad_target, d.N, d.D_out);
  o.sinks = {matrix_sink(s.gw1, d.D_in, d.H), matrix_sink(s.gw2, d.H, d.D_out),
             bias_sink(s.gb1, d.H), bias_sink(s.gb2, d.D_out)};
  return composite::step<CompositePolicy<kGemms>>(
      as_tensor(s.x, d.N, d.D_in), as_tensor(s.target, d.N, d.D_out), as_tensor(s.w1, d.D_in, d.H),
      as_tensor(s.w2, d.H, d.D_out), vector_tensor(s.b1.p, d.H, s.b1.stride),
      vector_tensor(s.b2.p, d.D_out, s.b2.stride), o);
}

}  // namespace

#define TWOLAYER_COMPOSITE_VARIANT(ns, gemms) \
  namespace ns {                              \
  template <typename T>                       \
  void forward(const ForwardArgs<T>& a) {     \
    cpu::forward<gemms>(a);                   \
  }                                           \
  template <typename T>                       \
  void backward(const BackwardArgs<T>& a) {   \
    cpu::backward<gemms>(a);                  \
  }                                           \
  template <typename T>                       \
  double step(const StepArgs<T>& s) {         \
    return cpu::step<gemms>(s);               \
  }                                           \
  TWOLAYER_INSTANTIATE_VARIANT                \
  }

TWOLAYER_COMPOSITE_VARIANT(blas, Gemms::RowChunks)
TWOLAYER_COMPOSITE_VARIANT(blas_mt, Gemms::Whole)

#undef TWOLAYER_COMPOSITE_VARIANT

}  // namespace twolayer::cpu
