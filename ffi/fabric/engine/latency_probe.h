// A ping-pong loop over the engine's public C++ API, without Python in the loop: it measures what
// the engine itself costs per small write, next to the raw-libfabric baseline (the benchmark's
// "engine (C++ loop)" row). Same protocol as the benchmark's Python loop: the initiator writes
// `bytes` with imm `imm_data` and waits for one `imm_ack`; the responder waits for the data's imms
// and answers with an imm-only write.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "fabric/engine/engine.h"

namespace jax_garden::fabric {

// Returns the round-trip time of each timed iteration in nanoseconds (initiator), or nothing
// (responder). Throws on any failure or timeout.
std::vector<int64_t> ping_pong(Engine& engine, const std::shared_ptr<MemoryRegion>& region,
                               const MemoryDescriptor& peer, uint64_t bytes, uint32_t imm_data, uint32_t imm_ack,
                               int warmup, int iters, bool initiator, double timeout_s);

}  // namespace jax_garden::fabric
