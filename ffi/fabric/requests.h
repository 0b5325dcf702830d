// The engine's typed internal API: what each operation asks for. The Python bindings build these
// from their arguments (strings are parsed there and nowhere else); the engine validates and plans
// them; the imm accounting (imm_accounting.h) counts by OpKind. Requests are call-scoped: the
// descriptors they point to must outlive the call only; the engine copies what it keeps.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "fabric/policy.h"
#include "fabric/wire_format.h"

namespace jax_garden::fabric {

class MemoryRegion;

enum class OpKind : uint8_t {
  kWrite,    // one contiguous write, split over the sender's domains when large
  kPaged,    // page lists on both sides, one write per page (the KV path)
  kScatter,  // one source, many destinations
  kImm,      // a zero-byte write carrying only an imm, to one peer
  kBarrier,  // an imm to each of a set of peers
  kSend,     // a two-sided control message
};
const char* op_kind_name(OpKind kind);

enum class ScatterSharding : uint8_t {
  kTargets,  // each target is one write; targets are spread over the domains
  kBytes,    // each target is cut into one piece per domain (`domains` imms per target)
};

struct WriteRequest {
  std::shared_ptr<MemoryRegion> src;
  const MemoryDescriptor* dst = nullptr;
  uint64_t length = 0, src_offset = 0, dst_offset = 0;
  std::optional<uint32_t> imm;
  TransferPath path = TransferPath::kAuto;  // kAuto: the engine's default path
};

// Page i moves page_bytes from src_offset + src_pages[i]*src_stride to
// dst_offset + dst_pages[i]*dst_stride.
struct PagedWriteRequest {
  std::shared_ptr<MemoryRegion> src;
  const MemoryDescriptor* dst = nullptr;
  uint64_t page_bytes = 0;
  std::vector<uint32_t> src_pages, dst_pages;
  uint64_t src_stride = 0, dst_stride = 0, src_offset = 0, dst_offset = 0;
  std::optional<uint32_t> imm;
  TransferPath path = TransferPath::kAuto;
};

struct ScatterTargetRequest {
  const MemoryDescriptor* dst = nullptr;
  uint64_t length = 0, src_offset = 0, dst_offset = 0;
};

struct ScatterRequest {
  std::shared_ptr<MemoryRegion> src;
  std::vector<ScatterTargetRequest> targets;
  ScatterSharding sharding = ScatterSharding::kTargets;
  std::optional<uint32_t> imm;
  TransferPath path = TransferPath::kAuto;
};

// kImm (one peer) or kBarrier (every peer): one zero-byte write with `imm` to each peer's owner.
struct ImmRequest {
  OpKind kind = OpKind::kImm;
  std::vector<const MemoryDescriptor*> peers;
  uint32_t imm = 0;
};

}  // namespace jax_garden::fabric
