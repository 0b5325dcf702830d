// Memory keys the engine chooses itself (providers without FI_MR_PROV_KEY, e.g. tcp): random 64-bit
// values from the OS's CSPRNG, never 0 and never handed out twice in an engine's life. A key is the
// secret part of a descriptor: with sequential keys, holding one region's descriptor would let a
// peer reach every other region of the engine by guessing its neighbours.
#pragma once

#include <cstdint>
#include <unordered_set>

#include "common/thread_annotations.h"

namespace jax_garden::fabric {

class KeyAllocator {
 public:
  uint64_t next();

 private:
  Mutex mu_;
  std::unordered_set<uint64_t> issued_ JG_GUARDED_BY(mu_);
};

uint64_t random_u64();  // getrandom(2); throws FabricError if the OS cannot provide entropy

}  // namespace jax_garden::fabric
