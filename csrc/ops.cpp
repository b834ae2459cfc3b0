// Schemas and dispatch: the one place that says which ops exist and which
// kernel serves each device. Importing twolayer_ext._C runs these static
// registrations; the module itself is empty (no pybind, so Dynamo sees real ops).
#include <Python.h>
#include <torch/library.h>

#include "cpu/tuner.h"
#include "cpu/variants.h"
#include "kernels.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Tensors come in one order everywhere: x, w1, w2, b1, b2, with target after x where
// there is one; gradients and output_mask follow the same order.
TORCH_LIBRARY(twolayer_ext, m) {
  // The public, differentiable ops (autograd formulas in autograd.cpp).
  // y = relu(x @ w1 + b1) @ w2 + b2
  m.def("two_layer(Tensor x, Tensor w1, Tensor w2, Tensor? b1=None, Tensor? b2=None) -> Tensor");
  // Sum or mean of (pred - target)^2, 0-dim.
  m.def("l2_loss(Tensor pred, Tensor target, str reduction=\"sum\") -> Tensor");
  // l2_loss(two_layer(x, w1, w2, b1, b2), target, reduction), its gradients made in the forward.
  m.def("two_layer_l2_loss(Tensor x, Tensor target, Tensor w1, Tensor w2, Tensor? b1=None,"
        " Tensor? b2=None, str reduction=\"sum\") -> Tensor");

  // The kernels behind them, per device. act is what the backward needs (see kernels.h).
  m.def("two_layer_fwd(Tensor x, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2) -> (Tensor y, Tensor act)");
  // Gradients for (x, w1, w2, b1, b2); only those set in output_mask are computed.
  m.def("two_layer_bwd(Tensor grad_y, Tensor? x, Tensor? w1, Tensor w2, Tensor act, bool[5] output_mask)"
        " -> (Tensor? grad_x, Tensor? grad_w1, Tensor? grad_w2, Tensor? grad_b1, Tensor? grad_b2)");
  // Sum or mean of squared error and, in the same pass, its gradient wrt pred.
  m.def("l2_loss_fwd(Tensor pred, Tensor target, str reduction, bool need_grad) -> (Tensor loss, Tensor? grad)");
  // grad_loss (0-dim) * grad: a loss's backward, an op of its own so that double backward fails loudly.
  m.def("l2_loss_bwd(Tensor grad_loss, Tensor grad) -> Tensor");
  // The fused loss and the gradients output_mask asks for, for (x, target, w1, w2, b1, b2).
  // grad_transposed: grad_w1 / grad_w2 returned as the transpose of a row-major [H, D_in] /
  // [D_out, H] (the layout of TwoLayerNet's nn.Linear parameters; kernels.h).
  m.def("two_layer_l2_loss_fwd(Tensor x, Tensor target, Tensor w1, Tensor w2, Tensor? b1,"
        " Tensor? b2, str reduction, bool[6] output_mask, bool[2] grad_transposed=[False, False])"
        " -> (Tensor loss, Tensor? grad_x, Tensor? grad_target, Tensor? grad_w1, Tensor? grad_w2,"
        " Tensor? grad_b1, Tensor? grad_b2)");
  // Forward, loss, backward and w -= lr * grad for each weight set in update (w1, w2, b1, b2),
  // in one call (weights mutated).
  m.def("sgd_step(Tensor x, Tensor target, Tensor(a!) w1, Tensor(b!) w2, Tensor(c!)? b1,"
        " Tensor(d!)? b2, float lr, str reduction, bool[4] update) -> Tensor loss");
  // The CPU kernel variants (cpu/variants.h): the choice (process-wide or this thread's), and the table.
  m.def("set_cpu_kernel(str name, bool this_thread=False) -> str",
        [](c10::string_view name, bool this_thread) {
    return twolayer::cpu::set_kernel_variant(name, this_thread);
  });
  m.def("cpu_kernel_info(int[]? dims=None, ScalarType dtype=float) -> str",
        [](at::OptionalIntArrayRef dims, c10::ScalarType dtype) {
    std::optional<twolayer::Dims> d;
    if (dims) {
      TORCH_CHECK_VALUE(dims->size() == 4, "cpu_kernel_info: shape must be (N, D_in, H, D_out), got ",
                        dims->size(), " numbers");
      d = twolayer::Dims{(*dims)[0], (*dims)[1], (*dims)[2], (*dims)[3]};
    }
    return twolayer::cpu::kernel_info(d, dtype);
  });
  // Measures auto's choice for this problem now and remembers it (cpu/tuner.h); JSON.
  m.def("cpu_kernel_tune(int[] dims, ScalarType dtype=float, bool full=False) -> str",
        [](at::IntArrayRef dims, c10::ScalarType dtype, bool full) {
    TORCH_CHECK_VALUE(dims.size() == 4, "tune: shape must be (N, D_in, H, D_out), got ", dims.size(),
                      " numbers");
    TORCH_CHECK_TYPE(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double,
                     "tune: dtype must be float32 or float64 (float16/bfloat16 have one path), got ",
                     dtype);
    for (int64_t v : dims) TORCH_CHECK_VALUE(v > 0, "tune: every size must be positive, got ", dims);
    return twolayer::cpu::tuner::tune({dims[0], dims[1], dims[2], dims[3]}, dtype, full);
  });
  m.def("cpu_kernels() -> str[]", [] { return twolayer::cpu::kernel_names(); });
  m.def("cpu_kernel_missing(str name) -> str", [](c10::string_view name) {
    return twolayer::cpu::kernel_missing(name);
  });
}

TORCH_LIBRARY_IMPL(twolayer_ext, CPU, m) {
  m.impl("two_layer_fwd", &twolayer::cpu::two_layer_fwd);
  m.impl("two_layer_bwd", &twolayer::cpu::two_layer_bwd);
  m.impl("l2_loss_fwd", &twolayer::cpu::l2_loss_fwd);
  m.impl("l2_loss_bwd", &twolayer::cpu::l2_loss_bwd);
  m.impl("two_layer_l2_loss_fwd", &twolayer::cpu::two_layer_l2_loss_fwd);
  m.impl("sgd_step", &twolayer::cpu::sgd_step);
}

#ifdef TWOLAYER_WITH_CUDA
TORCH_LIBRARY_IMPL(twolayer_ext, CUDA, m) {
  m.impl("two_layer_fwd", &twolayer::cuda::two_layer_fwd);
  m.impl("two_layer_bwd", &twolayer::cuda::two_layer_bwd);
  m.impl("l2_loss_fwd", &twolayer::cuda::l2_loss_fwd);
  m.impl("l2_loss_bwd", &twolayer::cuda::l2_loss_bwd);
  m.impl("two_layer_l2_loss_fwd", &twolayer::cuda::two_layer_l2_loss_fwd);
  m.impl("sgd_step", &twolayer::cuda::sgd_step);
}
#endif
