// Kernel entry points, one set per device. The dispatcher (ops.cpp) binds them
// to the schemas; argument checks live in checks.h and run before any kernel.
//
// The forward saves one hidden tensor, `act` [N, H]: the ReLU output, with the
// ReLU mask carried in the sign bit. Where the pre-activation h < 0 it holds
// -0.0 (a zero for the second matmul, "blocked" for the backward); elsewhere
// |h| (h >= 0, NaN kept with its sign cleared). So the backward applies
// numpy's `grad_h[h < 0] = 0` exactly, NaN and -0.0 included, without a
// second N x H tensor.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace twolayer {

using OptTensor = std::optional<at::Tensor>;
// Gradients in the argument order: (x, w1, w2, b1, b2); the fused loss adds target after x.
using Grads5 = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor>;
using FusedLossGrads =
    std::tuple<at::Tensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor>;

// The op kernels of one device, declared alike for each.
#define TWOLAYER_DECLARE_OP_KERNELS                                                          \
  std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const at::Tensor& x, const at::Tensor& w1, \
                                                   const at::Tensor& w2, const OptTensor& b1, \
                                                   const OptTensor& b2);                     \
  Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,     \
                       const at::Tensor& w2, const at::Tensor& act,                          \
                       std::array<bool, 5> output_mask);                                     \
  std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred,                      \
                                                const at::Tensor& target,                    \
                                                c10::string_view reduction, bool need_grad); \
  at::Tensor l2_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& grad);               \
  /* The loss of two_layer + l2_loss and, in the same call, the gradients output_mask asks  \
     for (x, target, w1, w2, b1, b2). */                                                     \
  FusedLossGrads two_layer_l2_loss_fwd(const at::Tensor& x, const at::Tensor& target,        \
                                       const at::Tensor& w1, const at::Tensor& w2,           \
                                       const OptTensor& b1, const OptTensor& b2,             \
                                       c10::string_view reduction,                          \
                                       std::array<bool, 6> output_mask,                     \
                                       std::array<bool, 2> grad_transposed);                \
  /* Forward, loss, backward at the current weights, then w -= lr * grad in place for each \
     of w1, w2, b1, b2 present and set in `update`. Returns the loss before the update. */  \
  at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,   \
                      const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2,        \
                      double lr, c10::string_view reduction, std::array<bool, 4> update);

// A weight that is a transposed contiguous matrix (TwoLayerNet's w1, w2: views of its
// nn.Linear-layout parameters): the fused loss asks for its gradient in that same layout
// (two_layer_l2_loss_fwd's grad_transposed), so that autograd hands it to the parameter as it
// is (AccumulateGrad copies a gradient whose strides differ from the parameter's). An explicit
// flag, not the strides, decides the output layout: torch.compile may lay inputs out anew.
inline bool transposed_layout(const at::Tensor& w) {
  return w.dim() == 2 && w.size(0) > 1 && w.size(1) > 1 && w.stride(0) == 1 &&
         w.stride(1) == w.size(0);
}

namespace cpu {
TWOLAYER_DECLARE_OP_KERNELS
}  // namespace cpu

#ifdef TWOLAYER_WITH_CUDA
namespace cuda {
TWOLAYER_DECLARE_OP_KERNELS
}  // namespace cuda
#endif

#undef TWOLAYER_DECLARE_OP_KERNELS

}  // namespace twolayer
