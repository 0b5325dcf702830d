#include "moe/cuda_all_to_all.h"

namespace jax_garden::moe {

ObjectRegistry<CudaAllToAll>& cuda_contexts() {
  static auto* registry = new ObjectRegistry<CudaAllToAll>();  // never destroyed: handlers may run late
  return *registry;
}

}  // namespace jax_garden::moe
