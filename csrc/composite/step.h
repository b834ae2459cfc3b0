// "ATen GEMMs plus our elementwise passes": the forward, backward and fused step (L2 loss,
// gradients, frozen weights, the mean's scaling, stored gradients or an SGD update) written
// once, for any device. A policy P says how each piece runs:
//   P::gemm(out, a, b, bias, alpha, accumulate)  out = alpha * a @ b (+ bias), or with
//                                                accumulate out += alpha * a @ b;
//   P::bias_in_gemm(t)        whether a bias rides in the GEMM (else bias_relu_ / add_bias_);
//   P::bias_relu_(act, bias)  act = relu(act (+ bias)), the mask in the sign bit (kernels.h);
//   P::add_bias_(y, bias)     y += bias;
//   P::relu_mask_(gh, act)    gh = 0 where the forward's ReLU blocked;
//   P::squared_error(pred, target, grad, grad_scale, l2) -> P::Loss, grad = grad_scale * d;
//   P::loss_tensor(loss, options)  the loss as its 0-dim result;
//   P::column_sums(g)         a bias gradient's sums, in the type its update and store read;
//   P::axpy_(bias, sums, alpha)    bias += alpha * sums;
//   P::kUpdatesLast           every gradient first, the in-place updates only at the end (an
//                             error then leaves every weight as it was).
// The CPU policy (cpu_policy.h) serves the blas variants and the CPU's 16-bit dtypes; the
// CUDA one (cuda/two_layer_cuda.cu) runs its passes as CUDA kernels. The L2 loss and the
// mean's scaling follow L2Loss (loss_value.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>

#include <array>
#include <optional>
#include <vector>

#include "../checks.h"
#include "../kernels.h"
#include "../loss_value.h"

namespace twolayer::composite {

// A GEMM as one ATen call (the BLAS, oneDNN or cuBLAS threads it as it likes). A bias goes
// to addmm as the 1-D tensor it is: added to the accumulator in the GEMM's epilogue where
// the backend can (one rounding for 16-bit storage). An output that is the transpose of a
// contiguous matrix gets the transposed product, C^T = B^T A^T, written contiguously.
inline void whole_gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                       const OptTensor& bias, double alpha, bool accumulate) {
  if (accumulate) {
    const_cast<at::Tensor&>(out).addmm_(a, b, /*beta=*/1.0, alpha);
  } else if (!out.is_contiguous() && out.t().is_contiguous()) {
    whole_gemm(out.t(), b.t(), a.t(), bias, alpha, accumulate);
  } else if (bias) {
    at::addmm_out(const_cast<at::Tensor&>(out), *bias, a, b);
  } else if (alpha == 1.0) {
    at::mm_out(const_cast<at::Tensor&>(out), a, b);
  } else {  // beta = 0 never reads the uninitialised output
    at::addmm_out(const_cast<at::Tensor&>(out), out, a, b, /*beta=*/0.0, alpha);
  }
}

// The forward into act [N, H] and y [N, D_out].
template <class P>
void forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,
             const OptTensor& b2, const at::Tensor& act, const at::Tensor& y) {
  const bool in_gemm = P::bias_in_gemm(x);
  P::gemm(act, x, w1, in_gemm ? b1 : std::nullopt, 1.0, false);
  P::bias_relu_(act, in_gemm ? std::nullopt : b1);
  P::gemm(y, act, w2, in_gemm ? b2 : std::nullopt, 1.0, false);
  if (!in_gemm && b2) P::add_bias_(y, *b2);
}

// grad_h = (grad_y @ w2^T) with the ReLU's mask applied (act contiguous).
template <class P>
at::Tensor hidden_grad(const at::Tensor& grad_y, const at::Tensor& w2, const at::Tensor& act) {
  at::Tensor grad_h = at::empty(act.sizes(), grad_y.options());
  P::gemm(grad_h, grad_y, w2.t(), std::nullopt, 1.0, false);
  P::relu_mask_(grad_h, act);
  return grad_h;
}

// Outputs of the backward, allocated by the caller; an absent one is not computed.
struct Grads {
  OptTensor x, w1, w2, b1, b2;
};

// The backward of forward() for grad_y (any strides) and forward's act (contiguous); x and
// w1 are read only for grads.w1 and grads.x.
template <class P>
void backward(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
              const at::Tensor& w2, const at::Tensor& act, const Grads& g) {
  if (g.w2) P::gemm(*g.w2, act.t(), grad_y, std::nullopt, 1.0, false);
  if (g.b2) g.b2->copy_(P::column_sums(grad_y));
  if (!g.x && !g.w1 && !g.b1) return;
  const at::Tensor grad_h = hidden_grad<P>(grad_y, w2, act);
  if (g.w1) P::gemm(*g.w1, x->t(), grad_h, std::nullopt, 1.0, false);
  if (g.b1) g.b1->copy_(P::column_sums(grad_h));
  if (g.x) P::gemm(*g.x, grad_h, w1->t(), std::nullopt, 1.0, false);
}

// Where one weight's gradient goes in a fused step: into `store` (a fresh gradient, possibly
// the transpose of a contiguous one), applied to `weight` in place as weight -= lr * grad, or
// nowhere (neither defined: not wanted, or a frozen weight).
struct Sink {
  at::Tensor store, weight;
  bool wanted() const { return store.defined() || weight.defined(); }
};

struct StepOutputs {
  bool mean = false;
  double lr = 0.0;                // for the sinks' weights
  OptTensor grad_x, grad_target;  // allocated by the caller
  std::array<Sink, 4> sinks;      // w1, w2, b1, b2
};

// Forward, L2 loss and the gradients `s` asks for, all at the weights as they were on entry:
// every read of a weight comes before its update.
template <class P>
typename P::Loss step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                      const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2,
                      const StepOutputs& s) {
  const int64_t N = x.size(0), H = w1.size(1), D_out = w2.size(1);
  const auto opts = x.options();
  const at::Tensor act = at::empty({N, H}, opts), y = at::empty({N, D_out}, opts);
  forward<P>(x, w1, w2, b1, b2, act, y);
  const auto& [sw1, sw2, sb1, sb2] = s.sinks;
  const bool hidden = s.grad_x || sw1.wanted() || sb1.wanted();
  const bool need_grad_y = hidden || s.grad_target || sw2.wanted() || sb2.wanted();
  const L2Loss l2{double(N) * double(D_out), s.mean};
  const bool deferred = defers_mean(x.scalar_type());
  // y becomes grad_y in place (each element read before it is written).
  const auto loss =
      P::squared_error(y, *target.expect_contiguous(), need_grad_y ? OptTensor(y) : std::nullopt,
                       l2.grad_y_scale(deferred), l2);
  if (!need_grad_y) return loss;
  const at::Tensor& gy = y;
  const double scale = l2.consumer_scale(deferred);

  if (s.grad_target) {
    if (scale == 1.0)
      at::neg_out(const_cast<at::Tensor&>(*s.grad_target), gy);
    else
      at::mul_out(const_cast<at::Tensor&>(*s.grad_target), gy, -scale);
  }
  at::Tensor grad_h;
  if (hidden) grad_h = hidden_grad<P>(gy, w2, act);  // reads w2 before its update
  if (s.grad_x) P::gemm(*s.grad_x, grad_h, w1.t(), std::nullopt, scale, false);  // and w1

  struct Update {
    at::Tensor weight, grad;
    double alpha;
  };
  std::vector<Update> pending;
  auto matrix = [&](const Sink& k, const at::Tensor& a, const at::Tensor& b) {
    if (k.store.defined()) {
      P::gemm(k.store, a, b, std::nullopt, scale, false);
    } else if (k.weight.defined() && P::kUpdatesLast) {
      at::Tensor g = at::empty(k.weight.sizes(), opts);
      P::gemm(g, a, b, std::nullopt, scale, false);
      pending.push_back({k.weight, g, -s.lr});
    } else if (k.weight.defined()) {  // w += (-lr * scale) * a @ b by the GEMM itself
      P::gemm(k.weight, a, b, std::nullopt, -s.lr * scale, true);
    }
  };
  auto bias = [&](const Sink& k, const at::Tensor& g) {
    if (!k.wanted()) return;
    const at::Tensor sums = P::column_sums(g);
    if (k.store.defined())
      k.store.copy_(scale == 1.0 ? sums : at::mul(sums, scale));
    else if (P::kUpdatesLast)
      pending.push_back({k.weight, sums, -s.lr * scale});
    else
      P::axpy_(k.weight, sums, -s.lr * scale);
  };
  matrix(sw2, act.t(), gy);
  bias(sb2, gy);
  if (hidden) {
    matrix(sw1, x.t(), grad_h);
    bias(sb1, grad_h);
  }
  for (const Update& u : pending) const_cast<at::Tensor&>(u.weight).add_(u.grad, u.alpha);
  return loss;
}

// The op kernels (kernels.h) on checked arguments, for a policy over whole tensors.
template <class P>
std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const Dims& d, const at::Tensor& x,
                                                 const at::Tensor& w1, const at::Tensor& w2,
                                                 const OptTensor& b1, const OptTensor& b2) {
  const at::Tensor act = at::empty({d.N, d.H}, x.options());
  const at::Tensor y = at::empty({d.N, d.D_out}, x.options());
  forward<P>(x, w1, w2, b1, b2, act, y);
  return {y, act};
}

// A fresh gradient [rows, cols] for a 2-D weight: row-major, or the transpose of a row-major
// one (the layout of a weight that is itself such a transpose: nn.Linear's, through .t()).
inline at::Tensor new_grad(std::array<int64_t, 2> sizes, const at::TensorOptions& opts,
                           bool transposed) {
  if (transposed) return at::empty({sizes[1], sizes[0]}, opts).t();
  return at::empty({sizes[0], sizes[1]}, opts);
}

template <class P>
Grads5 two_layer_bwd(const Dims& d, const at::Tensor& grad_y, const OptTensor& x,
                     const OptTensor& w1, const at::Tensor& w2, const at::Tensor& act,
                     std::array<bool, 5> output_mask, std::array<bool, 2> grad_transposed) {
  const auto [need_x, need_w1, need_w2, need_b1, need_b2] = output_mask;
  const auto opts = act.options();
  auto maybe = [&](bool need, at::IntArrayRef sizes) {
    return need ? OptTensor(at::empty(sizes, opts)) : std::nullopt;
  };
  auto weight = [&](bool need, int64_t rows, int64_t cols, bool transposed) {
    return need ? OptTensor(new_grad({rows, cols}, opts, transposed)) : std::nullopt;
  };
  const Grads g{maybe(need_x, {d.N, d.D_in}), weight(need_w1, d.D_in, d.H, grad_transposed[0]),
                weight(need_w2, d.H, d.D_out, grad_transposed[1]), maybe(need_b1, {d.H}),
                maybe(need_b2, {d.D_out})};
  backward<P>(grad_y, x, w1, w2, *act.expect_contiguous(), g);  // forward's act: no copy
  return {g.x, g.w1, g.w2, g.b1, g.b2};
}

template <class P>
std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                              Reduction r, bool need_grad) {
  // Non-contiguous inputs are read through a contiguous copy (made only then).
  const auto p = pred.expect_contiguous();
  const auto t = target.expect_contiguous();
  OptTensor grad;
  if (need_grad) grad = at::empty(pred.sizes(), pred.options());
  // This op returns the gradient itself: it carries the mean's 1/n for every dtype.
  const L2Loss l2{double(pred.numel()), r == Reduction::Mean};
  const auto loss = P::squared_error(*p, *t, grad, l2.grad_scale(), l2);
  return {P::loss_tensor(loss, pred.options()), grad};
}

// The fused loss's gradients that output_mask asks for, fresh: (x, target, w1, w2, b1, b2); a
// weight's in its own layout or, with grad_transposed, as the transpose of a row-major one.
inline std::array<OptTensor, 6> new_loss_grads(const Dims& d, const at::Tensor& x,
                                               const at::Tensor& w1, const at::Tensor& w2,
                                               const OptTensor& b1, const OptTensor& b2,
                                               std::array<bool, 6> output_mask,
                                               std::array<bool, 2> grad_transposed) {
  const auto opts = x.options();
  std::array<OptTensor, 6> g;
  if (output_mask[0]) g[0] = at::empty({d.N, d.D_in}, opts);
  if (output_mask[1]) g[1] = at::empty({d.N, d.D_out}, opts);
  if (output_mask[2]) g[2] = new_grad({w1.size(0), w1.size(1)}, opts, grad_transposed[0]);
  if (output_mask[3]) g[3] = new_grad({w2.size(0), w2.size(1)}, opts, grad_transposed[1]);
  if (output_mask[4] && b1) g[4] = at::empty({d.H}, opts);
  if (output_mask[5] && b2) g[5] = at::empty({d.D_out}, opts);
  return g;
}

template <class P>
FusedLossGrads two_layer_l2_loss_fwd(const Dims& d, const at::Tensor& x, const at::Tensor& target,
                                     const at::Tensor& w1, const at::Tensor& w2,
                                     const OptTensor& b1, const OptTensor& b2, bool mean,
                                     std::array<bool, 6> output_mask,
                                     std::array<bool, 2> grad_transposed) {
  const auto g = new_loss_grads(d, x, w1, w2, b1, b2, output_mask, grad_transposed);
  StepOutputs s;
  s.mean = mean;
  s.grad_x = g[0], s.grad_target = g[1];
  for (size_t i = 0; i < 4; ++i)
    if (g[i + 2]) s.sinks[i].store = *g[i + 2];
  const auto loss = step<P>(x, target, w1, w2, b1, b2, s);
  return {P::loss_tensor(loss, x.options()), g[0], g[1], g[2], g[3], g[4], g[5]};
}

template <class P>
at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                    const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, double lr,
                    bool mean, std::array<bool, 4> update) {
  StepOutputs s;
  s.mean = mean;
  s.lr = lr;
  // A frozen weight (update false) gets neither its gradient GEMM nor an update.
  if (update[0]) s.sinks[0].weight = w1;
  if (update[1]) s.sinks[1].weight = w2;
  if (update[2] && b1) s.sinks[2].weight = *b1;
  if (update[3] && b2) s.sinks[3].weight = *b2;
  return P::loss_tensor(step<P>(x, target, w1, w2, b1, b2, s), x.options());
}

}  // namespace twolayer::composite
