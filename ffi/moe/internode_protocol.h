// The inter-node MoE protocol: how ranks of different node groups move dispatch/combine rows
// through the TransferEngine (fabric/engine.h). Pure definitions and arithmetic (no engine calls):
// the host context (internode_all_to_all.h) follows them, and so do the GPU node groups (the CUDA
// kernels of proxy_kernels.cu pack and place the same messages, host_proxy.cc posts them).
//
// Every rank owns two host regions, registered once when the AllToAll is created:
//   receive region (peers write into it; its descriptor is what peers get at bootstrap):
//     abort mailboxes [R] | combine area (R headers + T*K rows, parts reserved per expert rank) |
//     dispatch slots [R]   (one private slot per source rank: rows land before counts are known)
//   send region (this rank writes from it; ranks of its own node read it in place):
//     abort message | combine area (R headers + M rows) | dispatch slots [R]
//
// One message = one engine write per (phase, source, destination): a fixed-size header followed by
// the payload, posted as a one-target scatter with ScatterSharding::kBytes, so that the number of
// imms it delivers (one per sender domain) does not depend on its length: the receiver knows how
// many imms to count before it knows how much data comes, and reads the header only once all of
// them arrived.
//
// Dispatch generation g, source s -> destination d (s and d in different node groups):
//   * s packs the tokens t < bound_m with at least one routing entry owned by d, each once, t
//     ascending, behind a DispatchHeader (count n, and the part of s's combine area reserved for
//     d's combine rows): header | token ids [n] | indices [n][K] | x rows [n] | scales [n]
//     (dispatch_layout(n)), written into d's slot [s] (imm kDispatch).
//   * d counts kDispatch imms from s, reads n, builds expert_x from every source's message in
//     (source rank, token, k) order (layout.h; capacity drops counted), then acks with one
//     zero-byte kDispatchFree imm: s may overwrite d's slot [s] from then on.
// Combine generation g, expert rank d -> source s:
//   * d packs the rows it kept for s in s's (t, k) order behind a CombineHeader carrying the rows
//     kept per local expert of d, and writes them to the part of s's combine area that s reserved
//     for d (imm kCombine). s knows its own routing, so those counts say which of its (t, k)
//     entries each packed row is; it sums in k order and acks with kCombineFree.
// Counting: how many imms one message delivers is fabric::imm_writes of the SENDER's domains
// (exchanged at bootstrap); nothing else is assumed about the engine's pieces. Imms carry (kind,
// generation mod 8, source, destination): a write of generation g can only ever count toward g's
// counter, and the free acks keep every pair within one generation of each other, so the 3
// generation bits never alias. A failing rank writes its reason into every remote peer's abort
// mailbox (imm kAbort): peers fail with it instead of waiting for the timeout.
#pragma once

#include <cstdint>
#include <string>

#include "fabric/core/imm_accounting.h"
#include "fabric/wire/wire_format.h"
#include "moe/dtype.h"
#include "moe/layout.h"

namespace jax_garden::moe::internode {

// ---- imm values -------------------------------------------------------------------------------

inline constexpr uint32_t kImmTag = 0x9u;  // bits 28..31 of every imm of this protocol
inline constexpr int kKindBits = 3, kGenerationBits = 3, kRankBits = 11;
inline constexpr int32_t kMaxRanks = 1 << kRankBits;             // 2048
inline constexpr uint32_t kGenerations = 1u << kGenerationBits;  // generations an imm tells apart

enum class Kind : uint32_t {
  kDispatch = 0,      // a dispatch message (header + tokens)
  kDispatchFree = 1,  // the destination consumed our dispatch message: its slot is free again
  kCombine = 2,       // a combine message (header + rows)
  kCombineFree = 3,   // the source consumed our combine message
  kAbort = 4,         // the sender failed; its reason is in our abort mailbox
};
inline constexpr int kKinds = 5;
const char* kind_name(Kind kind);

uint32_t make_imm(Kind kind, uint64_t generation, int32_t source, int32_t destination);

struct ImmFields {
  Kind kind;
  uint32_t generation_mod;  // generation % kGenerations
  int32_t source, destination;
};
// False when `imm` is not one of this protocol's values.
bool parse_imm(uint32_t imm, ImmFields* out);

// ---- messages ---------------------------------------------------------------------------------

inline constexpr uint32_t kDispatchMagic = 0x4A474D44;  // "JGMD"
inline constexpr uint32_t kCombineMagic = 0x4A474D43;   // "JGMC"
inline constexpr uint32_t kAbortMagic = 0x4A474D41;     // "JGMA"

struct DispatchHeader {
  uint32_t magic;
  uint32_t generation;     // dispatch generation (full)
  int32_t source;
  int32_t tokens;          // n: tokens in the message
  int32_t combine_rows;    // rows the source reserved for this destination's combine message: its
                           // (t, k) entries routed here
  int32_t bound_m;         // the source's clamped bound_m
  int64_t combine_offset;  // where in the source's combine area that message goes (bytes)
  uint32_t reserved[8];
};
static_assert(sizeof(DispatchHeader) == 64);

// Followed by kept[L] int32 (rows of the source kept per local expert of the sender), padded to
// RegionLayout::combine_header_bytes, then the rows.
struct CombineHeader {
  uint32_t magic;
  uint32_t generation;           // combine generation
  uint32_t dispatch_generation;  // the sender's dispatch whose rows these are
  int32_t source;                // the expert rank that sends
  int32_t rows;                  // packed rows (= sum of kept)
  uint32_t reserved[3];
};
static_assert(sizeof(CombineHeader) == 32);

inline constexpr int64_t kAbortBytes = 1024;
struct AbortMessage {
  uint32_t magic;
  int32_t source;
  uint32_t timed_out;
  uint32_t length;
  char text[kAbortBytes - 16];
};
static_assert(sizeof(AbortMessage) == kAbortBytes);

// ---- layouts ----------------------------------------------------------------------------------

inline constexpr int64_t kAlign = 64;
JG_MOE_HD inline int64_t align_up(int64_t x) { return round_up(x, kAlign); }

// A dispatch message of `tokens` tokens, packed (offsets from the end of its DispatchHeader).
// Inline for the CUDA kernels that pack and read the same messages (proxy_kernels.cu).
struct DispatchLayout {
  int64_t token_ids = 0, indices = 0, x = 0, scales = 0, bytes = 0;
};
JG_MOE_HD inline DispatchLayout dispatch_layout(int32_t experts_per_token, int32_t scale_cols, int64_t row_bytes,
                                                int64_t tokens) {
  DispatchLayout l;
  l.token_ids = 0;
  l.indices = tokens * 4;
  l.x = align_up(tokens * 4 * (1 + int64_t{experts_per_token}));
  l.scales = l.x + align_up(tokens * row_bytes);
  l.bytes = l.scales + tokens * int64_t{scale_cols} * 4;
  return l;
}
inline DispatchLayout dispatch_layout(const MoeShape& shape, int64_t row_bytes, int64_t tokens) {
  return dispatch_layout(shape.experts_per_token, shape.scale_cols, row_bytes, tokens);
}

struct RegionLayout {
  int64_t row_bytes = 0;             // one dispatch row (H * element size)
  int64_t combine_row_bytes = 0;     // one combine row (H * 2)
  int64_t dispatch_slot_bytes = 0;   // header + the message of T tokens
  int64_t combine_header_bytes = 0;  // CombineHeader + kept[L], aligned
  // receive region
  int64_t recv_abort = 0, recv_combine = 0, recv_combine_bytes = 0, recv_dispatch_slots = 0, recv_bytes = 0;
  // send region
  int64_t send_abort = 0, send_combine = 0, send_combine_bytes = 0, send_dispatch_slots = 0, send_bytes = 0;
};
RegionLayout region_layout(const MoeShape& shape, DType dispatch_dtype);

// Where, in a source's combine area, the combine message of each expert rank goes: the rank's
// header, then one row per (t, k) entry the source routed to it (entries[d]), ranks in order.
// Within RegionLayout::recv_combine_bytes. `offsets` has R entries.
void combine_offsets(const RegionLayout& layout, const int32_t* entries, int32_t num_ranks, int64_t* offsets);

// ---- counting (the engine's accounting, with the sender's settings) ----------------------------

struct SenderSettings {
  uint32_t domains = 1;
  fabric::ShardingPolicy sharding;
};
// Imms one message from that sender delivers (a one-target scatter with ScatterSharding::kBytes:
// one per sender domain, whatever its length).
uint64_t message_imms(const SenderSettings& sender);
// Imms one zero-byte signal (free ack) delivers.
uint64_t signal_imms(const SenderSettings& sender);

// ---- bootstrap ----------------------------------------------------------------------------------

// What a rank publishes so that ranks of other nodes can reach it (bytes through the bootstrap
// exchange; checked field by field when parsed).
struct PeerInfo {
  int32_t rank = -1;
  int32_t node_size = 0;
  MoeShape shape;
  DType dispatch_dtype = DType::kOther, combine_dtype = DType::kOther;
  SenderSettings sender;
  fabric::MemoryDescriptor receive;  // its receive region
};
fabric::Bytes encode_peer_info(const PeerInfo& info);
PeerInfo decode_peer_info(const uint8_t* data, size_t size);

}  // namespace jax_garden::moe::internode
