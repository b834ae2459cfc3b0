// The body of one ISA build of the tuned kernels. tuned_avx2.cpp and
// tuned_portable.cpp include it inside their own namespace, after tuned/prelude.h
// (every header it needs), with or without `#pragma GCC target("avx2,fma")` in force
// (setuptools cannot give one file its own flags; the pragma does, and no
// -march flag reaches the rest of the build). Nothing here includes headers.
#include "gemm.h"
#include "epilogues.h"
#include "steps.h"

template <typename T>
void forward(const ForwardArgs<T>& a) {
  forward_impl(a);
}
template <typename T>
void backward(const BackwardArgs<T>& a) {
  backward_impl(a);
}
template <typename T>
double step(const StepArgs<T>& a) {
  return step_impl(a);
}

template void forward<float>(const ForwardArgs<float>&);
template void forward<double>(const ForwardArgs<double>&);
template void backward<float>(const BackwardArgs<float>&);
template void backward<double>(const BackwardArgs<double>&);
template double step<float>(const StepArgs<float>&);
template double step<double>(const StepArgs<double>&);
