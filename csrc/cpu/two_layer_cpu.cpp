// CPU op entry points: check the arguments, allocate the outputs, then hand
// raw strided views to the kernel variant the registry picks for the shape
// (variants.h). The L2 loss, one pass for every variant, lives here too.
// float16/bfloat16 go to lowp_cpu.cpp after the checks (one path for every variant).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../kernels.h"
#include "../loss_value.h"
#include "cpu_impl.h"
#include "lowp_cpu.h"
#include "pool.h"
#include "tuning.h"
#include "variants.h"

namespace twolayer::cpu {

namespace {

template <typename T>
View<T> view(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}
template <typename T>
Bias<T> bias(const OptTensor& b) {
  if (!b) return {nullptr, 0};
  return {b->data_ptr<std::remove_const_t<T>>(), b->stride(0)};
}
template <typename T>
T* ptr_or_null(OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}
// A gradient stored into a fresh tensor from new_grad: row-major, or row-major transposed.
template <typename T>
GradOut<T> store_into(OptTensor& g) {
  GradOut<T> o;
  o.store = ptr_or_null<T>(g);
  o.transposed = g && !g->is_contiguous();
  return o;
}

// A fresh gradient for the 2-D weight w: row-major, or the transpose of a row-major one.
at::Tensor new_grad(const at::Tensor& w, bool transposed) {
  if (transposed) return at::empty({w.size(1), w.size(0)}, w.options()).t();
  return at::empty(w.sizes(), w.options());
}
// w -= lr * grad in place, for a 2-D weight or a 1-D bias (one row); nothing when absent
// or not to be updated.
template <typename T>
GradOut<T> update_in_place(const OptTensor& w, bool update, T lr) {
  GradOut<T> o;
  if (!w || !update) return o;
  const at::Tensor& t = *w;
  o.update = t.dim() == 2 ? MutView<T>{t.data_ptr<T>(), t.stride(0), t.stride(1)}
                          : MutView<T>{t.data_ptr<T>(), 0, t.stride(0)};
  o.lr = lr;
  return o;
}

}  // namespace

template <typename T>
double squared_error_sum(const T* p, const T* t, T* g, T scale2, int64_t n) {
  // Fixed chunks, partial sums added pairwise in chunk order: the same bits for
  // any thread count, and O(log n) error growth for very large losses.
  constexpr int64_t kChunk = 4096;
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
          const T d = p[i + l] - t[i + l];
          if (g) g[i + l] = scale2 * d;
          lanes[l] += double(d) * double(d);
        }
      }
      for (; i < end; ++i) {
        const T d = p[i] - t[i];
        if (g) g[i] = scale2 * d;
        lanes[0] += double(d) * double(d);
      }
      partial[c] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                   ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
  });
  return pairwise_sum(partial, chunks);
}
template double squared_error_sum<float>(const float*, const float*, float*, float, int64_t);
template double squared_error_sum<double>(const double*, const double*, double*, double, int64_t);

std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                 const at::Tensor& w2, const OptTensor& b1,
                                                 const OptTensor& b2) {
  const Dims d = check_two_layer_args("two_layer", x, w1, w2, b1, b2);
  if (lowp::handles(x)) return lowp::two_layer_fwd(d, x, w1, w2, b1, b2);
  auto act = at::empty({d.N, d.H}, x.options());
  auto y = at::empty({d.N, d.D_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_layer_fwd", [&] {
    using T = scalar_t;
    const ForwardArgs<T> a{d, view<T>(x), view<T>(w1), view<T>(w2), bias<const T>(b1),
                           bias<const T>(b2), act.data_ptr<T>(), y.data_ptr<T>()};
    variant_for(d, c10::CppTypeToScalarType<T>::value).kernels<T>().forward(a);
  });
  return {y, act};
}

Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                     const at::Tensor& w2, const at::Tensor& act_in, std::array<bool, 5> output_mask) {
  const auto [need_x, need_w1, need_w2, need_b1, need_b2] = output_mask;
  const Dims d = check_two_layer_bwd_args(grad_y, x, w1, w2, act_in, need_x, need_w1);
  if (lowp::handles(act_in)) return lowp::two_layer_bwd(grad_y, x, w1, w2, act_in, output_mask);
  const auto act = act_in.expect_contiguous();  // two_layer_fwd's own act: no copy
  const auto opts = act->options();
  OptTensor grad_x, grad_w1, grad_w2, grad_b1, grad_b2;
  if (need_x) grad_x = at::empty({d.N, d.D_in}, opts);
  if (need_w1) grad_w1 = at::empty({d.D_in, d.H}, opts);
  if (need_w2) grad_w2 = at::empty({d.H, d.D_out}, opts);
  if (need_b1) grad_b1 = at::empty({d.H}, opts);
  if (need_b2) grad_b2 = at::empty({d.D_out}, opts);
  AT_DISPATCH_FLOATING_TYPES(act->scalar_type(), "two_layer_bwd", [&] {
    using T = scalar_t;
    const View<T> none{nullptr, 0, 0};
    const BackwardArgs<T> a{d, view<T>(grad_y), grad_w1 ? view<T>(*x) : none,
                            grad_x ? view<T>(*w1) : none, view<T>(w2), act->data_ptr<T>(),
                            ptr_or_null<T>(grad_x), ptr_or_null<T>(grad_w1), ptr_or_null<T>(grad_w2),
                            ptr_or_null<T>(grad_b1), ptr_or_null<T>(grad_b2)};
    variant_for(d, c10::CppTypeToScalarType<T>::value).kernels<T>().backward(a);
  });
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
}

std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                              c10::string_view reduction, bool need_grad) {
  const Reduction r = check_l2_loss_args(pred, target, reduction);
  if (lowp::handles(pred)) return lowp::l2_loss_fwd(pred, target, r, need_grad);
  // Non-contiguous inputs are read through a contiguous copy (made only then).
  const auto p = pred.expect_contiguous();
  const auto t = target.expect_contiguous();
  const int64_t n = pred.numel();
  auto loss = at::empty({}, pred.options());
  OptTensor grad;
  if (need_grad) grad = at::empty(pred.sizes(), pred.options());
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "l2_loss_fwd", [&] {
    // mean of an empty tensor is NaN, as in numpy and nn.MSELoss.
    const double scale = r == Reduction::Mean ? 1.0 / double(n) : 1.0;
    const double total = squared_error_sum<scalar_t>(
        p->data_ptr<scalar_t>(), t->data_ptr<scalar_t>(),
        need_grad ? grad->data_ptr<scalar_t>() : nullptr, scalar_t(2.0 * scale), n);
    loss.fill_(loss_value(r == Reduction::Mean ? total / double(n) : total, pred.scalar_type()));
  });
  return {loss, grad};
}

at::Tensor l2_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_l2_loss_bwd_args(grad_loss, grad);
  return at::mul(grad, grad_loss.reshape({}));
}

FusedLossGrads two_layer_l2_loss_fwd(const at::Tensor& x, const at::Tensor& target,
                                     const at::Tensor& w1, const at::Tensor& w2,
                                     const OptTensor& b1, const OptTensor& b2,
                                     c10::string_view reduction, std::array<bool, 6> output_mask,
                                     std::array<bool, 2> grad_transposed) {
  const Dims d = check_two_layer_l2_loss_args(x, target, w1, w2, b1, b2);
  const bool mean = parse_reduction("two_layer_l2_loss", reduction) == Reduction::Mean;
  if (lowp::handles(x))
    return lowp::two_layer_l2_loss_fwd(d, x, target, w1, w2, b1, b2, mean, output_mask,
                                       grad_transposed);
  const auto [need_x, need_target, need_w1, need_w2, need_b1, need_b2] = output_mask;
  const auto opts = x.options();
  auto loss = at::empty({}, opts);
  OptTensor grad_x, grad_target, grad_w1, grad_w2, grad_b1, grad_b2;
  if (need_x) grad_x = at::empty({d.N, d.D_in}, opts);
  if (need_target) grad_target = at::empty({d.N, d.D_out}, opts);
  if (need_w1) grad_w1 = new_grad(w1, grad_transposed[0]);
  if (need_w2) grad_w2 = new_grad(w2, grad_transposed[1]);
  if (need_b1 && b1) grad_b1 = at::empty({d.H}, opts);
  if (need_b2 && b2) grad_b2 = at::empty({d.D_out}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_layer_l2_loss_fwd", [&] {
    using T = scalar_t;
    const StepArgs<T> s{d, view<T>(x), view<T>(target), view<T>(w1), view<T>(w2),
                        bias<const T>(b1), bias<const T>(b2), mean,
                        ptr_or_null<T>(grad_x), ptr_or_null<T>(grad_target),
                        store_into<T>(grad_w1), store_into<T>(grad_w2), store_into<T>(grad_b1),
                        store_into<T>(grad_b2)};
    loss.fill_(loss_value(variant_for(d, c10::CppTypeToScalarType<T>::value).kernels<T>().step(s),
                          x.scalar_type()));
  });
  return {loss, grad_x, grad_target, grad_w1, grad_w2, grad_b1, grad_b2};
}

at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                    const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, double lr,
                    c10::string_view reduction, std::array<bool, 4> update) {
  const Dims d = check_sgd_step_args(x, target, w1, w2, b1, b2, lr);
  const bool mean = parse_reduction("sgd_step", reduction) == Reduction::Mean;
  if (lowp::handles(x)) return lowp::sgd_step(d, x, target, w1, w2, b1, b2, lr, mean, update);
  const auto [update_w1, update_w2, update_b1, update_b2] = update;
  const PoolScope pool;  // the whole step in one call: our pool (pool.h)
  auto loss = at::empty({}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sgd_step", [&] {
    using T = scalar_t;
    const StepArgs<T> s{d, view<T>(x), view<T>(target), view<T>(w1), view<T>(w2),
                        bias<const T>(b1), bias<const T>(b2), mean, nullptr, nullptr,
                        update_in_place<T>(w1, update_w1, T(lr)),
                        update_in_place<T>(w2, update_w2, T(lr)),
                        update_in_place<T>(b1, update_b1, T(lr)),
                        update_in_place<T>(b2, update_b2, T(lr))};
    loss.fill_(loss_value(variant_for(d, c10::CppTypeToScalarType<T>::value).kernels<T>().step(s),
                          x.scalar_type()));
  });
  return loss;
}

}  // namespace twolayer::cpu
