// The tuned kernels for any CPU (baseline x86-64 / the compiler's default ISA).
#include "tuned/prelude.h"

namespace twolayer::cpu::tuned_portable {
#include "tuned/isa_body.h"
const char* isa() { return "portable"; }
}  // namespace twolayer::cpu::tuned_portable
