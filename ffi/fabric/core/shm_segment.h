#pragma once
// POSIX shared-memory segments that same-host engines map (the region table, the imm mailboxes).

#include <cstddef>
#include <cstdint>
#include <string>

namespace jax_garden::fabric {

// Creates the segment `name` (it must not exist yet, mode 0600), sizes it to `bytes` and maps it
// read-write. Throws FabricError naming the failed call; on failure nothing is left behind.
void* create_shared_segment(const std::string& name, size_t bytes);

// True when `pid` names no process any more (0 never does: a segment not yet claimed).
bool process_dead(uint64_t pid);

// Unlinks the segments in /dev/shm whose names start with `prefix`, whose first 64-bit word is
// `magic` and whose owner pid (64-bit word `pid_word` of the header) is dead: what processes that
// died without unlinking theirs left behind. Best effort: errors are skipped.
void remove_dead_segments(const char* prefix, uint64_t magic, size_t pid_word);

}  // namespace jax_garden::fabric
