// The tuned kernels for any CPU (baseline x86-64 / the compiler's default ISA).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <vector>

#include "cpu_impl.h"

namespace twolayer::cpu::tuned_portable {
#include "tuned/isa_body.h"
const char* isa() { return "portable"; }
}  // namespace twolayer::cpu::tuned_portable
