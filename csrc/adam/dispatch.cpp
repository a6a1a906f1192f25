// Picks the kernel for the CPU, splits a table of tensors into one contiguous element range per
// thread, and applies the non-finite policy.
#include <algorithm>
#include <atomic>
#include <functional>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "adam/adam.h"
#include "adam/thread_pool.h"

namespace memfit::adam {
namespace {

// Below this many elements per thread, waking another thread costs more than it saves.
constexpr std::int64_t kMinElementsPerThread = 1 << 15;
// Range starts fall on multiples of this many elements, which keeps threads off each other's cache
// lines inside a tensor.
constexpr std::int64_t kRangeAlignment = 64;

std::vector<Isa> detect_isas() {
  std::vector<Isa> isas{Isa::kScalar};
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    isas.push_back(Isa::kAvx2);
  }
  if (__builtin_cpu_supports("avx512f")) isas.push_back(Isa::kAvx512);
#endif
  return isas;
}

std::atomic<int> selected_isa{static_cast<int>(detect_isas().back())};

Kernels kernels_for([[maybe_unused]] Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::kAvx512) return avx512_kernels();
  if (isa == Isa::kAvx2) return avx2_kernels();
#endif
  return scalar_kernels();
}

// Pool threads inherit the caller's rounding and denormal modes (MXCSR), so a range computes the
// same bits whichever thread runs it.
class FloatModeScope {
 public:
#if defined(__x86_64__) || defined(__i386__)
  explicit FloatModeScope(unsigned mode) : saved_(_mm_getcsr()) { _mm_setcsr(mode); }
  ~FloatModeScope() { _mm_setcsr(saved_); }
  static unsigned current() { return _mm_getcsr(); }

 private:
  unsigned saved_;
#else
  explicit FloatModeScope(unsigned) {}
  static unsigned current() { return 0; }
#endif
};

// Runs fn over every tensor range, one contiguous share of the table's elements per thread;
// returns the OR of what fn returned.
bool parallel_ranges(const TensorBuffers* tensors, std::size_t num_tensors, int num_threads, RangeFn fn,
                     const StepConfig& config) {
  std::vector<std::int64_t> starts(num_tensors + 1, 0);  // starts[k]: first element of tensor k
  for (std::size_t k = 0; k < num_tensors; ++k) starts[k + 1] = starts[k] + tensors[k].numel;
  const std::int64_t total = starts[num_tensors];
  if (total == 0) return false;
  std::int64_t useful = (total + kMinElementsPerThread - 1) / kMinElementsPerThread;
  int num_tasks = static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, useful)));
  std::int64_t share = (total + num_tasks - 1) / num_tasks;
  share = (share + kRangeAlignment - 1) / kRangeAlignment * kRangeAlignment;
  std::vector<char> nonfinite(num_tasks, 0);
  const unsigned float_mode = FloatModeScope::current();
  std::function<void(int)> task = [&](int task_index) {
    FloatModeScope scope(float_mode);
    std::int64_t begin = std::min(total, task_index * share);
    std::int64_t end = std::min(total, begin + share);
    // The last tensor starting at or before begin (starts[0] is 0, so there is one).
    auto first = static_cast<std::size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
    bool found = false;
    for (std::size_t k = first; k < num_tensors && starts[k] < end; ++k) {
      std::int64_t local_begin = std::max(begin, starts[k]) - starts[k];
      std::int64_t local_end = std::min(end, starts[k + 1]) - starts[k];
      if (local_begin < local_end) found = fn(tensors[k], local_begin, local_end, config) || found;
    }
    nonfinite[task_index] = found;
  };
  shared_pool().run(num_tasks, task);
  return std::any_of(nonfinite.begin(), nonfinite.end(), [](char flag) { return flag != 0; });
}

}  // namespace

bool step(const TensorBuffers* tensors, std::size_t num_tensors, const StepConfig& config, NonFinite mode,
          int num_threads) {
  const Kernels kernels = kernels_for(current_isa());
  if (mode != NonFinite::kUpdate) {
    // Checking first reads only the gradients (2 or 4 bytes per element) before the update's
    // single pass over the state; the alternative, updating and rolling back, would rewrite it.
    bool nonfinite = parallel_ranges(tensors, num_tensors, num_threads, kernels.check, config);
    if (nonfinite || mode == NonFinite::kCheck) return nonfinite;
  }
  return parallel_ranges(tensors, num_tensors, num_threads, kernels.update, config);
}

std::vector<Isa> supported_isas() { return detect_isas(); }

Isa current_isa() { return static_cast<Isa>(selected_isa.load()); }

void set_isa(Isa isa) { selected_isa.store(static_cast<int>(isa)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace memfit::adam
