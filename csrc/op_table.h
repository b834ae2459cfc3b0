// Every op's contract, written once. ops.cpp makes the schemas and the dispatch from these
// tables, kernels.h the device kernels' declarations, autograd.cpp and autocast.cpp the typed
// handles they call through, and checks.cpp one argument check per kernel op (which the fake
// kernels in twolayer_ext/ops.py call as `<op>_check`, so C++ is the one source of messages).
//
// A row is X(name, public op, arguments schema, returns schema, C++ return type, C++ parameters).
// Tensors come in one order everywhere: x, w1, w2, b1, b2, with target after x where there is
// one; gradients and output_mask follow the same order.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <tuple>

namespace twolayer {

using OptTensor = std::optional<at::Tensor>;
// Gradients in the argument order: (x, w1, w2, b1, b2); the fused loss adds target after x.
using Grads5 = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor>;
using FusedLossGrads =
    std::tuple<at::Tensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor>;
// Return types without a comma, so that each is one macro argument.
using OutAndAct = std::tuple<at::Tensor, at::Tensor>;
using LossAndGrad = std::tuple<at::Tensor, OptTensor>;

}  // namespace twolayer

// The public, differentiable ops (autograd formulas in autograd.cpp, autocast in autocast.cpp).
#define TWOLAYER_PUBLIC_OPS(X)                                                                       \
  /* y = relu(x @ w1 + b1) @ w2 + b2 */                                                              \
  X(two_layer, two_layer, "(Tensor x, Tensor w1, Tensor w2, Tensor? b1=None, Tensor? b2=None)",      \
    "Tensor", at::Tensor,                                                                            \
    (const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,           \
     const OptTensor& b2))                                                                           \
  /* Sum or mean of (pred - target)^2, 0-dim. */                                                     \
  X(l2_loss, l2_loss, "(Tensor pred, Tensor target, str reduction=\"sum\")", "Tensor", at::Tensor,   \
    (const at::Tensor& pred, const at::Tensor& target, c10::string_view reduction))                  \
  /* l2_loss(two_layer(x, w1, w2, b1, b2), target, reduction), its gradients made in the           \
     forward. linear_layout: w1, w2 given as nn.Linear weights [H, D_in], [D_out, H], whose        \
     transposes are taken below autograd (no view nodes in the graph). */ \
  X(two_layer_l2_loss, two_layer_l2_loss,                                                            \
    "(Tensor x, Tensor target, Tensor w1, Tensor w2, Tensor? b1=None, Tensor? b2=None,"              \
    " str reduction=\"sum\", bool linear_layout=False)",                                             \
    "Tensor", at::Tensor,                                                                            \
    (const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1, const at::Tensor& w2,      \
     const OptTensor& b1, const OptTensor& b2, c10::string_view reduction, bool linear_layout))

// The kernel ops behind them, one kernel per device each (kernels.h). act is what the backward
// needs (kernels.h).
#define TWOLAYER_KERNEL_OPS(X)                                                                     \
  X(two_layer_fwd, two_layer, "(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2)",          \
    "(Tensor y, Tensor act)", OutAndAct,                                                           \
    (const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,         \
     const OptTensor& b2))                                                                         \
  /* Gradients for (x, w1, w2, b1, b2); only those set in output_mask are computed. */             \
  /* grad_transposed: grad_w1 / grad_w2 returned as the transpose of a row-major [H, D_in] / */    \
  /* [D_out, H] (w1 / w2 in that layout: TwoLayerNet's .t() views of nn.Linear weights). */        \
  X(two_layer_bwd, two_layer,                                                                      \
    "(Tensor grad_y, Tensor? x, Tensor? w1, Tensor w2, Tensor act, bool[5] output_mask,"           \
    " bool[2] grad_transposed=[False, False])",                                                    \
    "(Tensor? grad_x, Tensor? grad_w1, Tensor? grad_w2, Tensor? grad_b1, Tensor? grad_b2)",        \
    Grads5,                                                                                        \
    (const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1, const at::Tensor& w2,      \
     const at::Tensor& act, std::array<bool, 5> output_mask, std::array<bool, 2> grad_transposed)) \
  /* Sum or mean of squared error and, in the same pass, its gradient wrt pred. */                 \
  X(l2_loss_fwd, l2_loss, "(Tensor pred, Tensor target, str reduction, bool need_grad)",           \
    "(Tensor loss, Tensor? grad)", LossAndGrad,                                                    \
    (const at::Tensor& pred, const at::Tensor& target, c10::string_view reduction,                 \
     bool need_grad))                                                                              \
  /* grad_loss (0-dim) * grad: a loss's backward. */                                               \
  X(l2_loss_bwd, l2_loss, "(Tensor grad_loss, Tensor grad)", "Tensor", at::Tensor,                 \
    (const at::Tensor& grad_loss, const at::Tensor& grad))                                         \
  /* The fused loss and the gradients output_mask asks for, for (x, target, w1, w2, b1, b2). */    \
  /* grad_transposed: grad_w1 / grad_w2 returned as the transpose of a row-major [H, D_in] / */    \
  /* [D_out, H] (the layout of TwoLayerNet's nn.Linear parameters; kernels.h). */                  \
  X(two_layer_l2_loss_fwd, two_layer_l2_loss,                                                      \
    "(Tensor x, Tensor target, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, str reduction,"       \
    " bool[6] output_mask, bool[2] grad_transposed=[False, False])",                               \
    "(Tensor loss, Tensor? grad_x, Tensor? grad_target, Tensor? grad_w1, Tensor? grad_w2,"         \
    " Tensor? grad_b1, Tensor? grad_b2)",                                                          \
    FusedLossGrads,                                                                                \
    (const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1, const at::Tensor& w2,    \
     const OptTensor& b1, const OptTensor& b2, c10::string_view reduction,                         \
     std::array<bool, 6> output_mask, std::array<bool, 2> grad_transposed))                        \
  /* Forward, loss, backward at the current weights, then w -= lr * grad in place for each */      \
  /* of w1, w2, b1, b2 present and set in `update`. Returns the loss before the update. */         \
  X(sgd_step, sgd_step,                                                                            \
    "(Tensor x, Tensor target, Tensor(a!) w1, Tensor(b!) w2, Tensor(c!)? b1, Tensor(d!)? b2,"      \
    " float lr, str reduction, bool[4] update)",                                                   \
    "Tensor loss", at::Tensor,                                                                     \
    (const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1, const at::Tensor& w2,    \
     const OptTensor& b1, const OptTensor& b2, double lr, c10::string_view reduction,              \
     std::array<bool, 4> update))

namespace twolayer::sig {
// The function type of each op: sig::two_layer_fwd, ... (for typed dispatcher handles).
#define TWOLAYER_SIG(name, pub, args, rets, ret, params) using name = ret params;
TWOLAYER_PUBLIC_OPS(TWOLAYER_SIG)
TWOLAYER_KERNEL_OPS(TWOLAYER_SIG)
#undef TWOLAYER_SIG
}  // namespace twolayer::sig
