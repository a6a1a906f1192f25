// AVX2 + FMA + F16C path, 8 floats per vector, compiled through target attributes (see
// kernel_avx512.cpp). Tails shorter than a vector go through the scalar code.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "adam/element.h"

#define MEMFIT_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace memfit::adam {
namespace {

constexpr std::int64_t kWidth = 8;

template <DType G>
MEMFIT_AVX2 inline __m256 load_grad8(std::uintptr_t base, std::int64_t i) {
  if constexpr (G == DType::kFloat32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(base) + i);
  } else {
    __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const std::uint16_t*>(base) + i));
    if constexpr (G == DType::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    } else {
      return _mm256_cvtph_ps(half);
    }
  }
}

// Same rounding as float_to_bf16 / float_to_fp16.
template <DType O>
MEMFIT_AVX2 inline void store_param8(std::uintptr_t base, std::int64_t i, __m256 value) {
  if constexpr (O == DType::kNone) return;
  auto* out = reinterpret_cast<__m128i*>(reinterpret_cast<std::uint16_t*>(base) + i);
  if constexpr (O == DType::kBFloat16) {
    __m256i bits = _mm256_castps_si256(value);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    __m256i is_nan = _mm256_castps_si256(_mm256_cmp_ps(value, value, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), is_nan);
    // Each 32-bit lane holds a value below 2^16: pack within 128-bit halves, then gather the two
    // low quadwords.
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
    _mm_storeu_si128(out, _mm256_castsi256_si128(packed));
  } else if constexpr (O == DType::kFloat16) {
    _mm_storeu_si128(out, _mm256_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

MEMFIT_AVX2 inline bool any_nan(__m256 value) {
  return _mm256_movemask_ps(_mm256_cmp_ps(value, value, _CMP_UNORD_Q)) != 0;
}

template <DType G, DType O, bool L2>
struct Avx2Update {
  MEMFIT_AVX2 static bool run(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
    const Constants& c = config.constants;
    float* master = reinterpret_cast<float*>(t.master);
    float* exp_avg = reinterpret_cast<float*>(t.exp_avg);
    float* exp_avg_sq = reinterpret_cast<float*>(t.exp_avg_sq);
    const __m256 grad_scale = _mm256_set1_ps(c.grad_scale), l2 = _mm256_set1_ps(c.l2);
    const __m256 one_minus_beta1 = _mm256_set1_ps(c.one_minus_beta1), beta2 = _mm256_set1_ps(c.beta2);
    const __m256 one_minus_beta2 = _mm256_set1_ps(c.one_minus_beta2), eps = _mm256_set1_ps(c.eps);
    const __m256 inv_sqrt_bias2 = _mm256_set1_ps(c.inv_sqrt_bias2), neg_step_size = _mm256_set1_ps(c.neg_step_size);
    const __m256 decay = _mm256_set1_ps(c.decay), zero = _mm256_setzero_ps();
    __m256 nonfinite = zero;
    std::int64_t i = begin;
    for (; i + kWidth <= end; i += kWidth) {
      __m256 g = _mm256_mul_ps(load_grad8<G>(t.grad, i), grad_scale);
      nonfinite = _mm256_fmadd_ps(g, zero, nonfinite);
      __m256 p = _mm256_loadu_ps(master + i);
      if constexpr (L2) g = _mm256_fmadd_ps(l2, p, g);
      __m256 m = _mm256_loadu_ps(exp_avg + i);
      m = _mm256_fmadd_ps(one_minus_beta1, _mm256_sub_ps(g, m), m);
      __m256 v = _mm256_mul_ps(beta2, _mm256_loadu_ps(exp_avg_sq + i));
      v = _mm256_fmadd_ps(_mm256_mul_ps(one_minus_beta2, g), g, v);
      __m256 denom = _mm256_fmadd_ps(_mm256_sqrt_ps(v), inv_sqrt_bias2, eps);
      p = _mm256_fmadd_ps(neg_step_size, _mm256_div_ps(m, denom), _mm256_mul_ps(p, decay));
      _mm256_storeu_ps(master + i, p);
      _mm256_storeu_ps(exp_avg + i, m);
      _mm256_storeu_ps(exp_avg_sq + i, v);
      store_param8<O>(t.param_out, i, p);
    }
    bool tail_nonfinite = scalar_update<G, O, L2>(t, i, end, config);
    return tail_nonfinite || any_nan(nonfinite);
  }
};

template <DType G>
struct Avx2Check {
  MEMFIT_AVX2 static bool run(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
    const __m256 grad_scale = _mm256_set1_ps(config.constants.grad_scale), zero = _mm256_setzero_ps();
    __m256 nonfinite = zero;
    std::int64_t i = begin;
    for (; i + kWidth <= end; i += kWidth) {
      nonfinite = _mm256_fmadd_ps(_mm256_mul_ps(load_grad8<G>(t.grad, i), grad_scale), zero, nonfinite);
    }
    bool tail_nonfinite = scalar_check<G>(t, i, end, config);
    return tail_nonfinite || any_nan(nonfinite);
  }
};

}  // namespace

Kernels avx2_kernels() { return make_kernels<Avx2Update, Avx2Check>(); }

}  // namespace memfit::adam
#endif
