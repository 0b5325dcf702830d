#include "fabric/core/imm_accounting.h"

#include "common/error.h"

namespace jax_garden::fabric {

std::vector<WritePiece> plan_write(uint64_t length, uint64_t src_offset, uint64_t dst_offset, uint32_t domains,
                                   uint32_t first_domain, const ShardingPolicy& policy) {
  JG_CHECK_ARG(domains >= 1, "plan_write: domains must be >= 1, got ", domains);
  std::vector<WritePiece> pieces;
  if (domains == 1 || length < policy.split_threshold || length < uint64_t(domains) * ShardingPolicy::kPieceAlign) {
    pieces.push_back({first_domain % domains, src_offset, dst_offset, length, 0});
    return pieces;
  }
  const uint64_t a = ShardingPolicy::kPieceAlign;
  uint64_t chunk = ((length + domains - 1) / domains + a - 1) / a * a;
  for (uint32_t d = 0; d < domains; ++d) {
    uint64_t begin = uint64_t(d) * chunk;
    uint64_t end = std::min(length, begin + chunk);
    // Rounding chunks up to kPieceAlign can leave nothing for the last domains of a short write;
    // such pieces are not sent. imm_writes() counts through this same function, so the receiver's
    // expected count always matches (for the default 1 MiB threshold it is exactly `domains`).
    if (begin >= end) break;
    pieces.push_back({d, src_offset + begin, dst_offset + begin, end - begin, 0});
  }
  return pieces;
}

std::vector<WritePiece> plan_paged(uint64_t page_bytes, std::span<const uint32_t> src_pages,
                                   std::span<const uint32_t> dst_pages, uint64_t src_stride, uint64_t dst_stride,
                                   uint64_t src_offset, uint64_t dst_offset, uint32_t domains, uint32_t first_domain) {
  JG_CHECK_ARG(src_pages.size() == dst_pages.size(), "write_paged: ", src_pages.size(), " source pages but ",
               dst_pages.size(), " destination pages");
  std::vector<WritePiece> pieces;
  pieces.reserve(src_pages.size());
  for (size_t i = 0; i < src_pages.size(); ++i) {
    pieces.push_back({static_cast<uint32_t>((first_domain + i) % domains), src_offset + src_pages[i] * src_stride,
                      dst_offset + dst_pages[i] * dst_stride, page_bytes, 0});
  }
  return pieces;
}

std::vector<WritePiece> plan_scatter(const std::vector<ScatterTarget>& targets, uint32_t domains,
                                     ScatterSharding sharding, uint32_t first_domain) {
  std::vector<WritePiece> pieces;
  for (size_t t = 0; t < targets.size(); ++t) {
    const auto& tg = targets[t];
    if (sharding == ScatterSharding::kTargets) {
      pieces.push_back({static_cast<uint32_t>((first_domain + t) % domains), tg.src_offset, tg.dst_offset, tg.length,
                        static_cast<uint32_t>(t)});
      continue;
    }
    // kBytes: exactly one piece per domain, zero-length pieces included, so the receiver's count
    // (domains per target) does not depend on the length.
    uint64_t chunk = (tg.length + domains - 1) / domains;
    for (uint32_t d = 0; d < domains; ++d) {
      uint64_t begin = std::min(tg.length, uint64_t(d) * chunk);
      uint64_t end = std::min(tg.length, begin + chunk);
      pieces.push_back({d, tg.src_offset + begin, tg.dst_offset + begin, end - begin, static_cast<uint32_t>(t)});
    }
  }
  return pieces;
}

const char* op_kind_name(OpKind kind) {
  switch (kind) {
    case OpKind::kWrite: return "write";
    case OpKind::kPaged: return "write_paged";
    case OpKind::kScatter: return "scatter";
    case OpKind::kImm: return "write_imm";
    case OpKind::kBarrier: return "barrier";
    case OpKind::kSend: return "send";
  }
  return "?";
}

uint64_t imm_writes(OpKind op, uint32_t domains, uint64_t length, uint64_t pages, ScatterSharding sharding,
                    const ShardingPolicy& policy) {
  JG_CHECK_ARG(domains >= 1 && domains <= kMaxDomains, "imm_writes: domains must be in 1..", kMaxDomains, ", got ",
               domains);
  switch (op) {
    case OpKind::kWrite: return plan_write(length, 0, 0, domains, 0, policy).size();
    case OpKind::kPaged: return pages;
    case OpKind::kScatter: return sharding == ScatterSharding::kTargets ? 1 : domains;
    case OpKind::kImm:
    case OpKind::kBarrier: return 1;
    case OpKind::kSend: break;
  }
  throw InvalidArgument(str_cat("imm_writes: ", op_kind_name(op), " carries no imm"));
}

}  // namespace jax_garden::fabric
