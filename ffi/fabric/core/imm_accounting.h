// Imm accounting: how each operation is cut into RMA writes over the sender's domains, and so how
// many imm-carrying writes reach each destination. The engine posts exactly the pieces these
// functions return, and receivers call the same functions (through fabric.imm_writes) to know how
// many imms to wait for. Delivery is unordered: an imm proves only that its own piece landed, so the
// count is the whole completion protocol.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "fabric/core/requests.h"

namespace jax_garden::fabric {

// One RMA write of a plan: which local domain posts it and which bytes it moves.
struct WritePiece {
  uint32_t domain;      // sender domain index
  uint64_t src_offset;  // into the source region
  uint64_t dst_offset;  // into the destination region
  uint64_t length;      // may be 0 (then only the imm travels)
  uint32_t target;      // index of the destination in the op (scatter / barrier), else 0
};

struct ShardingPolicy {
  // Single writes at or above this length are cut into one piece per domain. Pieces are multiples
  // of kPieceAlign except the last, and are never empty.
  uint64_t split_threshold = 1u << 20;
  static constexpr uint64_t kPieceAlign = 4096;
};

// Single write of `length` bytes from `domains` domains. `first_domain` picks the domain of an
// unsplit write (round robin in the engine; receivers need only the count).
std::vector<WritePiece> plan_write(uint64_t length, uint64_t src_offset, uint64_t dst_offset, uint32_t domains,
                                   uint32_t first_domain, const ShardingPolicy& policy);

// Paged write: page i moves page_bytes from src_offset + src_pages[i]*src_stride to
// dst_offset + dst_pages[i]*dst_stride. One write (one imm) per page, pages dealt round robin.
std::vector<WritePiece> plan_paged(uint64_t page_bytes, std::span<const uint32_t> src_pages,
                                   std::span<const uint32_t> dst_pages, uint64_t src_stride, uint64_t dst_stride,
                                   uint64_t src_offset, uint64_t dst_offset, uint32_t domains, uint32_t first_domain);

struct ScatterTarget {
  uint64_t length, src_offset, dst_offset;
};
std::vector<WritePiece> plan_scatter(const std::vector<ScatterTarget>& targets, uint32_t domains,
                                     ScatterSharding sharding, uint32_t first_domain);

// The accounting function: imm-carrying writes that one destination receives from one op.
//   kWrite: `length` bytes;  kPaged: `pages` pages;  kScatter: per target, with `sharding`;
//   kImm: 1;  kBarrier: 1 per peer.  (kSend carries no imm: InvalidArgument.)
// `domains` is the SENDER's domain count (NetAddress / MemoryDescriptor carry it).
uint64_t imm_writes(OpKind op, uint32_t domains, uint64_t length, uint64_t pages, ScatterSharding sharding,
                    const ShardingPolicy& policy);

}  // namespace jax_garden::fabric
