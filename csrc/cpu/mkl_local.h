// MKL, where it is the BLAS torch was built with (torch's x86-64 builds link it and export
// these): its thread-local thread count, and its Fortran GEMMs (LP64: int sizes, as ATen's
// own BLAS calls pass them). Null where the BLAS is another.
#pragma once

#include <dlfcn.h>

#include <type_traits>

namespace twolayer::cpu {

// mkl_set_num_threads_local (Fortran ABI: an int*; returns the previous value, 0 = none).
using MklSetLocal = int (*)(int*);

inline MklSetLocal mkl_set_local() {
  static const MklSetLocal f =
      reinterpret_cast<MklSetLocal>(dlsym(RTLD_DEFAULT, "mkl_set_num_threads_local"));
  return f;
}

// sgemm_ / dgemm_ of the library that exports mkl_set_num_threads_local (not whichever
// sgemm_ another loaded library happens to export first).
template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                             const T*, const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
FortranGemm<T> mkl_gemm() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  static const FortranGemm<T> f = []() -> FortranGemm<T> {
    Dl_info info;
    if (!mkl_set_local() || !dladdr(reinterpret_cast<void*>(mkl_set_local()), &info) ||
        !info.dli_fname)
      return nullptr;
    void* lib = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    if (!lib) return nullptr;
    void* sym = dlsym(lib, std::is_same_v<T, float> ? "sgemm_" : "dgemm_");
    dlclose(lib);  // still loaded: RTLD_NOLOAD took a reference to the loaded library
    return reinterpret_cast<FortranGemm<T>>(sym);
  }();
  return f;
}

}  // namespace twolayer::cpu
