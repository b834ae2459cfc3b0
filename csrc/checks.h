// Argument validation shared by every device's kernels. Each check names the
// public function, the argument and what was expected, so a bad call never
// reaches a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "op_table.h"

namespace twolayer {

enum class Reduction { Sum, Mean };

// "sum" or "mean"; anything else is an error naming `op`.
Reduction parse_reduction(const char* op, c10::string_view reduction);

struct Dims {
  int64_t N, D_in, H, D_out;
};

// x[N, D_in], w1[D_in, H], w2[H, D_out], b1[H]?, b2[D_out]?: ranks, sizes,
// one floating dtype the device supports, one device.
Dims check_two_layer_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                          const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                          const std::optional<at::Tensor>& b2);

// The fused loss: the two_layer arguments and target [N, D_out] of x's dtype and device.
Dims check_two_layer_l2_loss_args(const at::Tensor& x, const at::Tensor& target,
                                  const at::Tensor& w1, const at::Tensor& w2,
                                  const std::optional<at::Tensor>& b1,
                                  const std::optional<at::Tensor>& b2,
                                  const char* op = "two_layer_l2_loss");

// two_layer's backward: grad_y [N, D_out], w2 [H, D_out], act [N, H]; x [N, D_in] and
// w1 [D_in, H] must be given where grad_w1 / grad_x are asked for, and are checked
// whenever given. D_in is 0 when neither is needed.
Dims check_two_layer_bwd_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                              const std::optional<at::Tensor>& w1, const at::Tensor& w2,
                              const at::Tensor& act, bool need_x, bool need_w1);

// pred and target: one floating dtype and device, the same shape (no broadcasting).
Reduction check_l2_loss_args(const at::Tensor& pred, const at::Tensor& target,
                             c10::string_view reduction);
void check_l2_loss_bwd_args(const at::Tensor& grad_loss, const at::Tensor& grad);

// sgd_step: the two_layer arguments, target [N, D_out], a finite lr >= 0, and weights
// that can be written in place without touching each other or the inputs.
Dims check_sgd_step_args(const at::Tensor& x, const at::Tensor& target, const at::Tensor& w1,
                         const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                         const std::optional<at::Tensor>& b2, double lr);

// `t` must have the dtype and device of `ref` (named `ref_name`).
void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref);

// `t` must have exactly `shape` (no broadcasting).
void check_shape(const char* op, const char* name, const at::Tensor& t, c10::SymIntArrayRef shape,
                 const char* shape_desc);

// A floating dtype with kernels: float32, float64, float16 or bfloat16 (CPU and CUDA).
void check_float(const char* op, const char* name, const at::Tensor& t);

// Tensors written in place must not overlap themselves or any other argument.
void check_writable_and_disjoint(
    const char* op, const char* name, const at::Tensor& t,
    std::initializer_list<std::pair<const char*, const at::Tensor*>> others);

// One check per kernel op, taking the op's own arguments (op_table.h): what its kernels check
// on every device, and what its fake kernel runs (as the op `<name>_check`) under torch.compile.
namespace check {
#define TWOLAYER_DECLARE_CHECK(name, pub, args, rets, ret, params) void name params;
TWOLAYER_KERNEL_OPS(TWOLAYER_DECLARE_CHECK)
#undef TWOLAYER_DECLARE_CHECK
}  // namespace check

}  // namespace twolayer
