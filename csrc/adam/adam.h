// Fused CPU Adam/AdamW step: one pass over memory per step, vectorised (AVX-512F, AVX2+FMA+F16C,
// scalar) with the level picked at run time, multi-threaded over fixed element ranges.
//
// Per element, in float32 and in this order in every path (the scalar path uses std::fma where
// the vector paths use FMA instructions, and the build disables floating-point contraction), so
// results are bit-identical for every dispatch level and every thread count:
//   g = grad * grad_scale                       (nonfinite |= g is inf or nan)
//   g = fma(l2, p, g)                           (Adam mode with weight decay only)
//   m = fma(1 - beta1, g - m, m)
//   v = fma((1 - beta2) * g, g, beta2 * v)
//   p = fma(-step_size, m / fma(sqrt(v), inv_sqrt_bias2, eps), p * decay)
//   out = p rounded to nearest even in bf16 or fp16 (optional)
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace memfit::adam {

// Codes shared with memfit/optim/fused_adam.py.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kNone = 3 };
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
// kUpdate: update and report; kSkip: check every gradient first and update only when all are
// finite; kCheck: report only, write nothing.
enum class NonFinite : int { kUpdate = 0, kSkip = 1, kCheck = 2 };

// One tensor's buffers, each holding numel elements; param_out is 0 when out_dtype is kNone.
// The layout is that of a row of the int64 table the binding receives.
struct TensorBuffers {
  std::uintptr_t master;
  std::uintptr_t grad;
  std::uintptr_t exp_avg;
  std::uintptr_t exp_avg_sq;
  std::uintptr_t param_out;
  std::int64_t numel;
};
static_assert(sizeof(TensorBuffers) == 6 * sizeof(std::int64_t), "table rows are six int64");

// Per-step constants, computed in double by the caller and rounded to float once.
struct Constants {
  float grad_scale;
  float l2;  // weight decay added to the gradient (Adam mode), else 0
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float inv_sqrt_bias2;  // 1 / sqrt(1 - beta2^step), or 1 without bias correction
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step), or -lr
  float decay;          // 1 - lr * weight_decay (AdamW mode), else 1
};

struct StepConfig {
  DType grad_dtype;
  DType out_dtype;
  Constants constants;
};

// Updates elements [begin, end) of one tensor; returns true when a scaled gradient element was
// inf or nan. The check variant only reads the gradient.
using RangeFn = bool (*)(const TensorBuffers&, std::int64_t begin, std::int64_t end, const StepConfig&);
struct Kernels {
  RangeFn update;
  RangeFn check;
};

Kernels scalar_kernels();
#if defined(__x86_64__) || defined(__i386__)
Kernels avx2_kernels();
Kernels avx512_kernels();
#endif

// Steps every tensor of the table with num_threads threads (fewer for small work); returns
// true when any scaled gradient element was inf or nan.
bool step(const TensorBuffers* tensors, std::size_t num_tensors, const StepConfig& config, NonFinite mode,
          int num_threads);

std::vector<Isa> supported_isas();
Isa current_isa();
// The caller passes a level from supported_isas().
void set_isa(Isa isa);
const char* isa_name(Isa isa);

}  // namespace memfit::adam
