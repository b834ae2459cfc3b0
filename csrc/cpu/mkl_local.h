// MKL's thread-local thread count, where the BLAS is MKL (torch's x86-64 builds export it):
// mkl_set_num_threads_local (Fortran ABI: an int*; it returns the previous value, 0 = none).
// Null where the BLAS is another.
#pragma once

#include <dlfcn.h>

namespace twolayer::cpu {

using MklSetLocal = int (*)(int*);

inline MklSetLocal mkl_set_local() {
  static const MklSetLocal f =
      reinterpret_cast<MklSetLocal>(dlsym(RTLD_DEFAULT, "mkl_set_num_threads_local"));
  return f;
}

}  // namespace twolayer::cpu
