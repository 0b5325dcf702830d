// Byte formats that cross process boundaries: NetAddress (how to reach an engine) and
// MemoryDescriptor (how to write into one of its regions). Both carry a magic, a version and a
// checksum, and are validated field by field when parsed: a garbled or truncated buffer is an
// InvalidArgument, never a wild write.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "fabric/wire/bytes_io.h"

namespace jax_garden::fabric {

inline constexpr uint16_t kWireFormatVersion = 5;
inline constexpr size_t kMaxDomains = 8;          // NICs per group we accept on the wire
inline constexpr size_t kMaxEndpointNameBytes = 256;
inline constexpr size_t kIpcHandleBytes = 64;      // cudaIpcMemHandle_t
inline constexpr size_t kMaxHostIdBytes = 64;
inline constexpr size_t kMaxPciBusIdBytes = 32;

// One engine's endpoints: the provider name and, per domain, the raw fi_getname() bytes.
struct NetAddress {
  std::string provider;
  std::vector<Bytes> domains;

  Bytes to_bytes() const;
  static NetAddress from_bytes(const uint8_t* data, size_t size);
  std::string to_string() const;  // short human form for error messages
  bool operator==(const NetAddress&) const = default;
};

enum class MemoryKind : uint8_t { kHost = 0, kCuda = 1 };

// How a same-host peer maps a CUDA region: a legacy CUDA IPC handle (cudaMalloc memory), or a
// virtual-memory-management range (cuMemCreate, as XLA's allocators make) exported as a POSIX
// file descriptor that the owner's fd broker hands out (fd_broker.h).
enum class IpcKind : uint8_t { kLegacy = 0, kVmm = 1 };

// Where a remote region lives: base address and length in the owner's address space, how RMA
// addresses are formed (virtual addresses or offsets, provider-dependent), and per owner domain the
// endpoint name, the region's remote key and the key of the owner engine's imm target.
//
// Besides the RMA coordinates a descriptor tells a sender which other paths can reach the region:
//   * imm target: a small scratch region of the owner engine (imm_base + per-domain imm_key) that
//     zero-byte writes carrying only an imm go to, so imm-only traffic never needs the region
//     itself to be libfabric-registered (staged regions are not);
//   * host_id (kernel boot id) + pid + process nonce: same host / same process checks;
//   * for CUDA regions with an IPC export: the cudaIpcMemHandle of the allocation holding the
//     region (or, for a VMM range, its size: the fd comes from the owner's broker), the region's
//     offset in it and the GPU's PCI bus id (CUDA IPC path on one host);
//   * staged: the provider cannot reach this memory (e.g. GPU memory on tcp); writes go through the
//     owner's bounce slots (stage_chunk_bytes each) by rendezvous;
//   * region_key: a random 64-bit secret of this registration, never reused: the capability that the
//     paths the provider does not check (staging, same-host copies) ask for, and what a failure query
//     names; region_slot: the region's slot in the owner process's shared region table
//     (shared_regions.h), which same-host copies check for liveness and bounds;
//   * mailbox: the serial of the owner engine's imm mailbox (imm_mailbox.h), where same-host copies
//     deliver their imms (0: none, and then no ipc path to this region).
struct MemoryDescriptor {
  struct DomainKey {
    Bytes endpoint;
    uint64_t key = 0;      // region key (0 for staged regions: they are not registered)
    uint64_t imm_key = 0;  // key of the owner engine's imm target on this domain
    bool operator==(const DomainKey&) const = default;
  };
  std::string provider;
  uint64_t base = 0;
  uint64_t length = 0;
  bool virtual_addressing = true;  // FI_MR_VIRT_ADDR: remote address = base + offset
  MemoryKind kind = MemoryKind::kHost;
  int32_t device = -1;  // CUDA ordinal (in the owner process) for kCuda
  bool staged = false;
  uint64_t imm_base = 0;
  uint32_t stage_chunk_bytes = 0;
  std::string host_id;
  uint32_t pid = 0;
  uint64_t process_nonce = 0;
  uint64_t region_key = 0;
  uint32_t region_slot = 0xFFFFFFFFu;
  uint32_t mailbox = 0;
  bool has_ipc = false;
  IpcKind ipc_kind = IpcKind::kLegacy;
  std::array<uint8_t, kIpcHandleBytes> ipc_handle{};  // kLegacy
  uint64_t ipc_offset = 0;       // region base - allocation (kVmm: range) base
  uint64_t ipc_range_bytes = 0;  // kVmm: size of the range to map
  std::string pci_bus_id;
  std::vector<DomainKey> domains;

  uint64_t remote_address(uint64_t offset) const { return virtual_addressing ? base + offset : offset; }
  uint64_t imm_address() const { return virtual_addressing ? imm_base : 0; }
  Bytes to_bytes() const;
  static MemoryDescriptor from_bytes(const uint8_t* data, size_t size);
  NetAddress owner() const;
  bool operator==(const MemoryDescriptor&) const = default;
};

}  // namespace jax_garden::fabric
