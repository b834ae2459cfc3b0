// The CPU kernel variants: one table (variants.cpp) of {name, ISA, kernels}, and
// the choice among them that every op follows:
//   "auto"    (default) per problem shape, the tuned kernels or "blas" (tuning.h);
//   "tuned"   the tuned kernels for the best ISA this CPU has (TWOLAYER_ISA forces one);
//   any table name, e.g. "tuned-avx2", "blas", "reference".
// TWOLAYER_CPU_KERNEL sets the starting choice; set_kernel_variant changes it.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_impl.h"

namespace twolayer::cpu {

template <typename T>
struct Kernels {
  void (*forward)(const ForwardArgs<T>&);
  void (*backward)(const BackwardArgs<T>&);
  double (*step)(const StepArgs<T>&);
};

struct Variant {
  const char* name;  // what set_cpu_kernel takes, e.g. "tuned-avx512"
  const char* isa;   // what the CPU must have: "avx512", "avx2" or "" (any CPU)
  Kernels<float> f32;
  Kernels<double> f64;
  template <typename T>
  const Kernels<T>& kernels() const {
    if constexpr (std::is_same_v<T, float>) return f32;
    else return f64;
  }
};

// The variant serving a problem of these dims and element type under the current choice.
const Variant& variant_for(const Dims& d, c10::ScalarType dtype);

// Sets the choice ("auto", "tuned" or a table name); returns the previous one.
std::string set_kernel_variant(c10::string_view name);
// The choice, what it runs (for these dims and dtype, if given) and the thread count.
std::string kernel_info(const std::optional<Dims>& d, c10::ScalarType dtype);
// Every table name, in table order.
std::vector<std::string> kernel_names();
// Why this CPU cannot run the variant ("" when it can).
std::string kernel_missing(c10::string_view name);

}  // namespace twolayer::cpu
