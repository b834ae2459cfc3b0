#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <utility>
#include <vector>

namespace twolayer {

namespace {
// Sizes are read as SymInts, so the same checks serve real tensors and the fake ones
// torch.compile traces with (whose sizes may be symbolic; a comparison then guards on it).
std::string shape_str(c10::SymIntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

double max_finite(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return std::numeric_limits<float>::max();
    case at::kHalf: return double(std::numeric_limits<c10::Half>::max());
    case at::kBFloat16: return double(std::numeric_limits<c10::BFloat16>::max());
    default: return std::numeric_limits<double>::max();
  }
}
}  // namespace

Reduction parse_reduction(const char* op, c10::string_view reduction) {
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "mean") return Reduction::Mean;
  TORCH_CHECK_VALUE(false, op, ": reduction must be \"sum\" or \"mean\", got \"",
                    std::string(reduction.data(), reduction.size()), "\"");
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  // The same four on every device with kernels (float16/bfloat16 compute in float32).
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16 on ",
                   t.is_cuda() ? std::string("CUDA") : t.device().str(), ", got ", dt);
}

void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name,
                   " must have the same dtype as ", ref_name, " (", ref.scalar_type(), "), got ",
                   t.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                 const char* shape_desc) {
  TORCH_CHECK_VALUE(t.sym_sizes() == shape, op, ": ", name, " must have shape ", shape_desc, " = ",
                    shape_str(shape), ", got ", shape_str(t.sym_sizes()));
}

namespace {

struct SymDims {
  c10::SymInt N, D_in, H, D_out;
  Dims ints() const {
    return {N.expect_int(), D_in.expect_int(), H.expect_int(), D_out.expect_int()};
  }
};

SymDims sym_two_layer_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                           const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                           const std::optional<at::Tensor>& b2) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be a 2-D tensor [N, D_in], got ", x.dim(),
                    "-D of shape ", shape_str(x.sym_sizes()));
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(w1.dim() == 2, op, ": w1 must be a 2-D tensor [D_in, H], got ", w1.dim(),
                    "-D of shape ", shape_str(w1.sym_sizes()));
  TORCH_CHECK_VALUE(w2.dim() == 2, op, ": w2 must be a 2-D tensor [H, D_out], got ", w2.dim(),
                    "-D of shape ", shape_str(w2.sym_sizes()));
  // A model's dtype is its weights': an input of another dtype is the input's fault (as
  // nn.Linear says), so x is named against w1.
  TORCH_CHECK_TYPE(x.scalar_type() == w1.scalar_type(), op, ": x must have the same dtype as w1 (",
                   w1.scalar_type(), "), got ", x.scalar_type());
  check_like(op, "w1", w1, "x", x);
  check_like(op, "w2", w2, "x", x);
  SymDims d{x.sym_size(0), x.sym_size(1), w1.sym_size(1), w2.sym_size(1)};
  TORCH_CHECK_VALUE(w1.sym_size(0) == d.D_in, op,
                    ": w1 must have shape [D_in, H] with D_in = ", d.D_in, " (x.size(1)), got ",
                    shape_str(w1.sym_sizes()));
  TORCH_CHECK_VALUE(w2.sym_size(0) == d.H, op, ": w2 must have shape [H, D_out] with H = ", d.H,
                    " (w1.size(1)), got ", shape_str(w2.sym_sizes()));
  if (b1.has_value()) {
    check_like(op, "b1", *b1, "x", x);
    check_shape(op, "b1", *b1, {d.H}, "[H]");
  }
  if (b2.has_value()) {
    check_like(op, "b2", *b2, "x", x);
    check_shape(op, "b2", *b2, {d.D_out}, "[D_out]");
  }
  return d;
}

}  // namespace

Dims check_two_layer_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                          const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                          const std::optional<at::Tensor>& b2) {
  return sym_two_layer_args(op, x, w1, w2, b1, b2).ints();
}

namespace {

// at::get_overlap_status and has_internal_overlap answer "too hard" for any
// tensor that is not dense; these settle those cases instead of refusing them.

// The first and last byte a tensor with elements can touch.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  uintptr_t lo = reinterpret_cast<uintptr_t>(t.data_ptr()), hi = lo;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t extent = (t.size(d) - 1) * t.stride(d) * int64_t(t.element_size());
    if (extent >= 0)
      hi += uintptr_t(extent);
    else
      lo -= uintptr_t(-extent);
  }
  return {lo, hi + t.element_size() - 1};
}

bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  switch (at::get_overlap_status(a, b)) {
    case at::MemOverlapStatus::No: return false;
    case at::MemOverlapStatus::TooHard: break;
    default: return true;
  }
  if (!a.is_alias_of(b)) return false;  // different storages
  const auto [a_lo, a_hi] = byte_span(a);
  const auto [b_lo, b_hi] = byte_span(b);
  return a_lo <= b_hi && b_lo <= a_hi;  // intervals meet: assume they overlap
}

// Some element is reachable from two indices (e.g. a stride-0 expanded tensor).
bool overlaps_itself(const at::Tensor& t) {
  switch (at::has_internal_overlap(t)) {
    case at::MemOverlap::No: return false;
    case at::MemOverlap::Yes: return true;
    default: break;
  }
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size) of dims with size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(std::abs(t.stride(d)), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // elements spanned by the smaller-stride dims
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return true;
    reach += (size - 1) * stride;
  }
  return false;
}

}  // namespace

void check_writable_and_disjoint(
    const char* op, const char* name, const at::Tensor& t,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  TORCH_CHECK_VALUE(!overlaps_itself(t), op, ": ", name,
                    " is updated in place, so its elements must not share memory (an expanded or "
                    "stride-0 tensor cannot be updated); pass a tensor with its own storage");
  for (const auto& [other_name, other] : others) {
    if (other == nullptr || !other->defined()) continue;
    TORCH_CHECK_VALUE(!may_overlap(t, *other), op, ": ", name,
                      " is updated in place and must not share memory with ", other_name);
  }
}

namespace {

SymDims sym_two_layer_bwd_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                               const std::optional<at::Tensor>& w1, const at::Tensor& w2,
                               const at::Tensor& act, bool need_x, bool need_w1) {
  constexpr const char* op = "two_layer (backward)";
  TORCH_CHECK_VALUE(act.dim() == 2, op, ": act must be 2-D [N, H], got ", act.dim(), "-D");
  check_float(op, "act", act);
  const c10::SymInt N = act.sym_size(0), H = act.sym_size(1);
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.sym_size(0) == H, op,
                    ": w2 must have shape [H, D_out] with H = ", H, ", got ",
                    shape_str(w2.sym_sizes()));
  check_like(op, "w2", w2, "act", act);
  const c10::SymInt D_out = w2.sym_size(1);
  TORCH_CHECK_VALUE(grad_y.dim() == 2, op, ": grad_y must be 2-D [N, D_out], got ", grad_y.dim(),
                    "-D");
  check_like(op, "grad_y", grad_y, "act", act);
  check_shape(op, "grad_y", grad_y, {N, D_out}, "[N, D_out]");
  TORCH_CHECK_VALUE(!need_w1 || x.has_value(), op, ": x [N, D_in] is needed for grad_w1");
  TORCH_CHECK_VALUE(!need_x || w1.has_value(), op, ": w1 [D_in, H] is needed for grad_x");
  c10::SymInt D_in = 0;
  if (x) {
    check_like(op, "x", *x, "act", act);
    TORCH_CHECK_VALUE(x->dim() == 2 && x->sym_size(0) == N, op,
                      ": x must have shape [N, D_in] with N = ", N, ", got ",
                      shape_str(x->sym_sizes()));
    D_in = x->sym_size(1);
  }
  if (w1) {
    check_like(op, "w1", *w1, "act", act);
    TORCH_CHECK_VALUE(w1->dim() == 2 && w1->sym_size(1) == H && (!x || w1->sym_size(0) == D_in), op,
                      ": w1 must have shape [D_in, H] with H = ", H,
                      x ? " and D_in = x.size(1)" : "", ", got ", shape_str(w1->sym_sizes()));
    D_in = w1->sym_size(0);
  }
  return {N, D_in, H, D_out};
}

SymDims sym_two_layer_l2_loss_args(const at::Tensor& x, const at::Tensor& target,
                                   const at::Tensor& w1, const at::Tensor& w2,
                                   const std::optional<at::Tensor>& b1,
                                   const std::optional<at::Tensor>& b2, const char* op) {
  SymDims d = sym_two_layer_args(op, x, w1, w2, b1, b2);
  check_like(op, "target", target, "x", x);
  check_shape(op, "target", target, {d.N, d.D_out}, "[N, D_out]");
  return d;
}

// A tensor with real memory to compare addresses in (not a fake or meta one).
bool has_memory(const at::Tensor& t) {
  return !t.is_meta() && !t.key_set().has(c10::DispatchKey::Python);
}

SymDims sym_sgd_step_args(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                          const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                          const std::optional<at::Tensor>& b2, double lr) {
  constexpr const char* op = "sgd_step";
  SymDims d = sym_two_layer_l2_loss_args(x, target, w1, w2, b1, b2, op);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, op, ": lr must be a finite number >= 0, got ",
                    lr);
  // The update computes lr * grad in the weights' dtype: an lr that dtype cannot hold is
  // refused before anything is written, as torch.optim refuses it.
  const double lr_max = max_finite(w1.scalar_type());
  TORCH_CHECK_VALUE(lr <= lr_max, op, ": lr must be at most ", lr_max, " (the largest ",
                    w1.scalar_type(), " value, the weights' dtype), got ", lr);
  const std::pair<const char*, const at::Tensor*> weights[] = {
      {"w1", &w1}, {"w2", &w2}, {"b1", b1 ? &*b1 : nullptr}, {"b2", b2 ? &*b2 : nullptr}};
  for (const auto& [name, w] : weights)
    TORCH_CHECK(w == nullptr || !w->is_inference() || c10::InferenceMode::is_enabled(), op, ": ",
                name,
                " is an inference tensor (made under torch.inference_mode()); an in-place "
                "update to it outside InferenceMode is not allowed (as torch refuses it): update "
                "it inside torch.inference_mode(), or clone it outside first");
  if (!has_memory(w1)) return d;
  const at::Tensor* pb1 = b1 ? &*b1 : nullptr;
  const at::Tensor* pb2 = b2 ? &*b2 : nullptr;
  check_writable_and_disjoint(
      op, "w1", w1, {{"x", &x}, {"target", &target}, {"w2", &w2}, {"b1", pb1}, {"b2", pb2}});
  check_writable_and_disjoint(op, "w2", w2,
                              {{"x", &x}, {"target", &target}, {"b1", pb1}, {"b2", pb2}});
  if (b1) check_writable_and_disjoint(op, "b1", *b1, {{"x", &x}, {"target", &target}, {"b2", pb2}});
  if (b2) check_writable_and_disjoint(op, "b2", *b2, {{"x", &x}, {"target", &target}});
  return d;
}

}  // namespace

Dims check_two_layer_bwd_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                              const std::optional<at::Tensor>& w1, const at::Tensor& w2,
                              const at::Tensor& act, bool need_x, bool need_w1) {
  return sym_two_layer_bwd_args(grad_y, x, w1, w2, act, need_x, need_w1).ints();
}

Reduction check_l2_loss_args(const at::Tensor& pred, const at::Tensor& target,
                             c10::string_view reduction) {
  constexpr const char* op = "l2_loss";
  const Reduction r = parse_reduction(op, reduction);
  check_float(op, "pred", pred);
  check_like(op, "target", target, "pred", pred);
  TORCH_CHECK_VALUE(target.sym_sizes() == pred.sym_sizes(), op,
                    ": target must have the same shape as pred ", shape_str(pred.sym_sizes()),
                    ", got ", shape_str(target.sym_sizes()), " (no broadcasting)");
  return r;
}

void check_l2_loss_bwd_args(const at::Tensor& grad_loss, const at::Tensor& grad) {
  constexpr const char* op = "l2_loss (backward)";
  TORCH_CHECK_VALUE(grad_loss.sym_numel() == 1, op, ": grad_loss must have one element, got shape ",
                    shape_str(grad_loss.sym_sizes()));
  check_like(op, "grad_loss", grad_loss, "grad", grad);
}

Dims check_two_layer_l2_loss_args(const at::Tensor& x, const at::Tensor& target,
                                  const at::Tensor& w1, const at::Tensor& w2,
                                  const std::optional<at::Tensor>& b1,
                                  const std::optional<at::Tensor>& b2, const char* op) {
  return sym_two_layer_l2_loss_args(x, target, w1, w2, b1, b2, op).ints();
}

Dims check_sgd_step_args(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                         const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                         const std::optional<at::Tensor>& b2, double lr) {
  return sym_sgd_step_args(x, target, w1, w2, b1, b2, lr).ints();
}

// ---- one check per kernel op, with the op's own parameters (op_table.h) ----------------------

namespace check {

void two_layer_fwd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                   const OptTensor& b1, const OptTensor& b2) {
  sym_two_layer_args("two_layer", x, w1, w2, b1, b2);
}

void two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                   const at::Tensor& w2, const at::Tensor& act, std::array<bool, 5> output_mask,
                   std::array<bool, 2>) {
  sym_two_layer_bwd_args(grad_y, x, w1, w2, act, output_mask[0], output_mask[1]);
}

void l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target, c10::string_view reduction,
                 bool) {
  check_l2_loss_args(pred, target, reduction);
}

void l2_loss_bwd(const at::Tensor& grad_loss, const at::Tensor& grad) {
  check_l2_loss_bwd_args(grad_loss, grad);
}

void two_layer_l2_loss_fwd(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                           const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2,
                           c10::string_view reduction, std::array<bool, 6>, std::array<bool, 2>) {
  constexpr const char* op = "two_layer_l2_loss";
  sym_two_layer_l2_loss_args(x, target, w1, w2, b1, b2, op);
  parse_reduction(op, reduction);
}

void sgd_step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
              const at::Tensor& w2, const OptTensor& b1, const OptTensor& b2, double lr,
              c10::string_view reduction, std::array<bool, 4>) {
  sym_sgd_step_args(x, target, w1, w2, b1, b2, lr);
  parse_reduction("sgd_step", reduction);
}

}  // namespace check

}  // namespace twolayer
