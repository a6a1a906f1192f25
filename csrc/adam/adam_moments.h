// One fused pass of Adam's moment update and normalisation, for the low-rank states of GaLore
// and FRUGAL: reads g, m, v once and writes m, v and the normalised direction.
#pragma once

#include <cstddef>

namespace memfit::adam {

// m <- m + (1 - beta1) (g - m);  v <- beta2 v + (1 - beta2) g g;  out <- m / (sqrt(v) + eps).
// The same operations, in the same order, as torch's lerp_, mul_ + addcmul_, sqrt + add_ + div.
void adam_moments_fp32(float* m, float* v, const float* g, float* out, std::size_t n, float beta1, float beta2,
                       float eps);

}  // namespace memfit::adam
