// CudaAllToAll's CUDA-only part (cuda_all_to_all.h): which device an FFI call runs on.
#include <cuda_runtime.h>

#include "moe/cuda_all_to_all.h"

namespace jax_garden::moe {

int CudaAllToAll::runtime_ordinal(int xla_ordinal) {
  const bool cached = xla_ordinal >= 0 && xla_ordinal < kOrdinalTable;
  if (cached) {
    const int known = runtime_ordinal_[xla_ordinal].load(std::memory_order_relaxed);
    if (known != 0) return known - 1;
  }
  int found = -1, current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && holds(current)) {
    found = current;
  } else if (holds(xla_ordinal)) {
    found = xla_ordinal;
  }
  // Only a hit is remembered: a miss (a call before finalize, or on a device of no rank) stays an
  // error every time.
  if (cached && found >= 0) runtime_ordinal_[xla_ordinal].store(found + 1, std::memory_order_relaxed);
  return found;
}

}  // namespace jax_garden::moe
