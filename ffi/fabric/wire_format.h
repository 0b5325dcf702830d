// Byte formats that cross process boundaries: NetAddress (how to reach an engine) and
// MemoryDescriptor (how to write into one of its regions). Both carry a magic, a version and a
// checksum, and are validated field by field when parsed: a garbled or truncated buffer is an
// InvalidArgument, never a wild write.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace jax_garden::fabric {

using Bytes = std::vector<uint8_t>;

inline constexpr uint16_t kWireFormatVersion = 1;
inline constexpr size_t kMaxDomains = 8;          // NICs per group we accept on the wire
inline constexpr size_t kMaxEndpointNameBytes = 256;

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

// Where a remote region lives: base address and length in the owner's address space, how RMA
// addresses are formed (virtual addresses or offsets, provider-dependent), and per owner domain the
// endpoint name and remote key.
struct MemoryDescriptor {
  struct DomainKey {
    Bytes endpoint;
    uint64_t key = 0;
    bool operator==(const DomainKey&) const = default;
  };
  std::string provider;
  uint64_t base = 0;
  uint64_t length = 0;
  bool virtual_addressing = true;  // FI_MR_VIRT_ADDR: remote address = base + offset
  MemoryKind kind = MemoryKind::kHost;
  int32_t device = -1;  // CUDA ordinal for kCuda
  std::vector<DomainKey> domains;

  uint64_t remote_address(uint64_t offset) const { return virtual_addressing ? base + offset : offset; }
  Bytes to_bytes() const;
  static MemoryDescriptor from_bytes(const uint8_t* data, size_t size);
  NetAddress owner() const;
  bool operator==(const MemoryDescriptor&) const = default;
};

uint32_t checksum32(const uint8_t* data, size_t size);  // FNV-1a

}  // namespace jax_garden::fabric
