// The variant table, and the choice among its rows (see variants.h).
// Adding a variant: a file with its namespace's forward/backward/step (see
// cpu_impl.h for the argument structs), and one line in TWOLAYER_CPU_VARIANTS.
#include "variants.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "busy_core.h"
#include "tuner.h"
#include "tuning.h"

namespace twolayer::cpu {

// namespace, name, the ISA it needs. Order: the tuned builds best first.
#define TWOLAYER_CPU_VARIANTS(X)            \
  X(tuned_avx512, "tuned-avx512", "avx512") \
  X(tuned_avx2, "tuned-avx2", "avx2")       \
  X(tuned_portable, "tuned-portable", "")   \
  X(blas, "blas", "")                       \
  X(blas_mt, "blas-mt", "")                 \
  X(reference, "reference", "")

#define TWOLAYER_DECLARE(ns, name, isa) TWOLAYER_DECLARE_VARIANT(ns)
TWOLAYER_CPU_VARIANTS(TWOLAYER_DECLARE)
#undef TWOLAYER_DECLARE

namespace {

#define TWOLAYER_ROW(ns, name, isa)                                      \
  Variant{name,                                                          \
          isa,                                                           \
          {&ns::forward<float>, &ns::backward<float>, &ns::step<float>}, \
          {&ns::forward<double>, &ns::backward<double>, &ns::step<double>}},
const Variant kTable[] = {TWOLAYER_CPU_VARIANTS(TWOLAYER_ROW)};
#undef TWOLAYER_ROW
constexpr int kRows = int(sizeof(kTable) / sizeof(kTable[0]));

bool cpu_has(const char* isa) {
  if (!*isa) return true;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (!std::strcmp(isa, "avx2"))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!std::strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma");
#endif
  return false;
}

int row_of(c10::string_view name) {
  for (int i = 0; i < kRows; ++i)
    if (name == kTable[i].name) return i;
  return -1;
}

std::string names_list() {
  std::string s = "\"auto\", \"tuned\"";
  for (const auto& v : kTable) s += std::string(", \"") + v.name + "\"";
  return s;
}

// The choice: a table row, or one of these policies.
constexpr int kAuto = -2, kTuned = -1;

// `what` names where the name came from, for the error.
int choice_from_name(c10::string_view name, const char* what) {
  if (name == "auto") return kAuto;
  if (name == "tuned") return kTuned;
  const int row = row_of(name);
  TORCH_CHECK_VALUE(row >= 0, what, " must be one of ", names_list(), ", got \"",
                    std::string(name.data(), name.size()), "\"");
  TORCH_CHECK(cpu_has(kTable[row].isa), what, " \"", kTable[row].name, "\" needs a CPU with ",
              kTable[row].isa, ", which this one lacks");
  return row;
}

// The process-wide choice (set_cpu_kernel, TWOLAYER_CPU_KERNEL) and a calling thread's own
// (use_cpu_kernel: thread-local, as torch's context managers are), which wins where set.
std::atomic<int>& process_choice() {
  static std::atomic<int> c{[] {
    const char* env = std::getenv("TWOLAYER_CPU_KERNEL");
    return env && *env ? choice_from_name(env, "TWOLAYER_CPU_KERNEL") : kAuto;
  }()};
  return c;
}
constexpr int kNoThreadChoice = -3;
thread_local int thread_choice = kNoThreadChoice;

int current_choice() {
  return thread_choice != kNoThreadChoice ? thread_choice : process_choice().load();
}

// The tuned build "tuned" and "auto" run: TWOLAYER_ISA=avx512|avx2|portable, else the
// best this CPU has.
int tuned_row() {
  static const int row = [] {
    const char* env = std::getenv("TWOLAYER_ISA");
    if (env && *env) {
      const int r = row_of(std::string("tuned-") + env);
      TORCH_CHECK_VALUE(r >= 0, "TWOLAYER_ISA must be avx512, avx2 or portable, got \"", env, "\"");
      TORCH_CHECK(cpu_has(kTable[r].isa), "TWOLAYER_ISA=", env, ": this CPU lacks ", kTable[r].isa);
      return r;
    }
    for (int r = 0; r < kRows; ++r)
      if (!std::strncmp(kTable[r].name, "tuned-", 6) && cpu_has(kTable[r].isa)) return r;
    return row_of("tuned-portable");
  }();
  return row;
}

bool low_precision(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16;
}

int row_for(int choice, const Dims& d, c10::ScalarType dtype) {
  if (choice >= 0) return choice;
  const int tuned = tuned_row();  // first, so that a bad TWOLAYER_ISA fails on any shape
  if (choice == kAuto && !low_precision(dtype)) return tuner::pick(d, dtype, tuner::For::Call).row;
  return tuned;
}

std::string choice_name(int choice) {
  return choice == kAuto ? "auto" : choice == kTuned ? "tuned" : kTable[choice].name;
}

}  // namespace

const Variant& variant_for(const Dims& d, c10::ScalarType dtype) {
  return kTable[row_for(current_choice(), d, dtype)];
}

tuner::Pick step_pick(const Dims& d, c10::ScalarType dtype) {
  const int c = current_choice();
  if (c == kAuto && !low_precision(dtype)) {
    tuned_row();  // a bad TWOLAYER_ISA fails on any shape
    return tuner::pick(d, dtype, tuner::For::WholeStep);
  }
  return {row_for(c, d, dtype), "pinned", ""};
}

std::string set_kernel_variant(c10::string_view name, bool this_thread) {
  // "" clears this thread's choice (what use_cpu_kernel restores when there was none).
  const int c = this_thread && name.empty() ? kNoThreadChoice
                                            : choice_from_name(name, "set_cpu_kernel: name");
  if (c < 0 && c != kNoThreadChoice) tuned_row();  // a bad TWOLAYER_ISA fails here, not mid-op
  if (!this_thread) return choice_name(process_choice().exchange(c));
  const int previous = thread_choice;
  thread_choice = c;
  return previous == kNoThreadChoice ? "" : choice_name(previous);
}

namespace {

// What runs for a problem under choice c: the variant's name, how it was chosen ("measured",
// "wisdom", "rule", "pinned" or "low precision") and, for auto, the tuner's account of it.
struct Resolved {
  std::string variant, how, why;
};

Resolved resolve(int c, const Dims& d, c10::ScalarType dtype) {
  if (low_precision(dtype)) return {"composite", "low precision", ""};  // one path for all
  if (c != kAuto) return {kTable[row_for(c, d, dtype)].name, "pinned", ""};
  tuned_row();  // a bad TWOLAYER_ISA fails here too
  const tuner::Pick p = tuner::pick(d, dtype);
  return {kTable[p.row].name, p.how, p.why};
}

}  // namespace

std::string kernel_info(const std::optional<Dims>& d, c10::ScalarType dtype) {
  const int c = current_choice();
  std::string s = choice_name(c), why;
  if (d && low_precision(dtype)) {
    s += ": low precision (the composite step: one path for every variant)";
  } else if (d) {
    const Resolved r = resolve(c, *d, dtype);
    s += ": " + r.variant;
    if (!r.why.empty()) why = "; " + r.why;
  } else if (c == kAuto) {
    s += " (measured per shape, dtype and thread count among";
    for (int r : auto_candidates()) s += std::string(" ") + kTable[r].name;
    s += ")";
  } else if (c == kTuned) {
    s += std::string(" (") + kTable[tuned_row()].name + ")";
  }
  if (busy_core::busy())
    why +=
        "; a core is busy (another process holds it): every loop runs on our pool, and "
        "ATen's parallel regions on the threads that call the ops on one thread";
  return s + ", threads: " + std::to_string(busy_core::team_threads()) + why;
}

std::string kernel_choice(const Dims& d, c10::ScalarType dtype) {
  const int c = current_choice();
  const Resolved r = resolve(c, d, dtype);
  return "{\"choice\": \"" + choice_name(c) + "\", \"variant\": \"" + r.variant +
         "\", \"how\": \"" + r.how +
         "\", \"threads\": " + std::to_string(busy_core::team_threads()) +
         ", \"busy_core\": " + (busy_core::busy() ? "true" : "false") + "}";
}

int variant_count() { return kRows; }
const Variant& variant_at(int row) { return kTable[row]; }
int variant_row(c10::string_view name) { return row_of(name); }

const std::vector<int>& auto_candidates() {
  static const std::vector<int> rows = [] {
    // The tuned builds from tuned_row's ISA down, but the portable one where a vector build
    // runs (it never beats one), then blas.
    std::vector<int> r;
    for (int i = tuned_row(); i < kRows; ++i)
      if (!std::strncmp(kTable[i].name, "tuned-", 6) && cpu_has(kTable[i].isa) &&
          (r.empty() || std::strcmp(kTable[i].name, "tuned-portable") != 0))
        r.push_back(i);
    r.push_back(row_of("blas"));
    r.push_back(row_of("blas-mt"));
    return r;
  }();
  return rows;
}

std::vector<std::string> kernel_names() {
  std::vector<std::string> names;
  for (const auto& v : kTable) names.emplace_back(v.name);
  return names;
}

std::string kernel_missing(c10::string_view name) {
  const int row = row_of(name);
  TORCH_CHECK_VALUE(row >= 0, "cpu_kernel_missing: name must be one of ", names_list(), ", got \"",
                    std::string(name.data(), name.size()), "\"");
  return cpu_has(kTable[row].isa) ? "" : std::string("needs a CPU with ") + kTable[row].isa;
}

}  // namespace twolayer::cpu
