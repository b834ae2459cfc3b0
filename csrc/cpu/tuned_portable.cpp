// The tuned kernels for any CPU (baseline x86-64 / the compiler's default ISA).
#include "tuned/prelude.h"

namespace twolayer::cpu::tuned_portable {
constexpr tuning::Isa kIsa = tuning::Isa::Portable;
#include "tuned/body.inc"
}  // namespace twolayer::cpu::tuned_portable
