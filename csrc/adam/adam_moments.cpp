#include "adam_moments.h"

#include <cmath>

namespace memfit::adam {

void adam_moments_fp32(float* __restrict m, float* __restrict v, const float* __restrict g, float* __restrict out,
                       std::size_t n, float beta1, float beta2, float eps) {
  const float weight = 1.0f - beta1;
  const float keep = 1.0f - weight;
  const float value = 1.0f - beta2;
  for (std::size_t i = 0; i < n; ++i) {
    const float grad = g[i];
    // torch's lerp: start + weight * (end - start) for weight < 0.5, else end - (end - start) * (1 - weight)
    const float moment = weight < 0.5f ? m[i] + weight * (grad - m[i]) : grad - (grad - m[i]) * keep;
    const float second = v[i] * beta2 + value * grad * grad;
    m[i] = moment;
    v[i] = second;
    out[i] = moment / (std::sqrt(second) + eps);
  }
}

}  // namespace memfit::adam
