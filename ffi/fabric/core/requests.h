// The engine's typed internal API: what each operation asks for. The Python bindings build these
// from their arguments (strings are parsed there and nowhere else); the engine validates and plans
// them; the imm accounting (imm_accounting.h) counts by OpKind. Requests are call-scoped: the
// descriptors they point to must outlive the call only; the engine copies what it keeps.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "common/error.h"
#include "fabric/core/policy.h"
#include "fabric/wire/wire_format.h"

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
// dst_offset + dst_pages[i]*dst_stride. The page lists are the caller's (views for the call).
struct PagedWriteRequest {
  std::shared_ptr<MemoryRegion> src;
  const MemoryDescriptor* dst = nullptr;
  uint64_t page_bytes = 0;
  std::span<const uint32_t> src_pages, dst_pages;
  uint64_t src_stride = 0, dst_stride = 0, src_offset = 0, dst_offset = 0;
  std::optional<uint32_t> imm;
  TransferPath path = TransferPath::kAuto;
};

struct ScatterTargetRequest {
  const MemoryDescriptor* dst = nullptr;
  uint64_t length = 0, src_offset = 0, dst_offset = 0;
};

// Scatter destinations checked once and posted many times (a weight push posts the same lists every
// push). Owns copies of the distinct descriptors; `targets` point into them, so consecutive
// targets to one destination share a pointer and the engine checks that destination once.
struct ScatterTargetList {
  std::vector<std::unique_ptr<MemoryDescriptor>> descriptors;
  std::vector<ScatterTargetRequest> targets;
  uint64_t total_bytes = 0;

  ScatterTargetList() = default;
  ScatterTargetList(const ScatterTargetList&) = delete;  // `targets` point into `descriptors`
  ScatterTargetList& operator=(const ScatterTargetList&) = delete;

  // Appends one target; `d` is the caller's descriptor (copied once per distinct pointer).
  void add(const MemoryDescriptor* d, uint64_t length, uint64_t src_offset, uint64_t dst_offset) {
    const size_t i = targets.size();
    JG_CHECK_ARG(d, "scatter target ", i, " has no descriptor");
    JG_CHECK_ARG(dst_offset <= d->length && length <= d->length - dst_offset, "scatter target ", i,
                 ": destination bytes [", dst_offset, ", ", dst_offset + length,
                 ") run past the end of the destination region (", d->length, " bytes)");
    auto [it, fresh] = copies_.emplace(d, nullptr);
    if (fresh) {
      descriptors.push_back(std::make_unique<MemoryDescriptor>(*d));
      it->second = descriptors.back().get();
    }
    targets.push_back({it->second, length, src_offset, dst_offset});
    total_bytes += length;
  }

 private:
  std::unordered_map<const MemoryDescriptor*, const MemoryDescriptor*> copies_;  // caller's -> ours
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
