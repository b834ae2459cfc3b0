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

// loss (0-dim) = sum of (pred - target)^2, divided by numel if `mean`,
// accumulated in float64 in a fixed order (same bits on every run); and, in the
// same read, grad = 2 * scale * (pred - target) with scale = 1 or 1/numel, when
// `grad` is given.
void squared_error(const at::Tensor& pred, const at::Tensor& target, bool mean,
                   const at::Tensor& loss, const std::optional<at::Tensor>& grad);

}  // namespace twolayer::cuda
