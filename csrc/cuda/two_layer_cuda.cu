// CUDA kernels of the ops, step for step the CPU ones (csrc/cpu/two_layer_cpu.cpp):
// the GEMMs through ATen (cuBLAS, honouring torch's TF32 and reduced-precision
// settings; float16/bfloat16 accumulate in float32), each followed by its
// elementwise pass from elementwise.cu. Every op checks its arguments first
// (a mixed-device call is an error naming the argument), then runs on x's (or
// the reference tensor's) device and that device's current stream, with no
// host synchronisation, so it can be captured in a CUDA graph. sgd_step changes no weight
// unless it runs to the end (see fused_step).
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <cmath>
#include <limits>

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

// The forward on checked arguments: (y, act). A bias goes to addmm as the 1-D tensor it is:
// ATen then adds it in cuBLASLt's epilogue where it can, instead of a copy of an expanded
// [N, H] view plus a beta = 1 GEMM.
std::tuple<at::Tensor, at::Tensor> forward(const Dims& d, const at::Tensor& x,
                                           const at::Tensor& w1, const at::Tensor& w2,
                                           const OptTensor& b1, const OptTensor& b2) {
  auto act = at::empty({d.N, d.H}, x.options());
  auto y = at::empty({d.N, d.D_out}, x.options());
  if (b1) at::addmm_out(act, *b1, x, w1);
  else at::mm_out(act, x, w1);
  relu_with_sign_mask_(act);
  if (b2) at::addmm_out(y, *b2, act, w2);
  else at::mm_out(y, act, w2);
  return {y, act};
}

// grad_h = (grad_y @ w2^T) with the ReLU's mask applied (act from forward: contiguous).
at::Tensor hidden_grad(const at::Tensor& grad_y, const at::Tensor& w2, const at::Tensor& act) {
  auto grad_h = at::mm(grad_y, w2.t());  // a fresh, contiguous result
  apply_relu_mask_(grad_h, act);
  return grad_h;
}

// scale * (a @ b) into a fresh tensor: the scale rides in the GEMM's alpha (beta = 0 never
// reads the uninitialised output).
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double scale) {
  if (scale == 1.0) return at::mm(a, b);
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0.0, /*alpha=*/scale);
}

// Where the gradients of a fused step go, in the order (w1, w2, b1, b2): stored into fresh
// tensors (the fused loss) or applied as w -= lr * grad in place (sgd_step, lr set).
struct FusedStep {
  bool mean = false;
  bool grad_x = false, grad_target = false;
  std::array<bool, 4> weights{};  // which weights' gradients are wanted (absent biases: false)
  std::optional<double> lr;       // set: update in place; unset: store
  std::array<bool, 2> transposed{};  // stored w1 / w2 gradients as transposes (kernels.h)
};

struct FusedResult {
  at::Tensor loss;
  OptTensor grad_x, grad_target;
  std::array<OptTensor, 4> grads;  // (w1, w2, b1, b2), stored mode only
};

// Forward, L2 loss and the gradients `s` asks for, all at the weights as they were on entry.
// The loss's gradient stays 2 * (y - target) (the "sum" one) and the mean's 1/n is folded into
// the GEMMs' alpha and the bias sums' scale: for reduced-precision dtypes (2/n) * d would be
// subnormal at large n (n ~ 1e6 for float16), leaving mostly rounding noise for the GEMMs to
// multiply.
//
// sgd_step (s.lr set) computes every gradient into fresh tensors first and only then updates
// the weights, with in-place adds that allocate nothing and whose alpha the caller has checked
// (see sgd_step): whatever can fail (an allocation, a GEMM, a conversion) fails before any weight
// has changed, so an error never leaves a caller with some weights updated. The weights'
// gradients cost the memory the fused loss's outputs take anyway.
FusedResult fused_step(const Dims& d, const at::Tensor& x, const at::Tensor& target,
                       const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,
                       const OptTensor& b2, const FusedStep& s) {
  auto [y, act] = forward(d, x, w1, w2, b1, b2);
  const bool any_weight = s.weights[0] || s.weights[1] || s.weights[2] || s.weights[3];
  const bool need_grad_y = s.grad_x || s.grad_target || any_weight;
  FusedResult r;
  r.loss = at::empty({}, x.options());
  OptTensor grad_y;
  if (need_grad_y) grad_y = at::empty({d.N, d.D_out}, x.options());
  const auto t = target.expect_contiguous();
  const double n = static_cast<double>(d.N) * static_cast<double>(d.D_out);
  // The mean of nothing is 0 / 0 = NaN, as on the CPU. A loss beyond the dtype's range is inf
  // (the device's double-to-dtype conversion rounds to nearest, overflowing to inf).
  squared_error(y, *t, /*loss_divisor=*/s.mean ? n : 1.0, r.loss, grad_y, /*grad_scale=*/2.0);
  if (!need_grad_y) return r;
  // n = 0: every gradient is an empty sum, 0 as on the CPU; scale 1 keeps alpha finite there.
  const double scale = s.mean && n > 0 ? 1.0 / n : 1.0;
  const auto& gy = *grad_y;
  const auto [want_w1, want_w2, want_b1, want_b2] = s.weights;

  at::Tensor grad_h;
  if (s.grad_x || want_w1 || want_b1) grad_h = hidden_grad(gy, w2, act);
  if (s.grad_target) r.grad_target = at::mul(gy, -scale);
  if (s.grad_x) r.grad_x = scaled_mm(grad_h, w1.t(), scale);

  // Each weight's gradient: scale * (a @ b) for a matrix, in its dtype; for a bias the column
  // sums of g, unscaled and in float32 for float16/bfloat16 (the unscaled sum of 2 * d over N
  // rows may pass float16's 65504 even where the scaled gradient is small).
  std::array<OptTensor, 4> grads;
  auto column_sums = [](const at::Tensor& g) {
    return at::sum(g, 0, /*keepdim=*/false, at::toOpMathType(g.scalar_type()));
  };
  // A matrix gradient, stored as the transpose of a row-major one where asked (kernels.h).
  auto matrix_grad = [&](int i, const at::Tensor& a, const at::Tensor& b) {
    return !s.lr && s.transposed[i] ? scaled_mm(b.t(), a.t(), scale).t() : scaled_mm(a, b, scale);
  };
  if (want_w2) grads[1] = matrix_grad(1, act.t(), gy);
  if (want_b2) grads[3] = column_sums(gy);
  if (grad_h.defined()) {
    if (want_w1) grads[0] = matrix_grad(0, x.t(), grad_h);
    if (want_b1) grads[2] = column_sums(grad_h);
  }
  const std::array<const at::Tensor*, 4> weights = {&w1, &w2, b1 ? &*b1 : nullptr,
                                                    b2 ? &*b2 : nullptr};
  for (int i = 0; i < 4; ++i) {
    if (!grads[i]) continue;
    const bool is_bias = i >= 2;
    if (!s.lr) {
      r.grads[i] = is_bias ? at::mul(*grads[i], scale).to(x.scalar_type()) : *grads[i];
    } else {
      // In place: w += alpha * grad, computed in the weight's opmath type (a float32 bias sum
      // into a 16-bit bias is cast inside the kernel, without a temporary).
      const_cast<at::Tensor&>(*weights[i]).add_(*grads[i], is_bias ? -*s.lr * scale : -*s.lr);
    }
  }
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                 const at::Tensor& w2, const OptTensor& b1,
                                                 const OptTensor& b2) {
  const Dims d = check_two_layer_args("two_layer", x, w1, w2, b1, b2);
  const c10::cuda::CUDAGuard guard(cuda_device_of("two_layer", "x", x));
  return forward(d, x, w1, w2, b1, b2);
}

Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                     const at::Tensor& w2, const at::Tensor& act, std::array<bool, 5> output_mask) {
  const auto [need_x, need_w1, need_w2, need_b1, need_b2] = output_mask;
  check_two_layer_bwd_args(grad_y, x, w1, w2, act, need_x, need_w1);
  const c10::cuda::CUDAGuard guard(cuda_device_of(kBackward, "act", act));
  OptTensor grad_x, grad_w1, grad_w2, grad_b1, grad_b2;
  if (need_w2) grad_w2 = at::mm(act.t(), grad_y);
  if (need_b2) grad_b2 = at::sum(grad_y, 0);
  if (need_x || need_w1 || need_b1) {
    const auto grad_h = hidden_grad(grad_y, w2, act.contiguous());  // forward's act: no copy
    if (need_w1) grad_w1 = at::mm(x->t(), grad_h);
    if (need_b1) grad_b1 = at::sum(grad_h, 0);
    if (need_x) grad_x = at::mm(grad_h, w1->t());
  }
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
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
  // This op returns the gradient itself, so it is (2/n) * d for the mean, as on the CPU.
  const double n = static_cast<double>(pred.numel());
  const bool mean = r == Reduction::Mean;
  squared_error(*p, *t, mean ? n : 1.0, loss, grad, mean ? 2.0 / n : 2.0);
  return {loss, grad};
}

at::Tensor l2_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_l2_loss_bwd_args(grad_loss, grad);
  const c10::cuda::CUDAGuard guard(cuda_device_of("l2_loss (backward)", "grad", grad));
  return at::mul(grad, grad_loss.reshape({}));
}

FusedLossGrads two_layer_l2_loss_fwd(const at::Tensor& x, const at::Tensor& target,
                                     const at::Tensor& w1, const at::Tensor& w2,
                                     const OptTensor& b1, const OptTensor& b2,
                                     c10::string_view reduction, std::array<bool, 6> output_mask,
                                     std::array<bool, 2> grad_transposed) {
  constexpr const char* op = "two_layer_l2_loss";
  const Dims d = check_two_layer_l2_loss_args(x, target, w1, w2, b1, b2);
  FusedStep s;
  s.mean = parse_reduction(op, reduction) == Reduction::Mean;
  const c10::cuda::CUDAGuard guard(cuda_device_of(op, "x", x));
  const auto [need_x, need_target, need_w1, need_w2, need_b1, need_b2] = output_mask;
  s.grad_x = need_x;
  s.grad_target = need_target;
  s.weights = {need_w1, need_w2, need_b1 && b1.has_value(), need_b2 && b2.has_value()};
  s.transposed = grad_transposed;
  auto r = fused_step(d, x, target, w1, w2, b1, b2, s);
  return {r.loss, r.grad_x, r.grad_target, r.grads[0], r.grads[1], r.grads[2], r.grads[3]};
}

at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                    const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, double lr,
                    c10::string_view reduction, std::array<bool, 4> update) {
  constexpr const char* op = "sgd_step";
  const Dims d = check_sgd_step_args(x, target, w1, w2, b1, b2, lr);
  FusedStep s;
  s.mean = parse_reduction(op, reduction) == Reduction::Mean;
  // The updates' alphas (-lr, and -lr / n for a mean's bias) are converted to the weights'
  // opmath type, float for float32/float16/bfloat16, which raises for a value beyond its range:
  // refuse such an lr here, before anything runs (fused_step then cannot fail after an update).
  TORCH_CHECK_VALUE(x.scalar_type() == at::kDouble || lr <= std::numeric_limits<float>::max(), op,
                    ": lr must fit in float32, the arithmetic type of ", x.scalar_type(),
                    " weights, got ", lr);
  const c10::cuda::CUDAGuard guard(cuda_device_of(op, "x", x));
  // A frozen weight (update false) gets neither its gradient GEMM nor an update.
  s.weights = {update[0], update[1], update[2] && b1.has_value(), update[3] && b2.has_value()};
  s.lr = lr;
  return fused_step(d, x, target, w1, w2, b1, b2, s).loss;
}

}  // namespace twolayer::cuda
