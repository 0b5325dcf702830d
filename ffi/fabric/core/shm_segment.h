#pragma once
// POSIX shared-memory segments that same-host engines map (the region table, the imm mailboxes).

#include <cstddef>
#include <string>

namespace jax_garden::fabric {

// Creates the segment `name` (it must not exist yet, mode 0600), sizes it to `bytes` and maps it
// read-write. Throws FabricError naming the failed call; on failure nothing is left behind.
void* create_shared_segment(const std::string& name, size_t bytes);

}  // namespace jax_garden::fabric
