// AVX-512F path, 16 floats per vector. Compiled through target attributes rather than -mavx512f so
// one build runs everywhere; dispatch.cpp calls it only where the CPU reports AVX-512F. 16-bit
// loads and stores use AVX-512F conversions only (no BF16 or BW instructions), and tails shorter
// than a vector go through the scalar code.
#if defined(__x86_64__) || defined(__i386__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "adam/element.h"

#define MEMFIT_AVX512 __attribute__((target("avx512f")))

namespace memfit::adam {
namespace {

constexpr std::int64_t kWidth = 16;

template <DType G>
MEMFIT_AVX512 inline __m512 load_grad16(std::uintptr_t base, std::int64_t i) {
  if constexpr (G == DType::kFloat32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(base) + i);
  } else {
    auto* address = reinterpret_cast<const __m256i*>(reinterpret_cast<const std::uint16_t*>(base) + i);
    __m256i half = _mm256_loadu_si256(address);
    if constexpr (G == DType::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    } else {
      return _mm512_cvtph_ps(half);
    }
  }
}

// Same rounding as float_to_bf16 / float_to_fp16.
template <DType O>
MEMFIT_AVX512 inline void store_param16(std::uintptr_t base, std::int64_t i, __m512 value) {
  if constexpr (O == DType::kNone) return;
  auto* out = reinterpret_cast<__m256i*>(reinterpret_cast<std::uint16_t*>(base) + i);
  if constexpr (O == DType::kBFloat16) {
    __m512i bits = _mm512_castps_si512(value);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    __mmask16 is_nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    rounded = _mm512_mask_blend_epi32(is_nan, rounded, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(out, _mm512_cvtepi32_epi16(rounded));
  } else if constexpr (O == DType::kFloat16) {
    _mm256_storeu_si256(out, _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <DType G, DType O, bool L2>
struct Avx512Update {
  MEMFIT_AVX512 static bool run(const TensorBuffers& t, std::int64_t begin, std::int64_t end,
                                const StepConfig& config) {
    const Constants& c = config.constants;
    float* master = reinterpret_cast<float*>(t.master);
    float* exp_avg = reinterpret_cast<float*>(t.exp_avg);
    float* exp_avg_sq = reinterpret_cast<float*>(t.exp_avg_sq);
    const __m512 grad_scale = _mm512_set1_ps(c.grad_scale), l2 = _mm512_set1_ps(c.l2);
    const __m512 one_minus_beta1 = _mm512_set1_ps(c.one_minus_beta1), beta2 = _mm512_set1_ps(c.beta2);
    const __m512 one_minus_beta2 = _mm512_set1_ps(c.one_minus_beta2), eps = _mm512_set1_ps(c.eps);
    const __m512 inv_sqrt_bias2 = _mm512_set1_ps(c.inv_sqrt_bias2), neg_step_size = _mm512_set1_ps(c.neg_step_size);
    const __m512 decay = _mm512_set1_ps(c.decay), zero = _mm512_setzero_ps();
    __m512 nonfinite = zero;
    std::int64_t i = begin;
    for (; i + kWidth <= end; i += kWidth) {
      __m512 g = _mm512_mul_ps(load_grad16<G>(t.grad, i), grad_scale);
      nonfinite = _mm512_fmadd_ps(g, zero, nonfinite);
      __m512 p = _mm512_loadu_ps(master + i);
      if constexpr (L2) g = _mm512_fmadd_ps(l2, p, g);
      __m512 m = _mm512_loadu_ps(exp_avg + i);
      m = _mm512_fmadd_ps(one_minus_beta1, _mm512_sub_ps(g, m), m);
      __m512 v = _mm512_mul_ps(beta2, _mm512_loadu_ps(exp_avg_sq + i));
      v = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, g), g, v);
      __m512 denom = _mm512_fmadd_ps(_mm512_sqrt_ps(v), inv_sqrt_bias2, eps);
      p = _mm512_fmadd_ps(neg_step_size, _mm512_div_ps(m, denom), _mm512_mul_ps(p, decay));
      _mm512_storeu_ps(master + i, p);
      _mm512_storeu_ps(exp_avg + i, m);
      _mm512_storeu_ps(exp_avg_sq + i, v);
      store_param16<O>(t.param_out, i, p);
    }
    bool tail_nonfinite = scalar_update<G, O, L2>(t, i, end, config);
    return tail_nonfinite || _mm512_cmp_ps_mask(nonfinite, nonfinite, _CMP_UNORD_Q) != 0;
  }
};

template <DType G>
struct Avx512Check {
  MEMFIT_AVX512 static bool run(const TensorBuffers& t, std::int64_t begin, std::int64_t end,
                                const StepConfig& config) {
    const __m512 grad_scale = _mm512_set1_ps(config.constants.grad_scale), zero = _mm512_setzero_ps();
    __m512 nonfinite = zero;
    std::int64_t i = begin;
    for (; i + kWidth <= end; i += kWidth) {
      nonfinite = _mm512_fmadd_ps(_mm512_mul_ps(load_grad16<G>(t.grad, i), grad_scale), zero, nonfinite);
    }
    bool tail_nonfinite = scalar_check<G>(t, i, end, config);
    return tail_nonfinite || _mm512_cmp_ps_mask(nonfinite, nonfinite, _CMP_UNORD_Q) != 0;
  }
};

}  // namespace

Kernels avx512_kernels() { return make_kernels<Avx512Update, Avx512Check>(); }

}  // namespace memfit::adam
#endif
