// CUDA kernels of the ops, step for step the CPU ones (csrc/cpu/two_layer_cpu.cpp):
// the GEMMs through ATen (cuBLAS, honouring torch's TF32 and reduced-precision
// settings; float16/bfloat16 accumulate in float32), each followed by its
// elementwise pass from elementwise.cu. Every op checks its arguments first
// (a mixed-device call is an error naming the argument), then runs on x's (or
// the reference tensor's) device and that device's current stream, with no
// host synchronisation, so it can be captured in a CUDA graph.
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>

#include <cmath>

#include "../checks.h"
#include "../kernels.h"
#include "elementwise.h"

namespace twolayer::cuda {

namespace {

constexpr const char* kBackward = "two_layer (backward)";

// Checks `t` is on CUDA before a guard is made from it (the dispatcher sends a call here when
// any tensor argument is on CUDA; the argument checks catch the others).
c10::Device cuda_device_of(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got ", t.device());
  return t.device();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                 const at::Tensor& w2, const OptTensor& b1,
                                                 const OptTensor& b2) {
  const Dims d = check_two_layer_args("two_layer", x, w1, w2, b1, b2);
  const c10::cuda::CUDAGuard guard(cuda_device_of("two_layer", "x", x));
  auto act = at::empty({d.N, d.H}, x.options());
  auto y = at::empty({d.N, d.D_out}, x.options());
  // Bias enters as the GEMM's C input (beta = 1), not as a pass of its own.
  if (b1) at::addmm_out(act, b1->expand({d.N, d.H}), x, w1);
  else at::mm_out(act, x, w1);
  relu_with_sign_mask_(act);
  if (b2) at::addmm_out(y, b2->expand({d.N, d.D_out}), act, w2);
  else at::mm_out(y, act, w2);
  return {y, act};
}

Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                     const at::Tensor& w2, const at::Tensor& act, std::array<bool, 5> output_mask) {
  const auto [need_x, need_w1, need_b1, need_w2, need_b2] = output_mask;
  check_two_layer_bwd_args(grad_y, x, w1, w2, act, need_x, need_w1);
  const c10::cuda::CUDAGuard guard(cuda_device_of(kBackward, "act", act));
  OptTensor grad_x, grad_w1, grad_b1, grad_w2, grad_b2;
  if (need_w2) grad_w2 = at::mm(act.t(), grad_y);
  if (need_b2) grad_b2 = at::sum(grad_y, 0);
  if (need_x || need_w1 || need_b1) {
    auto grad_h = at::mm(grad_y, w2.t()).contiguous();  // mm's result is contiguous: a no-op
    apply_relu_mask_(grad_h, act.contiguous());
    if (need_w1) grad_w1 = at::mm(x->t(), grad_h);
    if (need_b1) grad_b1 = at::sum(grad_h, 0);
    if (need_x) grad_x = at::mm(grad_h, w1->t());
  }
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                              c10::string_view reduction, bool need_grad) {
  const Reduction r = check_l2_loss_args(pred, target, reduction);
  const c10::cuda::CUDAGuard guard(cuda_device_of("l2_loss", "pred", pred));
  // Non-contiguous inputs are read through a contiguous copy (made only then).
  const auto p = pred.expect_contiguous();
  const auto t = target.expect_contiguous();
  auto loss = at::empty({}, pred.options());
  OptTensor grad;
  if (need_grad) grad = at::empty(pred.sizes(), pred.options());
  squared_error(*p, *t, r == Reduction::Mean, loss, grad);
  return {loss, grad};
}

at::Tensor l2_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_l2_loss_bwd_args(grad_loss, grad);
  const c10::cuda::CUDAGuard guard(cuda_device_of("l2_loss (backward)", "grad", grad));
  return at::mul(grad, grad_loss.reshape({}));
}

at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                    const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, double lr,
                    c10::string_view reduction) {
  check_sgd_step_args(x, target, w1, w2, b1, b2, lr);
  constexpr const char* op = "sgd_step";
  const c10::cuda::CUDAGuard guard(cuda_device_of(op, "x", x));

  auto [y, act] = two_layer_fwd(x, w1, w2, b1, b2);
  auto [loss, grad_y] = l2_loss_fwd(y, target, reduction, /*need_grad=*/true);
  // Every gradient is taken at the old weights: grad_h reads w2 before w2 is updated.
  auto grad_h = at::mm(*grad_y, w2.t()).contiguous();  // mm's result is contiguous: a no-op
  apply_relu_mask_(grad_h, act);
  // w -= lr * grad with the update in the GEMM's epilogue (beta = 1, alpha = -lr).
  const_cast<at::Tensor&>(w2).addmm_(act.t(), *grad_y, 1.0, -lr);
  const_cast<at::Tensor&>(w1).addmm_(x.t(), grad_h, 1.0, -lr);
  if (b2) const_cast<at::Tensor&>(*b2).add_(at::sum(*grad_y, 0), -lr);
  if (b1) const_cast<at::Tensor&>(*b1).add_(at::sum(grad_h, 0), -lr);
  return loss;
}

}  // namespace twolayer::cuda
