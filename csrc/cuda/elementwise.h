// The CUDA elementwise passes that follow each GEMM (the GEMMs themselves are
// ATen's, i.e. cuBLAS). Host functions: each launches on the current stream of
// the current device (the caller holds a CUDAGuard), with no host sync.
// Every tensor here must be contiguous, on that device, with one dtype
// (float32, float64, float16 or bfloat16); half types compute in float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace twolayer::cuda {

// In place: act = act < 0 ? -0.0 : |act|, the ReLU with its mask in the sign
// bit (see kernels.h).
void relu_with_sign_mask_(const at::Tensor& act);

// In place: grad_h = 0 where signbit(act), i.e. where the ReLU blocked it.
void apply_relu_mask_(const at::Tensor& grad_h, const at::Tensor& act);

// loss (0-dim) = (sum of (pred - target)^2) / loss_divisor, accumulated in
// float64 in a fixed order (same bits on every run), inf where it overflows
// loss's dtype; and, in the same read,
// grad = grad_scale * (pred - target) when `grad` is given (it may be pred
// itself). The two scales are apart because a 16-bit fused step keeps
// grad_scale = 2 for the mean too (L2Loss, loss_value.h).
void squared_error(const at::Tensor& pred, const at::Tensor& target, double loss_divisor,
                   const at::Tensor& loss, const std::optional<at::Tensor>& grad,
                   double grad_scale);

}  // namespace twolayer::cuda
