// The L2 loss's one convention, for every device and kernel, and the value its 0-dim result
// holds.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>

namespace twolayer {

// The L2 loss of n elements, d = pred - target: the sum of d^2 accumulated in double, divided
// by n once at the end iff mean (the mean of nothing is 0 / 0 = NaN, as nn.MSELoss); its
// gradient 2 * d, times 1 / n iff mean.
struct L2Loss {
  double n;
  bool mean;

  double divisor() const { return mean ? n : 1.0; }
  double value(double sum) const { return mean ? sum / n : sum; }
  double grad_scale() const { return mean ? 2.0 / n : 2.0; }

  // Where grad_y feeds GEMMs in 16-bit storage ("deferred"), (2 / n) * d would be subnormal in
  // float16 at large n (~1e6), leaving rounding noise for the GEMMs: grad_y keeps 2 * d and the
  // 1 / n goes into its consumers (GEMM alphas, bias-sum scales). Elsewhere grad_y carries it.
  double grad_y_scale(bool deferred) const { return deferred ? 2.0 : grad_scale(); }
  // n = 0: every gradient is an empty sum; scale 1 keeps an alpha finite there.
  double consumer_scale(bool deferred) const { return deferred && mean && n > 0 ? 1.0 / n : 1.0; }
};

// Whether grad_y of this dtype is deferred (L2Loss::grad_y_scale): the 16-bit dtypes.
inline bool defers_mean(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Half || dtype == c10::ScalarType::BFloat16;
}

// A loss accumulated in double, as the value its 0-dim result of `dtype` holds: rounded to
// that dtype, and +-inf beyond its range, as torch's own reductions overflow (fill_ with an
// out-of-range double raises instead). Every CPU loss kernel stores through this.
inline double loss_value(double v, c10::ScalarType dtype) {
  if (dtype == c10::ScalarType::Double) return v;
  // Doubles at or beyond float's max + half an ulp round to inf in IEEE conversion; the
  // C++ cast is undefined there, so saturate first.
  constexpr double kFloatOverflow = 0x1.ffffffp127;
  const float f = std::abs(v) >= kFloatOverflow
                      ? std::copysign(std::numeric_limits<float>::infinity(), v)
                      : float(v);
  switch (dtype) {
    case c10::ScalarType::Half: return double(float(c10::Half(f)));
    case c10::ScalarType::BFloat16: return double(float(c10::BFloat16(f)));
    default: return double(f);
  }
}

}  // namespace twolayer
