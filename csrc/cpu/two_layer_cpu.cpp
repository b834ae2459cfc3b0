// CPU kernels: GEMMs through ATen's BLAS, each followed by its fused
// elementwise epilogue in one parallel pass (bias in the GEMM via addmm, the
// ReLU and its sign-bit mask in one write, the loss and its gradient in one read).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>

#include <cmath>
#include <vector>

#include "../checks.h"
#include "../kernels.h"

namespace twolayer::cpu {

namespace {

constexpr int64_t kElementwiseGrain = 1 << 15;

// act = h < 0 ? -0.0 : |h|  (see kernels.h for why the sign bit is the mask).
template <typename T>
void relu_with_sign_mask(T* act, int64_t n) {
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T v = act[i];
      act[i] = v < T(0) ? -T(0) : std::abs(v);
    }
  });
}

// g = 0 where act's sign bit says the ReLU blocked the gradient.
template <typename T>
void apply_relu_mask(T* g, const T* act, int64_t n) {
  at::parallel_for(0, n, kElementwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) g[i] = std::signbit(act[i]) ? T(0) : g[i];
  });
}

// Sum of squares of (p - t) and, if g != nullptr, g = scale2 * (p - t), in one
// read. Partial sums over fixed chunks, added in chunk order: the result is
// the same bits for any thread count. Accumulates in double.
template <typename T>
double squared_error_sum(const T* p, const T* t, T* g, T scale2, int64_t n) {
  constexpr int64_t kChunk = 4096;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  at::parallel_for(0, chunks, kElementwiseGrain / kChunk, [&](int64_t c0, int64_t c1) {
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
  // Pairwise over chunks keeps the error O(log n) for very large losses.
  for (int64_t width = 1; width < chunks; width *= 2)
    for (int64_t c = 0; c + width < chunks; c += 2 * width) partial[c] += partial[c + width];
  return chunks ? partial[0] : 0.0;
}

void check_grad_y(const at::Tensor& grad_y, const at::Tensor& act, const at::Tensor& w2) {
  constexpr const char* op = "two_layer (backward)";
  TORCH_CHECK_VALUE(act.dim() == 2, op, ": act must be 2-D [N, H], got ", act.dim(), "-D");
  check_float(op, "act", act);
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == act.size(1), op,
                    ": w2 must have shape [H, D_out] with H = ", act.size(1));
  check_like(op, "w2", w2, "act", act);
  check_like(op, "grad_y", grad_y, "act", act);
  check_shape(op, "grad_y", grad_y, {act.size(0), w2.size(1)}, "[N, D_out]");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                 const at::Tensor& w2, const OptTensor& b1,
                                                 const OptTensor& b2) {
  const Dims d = check_two_layer_args("two_layer", x, w1, b1, w2, b2);
  auto act = at::empty({d.N, d.H}, x.options());
  auto y = at::empty({d.N, d.D_out}, x.options());
  // Bias enters as the GEMM's C input (beta = 1), not as a pass of its own.
  if (b1) at::addmm_out(act, b1->expand({d.N, d.H}), x, w1);
  else at::mm_out(act, x, w1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "two_layer_fwd", [&] {
    relu_with_sign_mask(act.data_ptr<scalar_t>(), act.numel());
  });
  if (b2) at::addmm_out(y, b2->expand({d.N, d.D_out}), act, w2);
  else at::mm_out(y, act, w2);
  return {y, act};
}

Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                     const at::Tensor& w2, const at::Tensor& act, std::array<bool, 5> output_mask) {
  check_grad_y(grad_y, act, w2);
  const auto [need_x, need_w1, need_b1, need_w2, need_b2] = output_mask;
  OptTensor grad_x, grad_w1, grad_b1, grad_w2, grad_b2;
  if (need_w2) grad_w2 = at::mm(act.t(), grad_y);
  if (need_b2) grad_b2 = at::sum(grad_y, 0);
  if (need_x || need_w1 || need_b1) {
    auto grad_h = at::mm(grad_y, w2.t());
    AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "two_layer_bwd", [&] {
      apply_relu_mask(grad_h.data_ptr<scalar_t>(), act.contiguous().data_ptr<scalar_t>(),
                      grad_h.numel());
    });
    if (need_w1) {
      TORCH_CHECK_VALUE(x.has_value(), "two_layer (backward): x is needed for grad_w1");
      check_like("two_layer (backward)", "x", *x, "act", act);
      check_shape("two_layer (backward)", "x", *x, {act.size(0), x->size(-1)}, "[N, D_in]");
      grad_w1 = at::mm(x->t(), grad_h);
    }
    if (need_b1) grad_b1 = at::sum(grad_h, 0);
    if (need_x) {
      TORCH_CHECK_VALUE(w1.has_value(), "two_layer (backward): w1 is needed for grad_x");
      check_like("two_layer (backward)", "w1", *w1, "act", act);
      check_shape("two_layer (backward)", "w1", *w1, {w1->size(0), act.size(1)}, "[D_in, H]");
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
    loss.fill_(r == Reduction::Mean ? total / double(n) : total);
  });
  return {loss, grad};
}

at::Tensor l2_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& grad) {
  constexpr const char* op = "l2_loss (backward)";
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, op, ": grad_loss must have one element, got shape ",
                    grad_loss.sizes());
  check_like(op, "grad_loss", grad_loss, "grad", grad);
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

  auto [y, act] = two_layer_fwd(x, w1, w2, b1, b2);
  auto [loss, grad_y] = l2_loss_fwd(y, target, reduction, /*need_grad=*/true);
  // Every gradient is taken at the old weights: grad_h reads w2 before w2 is updated.
  auto grad_h = at::mm(*grad_y, w2.t());
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "sgd_step", [&] {
    apply_relu_mask(grad_h.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(), grad_h.numel());
  });
  // w -= lr * grad with the update in the GEMM's epilogue (beta = 1, alpha = -lr).
  const_cast<at::Tensor&>(w2).addmm_(act.t(), *grad_y, 1.0, -lr);
  const_cast<at::Tensor&>(w1).addmm_(x.t(), grad_h, 1.0, -lr);
  if (b2) const_cast<at::Tensor&>(*b2).add_(at::sum(*grad_y, 0), -lr);
  if (b1) const_cast<at::Tensor&>(*b1).add_(at::sum(grad_h, 0), -lr);
  return loss;
}

}  // namespace twolayer::cpu
