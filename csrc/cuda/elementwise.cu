// CUDA kernels for the elementwise passes (declared in elementwise.h): plain
// grid-stride loops with int64 indices, one kernel per pass. Values are read
// into at::opmath_type (float for float16/bfloat16/float32, double for
// float64), so they match the CPU kernels' arithmetic for float32/float64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "elementwise.h"

// float32, float64, float16, bfloat16: the dtypes check_float allows on CUDA.
#define TWOLAYER_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace twolayer::cuda {

namespace {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU; the grid-stride loops cover the rest.
// It also bounds the loss's per-block partial sums, summed by one block.
constexpr int64_t kMaxBlocks = 1024;

// At least one block, so the loss kernels also run (and write 0) for numel 0.
unsigned int blocks_for(int64_t n) {
  return static_cast<unsigned int>(
      std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

__device__ __forceinline__ int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// The sign bit of T's own storage, read and cleared as an integer: the PTX ISA leaves the sign
// of `abs` (what fabs/fabsf compile to) unspecified for NaN, and a conversion to float may not
// keep a half NaN's sign either; the backward's mask relies on this bit alone.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 8, uint64_t,
                                std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
template <typename T>
constexpr Bits<T> kSignBit = Bits<T>(1) << (8 * sizeof(T) - 1);

template <typename T>
__device__ __forceinline__ bool sign_bit(T v) {
  static_assert(sizeof(T) == sizeof(Bits<T>));
  Bits<T> b;
  memcpy(&b, &v, sizeof b);
  return (b & kSignBit<T>) != 0;
}

template <typename T>
__device__ __forceinline__ T clear_sign_bit(T v) {
  Bits<T> b;
  memcpy(&b, &v, sizeof b);
  b &= static_cast<Bits<T>>(~kSignBit<T>);
  memcpy(&v, &b, sizeof b);
  return v;
}

template <typename T>
__global__ void relu_with_sign_mask_kernel(T* act, int64_t n) {
  using A = at::opmath_type<T>;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const T v = act[i];
    act[i] = static_cast<A>(v) < A(0) ? static_cast<T>(-A(0)) : clear_sign_bit(v);
  }
}

template <typename T>
__global__ void apply_relu_mask_kernel(T* grad_h, const T* act, int64_t n) {
  using A = at::opmath_type<T>;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    if (sign_bit(act[i])) grad_h[i] = static_cast<T>(A(0));
  }
}

// Sum of `v` over a block of kBlock threads, in a fixed tree order; every thread gets the
// result. Launch with blockDim.x == kBlock (every launch here uses kThreads).
template <int kBlock>
__device__ double block_sum(double v) {
  static_assert(kBlock > 0 && (kBlock & (kBlock - 1)) == 0,
                "block_sum halves the block: kBlock must be a power of two");
  __shared__ double lanes[kBlock];
  lanes[threadIdx.x] = v;
  __syncthreads();
  for (int width = kBlock / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) lanes[threadIdx.x] += lanes[threadIdx.x + width];
    __syncthreads();
  }
  return lanes[0];
}

// partial[block] = sum of d^2 over the block's elements, d = pred - target;
// grad = grad_scale * d when grad != nullptr.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    squared_error_partials_kernel(const T* pred, const T* target, T* grad,
                                  at::opmath_type<T> grad_scale, int64_t n, double* partial) {
  using A = at::opmath_type<T>;
  double sum = 0.0;
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const A d = static_cast<A>(pred[i]) - static_cast<A>(target[i]);
    if (grad != nullptr) grad[i] = static_cast<T>(grad_scale * d);
    sum += static_cast<double>(d) * static_cast<double>(d);
  }
  const double total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// loss = (sum of the partials) / divisor, by one block in a fixed order. The float64 value
// goes to T through T's opmath type with the device's IEEE round-to-nearest conversions, which
// saturate to +-inf: a loss beyond T's range is inf, as torch's own losses give (never an error,
// never the undefined result a host-side C++ cast of an out-of-range double would be).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finish_loss_kernel(const double* partial, int64_t num_partials, double divisor, T* loss) {
  using A = at::opmath_type<T>;
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += blockDim.x) sum += partial[i];
  const double total = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) *loss = static_cast<T>(static_cast<A>(total / divisor));
}

}  // namespace

void relu_with_sign_mask_(const at::Tensor& act) {
  TORCH_INTERNAL_ASSERT(act.is_cuda() && act.is_contiguous());
  const int64_t n = act.numel();
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TWOLAYER_DISPATCH_FLOATING(act.scalar_type(), "relu_with_sign_mask_cuda", [&] {
    relu_with_sign_mask_kernel<scalar_t>
        <<<blocks_for(n), kThreads, 0, stream>>>(act.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void apply_relu_mask_(const at::Tensor& grad_h, const at::Tensor& act) {
  TORCH_INTERNAL_ASSERT(grad_h.is_cuda() && grad_h.is_contiguous() && act.is_contiguous());
  TORCH_INTERNAL_ASSERT(grad_h.sizes() == act.sizes() && grad_h.dtype() == act.dtype());
  const int64_t n = grad_h.numel();
  if (n == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TWOLAYER_DISPATCH_FLOATING(act.scalar_type(), "apply_relu_mask_cuda", [&] {
    apply_relu_mask_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        grad_h.mutable_data_ptr<scalar_t>(), act.const_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void squared_error(const at::Tensor& pred, const at::Tensor& target, double loss_divisor,
                   const at::Tensor& loss, const std::optional<at::Tensor>& grad,
                   double grad_scale) {
  TORCH_INTERNAL_ASSERT(pred.is_cuda() && pred.is_contiguous() && target.is_contiguous());
  TORCH_INTERNAL_ASSERT(loss.numel() == 1 && (!grad || grad->is_contiguous()));
  const int64_t n = pred.numel();
  const unsigned int blocks = blocks_for(n);
  // Per-block sums in a scratch tensor (stream-ordered, so capturable in a CUDA graph).
  const auto partial = at::empty({static_cast<int64_t>(blocks)}, pred.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TWOLAYER_DISPATCH_FLOATING(pred.scalar_type(), "l2_loss_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    squared_error_partials_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        pred.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
        grad ? grad->mutable_data_ptr<scalar_t>() : nullptr, static_cast<A>(grad_scale), n,
        partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_loss_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        partial.const_data_ptr<double>(), blocks, loss_divisor, loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace twolayer::cuda
