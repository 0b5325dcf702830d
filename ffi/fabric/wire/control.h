// The engine's two-sided control messages. Every message is a frame
//   magic "JGC3" | kind u8 | sender NetAddress (u16 length + bytes) | payload
// kind 0 is a user message (TransferEngine.send/recv); the other kinds are internal (imm batches
// for non-RMA paths, the staging rendezvous, failure queries) and never reach recv(). Everything is validated when
// decoded: a malformed frame or payload is an InvalidArgument, and the worker drops it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fabric/wire/wire_format.h"

namespace jax_garden::fabric {

enum class MsgKind : uint8_t {
  kUser = 0,
  kImmBatch = 1,    // sender -> receiver: count imm arrivals of one value (IPC / staged completions)
  kStageOpen = 2,   // sender -> receiver: a staged transfer into one of the receiver's regions
  kStageGrant = 3,  // receiver -> sender: one bounce slot is yours
  kStageChunk = 4,  // sender -> receiver: a slot holds this chunk (its data write completed)
  kStageDone = 5,   // receiver -> sender: every byte landed and the imms were counted
  kStageError = 6,  // receiver -> sender: the transfer was refused or failed
  kStageAbort = 7,  // sender -> receiver: the transfer is abandoned; free its slots
  kRegionQuery = 8,  // sender -> owner: do these regions still exist? (after a write to one failed)
  kRegionReply = 9,  // owner -> sender: yes or no for each
};
inline constexpr uint8_t kMaxMsgKind = 9;
inline constexpr size_t kMaxRegionQueries = 1024;  // entries per query message
inline constexpr size_t kMaxStageSegments = 4096;  // per chunk message

struct Frame {
  MsgKind kind = MsgKind::kUser;
  NetAddress sender;
  Bytes payload;
};
Bytes encode_frame(MsgKind kind, const Bytes& sender_address, const uint8_t* payload, size_t size);
size_t frame_header_bytes(const Bytes& sender_address);
Frame decode_frame(const uint8_t* data, size_t size);

struct ImmBatchMsg {
  uint32_t imm = 0;
  uint64_t count = 0;
};
struct StageOpenMsg {
  uint64_t xfer = 0;  // sender-unique id of this transfer
  uint64_t dst_region_key = 0;            // the capability: the destination descriptor's region key
  uint64_t dst_base = 0, dst_length = 0;  // the destination descriptor's region
  uint64_t total_bytes = 0;
  uint64_t chunks = 0;  // chunk announcements (one grant each) the receiver will see
  bool has_imm = false;
  uint32_t imm = 0;
  uint64_t imm_count = 0;  // imms the receiver counts once every byte landed
};
struct StageGrantMsg {
  uint64_t xfer = 0;
  uint32_t slot = 0;
  uint64_t remote_address = 0;  // RMA address of the slot (virtual address or offset)
  uint64_t slot_bytes = 0;
  std::vector<uint64_t> keys;  // per receiver domain
};
struct StageChunkMsg {
  uint64_t xfer = 0;
  uint32_t slot = 0;
  std::vector<std::pair<uint64_t, uint64_t>> segments;  // (dst_offset, length), packed from the slot start
};
struct StageXferMsg {  // kStageDone, kStageAbort
  uint64_t xfer = 0;
};
struct StageErrorMsg {
  uint64_t xfer = 0;
  std::string error;
};

struct RegionQueryMsg {
  struct Entry {
    uint64_t region_key = 0, key = 0, base = 0, length = 0;
  };
  uint64_t query = 0;  // sender-unique id
  std::vector<Entry> entries;
};
struct RegionReplyMsg {
  uint64_t query = 0;
  std::vector<uint8_t> live;  // one per queried entry: 1 = the owner has that region
};

Bytes encode(const ImmBatchMsg& m);
Bytes encode(const StageOpenMsg& m);
Bytes encode(const StageGrantMsg& m);
Bytes encode(const StageChunkMsg& m);
Bytes encode(const StageXferMsg& m);
Bytes encode(const StageErrorMsg& m);
Bytes encode(const RegionQueryMsg& m);
Bytes encode(const RegionReplyMsg& m);

ImmBatchMsg decode_imm_batch(const Bytes& b);
StageOpenMsg decode_stage_open(const Bytes& b);
StageGrantMsg decode_stage_grant(const Bytes& b);
StageChunkMsg decode_stage_chunk(const Bytes& b);
StageXferMsg decode_stage_xfer(const Bytes& b);
StageErrorMsg decode_stage_error(const Bytes& b);
RegionQueryMsg decode_region_query(const Bytes& b);
RegionReplyMsg decode_region_reply(const Bytes& b);

}  // namespace jax_garden::fabric
