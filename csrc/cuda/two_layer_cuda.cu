// CUDA kernels of the ops: the composite step (csrc/composite/step.h), the CPU tests' own
// orchestration, with the CUDA policy below. The GEMMs go through ATen (cuBLAS, honouring
// torch's TF32 and reduced-precision settings; float16/bfloat16 accumulate in float32), each
// followed by its elementwise pass from elementwise.cu. Every op checks its arguments first (a
// mixed-device call is an error naming the argument), then runs on x's (or the reference
// tensor's) device and that device's current stream, with no host synchronisation, so it can
// be captured in a CUDA graph. sgd_step changes no weight unless it runs to the end
// (kUpdatesLast).
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <limits>

#include "../checks.h"
#include "../composite/step.h"
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

struct Policy {
  using Loss = at::Tensor;  // 0-dim, written on the device
  // Every gradient first, then the in-place adds, which allocate nothing and whose alphas the
  // caller has checked (see sgd_step): whatever can fail (an allocation, a GEMM, a conversion)
  // fails before any weight has changed.
  static constexpr bool kUpdatesLast = true;

  // ATen then adds the bias in cuBLASLt's epilogue where it can, instead of a copy of an
  // expanded [N, H] view plus a beta = 1 GEMM.
  static bool bias_in_gemm(const at::Tensor&) { return true; }
  static void gemm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                   const OptTensor& bias, double alpha, bool accumulate) {
    composite::whole_gemm(out, a, b, bias, alpha, accumulate);
  }
  static void bias_relu_(const at::Tensor& act, const OptTensor& bias) {
    TORCH_INTERNAL_ASSERT(!bias, "the CUDA GEMM adds the bias");
    relu_with_sign_mask_(act);
  }
  static void add_bias_(const at::Tensor&, const at::Tensor&) {
    TORCH_INTERNAL_ASSERT(false, "the CUDA GEMM adds the bias");
  }
  static void relu_mask_(const at::Tensor& grad_h, const at::Tensor& act) {
    apply_relu_mask_(grad_h, act);
  }
  // A loss beyond the dtype's range is inf (the device's double-to-dtype conversion rounds to
  // nearest, overflowing to inf); the mean of nothing is 0 / 0 = NaN, as on the CPU.
  static Loss squared_error(const at::Tensor& pred, const at::Tensor& target, const OptTensor& grad,
                            double grad_scale, const L2Loss& l2) {
    at::Tensor loss = at::empty({}, pred.options());
    cuda::squared_error(pred, target, l2.divisor(), loss, grad, grad_scale);
    return loss;
  }
  static at::Tensor loss_tensor(const Loss& loss, const at::TensorOptions&) { return loss; }
  // In the opmath type: float32 for float16/bfloat16, where an N-term sum could pass
  // float16's 65504 even where the mean-scaled gradient is small.
  static at::Tensor column_sums(const at::Tensor& g) {
    return at::sum(g, 0, /*keepdim=*/false, at::toOpMathType(g.scalar_type()));
  }
  static void axpy_(const at::Tensor& bias, const at::Tensor& sums, double alpha) {
    const_cast<at::Tensor&>(bias).add_(sums, alpha);
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                 const at::Tensor& w2, const OptTensor& b1,
                                                 const OptTensor& b2) {
  const Dims d = check_two_layer_args("two_layer", x, w1, w2, b1, b2);
  const c10::cuda::CUDAGuard guard(cuda_device_of("two_layer", "x", x));
  return composite::two_layer_fwd<Policy>(d, x, w1, w2, b1, b2);
}

Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                     const at::Tensor& w2, const at::Tensor& act, std::array<bool, 5> output_mask,
                     std::array<bool, 2> grad_transposed) {
  const Dims d = check_two_layer_bwd_args(grad_y, x, w1, w2, act, output_mask[0], output_mask[1]);
  const c10::cuda::CUDAGuard guard(cuda_device_of(kBackward, "act", act));
  return composite::two_layer_bwd<Policy>(d, grad_y, x, w1, w2, act, output_mask, grad_transposed);
}

std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                              c10::string_view reduction, bool need_grad) {
  const Reduction r = check_l2_loss_args(pred, target, reduction);
  const c10::cuda::CUDAGuard guard(cuda_device_of("l2_loss", "pred", pred));
  return composite::l2_loss_fwd<Policy>(pred, target, r, need_grad);
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
  const bool mean = parse_reduction(op, reduction) == Reduction::Mean;
  const c10::cuda::CUDAGuard guard(cuda_device_of(op, "x", x));
  return composite::two_layer_l2_loss_fwd<Policy>(d, x, target, w1, w2, b1, b2, mean, output_mask,
                                                  grad_transposed);
}

at::Tensor sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                    const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, double lr,
                    c10::string_view reduction, std::array<bool, 4> update) {
  constexpr const char* op = "sgd_step";
  check_sgd_step_args(x, target, w1, w2, b1, b2, lr);
  const bool mean = parse_reduction(op, reduction) == Reduction::Mean;
  // The updates' alphas (-lr, and -lr / n for a mean's bias) are converted to the weights'
  // opmath type, float for float32/float16/bfloat16, which raises for a value beyond its range:
  // refuse such an lr here, before anything runs (the step then cannot fail after an update).
  TORCH_CHECK_VALUE(x.scalar_type() == at::kDouble || lr <= std::numeric_limits<float>::max(), op,
                    ": lr must fit in float32, the arithmetic type of ", x.scalar_type(),
                    " weights, got ", lr);
  const c10::cuda::CUDAGuard guard(cuda_device_of(op, "x", x));
  return composite::sgd_step<Policy>(x, target, w1, w2, b1, b2, lr, mean, update);
}

}  // namespace twolayer::cuda
