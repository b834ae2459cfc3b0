// Autocast for the public ops, as torch's own autocast kernels (ATen/autocast_mode.h) do it
// for the modules they replace: two_layer runs in the autocast dtype (the lower-precision
// policy of linear/addmm, as nn.Linear), l2_loss in float32 (the fp32 policy of mse_loss, as
// nn.MSELoss), and two_layer_l2_loss is those two, so both losses are float32 throughout.
// Each kernel casts the floating tensor arguments (not float64 ones, and not tensors on
// another device type, as autocast leaves those alone), then calls the op again with the
// autocast key excluded, so it reaches autograd (which records the casts) and the device kernels. sgd_step has none: it updates its weights in place, and a
// cast copy would be updated instead; it runs in its arguments' dtype, like torch.optim.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include "kernels.h"

namespace twolayer {

namespace {

enum class Policy { LowerPrecision, Float32 };

// The op `name` called with every tensor argument cast per `policy` for device type `dev`
// (cached_cast passes the other arguments through).
template <c10::DeviceType dev, Policy policy, typename Sig, typename... Args>
at::Tensor cast_and_call(const char* name, const Args&... args) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(dev));
  const at::ScalarType to = policy == Policy::Float32
                                ? at::kFloat
                                : at::autocast::get_lower_precision_fp_from_device_type(dev);
  return op.call(at::autocast::cached_cast(to, args, dev)...);
}

template <c10::DeviceType dev>
at::Tensor two_layer_autocast(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                              const OptTensor& b1, const OptTensor& b2) {
  return cast_and_call<dev, Policy::LowerPrecision, sig::two_layer>("twolayer_ext::two_layer", x,
                                                                    w1, w2, b1, b2);
}

template <c10::DeviceType dev>
at::Tensor l2_loss_autocast(const at::Tensor& pred, const at::Tensor& target,
                            c10::string_view reduction) {
  return cast_and_call<dev, Policy::Float32, sig::l2_loss>("twolayer_ext::l2_loss", pred, target,
                                                           reduction);
}

// The loss of two_layer + l2_loss under autocast, as nn.Linear + nn.MSELoss: the prediction in
// the autocast dtype, the loss computed, accumulated and returned in float32 against the
// target as given (the fused kernel would round the loss and the target to the autocast dtype).
template <c10::DeviceType dev>
at::Tensor two_layer_l2_loss_autocast(const at::Tensor& x, const at::Tensor& target,
                                      const at::Tensor& w1, const at::Tensor& w2,
                                      const OptTensor& b1, const OptTensor& b2,
                                      c10::string_view reduction, bool linear_layout) {
  const at::Tensor y = linear_layout ? two_layer_autocast<dev>(x, w1.t(), w2.t(), b1, b2)
                                     : two_layer_autocast<dev>(x, w1, w2, b1, b2);
  return l2_loss_autocast<dev>(y, target, reduction);
}

}  // namespace

#define TWOLAYER_REGISTER_AUTOCAST(m, dev)       \
  m.impl("two_layer", &two_layer_autocast<dev>); \
  m.impl("l2_loss", &l2_loss_autocast<dev>);     \
  m.impl("two_layer_l2_loss", &two_layer_l2_loss_autocast<dev>)

TORCH_LIBRARY_IMPL(twolayer_ext, AutocastCPU, m) {
  TWOLAYER_REGISTER_AUTOCAST(m, c10::DeviceType::CPU);
}

// Registered in every build: the key exists without CUDA, and its kernels run only for CUDA
// tensors under torch.autocast("cuda").
TORCH_LIBRARY_IMPL(twolayer_ext, AutocastCUDA, m) {
  TWOLAYER_REGISTER_AUTOCAST(m, c10::DeviceType::CUDA);
}

#undef TWOLAYER_REGISTER_AUTOCAST

}  // namespace twolayer
