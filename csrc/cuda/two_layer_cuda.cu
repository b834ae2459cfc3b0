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

// grad_y [N, D_out], w2 [H, D_out] and act [N, H] agree; x and w1, when given, are on act's
// device with its dtype (checked even when unused, so a stray CPU tensor is never ignored).
void check_backward_args(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                         const at::Tensor& w2, const at::Tensor& act) {
  TORCH_CHECK_VALUE(act.dim() == 2, kBackward, ": act must be 2-D [N, H], got ", act.dim(), "-D");
  check_float(kBackward, "act", act);
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == act.size(1), kBackward,
                    ": w2 must have shape [H, D_out] with H = ", act.size(1), ", got ", w2.sizes());
  check_like(kBackward, "w2", w2, "act", act);
  TORCH_CHECK_VALUE(grad_y.dim() == 2, kBackward, ": grad_y must be 2-D [N, D_out]");
  check_like(kBackward, "grad_y", grad_y, "act", act);
  check_shape(kBackward, "grad_y", grad_y, {act.size(0), w2.size(1)}, "[N, D_out]");
  if (x) check_like(kBackward, "x", *x, "act", act);
  if (w1) check_like(kBackward, "w1", *w1, "act", act);
}

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
  const Dims d = check_two_layer_args("two_layer", x, w1, b1, w2, b2);
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
  check_backward_args(grad_y, x, w1, w2, act);
  const c10::cuda::CUDAGuard guard(cuda_device_of(kBackward, "act", act));
  const auto [need_x, need_w1, need_b1, need_w2, need_b2] = output_mask;
  OptTensor grad_x, grad_w1, grad_b1, grad_w2, grad_b2;
  if (need_w2) grad_w2 = at::mm(act.t(), grad_y);
  if (need_b2) grad_b2 = at::sum(grad_y, 0);
  if (need_x || need_w1 || need_b1) {
    auto grad_h = at::mm(grad_y, w2.t()).contiguous();  // mm's result is contiguous: a no-op
    apply_relu_mask_(grad_h, act.contiguous());
    if (need_w1) {
      TORCH_CHECK_VALUE(x.has_value(), kBackward, ": x is needed for grad_w1");
      check_shape(kBackward, "x", *x, {act.size(0), x->size(-1)}, "[N, D_in]");
      grad_w1 = at::mm(x->t(), grad_h);
    }
    if (need_b1) grad_b1 = at::sum(grad_h, 0);
    if (need_x) {
      TORCH_CHECK_VALUE(w1.has_value(), kBackward, ": w1 is needed for grad_x");
      check_shape(kBackward, "w1", *w1, {w1->size(0), act.size(1)}, "[D_in, H]");
      grad_x = at::mm(grad_h, w1->t());
    }
  }
  return {grad_x, grad_w1, grad_b1, grad_w2, grad_b2};
}

std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                              c10::string_view reduction, bool need_grad) {
  constexpr const char* op = "l2_loss";
  const Reduction r = parse_reduction(op, reduction);
  check_float(op, "pred", pred);
  check_like(op, "target", target, "pred", pred);
  TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), op,
                    ": target must have the same shape as pred ", pred.sizes(), ", got ",
                    target.sizes(), " (no broadcasting)");
  const c10::cuda::CUDAGuard guard(cuda_device_of(op, "pred", pred));
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
  constexpr const char* op = "l2_loss (backward)";
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ",
                    grad_loss.sizes());
  check_like(op, "grad_loss", grad_loss, "grad", grad);
  const c10::cuda::CUDAGuard guard(cuda_device_of(op, "grad", grad));
  return at::mul(grad, grad_loss.reshape({}));
}

at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                    const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, double lr,
                    c10::string_view reduction) {
  constexpr const char* op = "sgd_step";
  const Dims d = check_two_layer_args(op, x, w1, b1, w2, b2);
  check_like(op, "target", target, "x", x);
  check_shape(op, "target", target, {d.N, d.D_out}, "[N, D_out]");
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, op, ": lr must be a finite number >= 0, got ",
                    lr);
  parse_reduction(op, reduction);
  const at::Tensor* no = nullptr;
  const at::Tensor* pb1 = b1 ? &*b1 : no;
  const at::Tensor* pb2 = b2 ? &*b2 : no;
  check_writable_and_disjoint(op, "w1", w1, {{"x", &x}, {"target", &target}, {"w2", &w2},
                                             {"b1", pb1}, {"b2", pb2}});
  check_writable_and_disjoint(op, "w2", w2, {{"x", &x}, {"target", &target}, {"b1", pb1},
                                             {"b2", pb2}});
  if (b1) check_writable_and_disjoint(op, "b1", *b1, {{"x", &x}, {"target", &target}, {"b2", pb2}});
  if (b2) check_writable_and_disjoint(op, "b2", *b2, {{"x", &x}, {"target", &target}});
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
