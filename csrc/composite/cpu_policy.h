// The CPU policy of the composite step (step.h): its elementwise passes are loops on our
// threads (pool.h), for float32/float64 (the "blas" variants) and float16/bfloat16 (one path
// for every variant). Its GEMMs run one of two ways:
//   RowChunks  each GEMM's output rows cut into chunks fixed by the shape alone, each chunk
//              one BLAS call on one of our threads with the BLAS single-threaded: the same
//              bits for any thread count, and a descheduled thread never stalls a step at an
//              OpenMP barrier (the caller takes its chunks instead). The "blas" variant.
//   Whole      each GEMM one ATen call on the BLAS's own threads ("blas-mt"; and float16/
//              bfloat16, where ATen's GEMM is oneDNN's, with AVX512_BF16 / AMX where the CPU
//              has them, accumulating in float32).
// 16-bit storage computes in float32: a bias is added to the GEMM's float32 accumulator
// (h rounded once), the other passes read float32 and round once. float32/float64 add the
// bias in the pass after the GEMM.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../cpu/cpu_impl.h"
#include "../cpu/pool.h"
#include "../cpu/mkl_local.h"
#include "../cpu/tuning.h"
#include "../loss_value.h"
#include "step.h"

namespace twolayer::cpu {

namespace composite_detail {

// The BLAS on the calling thread alone while this lives: MKL's thread-local setting
// (mkl_local.h); elsewhere the BLAS follows OpenMP's thread-local nthreads setting.
class OneBlasThread {
 public:
  OneBlasThread() {
    if (mkl_set_local()) {
      int one = 1;
      previous_ = mkl_set_local()(&one);
    } else {
#ifdef _OPENMP
      previous_ = omp_get_max_threads();
      omp_set_num_threads(1);
#endif
    }
  }
  ~OneBlasThread() {
    if (mkl_set_local()) {
      mkl_set_local()(&previous_);
    } else {
#ifdef _OPENMP
      omp_set_num_threads(previous_);
#endif
    }
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_ = 0;
};

// out = alpha * a @ b (+ out with accumulate) by MKL's Fortran GEMM, called directly, row-major
// C computed as the column-major C^T = B^T A^T: the same BLAS kernel ATen's mm reaches, without
// its per-call tensor work (views, dispatch, checks; at the tutorial's size about a fifth of a
// step). Planned once per GEMM; `applies` is false where it cannot run (no MKL, 16-bit, a
// layout neither row- nor column-major, sizes over int), and the caller goes through ATen.
struct DirectGemm {
  bool applies = false;
  char op_a = 'N', op_b = 'N';
  int k = 0, n = 0, lda = 0, ldb = 0, ldc = 0;

  DirectGemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
    const auto st = out.scalar_type();
    if ((st != at::kFloat && st != at::kDouble) || a.scalar_type() != st || b.scalar_type() != st)
      return;
    if (st == at::kFloat ? !mkl_gemm<float>() : !mkl_gemm<double>()) return;
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    if (M <= 0 || K <= 0 || N <= 0 || out.stride(1) != 1 || out.stride(0) < N) return;
    // A row-major operand is its transpose in column-major terms ('N' there), a column-major
    // one ('T'); ld is the stride between its column-major columns.
    int64_t la, lb;
    if (!layout(a, M, K, op_a, la) || !layout(b, K, N, op_b, lb)) return;
    constexpr int64_t kMaxInt = 0x7fffffff;
    if (std::max({M, N, K, la, lb, out.stride(0)}) > kMaxInt) return;
    k = int(K), n = int(N), lda = int(la), ldb = int(lb), ldc = int(out.stride(0));
    applies = true;
  }

  // Rows [r0, r0 + rows) of out, in one call.
  template <typename T>
  void chunk(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha,
             bool accumulate, int64_t r0, int64_t rows) const {
    const int m = int(rows);
    const T al = T(alpha), be = accumulate ? T(1) : T(0);
    mkl_gemm<T>()(&op_b, &op_a, &n, &m, &k, &al, b.const_data_ptr<T>(), &ldb,
                  a.const_data_ptr<T>() + r0 * a.stride(0), &lda, &be,
                  out.data_ptr<T>() + r0 * out.stride(0), &ldc);
  }

 private:
  static bool layout(const at::Tensor& t, int64_t rows, int64_t cols, char& op, int64_t& ld) {
    if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(cols, 1))
      return op = 'N', ld = t.stride(0), true;
    if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(rows, 1))
      return op = 'T', ld = t.stride(1), true;
    return false;
  }
};

// out = alpha * a @ b, or with accumulate out += alpha * a @ b, in row chunks on our threads.
// The chunks depend on the shape only: at least tuning::kBlasChunkFlops each, at most
// tuning::kBlasMaxChunks, rows a multiple of 16.
inline void mm_rows(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha,
                    bool accumulate) {
  // A column-major out (a weight gradient in nn.Linear's layout) as the row-major out^T =
  // b^T a^T, which DirectGemm takes: otherwise each chunk goes through ATen.
  if (out.stride(0) == 1 && out.stride(1) != 1 && out.size(0) > 1 && out.size(1) > 1)
    return mm_rows(out.t(), b.t(), a.t(), alpha, accumulate);
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const double flops = 2.0 * double(M) * double(K) * double(N);
  const int64_t chunks =
      std::clamp<int64_t>(int64_t(flops / tuning::kBlasChunkFlops), 1, tuning::kBlasMaxChunks);
  const int64_t rows = std::max<int64_t>(16, ((M + chunks - 1) / chunks + 15) / 16 * 16);
  const DirectGemm direct(out, a, b);
  auto run = [&](int64_t i0, int64_t i1) {
    const OneBlasThread one;
    // One call per chunk of `rows`, whoever runs it: the bits do not depend on the threads.
    for (int64_t r0 = i0 * rows; r0 < std::min(M, i1 * rows); r0 += rows) {
      const int64_t n = std::min(rows, M - r0);
      if (direct.applies) {
        if (out.scalar_type() == at::kFloat)
          direct.chunk<float>(out, a, b, alpha, accumulate, r0, n);
        else
          direct.chunk<double>(out, a, b, alpha, accumulate, r0, n);
        continue;
      }
      at::Tensor o = out.narrow(0, r0, n);
      if (accumulate)
        o.addmm_(a.narrow(0, r0, n), b, 1.0, alpha);
      else if (alpha == 1.0)
        at::mm_out(o, a.narrow(0, r0, n), b);
      else
        at::addmm_out(o, o, a.narrow(0, r0, n), b, /*beta=*/0.0, alpha);
    }
  };
  parallel_for(0, (M + rows - 1) / rows, 1, run);
}

template <typename T>
constexpr bool kSixteenBit = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// The sign bit of both 16-bit formats. Their passes work on the bits: a conversion to float
// and back would keep a NaN's payload but is a rounding step the mask does not need.
constexpr uint16_t kSignBit16 = 0x8000;

template <typename T>
T from_bits(uint16_t b) {
  return T(b, T::from_bits());
}

// The ReLU with its mask in the sign bit (kernels.h), for each storage type.
template <typename T>
T relu_with_sign_mask_of(T v) {
  if constexpr (kSixteenBit<T>) {
    return from_bits<T>(static_cast<float>(v) < 0.0f ? kSignBit16 : uint16_t(v.x & ~kSignBit16));
  } else {
    return relu_with_sign_mask(v);
  }
}

// g, or 0 where the ReLU blocked: signbit(act).
template <typename T>
T masked(T g, T act) {
  if constexpr (kSixteenBit<T>) {
    const uint16_t keep = uint16_t((act.x >> 15) - 1);  // 0xffff, or 0 where the sign is set
    return from_bits<T>(uint16_t(g.x & keep));
  } else {  // signbit written as copysign: the same test, but one that vectorizes
    return std::copysign(T(1), act) > T(0) ? g : T(0);
  }
}

// float32, float64, float16, bfloat16.
#define TWOLAYER_CPU_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

}  // namespace composite_detail

// The sum of (p - t)^2 over n contiguous elements, each difference in T's arithmetic type
// (float for 16-bit storage), the sum in double over fixed chunks added pairwise: the same
// bits for any thread count, and O(log n) error growth for very large losses. When g is
// given (it may be p itself) also g = scale * (p - t), rounded once.
template <typename T>
double sum_squared_errors(const T* p, const T* t, T* g, at::opmath_type<T> scale, int64_t n) {
  using A = at::opmath_type<T>;
  constexpr int64_t kChunk = tuning::kLossChunk;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // Reused across calls. A pointer, not the thread_local itself, goes into the parallel
  // body: there the name would mean each worker thread's own (empty) vector.
  thread_local std::vector<double> buffer;
  buffer.assign(chunks, 0.0);
  double* partial = buffer.data();
  parallel_for(0, chunks, tuning::kElementwiseGrain / kChunk, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent chains, vectorizable
      int64_t i = begin;
      for (; i + 8 <= end; i += 8) {
        for (int l = 0; l < 8; ++l) {
          const A d = A(p[i + l]) - A(t[i + l]);
          if (g) g[i + l] = T(scale * d);
          lanes[l] += double(d) * double(d);
        }
      }
      for (; i < end; ++i) {
        const A d = A(p[i]) - A(t[i]);
        if (g) g[i] = T(scale * d);
        lanes[0] += double(d) * double(d);
      }
      partial[c] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                   ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
  });
  return pairwise_sum(partial, chunks);
}

enum class Gemms { RowChunks, Whole };

template <Gemms kGemms>
struct CompositePolicy {
  using Loss = double;  // the loss's value, in double
  static constexpr bool kUpdatesLast = false;

  static bool bias_in_gemm(const at::Tensor& t) { return defers_mean(t.scalar_type()); }

  static void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   const OptTensor& bias, double alpha, bool accumulate) {
    if constexpr (kGemms == Gemms::Whole) {
      composite::whole_gemm(out, a, b, bias, alpha, accumulate);
    } else {
      TORCH_INTERNAL_ASSERT(!bias, "row-chunked GEMMs take no bias");
      composite_detail::mm_rows(out, a, b, alpha, accumulate);
    }
  }

  // act (contiguous [rows, cols]) = relu(act + bias), the mask in the sign bit.
  static void bias_relu_(const at::Tensor& act, const OptTensor& bias) {
    using namespace composite_detail;
    TWOLAYER_CPU_DISPATCH(act.scalar_type(), "bias_relu_", [&] {
      using T = scalar_t;
      T* p = act.data_ptr<T>();
      if (!bias) {
        parallel_for(0, act.numel(), tuning::kElementwiseGrain, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) p[i] = relu_with_sign_mask_of(p[i]);
        });
      } else {
        TORCH_INTERNAL_ASSERT(!kSixteenBit<T>, "16-bit storage adds its bias in the GEMM");
        const int64_t rows = act.size(0), cols = act.size(1);
        std::vector<T> b(cols);
        const T* bp = bias->data_ptr<T>();
        for (int64_t j = 0; j < cols; ++j) b[j] = bp[j * bias->stride(0)];
        const T* bc = b.data();
        const int64_t chunk =
            std::max<int64_t>(1, tuning::kElementwiseGrain / std::max<int64_t>(cols, 1));
        parallel_for(0, rows, chunk, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            T* r = p + i * cols;
            for (int64_t j = 0; j < cols; ++j) r[j] = relu_with_sign_mask_of(T(r[j] + bc[j]));
          }
        });
      }
    });
  }

  // y (contiguous [rows, cols]) += bias, for float32/float64.
  static void add_bias_(const at::Tensor& y, const at::Tensor& bias) {
    AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "add_bias_", [&] {
      using T = scalar_t;
      add_bias(y.data_ptr<T>(), y.size(0), y.size(1),
               Bias<const T>{bias.data_ptr<T>(), bias.stride(0)});
    });
  }

  // grad_h = 0 where signbit(act), i.e. where the ReLU blocked (numpy's grad_h[h < 0] = 0,
  // -0.0 and NaN included). Both contiguous.
  static void relu_mask_(const at::Tensor& grad_h, const at::Tensor& act) {
    using namespace composite_detail;
    TWOLAYER_CPU_DISPATCH(act.scalar_type(), "relu_mask_", [&] {
      using T = scalar_t;
      T* g = grad_h.data_ptr<T>();
      const T* a = act.const_data_ptr<T>();
      parallel_for(0, act.numel(), tuning::kElementwiseGrain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) g[i] = masked(g[i], a[i]);
      });
    });
  }

  // pred, target contiguous; grad (contiguous, may be pred) = grad_scale * (pred - target).
  static Loss squared_error(const at::Tensor& pred, const at::Tensor& target, const OptTensor& grad,
                            double grad_scale, const L2Loss& l2) {
    double total = 0.0;
    TWOLAYER_CPU_DISPATCH(pred.scalar_type(), "squared_error", [&] {
      using T = scalar_t;
      total = sum_squared_errors<T>(pred.const_data_ptr<T>(), target.const_data_ptr<T>(),
                                    grad ? grad->data_ptr<T>() : nullptr,
                                    static_cast<at::opmath_type<T>>(grad_scale), pred.numel());
    });
    return l2.value(total);
  }

  static at::Tensor loss_tensor(Loss loss, const at::TensorOptions& opts) {
    return at::empty({}, opts).fill_(loss_value(loss, opts.dtype().toScalarType()));
  }

  // Column sums of g [rows, cols]: for float32/float64 in double, rows in order, rounded to
  // T; for 16-bit storage in float32 (an N-term sum could pass float16's 65504 even where the
  // mean-scaled gradient is small), left in float32 for the update or store to round once.
  static at::Tensor column_sums(const at::Tensor& g) {
    if (defers_mean(g.scalar_type())) return at::sum(g, 0, /*keepdim=*/false, at::kFloat);
    at::Tensor out = at::empty({g.size(1)}, g.options());
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "column_sums", [&] {
      using T = scalar_t;
      const int64_t rows = g.size(0), cols = g.size(1), rs = g.stride(0), cs = g.stride(1);
      const T* p = g.const_data_ptr<T>();
      std::vector<double> s(cols, 0.0);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) s[j] += double(p[i * rs + j * cs]);
      T* o = out.data_ptr<T>();
      for (int64_t j = 0; j < cols; ++j) o[j] = T(s[j]);
    });
    return out;
  }

  // bias += alpha * sums: in float32 arithmetic for 16-bit storage (ATen's add_, one rounding),
  // else in T.
  static void axpy_(const at::Tensor& bias, const at::Tensor& sums, double alpha) {
    if (defers_mean(bias.scalar_type())) {
      const_cast<at::Tensor&>(bias).add_(sums, alpha);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES(bias.scalar_type(), "axpy_", [&] {
      using T = scalar_t;
      T* b = bias.data_ptr<T>();
      const T* s = sums.const_data_ptr<T>();
      const T a = T(alpha);
      for (int64_t j = 0; j < bias.numel(); ++j) b[j * bias.stride(0)] += a * s[j];
    });
  }
};

#undef TWOLAYER_CPU_DISPATCH

}  // namespace twolayer::cpu
