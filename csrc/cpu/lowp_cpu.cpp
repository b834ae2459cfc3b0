// bfloat16 and float16 on the CPU (see lowp_cpu.h): ATen's GEMMs (float32 accumulation;
// a bias is added to the float32 accumulator in the GEMM's epilogue, beta = 1, so h is
// rounded once), then our elementwise passes in float32 arithmetic on the 16-bit storage.
// The structure is the CUDA path's (two_layer_cuda.cu); only the elementwise passes differ.
#include "lowp_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <vector>

#include "../kernels.h"
#include "../loss_value.h"
#include "cpu_impl.h"
#include "tuning.h"

namespace twolayer::cpu::lowp {

namespace {

// The sign bit of both 16-bit formats. The masks work on the bits: a conversion to float and
// back would keep a NaN's payload but is a rounding step the mask does not need.
constexpr uint16_t kSignBit = 0x8000;

template <typename T>
T from_bits(uint16_t b) {
  return T(b, T::from_bits());
}

// f(i0, i1) over [0, n) in tasks of kElementwiseGrain elements.
template <typename F>
void for_elements(int64_t n, F f) {
  at::parallel_for(0, n, tuning::kElementwiseGrain, f);
}

// In place: act = act < 0 ? -0.0 : |act| (NaN kept, its sign cleared), the ReLU with its
// mask in the sign bit (kernels.h). act is contiguous.
void relu_with_sign_mask_(const at::Tensor& act) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(act.scalar_type(), "relu_with_sign_mask_", [&] {
    scalar_t* p = act.data_ptr<scalar_t>();
    for_elements(act.numel(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const uint16_t b = p[i].x;
        p[i] = from_bits<scalar_t>(static_cast<float>(p[i]) < 0.0f ? kSignBit
                                                                     : uint16_t(b & ~kSignBit));
      }
    });
  });
}

// In place: grad_h = 0 where signbit(act), i.e. where the ReLU blocked (numpy's
// grad_h[h < 0] = 0, -0.0 and NaN included). Both contiguous, one dtype.
void apply_relu_mask_(const at::Tensor& grad_h, const at::Tensor& act) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(act.scalar_type(), "apply_relu_mask_", [&] {
    scalar_t* g = grad_h.data_ptr<scalar_t>();
    const scalar_t* a = act.const_data_ptr<scalar_t>();
    for_elements(act.numel(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const uint16_t keep = uint16_t((a[i].x >> 15) - 1);  // 0xffff, or 0 where the sign is set
        g[i] = from_bits<scalar_t>(uint16_t(g[i].x & keep));
      }
    });
  });
}

// The sum of (pred - target)^2 over contiguous tensors of n elements: each difference in
// float32, the sum in double over fixed chunks added pairwise (the same bits for any thread
// count, as squared_error_sum does for float32/float64). When `grad` is given (contiguous;
// it may be pred itself), also grad = grad_scale * (pred - target), rounded once.
double squared_error(const at::Tensor& pred, const at::Tensor& target, const OptTensor& grad,
                     double grad_scale) {
  constexpr int64_t kChunk = 4096;
  const int64_t n = pred.numel(), chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
  const float scale = static_cast<float>(grad_scale);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(pred.scalar_type(), "squared_error", [&] {
    using T = scalar_t;
    const T* p = pred.const_data_ptr<T>();
    const T* t = target.const_data_ptr<T>();
    T* g = grad ? grad->data_ptr<T>() : nullptr;
    at::parallel_for(0, chunks, tuning::kElementwiseGrain / kChunk, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
        std::array<double, 8> lanes{};  // independent chains
        for (int64_t i = begin; i < end; ++i) {
          const float d = static_cast<float>(p[i]) - static_cast<float>(t[i]);
          if (g) g[i] = static_cast<T>(scale * d);
          lanes[i & 7] += double(d) * double(d);
        }
        partial[c] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                     ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      }
    });
  });
  return pairwise_sum(partial.data(), chunks);
}

// The forward on checked arguments: (y, act).
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

// grad_h = (grad_y @ w2^T) with the ReLU's mask applied (act contiguous).
at::Tensor hidden_grad(const at::Tensor& grad_y, const at::Tensor& w2, const at::Tensor& act) {
  auto grad_h = at::mm(grad_y, w2.t()).contiguous();  // mm's fresh result: no copy
  apply_relu_mask_(grad_h, act);
  return grad_h;
}

// scale * (a @ b) into a fresh tensor: the scale rides in the GEMM's alpha, applied to the
// float32 accumulator (beta = 0 never reads the uninitialised output).
at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double scale) {
  if (scale == 1.0) return at::mm(a, b);
  auto out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0.0, /*alpha=*/scale);
}

// Column sums of g [rows, cols] in float32: a bias gradient's N-term sum, which in float16
// could pass 65504 even where the (mean-)scaled gradient is small.
at::Tensor column_sums(const at::Tensor& g) {
  return at::sum(g, 0, /*keepdim=*/false, at::kFloat);
}

at::Tensor scaled_column_sums(const at::Tensor& g, double scale) {
  return at::mul(column_sums(g), scale).to(g.scalar_type());
}

// Where a fused step's gradients go (w1, w2, b1, b2): stored into fresh tensors (the fused
// loss) or applied as w -= lr * grad in place (sgd_step, lr set).
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

// Forward, L2 loss and the gradients `s` asks for, at the weights as they were on entry
// (every read of a weight comes before its update). grad_y stays 2 * (y - target) for the
// mean too, the 1/n going into the GEMMs' alpha and the bias sums' scale: (2/n) * d would be
// subnormal in float16 at large n (~1e6), leaving rounding noise for the GEMMs.
FusedResult fused_step(const Dims& d, const at::Tensor& x, const at::Tensor& target,
                       const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,
                       const OptTensor& b2, const FusedStep& s) {
  auto [y, act] = forward(d, x, w1, w2, b1, b2);
  const bool any_weight = s.weights[0] || s.weights[1] || s.weights[2] || s.weights[3];
  const bool need_grad_y = s.grad_x || s.grad_target || any_weight;
  FusedResult r;
  r.loss = at::empty({}, x.options());
  const double n = static_cast<double>(d.N) * static_cast<double>(d.D_out);
  // y becomes grad_y in place (each element read before it is written).
  const double total = squared_error(y, *target.expect_contiguous(),
                                     need_grad_y ? OptTensor(y) : std::nullopt, 2.0);
  r.loss.fill_(loss_value(s.mean ? total / n : total, r.loss.scalar_type()));  // the mean of nothing: 0 / 0 = NaN
  if (!need_grad_y) return r;
  const at::Tensor& gy = y;
  // n = 0: every gradient is an empty sum, 0; scale 1 keeps alpha finite there.
  const double scale = s.mean && n > 0 ? 1.0 / n : 1.0;

  // The hidden gradient first: it reads w2 before w2's update.
  at::Tensor grad_h;
  if (s.grad_x || s.weights[0] || s.weights[2]) grad_h = hidden_grad(gy, w2, act);
  if (s.grad_target) r.grad_target = at::mul(gy, -scale);
  if (s.grad_x) r.grad_x = scaled_mm(grad_h, w1.t(), scale);  // reads w1 before its update

  auto matrix = [&](int i, const at::Tensor& w, const at::Tensor& a, const at::Tensor& b) {
    if (!s.weights[i]) return;
    if (s.lr) const_cast<at::Tensor&>(w).addmm_(a, b, /*beta=*/1.0, /*alpha=*/-*s.lr * scale);
    else if (s.transposed[i]) r.grads[i] = scaled_mm(b.t(), a.t(), scale).t();
    else r.grads[i] = scaled_mm(a, b, scale);
  };
  auto bias = [&](int i, const OptTensor& b, const at::Tensor& g) {
    if (!s.weights[i] || !b) return;
    // The float32 sum meets the 16-bit bias in float32 arithmetic: one rounding.
    if (s.lr) const_cast<at::Tensor&>(*b).add_(column_sums(g), -*s.lr * scale);
    else r.grads[i] = scaled_column_sums(g, scale);
  };
  matrix(1, w2, act.t(), gy);
  bias(3, b2, gy);
  if (grad_h.defined()) {
    matrix(0, w1, x.t(), grad_h);
    bias(2, b1, grad_h);
  }
  return r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const Dims& d, const at::Tensor& x,
                                                 const at::Tensor& w1, const at::Tensor& w2,
                                                 const OptTensor& b1, const OptTensor& b2) {
  return forward(d, x, w1, w2, b1, b2);
}

Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                     const at::Tensor& w2, const at::Tensor& act_in, std::array<bool, 5> output_mask) {
  const auto [need_x, need_w1, need_w2, need_b1, need_b2] = output_mask;
  const auto act = act_in.expect_contiguous();  // two_layer_fwd's own act: no copy
  OptTensor grad_x, grad_w1, grad_w2, grad_b1, grad_b2;
  if (need_w2) grad_w2 = at::mm(act->t(), grad_y);
  if (need_b2) grad_b2 = scaled_column_sums(grad_y, 1.0);
  if (need_x || need_w1 || need_b1) {
    const auto grad_h = hidden_grad(grad_y, w2, *act);
    if (need_w1) grad_w1 = at::mm(x->t(), grad_h);
    if (need_b1) grad_b1 = scaled_column_sums(grad_h, 1.0);
    if (need_x) grad_x = at::mm(grad_h, w1->t());
  }
  return {grad_x, grad_w1, grad_w2, grad_b1, grad_b2};
}

std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                              Reduction r, bool need_grad) {
  const auto p = pred.expect_contiguous();
  const auto t = target.expect_contiguous();
  auto loss = at::empty({}, pred.options());
  OptTensor grad;
  if (need_grad) grad = at::empty(pred.sizes(), pred.options());
  // This op returns the gradient itself, so it is (2/n) * d for the mean, as for float32.
  const double n = static_cast<double>(pred.numel());
  const bool mean = r == Reduction::Mean;
  const double total = squared_error(*p, *t, grad, mean ? 2.0 / n : 2.0);
  loss.fill_(loss_value(mean ? total / n : total, loss.scalar_type()));  // the mean of nothing is NaN, as nn.MSELoss
  return {loss, grad};
}

FusedLossGrads two_layer_l2_loss_fwd(const Dims& d, const at::Tensor& x, const at::Tensor& target,
                                     const at::Tensor& w1, const at::Tensor& w2,
                                     const OptTensor& b1, const OptTensor& b2, bool mean,
                                     std::array<bool, 6> output_mask,
                                     std::array<bool, 2> grad_transposed) {
  const auto [need_x, need_target, need_w1, need_w2, need_b1, need_b2] = output_mask;
  FusedStep s;
  s.mean = mean;
  s.grad_x = need_x;
  s.grad_target = need_target;
  s.weights = {need_w1, need_w2, need_b1 && b1.has_value(), need_b2 && b2.has_value()};
  s.transposed = grad_transposed;
  auto r = fused_step(d, x, target, w1, w2, b1, b2, s);
  return {r.loss, r.grad_x, r.grad_target, r.grads[0], r.grads[1], r.grads[2], r.grads[3]};
}

at::Tensor sgd_step(const Dims& d, const at::Tensor& x, const at::Tensor& target,
                    const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,
                    const OptTensor& b2, double lr, bool mean, std::array<bool, 4> update) {
  FusedStep s;
  s.mean = mean;
  // A frozen weight (update false) gets neither its gradient GEMM nor an update.
  s.weights = {update[0], update[1], update[2] && b1.has_value(), update[3] && b2.has_value()};
  s.lr = lr;
  return fused_step(d, x, target, w1, w2, b1, b2, s).loss;
}

}  // namespace twolayer::cpu::lowp
