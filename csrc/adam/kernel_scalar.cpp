// The portable path: plain C++ with std::fma, the reference bits for the vector paths.
#include "adam/element.h"

namespace memfit::adam {
namespace {

template <DType G, DType O, bool L2>
struct ScalarUpdate {
  static bool run(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
    return scalar_update<G, O, L2>(t, begin, end, config);
  }
};

template <DType G>
struct ScalarCheck {
  static bool run(const TensorBuffers& t, std::int64_t begin, std::int64_t end, const StepConfig& config) {
    return scalar_check<G>(t, begin, end, config);
  }
};

}  // namespace

Kernels scalar_kernels() { return make_kernels<ScalarUpdate, ScalarCheck>(); }

}  // namespace memfit::adam
