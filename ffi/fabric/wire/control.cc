#include "fabric/wire/control.h"

#include "common/error.h"
#include "fabric/wire/bytes_io.h"

namespace jax_garden::fabric {
namespace {

constexpr uint32_t kFrameMagic = 0x3343474a;  // "JGC3"

}  // namespace

size_t frame_header_bytes(const Bytes& sender_address) { return 4 + 1 + 2 + sender_address.size(); }

Bytes encode_frame(MsgKind kind, const Bytes& sender_address, const uint8_t* payload, size_t size) {
  Writer w;
  w.out.reserve(frame_header_bytes(sender_address) + size);
  w.put<uint32_t>(kFrameMagic);
  w.put<uint8_t>(static_cast<uint8_t>(kind));
  w.put_bytes(sender_address);
  w.out.insert(w.out.end(), payload, payload + size);
  return std::move(w.out);
}

Frame decode_frame(const uint8_t* data, size_t size) {
  Reader r(data, size, "control message");
  uint32_t magic = r.get<uint32_t>("magic");
  JG_CHECK_ARG(magic == kFrameMagic, "control message has the wrong magic 0x", std::hex, magic);
  uint8_t kind = r.get<uint8_t>("kind");
  JG_CHECK_ARG(kind <= kMaxMsgKind, "control message has unknown kind ", int(kind));
  Bytes addr = r.get_bytes("sender address", 4096);
  Frame f;
  f.kind = static_cast<MsgKind>(kind);
  f.sender = NetAddress::from_bytes(addr.data(), addr.size());
  f.payload.assign(data + r.pos, data + size);
  return f;
}

Bytes encode(const ImmBatchMsg& m) {
  Writer w;
  w.put<uint32_t>(m.imm);
  w.put<uint64_t>(m.count);
  return std::move(w.out);
}

ImmBatchMsg decode_imm_batch(const Bytes& b) {
  Reader r(b.data(), b.size(), "imm batch message");
  ImmBatchMsg m;
  m.imm = r.get<uint32_t>("imm");
  m.count = r.get<uint64_t>("count");
  JG_CHECK_ARG(m.count > 0 && m.count < (1ULL << 40), "imm batch message: implausible count ", m.count);
  r.expect_end();
  return m;
}

Bytes encode(const StageOpenMsg& m) {
  Writer w;
  w.put<uint64_t>(m.xfer);
  w.put<uint64_t>(m.dst_region_key);
  w.put<uint64_t>(m.dst_base);
  w.put<uint64_t>(m.dst_length);
  w.put<uint64_t>(m.total_bytes);
  w.put<uint64_t>(m.chunks);
  w.put<uint8_t>(m.has_imm ? 1 : 0);
  w.put<uint32_t>(m.imm);
  w.put<uint64_t>(m.imm_count);
  return std::move(w.out);
}

StageOpenMsg decode_stage_open(const Bytes& b) {
  Reader r(b.data(), b.size(), "stage open message");
  StageOpenMsg m;
  m.xfer = r.get<uint64_t>("xfer");
  m.dst_region_key = r.get<uint64_t>("dst region key");
  m.dst_base = r.get<uint64_t>("dst base");
  m.dst_length = r.get<uint64_t>("dst length");
  m.total_bytes = r.get<uint64_t>("total bytes");
  m.chunks = r.get<uint64_t>("chunks");
  JG_CHECK_ARG(m.chunks <= m.total_bytes, "stage open message: ", m.chunks, " chunks for ", m.total_bytes, " bytes");
  uint8_t has = r.get<uint8_t>("has imm");
  JG_CHECK_ARG(has <= 1, "stage open message: bad imm flag ", int(has));
  m.has_imm = has == 1;
  m.imm = r.get<uint32_t>("imm");
  m.imm_count = r.get<uint64_t>("imm count");
  JG_CHECK_ARG(m.has_imm || m.imm_count == 0, "stage open message: imm count without an imm");
  r.expect_end();
  return m;
}

Bytes encode(const StageGrantMsg& m) {
  Writer w;
  w.put<uint64_t>(m.xfer);
  w.put<uint32_t>(m.slot);
  w.put<uint64_t>(m.remote_address);
  w.put<uint64_t>(m.slot_bytes);
  w.put<uint8_t>(static_cast<uint8_t>(m.keys.size()));
  for (uint64_t k : m.keys) w.put<uint64_t>(k);
  return std::move(w.out);
}

StageGrantMsg decode_stage_grant(const Bytes& b) {
  Reader r(b.data(), b.size(), "stage grant message");
  StageGrantMsg m;
  m.xfer = r.get<uint64_t>("xfer");
  m.slot = r.get<uint32_t>("slot");
  m.remote_address = r.get<uint64_t>("remote address");
  m.slot_bytes = r.get<uint64_t>("slot bytes");
  uint8_t n = r.get<uint8_t>("key count");
  JG_CHECK_ARG(n >= 1 && n <= kMaxDomains, "stage grant message: ", int(n), " keys");
  for (uint8_t i = 0; i < n; ++i) m.keys.push_back(r.get<uint64_t>("key"));
  r.expect_end();
  return m;
}

Bytes encode(const StageChunkMsg& m) {
  Writer w;
  w.put<uint64_t>(m.xfer);
  w.put<uint32_t>(m.slot);
  w.put<uint32_t>(static_cast<uint32_t>(m.segments.size()));
  for (auto& [off, len] : m.segments) {
    w.put<uint64_t>(off);
    w.put<uint64_t>(len);
  }
  return std::move(w.out);
}

StageChunkMsg decode_stage_chunk(const Bytes& b) {
  Reader r(b.data(), b.size(), "stage chunk message");
  StageChunkMsg m;
  m.xfer = r.get<uint64_t>("xfer");
  m.slot = r.get<uint32_t>("slot");
  uint32_t n = r.get<uint32_t>("segment count");
  JG_CHECK_ARG(n >= 1 && n <= kMaxStageSegments, "stage chunk message: ", n, " segments");
  JG_CHECK_ARG(r.remaining() == size_t(n) * 16, "stage chunk message: ", r.remaining(), " bytes for ", n,
               " segments");
  m.segments.reserve(n);
  for (uint32_t i = 0; i < n; ++i) {
    uint64_t off = r.get<uint64_t>("segment offset");
    uint64_t len = r.get<uint64_t>("segment length");
    m.segments.emplace_back(off, len);
  }
  r.expect_end();
  return m;
}

Bytes encode(const StageXferMsg& m) {
  Writer w;
  w.put<uint64_t>(m.xfer);
  return std::move(w.out);
}

StageXferMsg decode_stage_xfer(const Bytes& b) {
  Reader r(b.data(), b.size(), "stage message");
  StageXferMsg m;
  m.xfer = r.get<uint64_t>("xfer");
  r.expect_end();
  return m;
}

Bytes encode(const StageErrorMsg& m) {
  Writer w;
  w.put<uint64_t>(m.xfer);
  w.put_string(m.error.substr(0, 1000));
  return std::move(w.out);
}

StageErrorMsg decode_stage_error(const Bytes& b) {
  Reader r(b.data(), b.size(), "stage error message");
  StageErrorMsg m;
  m.xfer = r.get<uint64_t>("xfer");
  Bytes e = r.get_bytes("error", 4096);
  m.error.assign(e.begin(), e.end());
  r.expect_end();
  return m;
}

Bytes encode(const RegionQueryMsg& m) {
  Writer w;
  w.put<uint64_t>(m.query);
  w.put<uint32_t>(static_cast<uint32_t>(m.entries.size()));
  for (const auto& e : m.entries) {
    w.put<uint64_t>(e.region_key);
    w.put<uint64_t>(e.key);
    w.put<uint64_t>(e.base);
    w.put<uint64_t>(e.length);
  }
  return std::move(w.out);
}

RegionQueryMsg decode_region_query(const Bytes& b) {
  Reader r(b.data(), b.size(), "region query message");
  RegionQueryMsg m;
  m.query = r.get<uint64_t>("query");
  uint32_t n = r.get<uint32_t>("entry count");
  JG_CHECK_ARG(n >= 1 && n <= kMaxRegionQueries, "region query message: ", n, " entries");
  JG_CHECK_ARG(r.remaining() == size_t(n) * 32, "region query message: ", r.remaining(), " bytes for ", n, " entries");
  for (uint32_t i = 0; i < n; ++i) {
    RegionQueryMsg::Entry e;
    e.region_key = r.get<uint64_t>("region key");
    e.key = r.get<uint64_t>("key");
    e.base = r.get<uint64_t>("base");
    e.length = r.get<uint64_t>("length");
    m.entries.push_back(e);
  }
  r.expect_end();
  return m;
}

Bytes encode(const RegionReplyMsg& m) {
  Writer w;
  w.put<uint64_t>(m.query);
  w.put<uint32_t>(static_cast<uint32_t>(m.live.size()));
  for (uint8_t l : m.live) w.put<uint8_t>(l);
  return std::move(w.out);
}

RegionReplyMsg decode_region_reply(const Bytes& b) {
  Reader r(b.data(), b.size(), "region reply message");
  RegionReplyMsg m;
  m.query = r.get<uint64_t>("query");
  uint32_t n = r.get<uint32_t>("entry count");
  JG_CHECK_ARG(n <= kMaxRegionQueries && r.remaining() == n, "region reply message: ", r.remaining(), " bytes for ",
               n, " entries");
  for (uint32_t i = 0; i < n; ++i) {
    uint8_t l = r.get<uint8_t>("live flag");
    JG_CHECK_ARG(l <= 1, "region reply message: bad live flag ", int(l));
    m.live.push_back(l);
  }
  r.expect_end();
  return m;
}

}  // namespace jax_garden::fabric
