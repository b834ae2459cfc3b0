// Kernel entry points, one set per device. The dispatcher (ops.cpp) binds them
// to the schemas; argument checks live in checks.h and run before any kernel.
//
// The forward saves one hidden tensor, `act` [N, H]: the ReLU output, with the
// ReLU mask carried in the sign bit. Where the pre-activation h < 0 it holds
// -0.0 (a zero for the second matmul, "blocked" for the backward); elsewhere
// |h| (h >= 0, NaN kept with its sign cleared). So the backward applies
// numpy's `grad_h[h < 0] = 0` exactly, NaN and -0.0 included, without a
// second N x H tensor.
#pragma once

#include "op_table.h"

namespace twolayer {

// The op kernels of one device, declared alike for each (op_table.h).
#define TWOLAYER_DECLARE_KERNEL(name, pub, args, rets, ret, params) ret name params;

// A weight that is a transposed contiguous matrix (TwoLayerNet's w1, w2: views of its
// nn.Linear-layout parameters): the fused loss and two_layer's backward ask for its gradient in
// that same layout (grad_transposed of two_layer_l2_loss_fwd and two_layer_bwd), so that
// autograd hands it to the parameter as it is (AccumulateGrad copies a gradient whose strides
// differ from the parameter's). An explicit flag, not the strides, decides the output layout:
// torch.compile may lay inputs out anew.
inline bool transposed_layout(const at::Tensor& w) {
  return w.dim() == 2 && w.size(0) > 1 && w.size(1) > 1 && w.stride(0) == 1 &&
         w.stride(1) == w.size(0);
}

namespace cpu {
TWOLAYER_KERNEL_OPS(TWOLAYER_DECLARE_KERNEL)
}  // namespace cpu

#ifdef TWOLAYER_WITH_CUDA
namespace cuda {
TWOLAYER_KERNEL_OPS(TWOLAYER_DECLARE_KERNEL)
}  // namespace cuda
#endif

#undef TWOLAYER_DECLARE_KERNEL

}  // namespace twolayer
