// How a message and a free ack of the inter-node MoE protocol (internode_protocol.h) are posted to
// the TransferEngine: one definition for the CPU host context (internode_steps.cc) and the GPU
// host proxy (host_proxy.cc), so that both deliver exactly the imms the receiver counts.
#pragma once

#include <cstdint>
#include <memory>

#include "fabric/engine/engine.h"

namespace jax_garden::moe::internode {

// A message: `bytes` from `src` at src_offset into `dst` at dst_offset, posted as a one-target
// scatter cut by bytes (one piece, hence one imm, per sender domain whatever its length: the
// receiver counts message_imms() before it knows the length).
std::shared_ptr<fabric::TransferState> post_message(fabric::Engine& engine,
                                                    const std::shared_ptr<fabric::MemoryRegion>& src,
                                                    const fabric::MemoryDescriptor& dst, int64_t src_offset,
                                                    int64_t dst_offset, int64_t bytes, uint32_t imm);
// A zero-byte write carrying `imm` (free acks): signal_imms() imms.
std::shared_ptr<fabric::TransferState> post_signal(fabric::Engine& engine, const fabric::MemoryDescriptor& dst,
                                                   uint32_t imm);

}  // namespace jax_garden::moe::internode
