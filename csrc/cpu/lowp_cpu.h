// bfloat16 and float16 on the CPU ("low precision"): the op entry points in
// two_layer_cpu.cpp route these dtypes here after their argument checks. One
// implementation for every kernel variant: the GEMMs are ATen's (oneDNN, which uses
// AVX512_BF16 / AMX where the CPU has them, else ATen's own GEMM; both accumulate in
// float32), each followed by an elementwise pass in float32 arithmetic. Step for step
// the CUDA kernels (csrc/cuda/two_layer_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include "../checks.h"
#include "../kernels.h"

namespace twolayer::cpu::lowp {

// Whether t's dtype is served here (float16 or bfloat16).
inline bool handles(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// The op kernels on checked arguments (d from the checks).
std::tuple<at::Tensor, at::Tensor> two_layer_fwd(const Dims& d, const at::Tensor& x,
                                                 const at::Tensor& w1, const at::Tensor& w2,
                                                 const OptTensor& b1, const OptTensor& b2);
Grads5 two_layer_bwd(const at::Tensor& grad_y, const OptTensor& x, const OptTensor& w1,
                     const at::Tensor& w2, const at::Tensor& act, std::array<bool, 5> output_mask);
std::tuple<at::Tensor, OptTensor> l2_loss_fwd(const at::Tensor& pred, const at::Tensor& target,
                                              Reduction r, bool need_grad);
FusedLossGrads two_layer_l2_loss_fwd(const Dims& d, const at::Tensor& x, const at::Tensor& target,
                                     const at::Tensor& w1, const at::Tensor& w2,
                                     const OptTensor& b1, const OptTensor& b2, bool mean,
                                     std::array<bool, 6> output_mask,
                                     std::array<bool, 2> grad_transposed);
at::Tensor sgd_step(const Dims& d, const at::Tensor& x, const at::Tensor& target,
                    const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,
                    const OptTensor& b2, double lr, bool mean, std::array<bool, 4> update);

}  // namespace twolayer::cpu::lowp
