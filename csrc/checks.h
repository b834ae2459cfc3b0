// Argument validation shared by every device's kernels. Each check names the
// public function, the argument and what was expected, so a bad call never
// reaches a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace twolayer {

enum class Reduction { Sum, Mean };

// "sum" or "mean"; anything else is an error naming `op`.
Reduction parse_reduction(const char* op, c10::string_view reduction);

struct Dims {
  int64_t N, D_in, H, D_out;
};

// x[N, D_in], w1[D_in, H], b1[H]?, w2[H, D_out], b2[D_out]?: ranks, sizes,
// one floating dtype the device supports, one device.
Dims check_two_layer_args(const char* op, const at::Tensor& x, const at::Tensor& w1,
                          const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                          const std::optional<at::Tensor>& b2);

// `t` must have the dtype and device of `ref` (named `ref_name`).
void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref);

// `t` must have exactly `shape` (no broadcasting).
void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                 const char* shape_desc);

// A floating dtype with kernels on t's device (float32/float64 on CPU; also
// float16/bfloat16 on CUDA).
void check_float(const char* op, const char* name, const at::Tensor& t);

// Tensors written in place must not overlap themselves or any other argument.
void check_writable_and_disjoint(const char* op, const char* name, const at::Tensor& t,
                                 std::initializer_list<std::pair<const char*, const at::Tensor*>> others);

}  // namespace twolayer
