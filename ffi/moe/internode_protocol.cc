#include "moe/internode_protocol.h"

#include "common/error.h"
#include "fabric/wire/bytes_io.h"

namespace jax_garden::moe::internode {

namespace {
constexpr int kRankShift = 0;
constexpr int kSourceShift = kRankBits;
constexpr int kGenerationShift = 2 * kRankBits;
constexpr int kKindShift = kGenerationShift + kGenerationBits;
constexpr int kTagShift = kKindShift + kKindBits;
static_assert(kTagShift + 4 == 32, "imm fields must fill 32 bits");
constexpr uint32_t kRankMask = (1u << kRankBits) - 1;

constexpr uint32_t kPeerInfoMagic = 0x4A474D4E;  // "JGMN"
constexpr uint16_t kPeerInfoVersion = 1;
}  // namespace

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kDispatch: return "dispatch message";
    case Kind::kDispatchFree: return "dispatch free ack";
    case Kind::kCombine: return "combine message";
    case Kind::kCombineFree: return "combine free ack";
    case Kind::kAbort: return "abort";
  }
  return "?";
}

uint32_t make_imm(Kind kind, uint64_t generation, int32_t source, int32_t destination) {
  JG_CHECK_ARG(source >= 0 && source < kMaxRanks && destination >= 0 && destination < kMaxRanks,
               "MoE internode: ranks must be in [0, ", kMaxRanks, "), got source ", source, " destination ",
               destination);
  return (kImmTag << kTagShift) | (static_cast<uint32_t>(kind) << kKindShift) |
         (static_cast<uint32_t>(generation % kGenerations) << kGenerationShift) |
         (static_cast<uint32_t>(source) << kSourceShift) | (static_cast<uint32_t>(destination) << kRankShift);
}

bool parse_imm(uint32_t imm, ImmFields* out) {
  if ((imm >> kTagShift) != kImmTag) return false;
  uint32_t kind = (imm >> kKindShift) & ((1u << kKindBits) - 1);
  if (kind >= static_cast<uint32_t>(kKinds)) return false;
  out->kind = static_cast<Kind>(kind);
  out->generation_mod = (imm >> kGenerationShift) & (kGenerations - 1);
  out->source = static_cast<int32_t>((imm >> kSourceShift) & kRankMask);
  out->destination = static_cast<int32_t>((imm >> kRankShift) & kRankMask);
  return true;
}

RegionLayout region_layout(const MoeShape& s, DType dispatch_dtype) {
  RegionLayout l;
  const int64_t R = s.num_ranks, T = s.max_tokens, K = s.experts_per_token, M = s.max_recv_tokens;
  l.row_bytes = int64_t{s.hidden} * static_cast<int64_t>(dtype_size(dispatch_dtype));
  l.combine_row_bytes = int64_t{s.hidden} * 2;
  l.dispatch_slot_bytes =
      align_up(int64_t{sizeof(DispatchHeader)} + dispatch_layout(s, l.row_bytes, T).bytes);
  l.combine_header_bytes = align_up(int64_t{sizeof(CombineHeader)} + 4 * int64_t{s.local_experts()});
  // A source reserves, per expert rank, a header and one row per (t, k) entry routed there: at
  // most T*K rows in all. A sender packs, per source, a header and the rows it kept: at most M.
  l.recv_combine_bytes = align_up(R * l.combine_header_bytes + T * K * l.combine_row_bytes);
  l.send_combine_bytes = align_up(R * l.combine_header_bytes + M * l.combine_row_bytes);

  int64_t at = 0;
  l.recv_abort = at;
  at += R * kAbortBytes;
  l.recv_combine = at;
  at += l.recv_combine_bytes;
  l.recv_dispatch_slots = at;
  at += R * l.dispatch_slot_bytes;
  l.recv_bytes = at;

  at = 0;
  l.send_abort = at;
  at += kAbortBytes;
  l.send_combine = at;
  at += l.send_combine_bytes;
  l.send_dispatch_slots = at;
  at += R * l.dispatch_slot_bytes;
  l.send_bytes = at;
  return l;
}

void combine_offsets(const RegionLayout& layout, const int32_t* entries, int32_t num_ranks, int64_t* offsets) {
  int64_t at = 0;
  for (int32_t d = 0; d < num_ranks; ++d) {
    offsets[d] = at;
    at += layout.combine_header_bytes + int64_t{entries[d]} * layout.combine_row_bytes;
  }
}

uint64_t message_imms(const SenderSettings& sender) {
  return fabric::imm_writes(fabric::OpKind::kScatter, sender.domains, 0, 0, fabric::ScatterSharding::kBytes,
                            sender.sharding);
}

uint64_t signal_imms(const SenderSettings& sender) {
  return fabric::imm_writes(fabric::OpKind::kImm, sender.domains, 0, 0, fabric::ScatterSharding::kTargets,
                            sender.sharding);
}

fabric::Bytes encode_peer_info(const PeerInfo& info) {
  fabric::Writer w;
  w.put<uint32_t>(kPeerInfoMagic);
  w.put<uint16_t>(kPeerInfoVersion);
  w.put<int32_t>(info.rank);
  w.put<int32_t>(info.node_size);
  const MoeShape& s = info.shape;
  w.put<int32_t>(s.num_ranks);
  w.put<int32_t>(s.num_experts);
  w.put<int32_t>(s.experts_per_token);
  w.put<int32_t>(s.hidden);
  w.put<int32_t>(s.max_tokens);
  w.put<int64_t>(s.max_recv_tokens);
  w.put<int32_t>(s.expert_padding);
  w.put<int32_t>(s.scale_cols);
  w.put<int32_t>(static_cast<int32_t>(info.dispatch_dtype));
  w.put<int32_t>(static_cast<int32_t>(info.combine_dtype));
  w.put<uint32_t>(info.sender.domains);
  w.put<uint64_t>(info.sender.sharding.split_threshold);
  fabric::Bytes desc = info.receive.to_bytes();
  w.put<uint32_t>(static_cast<uint32_t>(desc.size()));
  w.out.insert(w.out.end(), desc.begin(), desc.end());
  return w.finish();
}

PeerInfo decode_peer_info(const uint8_t* data, size_t size) {
  const char* what = "MoE internode peer info";
  fabric::Reader r(data, size, what);
  JG_CHECK_ARG(size >= 10, what, " is truncated: ", size, " bytes");
  uint32_t magic = r.get<uint32_t>("magic");
  JG_CHECK_ARG(magic == kPeerInfoMagic, what, " has the wrong magic 0x", std::hex, magic,
               ": not what InternodeAllToAll.peer_info returns");
  r.verify_checksum();
  uint16_t version = r.get<uint16_t>("version");
  JG_CHECK_ARG(version == kPeerInfoVersion, what, " has version ", version, ", this build reads ", kPeerInfoVersion);
  PeerInfo info;
  info.rank = r.get<int32_t>("rank");
  info.node_size = r.get<int32_t>("node_size");
  MoeShape& s = info.shape;
  s.num_ranks = r.get<int32_t>("num_ranks");
  s.num_experts = r.get<int32_t>("num_experts");
  s.experts_per_token = r.get<int32_t>("experts_per_token");
  s.hidden = r.get<int32_t>("hidden");
  s.max_tokens = r.get<int32_t>("max_tokens");
  s.max_recv_tokens = r.get<int64_t>("max_recv_tokens");
  s.expert_padding = r.get<int32_t>("expert_padding");
  s.scale_cols = r.get<int32_t>("scale_cols");
  int32_t dd = r.get<int32_t>("dispatch_dtype");
  int32_t cd = r.get<int32_t>("combine_dtype");
  JG_CHECK_ARG(dd >= 0 && dd < static_cast<int32_t>(DType::kOther) && cd >= 0 &&
                   cd < static_cast<int32_t>(DType::kOther),
               what, ": unknown dtype codes ", dd, ", ", cd);
  info.dispatch_dtype = static_cast<DType>(dd);
  info.combine_dtype = static_cast<DType>(cd);
  info.sender.domains = r.get<uint32_t>("domains");
  JG_CHECK_ARG(info.sender.domains >= 1 && info.sender.domains <= fabric::kMaxDomains, what, ": domains ",
               info.sender.domains, " outside 1..", fabric::kMaxDomains);
  info.sender.sharding.split_threshold = r.get<uint64_t>("split_threshold");
  JG_CHECK_ARG(info.sender.sharding.split_threshold > 0, what, ": split_threshold must be > 0");
  uint32_t n = r.get<uint32_t>("descriptor length");
  r.need(n, "descriptor");
  info.receive = fabric::MemoryDescriptor::from_bytes(r.data + r.pos, n);
  r.pos += n;
  r.expect_end();
  return info;
}

}  // namespace jax_garden::moe::internode
