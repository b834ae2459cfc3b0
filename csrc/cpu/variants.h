// The CPU kernel variants: one table (variants.cpp) of {name, ISA, kernels}, and
// the choice among them that every op follows:
//   "auto"    (default) per problem, the variant measured fastest here (tuner.h);
//   "tuned"   the tuned kernels for the best ISA this CPU has (TWOLAYER_ISA forces one);
//   any table name, e.g. "tuned-avx2", "blas", "reference".
// TWOLAYER_CPU_KERNEL sets the starting choice; set_kernel_variant changes it for the process,
// or for the calling thread alone (use_cpu_kernel).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_impl.h"
#include "tuner.h"

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
    if constexpr (std::is_same_v<T, float>)
      return f32;
    else
      return f64;
  }
};

// The variant serving a problem of these dims and element type under the current choice.
const Variant& variant_for(const Dims& d, c10::ScalarType dtype);
// The table row for a whole step (sgd_step, the fused loss), where auto may hand out a trial
// (tuner.h: pick): then the caller times the call and hands the time to tuner::report_trial.
tuner::Pick step_pick(const Dims& d, c10::ScalarType dtype);

// Sets the process-wide choice ("auto", "tuned" or a table name), or with this_thread the
// calling thread's own, which overrides it ("" clears it); returns the previous one ("" for
// a thread without its own).
std::string set_kernel_variant(c10::string_view name, bool this_thread);
// The choice, what it runs (for these dims and dtype, if given) and the thread count.
std::string kernel_info(const std::optional<Dims>& d, c10::ScalarType dtype);
// The same as a JSON object: {"choice", "variant" (what runs), "how" ("measured", "wisdom",
// "rule", "pinned" or "low precision"), "threads"}.
std::string kernel_choice(const Dims& d, c10::ScalarType dtype);
// Every table name, in table order.
std::vector<std::string> kernel_names();
// Why this CPU cannot run the variant ("" when it can).
std::string kernel_missing(c10::string_view name);

// For the tuner (tuner.h): the table's rows, and those "auto" chooses among on this CPU (the
// best tuned build first, "blas" and "blas-mt" last; never "reference").
int variant_count();
const Variant& variant_at(int row);
int variant_row(c10::string_view name);  // -1: no such row
const std::vector<int>& auto_candidates();

}  // namespace twolayer::cpu
