// The scalar form of the step and the 16-bit conversions. Every path runs its tail elements
// through scalar_range, so these lines define the bits the vector paths must reproduce.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "adam/adam.h"

namespace memfit::adam {

inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float bits_float(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float bf16_to_float(std::uint16_t half) { return bits_float(static_cast<std::uint32_t>(half) << 16); }

// Round to nearest even; every nan becomes 0x7FC0, as torch's scalar conversion does.
inline std::uint16_t float_to_bf16(float value) {
  std::uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<std::uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Exact, like F16C's vcvtph2ps (nans come back quiet).
inline float fp16_to_float(std::uint16_t half) {
  std::uint32_t sign = static_cast<std::uint32_t>(half & 0x8000u) << 16;
  std::uint32_t exponent = (half >> 10) & 0x1Fu;
  std::uint32_t mantissa = half & 0x3FFu;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u));
  if (exponent == 0) {
    float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // exact: mantissa < 2^10
    return bits_float(sign | float_bits(magnitude));
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// Round to nearest even, like F16C's vcvtps2ph with _MM_FROUND_TO_NEAREST_INT (nans stay nans,
// quiet, with the top payload bits).
inline std::uint16_t float_to_fp16(float value) {
  std::uint32_t bits = float_bits(value);
  std::uint32_t sign = (bits >> 16) & 0x8000u;
  std::uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu));
  if (magnitude >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (magnitude >= 0x38800000u) {  // a normal half: rebias the exponent from 127 to 15, then round
    std::uint32_t rebiased = magnitude - 0x38000000u;
    return static_cast<std::uint16_t>(sign | ((rebiased + 0xFFFu + ((rebiased >> 13) & 1u)) >> 13));
  }
  if (magnitude <= 0x33000000u) return static_cast<std::uint16_t>(sign);  // <= 2^-25 rounds to zero
  // A subnormal half counts units of 2^-24; the float is (1.mantissa) * 2^(exponent - 127).
  std::uint32_t significand = (magnitude & 0x7FFFFFu) | 0x800000u;
  int shift = 126 - static_cast<int>(magnitude >> 23);  // 14..24
  std::uint32_t result = significand >> shift;
  std::uint32_t remainder = significand & ((1u << shift) - 1u);
  std::uint32_t halfway = 1u << (shift - 1);
  if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
  return static_cast<std::uint16_t>(sign | result);
}

template <DType G>
inline float load_grad(std::uintptr_t base, std::int64_t index) {
  if constexpr (G == DType::kFloat32) {
    return reinterpret_cast<const float*>(base)[index];
  } else if constexpr (G == DType::kBFloat16) {
    return bf16_to_float(reinterpret_cast<const std::uint16_t*>(base)[index]);
  } else {
    return fp16_to_float(reinterpret_cast<const std::uint16_t*>(base)[index]);
  }
}

template <DType O>
inline void store_param(std::uintptr_t base, std::int64_t index, float value) {
  if constexpr (O == DType::kBFloat16) {
    reinterpret_cast<std::uint16_t*>(base)[index] = float_to_bf16(value);
  } else if constexpr (O == DType::kFloat16) {
    reinterpret_cast<std::uint16_t*>(base)[index] = float_to_fp16(value);
  }
}

// inf * 0 and nan * 0 are nan, finite * 0 is zero, and nan sticks: one fma per element tracks
// whether any gradient element was not finite.
template <DType G, DType O, bool L2>
bool scalar_update(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
  const Constants& c = config.constants;
  float* master = reinterpret_cast<float*>(t.master);
  float* exp_avg = reinterpret_cast<float*>(t.exp_avg);
  float* exp_avg_sq = reinterpret_cast<float*>(t.exp_avg_sq);
  float nonfinite = 0.0f;
  for (std::int64_t i = begin; i < end; ++i) {
    float g = load_grad<G>(t.grad, i) * c.grad_scale;
    nonfinite = std::fma(g, 0.0f, nonfinite);
    float p = master[i];
    if constexpr (L2) g = std::fma(c.l2, p, g);
    float m = std::fma(c.one_minus_beta1, g - exp_avg[i], exp_avg[i]);
    float v = std::fma(c.one_minus_beta2 * g, g, c.beta2 * exp_avg_sq[i]);
    float denom = std::fma(std::sqrt(v), c.inv_sqrt_bias2, c.eps);
    p = std::fma(c.neg_step_size, m / denom, p * c.decay);
    master[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    store_param<O>(t.param_out, i, p);
  }
  return std::isnan(nonfinite);
}

template <DType G>
bool scalar_check(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
  float nonfinite = 0.0f;
  for (std::int64_t i = begin; i < end; ++i) {
    nonfinite = std::fma(load_grad<G>(t.grad, i) * config.constants.grad_scale, 0.0f, nonfinite);
  }
  return std::isnan(nonfinite);
}

// Picks the instantiation of Update<G, O, L2>::run / Check<G>::run for a call's dtypes, once per range.
template <template <DType, DType, bool> class Update, template <DType> class Check>
struct Selector {
  template <DType G, DType O>
  static bool update_go(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
    if (config.constants.l2 != 0.0f) return Update<G, O, true>::run(t, begin, end, config);
    return Update<G, O, false>::run(t, begin, end, config);
  }

  template <DType G>
  static bool update_g(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
    switch (config.out_dtype) {
      case DType::kBFloat16:
        return update_go<G, DType::kBFloat16>(t, begin, end, config);
      case DType::kFloat16:
        return update_go<G, DType::kFloat16>(t, begin, end, config);
      default:
        return update_go<G, DType::kNone>(t, begin, end, config);
    }
  }

  static bool update(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
    switch (config.grad_dtype) {
      case DType::kBFloat16:
        return update_g<DType::kBFloat16>(t, begin, end, config);
      case DType::kFloat16:
        return update_g<DType::kFloat16>(t, begin, end, config);
      default:
        return update_g<DType::kFloat32>(t, begin, end, config);
    }
  }

  static bool check(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
    switch (config.grad_dtype) {
      case DType::kBFloat16:
        return Check<DType::kBFloat16>::run(t, begin, end, config);
      case DType::kFloat16:
        return Check<DType::kFloat16>::run(t, begin, end, config);
      default:
        return Check<DType::kFloat32>::run(t, begin, end, config);
    }
  }
};

template <template <DType, DType, bool> class Update, template <DType> class Check>
Kernels make_kernels() {
  return Kernels{&Selector<Update, Check>::update, &Selector<Update, Check>::check};
}

}  // namespace memfit::adam
