// Schemas and dispatch: the one place that says which ops exist and which
// kernel serves each device. Importing twolayer_ext._C runs these static
// registrations; the module itself is empty (no pybind, so Dynamo sees real ops).
#include <Python.h>
#include <torch/library.h>

#include "cpu/busy_core.h"
#include "cpu/tuner.h"
#include "cpu/variants.h"
#include "checks.h"
#include "kernels.h"

#include <string>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
// A check op's schema: the kernel op's arguments without alias annotations (a check reads only).
std::string check_schema(const char* name, const char* args) {
  std::string s = std::string(name) + "_check" + args + " -> ()";
  for (size_t i = 0; (i = s.find("!)", i)) != std::string::npos;) s.erase(i - 2, 4);  // "(a!)"
  return s;
}
}  // namespace

TORCH_LIBRARY(twolayer_ext, m) {
  // The ops and their schemas, from op_table.h.
#define TWOLAYER_DEF(name, pub, args, rets, ret, params) m.def(#name args " -> " rets);
  TWOLAYER_PUBLIC_OPS(TWOLAYER_DEF)
  TWOLAYER_KERNEL_OPS(TWOLAYER_DEF)
#undef TWOLAYER_DEF
  // Each kernel op's argument check alone (checks.h): the fake kernels call these, so a bad
  // call under torch.compile or on meta tensors fails with the real kernels' words.
#define TWOLAYER_DEF_CHECK(name, pub, args, rets, ret, params) \
  m.def(check_schema(#name, args).c_str(),                     \
        torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, &twolayer::check::name));
  TWOLAYER_KERNEL_OPS(TWOLAYER_DEF_CHECK)
#undef TWOLAYER_DEF_CHECK

  // The CPU kernel variants (cpu/variants.h): the choice (process-wide or this thread's), and the table.
  m.def("set_cpu_kernel(str name, bool this_thread=False) -> str",
        [](c10::string_view name, bool this_thread) {
          return twolayer::cpu::set_kernel_variant(name, this_thread);
        });
  m.def("cpu_kernel_info(int[]? dims=None, ScalarType dtype=float) -> str",
        [](at::OptionalIntArrayRef dims, c10::ScalarType dtype) {
          std::optional<twolayer::Dims> d;
          if (dims) {
            TORCH_CHECK_VALUE(dims->size() == 4,
                              "cpu_kernel_info: shape must be (N, D_in, H, D_out), got ",
                              dims->size(), " numbers");
            d = twolayer::Dims{(*dims)[0], (*dims)[1], (*dims)[2], (*dims)[3]};
          }
          return twolayer::cpu::kernel_info(d, dtype);
        });
  m.def("cpu_kernel_choice(int[] dims, ScalarType dtype=float) -> str",
        [](at::IntArrayRef dims, c10::ScalarType dtype) {
          TORCH_CHECK_VALUE(dims.size() == 4,
                            "cpu_kernel_choice: shape must be (N, D_in, H, D_out), got ",
                            dims.size(), " numbers");
          return twolayer::cpu::kernel_choice({dims[0], dims[1], dims[2], dims[3]}, dtype);
        });
  // Measures auto's choice for this problem now and remembers it (cpu/tuner.h); JSON.
  m.def("cpu_kernel_tune(int[] dims, ScalarType dtype=float, bool full=False) -> str",
        [](at::IntArrayRef dims, c10::ScalarType dtype, bool full) {
          TORCH_CHECK_VALUE(dims.size() == 4, "tune: shape must be (N, D_in, H, D_out), got ",
                            dims.size(), " numbers");
          TORCH_CHECK_TYPE(
              dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double,
              "tune: dtype must be float32 or float64 (float16/bfloat16 have one path), got ",
              dtype);
          for (int64_t v : dims)
            TORCH_CHECK_VALUE(v > 0, "tune: every size must be positive, got ", dims);
          return twolayer::cpu::tuner::tune({dims[0], dims[1], dims[2], dims[3]}, dtype, full);
        });
  // For tests: count a core as busy for the next `ms` milliseconds (cpu/busy_core.h).
  m.def("_assume_busy_core(int ms) -> ()",
        [](int64_t ms) { twolayer::cpu::busy_core::assume_busy_for(ms); });
  // For tests: `n` signs of a lost core now (cpu/busy_core.h).
  m.def("_busy_core_signs(int n) -> ()",
        [](int64_t n) { twolayer::cpu::busy_core::note_signs(int(n)); });
  m.def("cpu_name() -> str", [] { return twolayer::cpu::tuner::cpu_name(); });
  m.def("cpu_kernels() -> str[]", [] { return twolayer::cpu::kernel_names(); });
  m.def("cpu_kernel_missing(str name) -> str",
        [](c10::string_view name) { return twolayer::cpu::kernel_missing(name); });
}

#define TWOLAYER_IMPL(name, pub, args, rets, ret, params) m.impl(#name, &DEVICE::name);
#define DEVICE twolayer::cpu
TORCH_LIBRARY_IMPL(twolayer_ext, CPU, m){TWOLAYER_KERNEL_OPS(TWOLAYER_IMPL)}
#undef DEVICE

#ifdef TWOLAYER_WITH_CUDA
#define DEVICE twolayer::cuda
TORCH_LIBRARY_IMPL(twolayer_ext, CUDA, m) {
  TWOLAYER_KERNEL_OPS(TWOLAYER_IMPL)
}
#undef DEVICE
#endif
#undef TWOLAYER_IMPL
