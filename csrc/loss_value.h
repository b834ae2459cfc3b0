// A loss accumulated in double, as the value its 0-dim result of `dtype` holds: rounded to
// that dtype, and +-inf beyond its range, as torch's own reductions overflow (fill_ with an
// out-of-range double raises instead). Every device's loss kernels store through this.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

namespace twolayer {

inline double loss_value(double v, c10::ScalarType dtype) {
  if (dtype == c10::ScalarType::Double) return v;
  // Doubles at or beyond float's max + half an ulp round to inf in IEEE conversion; the
  // C++ cast is undefined there, so saturate first.
  constexpr double kFloatOverflow = 0x1.ffffffp127;
  const float f = std::abs(v) >= kFloatOverflow ? std::copysign(std::numeric_limits<float>::infinity(), v)
                                                : float(v);
  switch (dtype) {
    case c10::ScalarType::Half: return double(float(c10::Half(f)));
    case c10::ScalarType::BFloat16: return double(float(c10::BFloat16(f)));
    default: return double(f);
  }
}

}  // namespace twolayer
