// CPU op entry points: check the arguments, allocate the outputs, then hand
// raw strided views to the kernel variant the registry picks for the shape
// (variants.h). The L2 loss, one pass for every variant and dtype, lives here too.
// float16/bfloat16 go, after the checks, to the composite step with the CPU policy
// (composite/cpu_policy.h), one path for every variant.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>

#include <chrono>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../composite/cpu_policy.h"
#include "../composite/step.h"
#include "../kernels.h"
#include "../loss_value.h"
#include "cpu_impl.h"
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

// float16/bfloat16: ATen's GEMMs, each one call, and the CPU policy's passes.
using SixteenBit = CompositePolicy<Gemms::Whole>;

bool sixteen_bit(const at::Tensor& t) { return defers_mean(t.scalar_type()); }
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

// One fused step through the variant serving this problem: forward, loss, the gradients the
// sinks ask for (stored or applied); returns the loss.
template <typename T>
double run_step(const Dims& d, const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, bool mean,
                T* grad_x, T* grad_target, GradOut<T> gw1, GradOut<T> gw2, GradOut<T> gb1,
                GradOut<T> gb2) {
  const StepArgs<T> s{d,
                      view<T>(x),
                      view<T>(target),
                      view<T>(w1),
                      view<T>(w2),
                      bias<const T>(b1),
                      bias<const T>(b2),
                      mean,
                      grad_x,
                      grad_target,
                      gw1,
                      gw2,
                      gb1,
                      gb2};
  const tuner::Pick p = step_pick(d, c10::CppTypeToScalarType<T>::value);
  const auto step = variant_at(p.row).template kernels<T>().step;
  if (!p.trial) return step(s);
  const auto t0 = std::chrono::steady_clock::now();
  double total;
  try {
    total = step(s);
  } catch (...) {
    tuner::report_trial(p.key, d, p.row, -1);
    throw;
  }
  tuner::report_trial(
      p.key, d, p.row,
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  return total;
}

}  // namespace

template <typename T>
double squared_error_sum(const T* p, const T* t, T* g, T scale2, int64_t n) {
  return sum_squared_errors<T>(p, t, g, scale2, n);
}
template double squared_error_sum<float>(const float*, const float*, float*, float, int64_t);
template double squared_error_sum<double>(const double*, const double*, double*, double, int64_t);

std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                 const at::Tensor& w2, const OptTensor& b1,
                                                 const OptTensor& b2) {
  const Dims d = check_two_layer_args("two_layer", x, w1, w2, b1, b2);
  if (sixteen_bit(x)) return composite::two_layer_fwd<SixteenBit>(d, x, w1, w2, b1, b2);
  auto act = at::empty({d.N, d.H}, x.options());
  auto y = at::empty({d.N, d.D_out}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_layer_fwd", [&] {
    using T = scalar_t;
    const ForwardArgs<T> a{d,
                           view<T>(x),
                           view<T>(w1),
                           view<T>(w2),
                           bias<const T>(b1),
                           bias<const T>(b2),
                           act.data_ptr<T>(),
                           y.data_ptr<T>()};
    variant_for(d, c10::CppTypeToScalarType<T>::value).kernels<T>().forward(a);
  });
  return {y, act};
}

Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                     const at::Tensor& w2, const at::Tensor& act_in,
                     std::array<bool, 5> output_mask, std::array<bool, 2> grad_transposed) {
  const auto [need_x, need_w1, need_w2, need_b1, need_b2] = output_mask;
  const Dims d = check_two_layer_bwd_args(grad_y, x, w1, w2, act_in, need_x, need_w1);
  if (sixteen_bit(act_in))
    return composite::two_layer_bwd<SixteenBit>(d, grad_y, x, w1, w2, act_in, output_mask,
                                                grad_transposed);
  const auto act = act_in.expect_contiguous();  // two_layer_fwd's own act: no copy
  const auto opts = act->options();
  OptTensor grad_x, grad_w1, grad_w2, grad_b1, grad_b2;
  if (need_x) grad_x = at::empty({d.N, d.D_in}, opts);
  if (need_w1) grad_w1 = composite::new_grad({d.D_in, d.H}, opts, grad_transposed[0]);
  if (need_w2) grad_w2 = composite::new_grad({d.H, d.D_out}, opts, grad_transposed[1]);
  if (need_b1) grad_b1 = at::empty({d.H}, opts);
  if (need_b2) grad_b2 = at::empty({d.D_out}, opts);
  AT_DISPATCH_FLOATING_TYPES(act->scalar_type(), "two_layer_bwd", [&] {
    using T = scalar_t;
    const View<T> none{nullptr, 0, 0};
    const BackwardArgs<T> a{d,
                            view<T>(grad_y),
                            grad_w1 ? view<T>(*x) : none,
                            grad_x ? view<T>(*w1) : none,
                            view<T>(w2),
                            act->data_ptr<T>(),
                            ptr_or_null<T>(grad_x),
                            store_into<T>(grad_w1),
                            store_into<T>(grad_w2),
                            ptr_or_null<T>(grad_b1),
                            ptr_or_null<T>(grad_b2)};
    variant_for(d, c10::CppTypeToScalarType<T>::value).kernels<T>().backward(a);
  });
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
}

std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                              c10::string_view reduction, bool need_grad) {
  const Reduction r = check_l2_loss_args(pred, target, reduction);
  // One pass for every variant and dtype: only its GEMMs differ between the variants.
  return composite::l2_loss_fwd<SixteenBit>(pred, target, r, need_grad);
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
  if (sixteen_bit(x))
    return composite::two_layer_l2_loss_fwd<SixteenBit>(d, x, target, w1, w2, b1, b2, mean,
                                                        output_mask, grad_transposed);
  auto g = composite::new_loss_grads(d, x, w1, w2, b1, b2, output_mask, grad_transposed);
  auto loss = at::empty({}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_layer_l2_loss_fwd", [&] {
    using T = scalar_t;
    const double total = run_step<T>(d, x, target, w1, w2, b1, b2, mean, ptr_or_null<T>(g[0]),
                                     ptr_or_null<T>(g[1]), store_into<T>(g[2]), store_into<T>(g[3]),
                                     store_into<T>(g[4]), store_into<T>(g[5]));
    loss.fill_(loss_value(total, x.scalar_type()));
  });
  return {loss, g[0], g[1], g[2], g[3], g[4], g[5]};
}

at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                    const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, double lr,
                    c10::string_view reduction, std::array<bool, 4> update) {
  const Dims d = check_sgd_step_args(x, target, w1, w2, b1, b2, lr);
  const bool mean = parse_reduction("sgd_step", reduction) == Reduction::Mean;
  if (sixteen_bit(x))
    return composite::sgd_step<SixteenBit>(x, target, w1, w2, b1, b2, lr, mean, update);
  const auto [update_w1, update_w2, update_b1, update_b2] = update;
  auto loss = at::empty({}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sgd_step", [&] {
    using T = scalar_t;
    const double total = run_step<T>(
        d, x, target, w1, w2, b1, b2, mean, nullptr, nullptr,
        update_in_place<T>(w1, update_w1, T(lr)), update_in_place<T>(w2, update_w2, T(lr)),
        update_in_place<T>(b1, update_b1, T(lr)), update_in_place<T>(b2, update_b2, T(lr)));
    loss.fill_(loss_value(total, x.scalar_type()));
  });
  return loss;
}

}  // namespace twolayer::cpu
