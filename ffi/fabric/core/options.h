// An engine's settings (TransferEngine(...) in Python).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "fabric/core/imm_accounting.h"
#include "fabric/core/policy.h"

namespace jax_garden::fabric {

enum class CompletionMode : uint8_t {
  // A Transfer completes once the target placed the data (FI_DELIVERY_COMPLETE). On providers whose
  // own completions only mean "handed to the network" (tcp), this is what guarantees that no op is
  // reported successful while its bytes did not land, e.g. when the peer drops the connection.
  kDelivery,
  // A Transfer completes once the source may be reused (the provider's default); faster on tcp, but a
  // write the peer never placed can then be reported successful. Only imm counting at the receiver
  // proves placement.
  kTransmit,
};

struct EngineOptions {
  std::string provider;          // "" = auto (efa > verbs;ofi_rxm > tcp)
  std::string node;              // source address to bind; "" = provider default
  uint32_t domains = 1;          // NICs (tcp: loopback endpoints) in the group
  double timeout_s = 10.0;       // per-op stall timeout: a silent peer fails ops within this
  double min_rate_bytes_per_s = 200e6;  // big ops get timeout + bytes / min_rate
  uint32_t max_message_bytes = 256 * 1024;  // two-sided control messages
  uint32_t recv_slots = 16;
  uint32_t max_outstanding_per_peer = 128;  // posted requests per (domain, peer) link
  CompletionMode completion = CompletionMode::kDelivery;
  ShardingPolicy sharding;
  TransferPath default_path = TransferPath::kAuto;  // per-op `path` overrides it
  uint32_t stage_chunk_bytes = 1u << 20;  // staging: bounce buffer / slot size
  uint32_t stage_slots = 8;               // staging: bounce buffers per side (send pool, receive slots)
  // Same-host peers may map GPU regions in cuMemCreate memory (no legacy IPC handle; XLA's default
  // and platform allocators) through an fd this process exports (fd_broker.h): how jax arrays
  // reach another process's GPU at device speed. JAX_GARDEN_VMM_IPC=0 turns it off.
  bool vmm_ipc = true;
  // ipc single writes of at most this many bytes (16-byte aligned, few segments) go as one copy
  // kernel that also stores the imm records, instead of cudaMemcpyAsync + cuStreamWriteValue64: less
  // host work per op, but the copy needs free SMs, where the driver's copy engines do not (a kernel
  // spinning for such a write's bytes could starve it). 0 (default): always the driver's copy.
  // JAX_GARDEN_IPC_COPY_KERNEL_BYTES.
  uint64_t ipc_copy_kernel_bytes = 0;
  // The adversarial delivery mode (adversary.h): "seed=7,hold=0.5,..."; "" or "off" = off;
  // nullopt = the JAX_GARDEN_ADVERSARY environment variable (read when the engine is created).
  std::optional<std::string> adversary;

  // The deadline allowance of an op moving `bytes`.
  double op_timeout(uint64_t bytes) const { return timeout_s + double(bytes) / min_rate_bytes_per_s; }
};

}  // namespace jax_garden::fabric
