#include "fabric/transport/transport_staged.h"

#include <rdma/fi_rma.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "common/error.h"

namespace jax_garden::fabric {
namespace {

void free_pool(BouncePool& p) {
  if (!p.base) return;
  if (p.pinned)
    gpu_runtime().host_free(p.base);
  else
    std::free(p.base);
  p.base = nullptr;
}

const DoneCallback kIgnore = [](bool, const std::string&) {};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Pools and bookkeeping

StagingTransport::StagingTransport(const EngineOptions& options, const ProviderInfo& provider, Worker& worker,
                                   ControlPlane& control, RegionTable& regions, const Bytes& address_bytes)
    : options_(options),
      provider_(provider),
      worker_(worker),
      control_(control),
      regions_(regions),
      address_bytes_(address_bytes) {
  control_.subscribe({MsgKind::kStageOpen, MsgKind::kStageGrant, MsgKind::kStageChunk, MsgKind::kStageDone,
                           MsgKind::kStageError, MsgKind::kStageAbort},
                          [this](Frame& f) {
                            progress_role.assert_held();  // run by the control plane in the worker's pass
                            on_frame(f);
                          });
}

StagingTransport::~StagingTransport() {
  // The engine unregistered the pools (close()) and closed the domains before this runs.
  free_pool(send_);
  free_pool(recv_);
}

void StagingTransport::make_pool(BouncePool& p) {
  p.slot_bytes = options_.stage_chunk_bytes;
  p.slots = options_.stage_slots;
  size_t bytes = p.slot_bytes * p.slots;
  void* mem = gpu_runtime().available() ? gpu_runtime().host_alloc(bytes) : nullptr;  // pinned: async copies
  p.pinned = mem != nullptr;
  if (!mem) mem = std::aligned_alloc(4096, bytes);
  if (!mem) throw std::bad_alloc();
  p.base = static_cast<uint8_t*>(mem);
  for (uint32_t i = p.slots; i-- > 0;) p.free.push_back(i);
  for (uint32_t d = 0; d < worker_.num_domains(); ++d) p.regs.push_back(worker_.register_host(d, p.base, bytes));
}

BouncePool& StagingTransport::send_pool() {
  if (!send_.base) make_pool(send_);
  return send_;
}

BouncePool& StagingTransport::recv_pool() {
  if (!recv_.base) make_pool(recv_);
  return recv_;
}

uint64_t StagingTransport::open(StagedPart* part) {
  uint64_t x = next_xfer_++;
  outbound_[x] = part;
  return x;
}

void StagingTransport::forget(uint64_t xfer) { outbound_.erase(xfer); }

void StagingTransport::close() {
  for (auto* pool : {&send_, &recv_}) {
    for (size_t d = 0; d < pool->regs.size(); ++d) worker_.domain(static_cast<uint32_t>(d)).unregister(pool->regs[d]);
    pool->regs.clear();
  }
  inbound_.clear();
}

StagingStats StagingTransport::stats() const {
  StagingStats s;
  s.chunk_bytes = options_.stage_chunk_bytes;
  s.send_buffers = send_.slots;
  s.send_buffers_free = static_cast<uint32_t>(send_.free.size());
  s.recv_slots = recv_.slots;
  s.recv_slots_free = static_cast<uint32_t>(recv_.free.size());
  s.inbound = static_cast<uint32_t>(inbound_.size());
  s.outbound = static_cast<uint32_t>(outbound_.size());
  return s;
}

void StagingTransport::reply_error(const Bytes& endpoint, uint64_t xfer, const std::string& error) {
  control_.send(endpoint, MsgKind::kStageError, encode(StageErrorMsg{xfer, error}), kIgnore);
}

// ---------------------------------------------------------------------------------------------
// Control messages

void StagingTransport::on_frame(Frame& f) {
  switch (f.kind) {
    case MsgKind::kStageGrant:
    case MsgKind::kStageDone:
    case MsgKind::kStageError: {
      uint64_t xfer = f.kind == MsgKind::kStageGrant  ? decode_stage_grant(f.payload).xfer
                      : f.kind == MsgKind::kStageDone ? decode_stage_xfer(f.payload).xfer
                                                      : decode_stage_error(f.payload).xfer;
      auto it = outbound_.find(xfer);
      if (it == outbound_.end()) return;  // the transfer is gone (failed); the receiver frees on abort
      if (f.kind == MsgKind::kStageGrant)
        it->second->on_grant(decode_stage_grant(f.payload));
      else if (f.kind == MsgKind::kStageDone)
        it->second->on_done_msg();
      else
        it->second->on_error_msg(decode_stage_error(f.payload).error);
      return;
    }
    case MsgKind::kStageOpen: {
      auto m = decode_stage_open(f.payload);
      recv_pool();
      auto key = std::make_pair(f.sender.to_bytes(), m.xfer);
      if (inbound_.count(key)) return;  // duplicate
      const Bytes& reply_to = f.sender.domains[0];
      // The region key is the capability: base and length alone (guessable) are not enough.
      std::shared_ptr<MemoryRegion> region = regions_.find(m.dst_region_key, m.dst_base, m.dst_length);
      if (!region) {
        reply_error(reply_to, m.xfer,
                    str_cat("the peer no longer has region [0x", std::hex, m.dst_base, ", +", std::dec, m.dst_length,
                            ") with this region key (it was deregistered: a stale descriptor; or the descriptor "
                            "was forged or garbled): nothing was written there"));
        return;
      }
      if (m.total_bytes > m.dst_length) {
        reply_error(reply_to, m.xfer, str_cat(m.total_bytes, " bytes do not fit the region of ", m.dst_length, " bytes"));
        return;
      }
      auto in = std::make_unique<Inbound>();
      in->sender = f.sender;
      in->sender_endpoint = reply_to;
      in->xfer = m.xfer;
      in->region = std::move(region);
      in->total_bytes = m.total_bytes;
      in->chunks = m.chunks;
      in->has_imm = m.has_imm;
      in->imm = m.imm;
      in->imm_count = m.imm_count;
      in->last_activity = Clock::now();
      inbound_.emplace(std::move(key), std::move(in));
      return;
    }
    case MsgKind::kStageChunk: {
      auto m = decode_stage_chunk(f.payload);
      auto it = inbound_.find({f.sender.to_bytes(), m.xfer});
      if (it == inbound_.end()) return;
      Inbound& in = *it->second;
      if (in.dead) return;
      auto g = std::find(in.granted.begin(), in.granted.end(), m.slot);
      JG_CHECK_ARG(g != in.granted.end(), "stage chunk for slot ", m.slot, " which was not granted to it");
      in.granted.erase(g);
      in.last_activity = Clock::now();
      BouncePool& pool = recv_;
      uint64_t bytes = 0;
      std::vector<CopySegment> segs;
      std::string bad;
      for (auto& [off, len] : m.segments) {
        if (!(off <= in.region->length() && len <= in.region->length() - off)) {
          bad = str_cat("segment [", off, ", +", len, ") outside the region of ", in.region->length(), " bytes");
          break;
        }
        segs.push_back({in.region->base() + off, reinterpret_cast<uint64_t>(pool.slot(m.slot)) + bytes, len});
        bytes += len;
      }
      if (bad.empty() && bytes > pool.slot_bytes) bad = str_cat("chunk of ", bytes, " bytes exceeds the slot");
      if (!bad.empty()) {
        pool.free.push_back(m.slot);
        in.dead = true;
        reply_error(in.sender_endpoint, in.xfer, bad);
        return;
      }
      std::unique_ptr<CopyJob> job =
          in.region->cuda() ? gpu_runtime().copy(in.region->device(), 1, segs) : host_copy(segs);
      in.copies.push_back({m.slot, bytes, std::move(job)});
      return;
    }
    case MsgKind::kStageAbort: {
      auto m = decode_stage_xfer(f.payload);
      auto it = inbound_.find({f.sender.to_bytes(), m.xfer});
      if (it != inbound_.end()) it->second->dead = true;
      return;
    }
    default:
      return;
  }
}

// ---------------------------------------------------------------------------------------------
// Receiver side

bool StagingTransport::advance(Clock::time_point now) {
  if (inbound_.empty()) return false;
  bool progress = false;
  BouncePool& pool = recv_;
  auto grace = seconds_to_duration(2 * options_.timeout_s);
  std::vector<std::pair<Bytes, uint64_t>> erase;
  for (auto& [key, inp] : inbound_) {
    Inbound& in = *inp;
    for (size_t i = 0; i < in.copies.size();) {
      std::string err;
      int r = in.copies[i].job->poll(&err);
      if (r == 0) {
        ++i;
        continue;
      }
      progress = true;
      pool.free.push_back(in.copies[i].slot);
      if (r > 0) {
        in.landed += in.copies[i].bytes;
        in.chunks_landed++;
        in.last_activity = now;
      } else if (!in.dead) {
        in.dead = true;
        reply_error(in.sender_endpoint, in.xfer, err);
      }
      in.copies.erase(in.copies.begin() + static_cast<std::ptrdiff_t>(i));
    }
    if (!in.dead && in.chunks_landed == in.chunks) {
      if (in.landed != in.total_bytes) {
        in.dead = true;
        reply_error(in.sender_endpoint, in.xfer, str_cat("received ", in.landed, " of ", in.total_bytes, " bytes"));
      } else {
        // Every byte is in the region (the copies completed): only now do the imms count.
        if (in.has_imm && in.imm_count) worker_.deliver_imm(in.imm, static_cast<int64_t>(in.imm_count));
        control_.send(in.sender_endpoint, MsgKind::kStageDone, encode(StageXferMsg{in.xfer}), kIgnore);
        erase.push_back(key);
        progress = true;
        continue;
      }
    }
    if (!in.dead && now - in.last_activity > grace) {
      std::fprintf(stderr,
                   "jax_garden.fabric: staged transfer %llu from %s silent for %.1f s: reclaiming its %zu slot(s)\n",
                   static_cast<unsigned long long>(in.xfer), in.sender.to_string().c_str(), 2 * options_.timeout_s,
                   in.granted.size());
      in.dead = true;
    }
    if (in.dead && in.copies.empty()) {
      for (uint32_t s : in.granted) pool.free.push_back(s);
      in.granted.clear();
      erase.push_back(key);
      progress = true;
    }
  }
  for (auto& k : erase) inbound_.erase(k);
  return grant_slots(now) || progress;
}

bool StagingTransport::grant_slots(Clock::time_point now) {
  // One slot at a time, round robin over the transfers that still need slots.
  BouncePool& pool = recv_;
  std::vector<Inbound*> wanting;
  for (auto& [key, inp] : inbound_)
    if (!inp->dead && inp->chunks_granted < inp->chunks) wanting.push_back(inp.get());
  if (wanting.empty() || pool.free.empty()) return false;
  size_t cap = std::max<size_t>(1, pool.slots / wanting.size());
  size_t start = grant_cursor_++ % wanting.size();
  bool progress = false, any = true;
  while (!pool.free.empty() && any) {
    any = false;
    for (size_t k = 0; k < wanting.size() && !pool.free.empty(); ++k) {
      Inbound& in = *wanting[(start + k) % wanting.size()];
      if (in.chunks_granted >= in.chunks || in.granted.size() + in.copies.size() >= cap) continue;
      uint32_t slot = pool.free.back();
      pool.free.pop_back();
      in.granted.push_back(slot);
      in.chunks_granted++;
      in.last_activity = now;
      StageGrantMsg g;
      g.xfer = in.xfer;
      g.slot = slot;
      uint64_t addr = reinterpret_cast<uint64_t>(pool.slot(slot));
      g.remote_address = provider_.virtual_addressing ? addr : addr - reinterpret_cast<uint64_t>(pool.base);
      g.slot_bytes = pool.slot_bytes;
      for (auto& r : pool.regs) g.keys.push_back(r.key);
      auto key = std::make_pair(in.sender.to_bytes(), in.xfer);
      control_.send(in.sender_endpoint, MsgKind::kStageGrant, encode(g), [this, key](bool ok, const std::string&) {
        progress_role.assert_held();  // run by the worker under its lock
        if (ok) return;
        auto it = inbound_.find(key);  // the sender is unreachable: give up on it
        if (it != inbound_.end()) it->second->dead = true;
      });
      any = progress = true;
    }
  }
  return progress;
}

// ---------------------------------------------------------------------------------------------
// Sender side

std::unique_ptr<StagedPart> StagingTransport::make_part(Job* job, StagedPart::Spec spec) {
  return std::make_unique<StagedPart>(job, std::move(spec), *this, control_, worker_, options_, address_bytes_);
}

StagedPart::StagedPart(Job* job, Spec spec, StagingTransport& staging, ControlPlane& control, Worker& worker,
                       const EngineOptions& options, const Bytes& address_bytes)
    : Part(job),
      transport_(staging),
      control_(control),
      worker_(worker),
      options_(options),
      address_bytes_(address_bytes),
      spec_(std::move(spec)) {
  uint64_t chunk = options_.stage_chunk_bytes;
  if (spec_.stage_dst) chunk = std::min<uint64_t>(chunk, dst().stage_chunk_bytes);
  size_t header = frame_header_bytes(address_bytes_) + 64;
  size_t max_segs = options_.max_message_bytes > header ? (options_.max_message_bytes - header) / 16 : 1;
  max_segs = std::clamp<size_t>(max_segs, 1, 1024);
  chunks_ = plan_stage_chunks(spec_.segments, chunk, max_segs);
}

StagedPart::~StagedPart() {
  // Destroyed by the job runner under the progress lock (or at close, when nothing runs).
  if (registered_) transport_.forget(xfer_);
}

uint32_t StagedPart::buffer_cap() const {
  return std::max<uint32_t>(1, (options_.stage_slots + 1) / 2);
}

bool StagedPart::idle() const { return staging_.empty() && ops_in_flight_ == 0; }

void StagedPart::cancel() {
  Part::cancel();
  // Buffers whose data was staged but not yet written go back to the pool now.
  if (!ready_.empty()) {
    BouncePool& pool = transport_.send_pool();
    for (auto& [chunk, b] : ready_)
      if (b >= 0) {
        pool.free.push_back(static_cast<uint32_t>(b));
        buffers_held_--;
      }
  }
  ready_.clear();
  grants_.clear();
}

void StagedPart::fail(const std::string& error) {
  if (failed_) return;
  failed_ = true;
  job_->fail(TransferState::Status::kFailed, error);  // cancels this part too
}

void StagedPart::on_grant(const StageGrantMsg& g) {
  if (failed_ || cancelled_ || finished_) return;
  uint64_t largest = 0;
  for (const auto& c : chunks_) largest = std::max(largest, c.bytes);
  if (g.slot_bytes < largest) {
    fail(str_cat("the receiver granted a ", g.slot_bytes, "-byte slot, smaller than a ", largest, "-byte chunk"));
    return;
  }
  grants_.push_back({g.slot, g.remote_address, g.slot_bytes, g.keys});
}

void StagedPart::on_error_msg(const std::string& error) {
  done_received_ = true;  // the receiver dropped the transfer: no abort needed
  fail(str_cat("the receiver failed the staged transfer: ", error));
}

bool StagedPart::advance() {
  if (finished_) return false;
  bool progress = false;
  const MemoryRegion& src = *job_->src;

  // Local copies finish whatever happens (their buffers cannot be reused before).
  for (size_t i = 0; i < staging_.size();) {
    std::string err;
    int r = staging_[i].copy->poll(&err);
    if (r == 0) {
      ++i;
      continue;
    }
    progress = true;
    if (r > 0 && !cancelled_) {
      ready_.emplace_back(staging_[i].chunk, static_cast<int>(staging_[i].buffer));
    } else {
      transport_.send_pool().free.push_back(staging_[i].buffer);
      buffers_held_--;
      if (r < 0) fail(str_cat("staging copy failed: ", err));
    }
    staging_.erase(staging_.begin() + static_cast<std::ptrdiff_t>(i));
  }

  if (cancelled_) {
    if (!idle()) return progress;
    if (spec_.stage_dst && open_sent_ && !done_received_) {
      // Every write toward the receiver's slots has completed: it may free them.
      control_.send(dst().domains[0].endpoint, MsgKind::kStageAbort, encode(StageXferMsg{xfer_}), kIgnore);
    }
    if (registered_) transport_.forget(xfer_);
    registered_ = false;
    finish(false, "cancelled");
    return true;
  }

  if (spec_.stage_dst && !open_sent_) {
    xfer_ = transport_.open(this);
    registered_ = true;
    StageOpenMsg m;
    m.xfer = xfer_;
    m.dst_region_key = dst().region_key;
    m.dst_base = dst().base;
    m.dst_length = dst().length;
    for (auto& c : chunks_) m.total_bytes += c.bytes;
    m.chunks = chunks_.size();
    m.has_imm = spec_.has_imm;
    m.imm = spec_.imm;
    m.imm_count = spec_.has_imm ? spec_.imm_count : 0;
    open_sent_ = true;
    ops_in_flight_++;
    control_.send(dst().domains[0].endpoint, MsgKind::kStageOpen, encode(m),
                       [this](bool ok, const std::string& error) {
                         progress_role.assert_held();  // run by the worker under its lock
                         ops_in_flight_--;
                         if (!ok) {
                           done_received_ = true;  // it never arrived: nothing to abort
                           fail(str_cat("staged transfer: the receiver is unreachable: ", error));
                         }
                       });
    progress = true;
  }

  // Stage chunks ahead of the network into local bounce buffers (bounded per transfer). Toward a
  // staged destination, only as many as this transfer holds grants for: a buffer held while
  // waiting for a grant can deadlock with the receiver, whose slots may all be granted to other
  // transfers that wait for this sender's buffers.
  if (spec_.stage_src) {
    BouncePool& pool = transport_.send_pool();
    auto matched = [&] { return !spec_.stage_dst || staging_.size() + ready_.size() < grants_.size(); };
    while (next_stage_ < chunks_.size() && buffers_held_ < buffer_cap() && !pool.free.empty() && matched()) {
      uint32_t b = pool.free.back();
      pool.free.pop_back();
      buffers_held_++;
      std::vector<CopySegment> segs;
      uint64_t off = 0;
      for (auto& sg : chunks_[next_stage_].segments) {
        segs.push_back({reinterpret_cast<uint64_t>(pool.slot(b)) + off, src.base() + sg.src_offset, sg.length});
        off += sg.length;
      }
      std::unique_ptr<CopyJob> job = src.cuda() ? gpu_runtime().copy(src.device(), 0, segs) : host_copy(segs);
      staging_.push_back({next_stage_, b, std::move(job)});
      next_stage_++;
      progress = true;
    }
  } else {
    while (next_stage_ < chunks_.size()) ready_.emplace_back(next_stage_++, -1);
  }

  // Write ready chunks: straight to the destination, or into granted slots.
  while (!ready_.empty() && !failed_ && (!spec_.stage_dst || !grants_.empty())) {
    auto [chunk, buffer] = ready_.front();
    ready_.pop_front();
    if (spec_.stage_dst) {
      Grant g = std::move(grants_.front());
      grants_.pop_front();
      write_chunk(chunk, buffer, &g);
    } else {
      write_chunk(chunk, buffer, nullptr);
    }
    progress = true;
  }

  if (failed_) return progress;
  if (spec_.stage_dst) {
    if (done_received_ && ops_in_flight_ == 0) {
      if (registered_) transport_.forget(xfer_);
      registered_ = false;
      finish(true, {});
      return true;
    }
  } else if (chunks_written_ == chunks_.size() && !imms_started_) {
    // Every data write completed with delivery semantics: the imms may go now.
    imms_started_ = true;
    ops_in_flight_++;
    control_.queue_imms(spec_.dst, spec_.imm, spec_.has_imm ? spec_.imm_count : 0,
                             [this](bool ok, const std::string& error) {
                               progress_role.assert_held();  // run by the worker under its lock
                               ops_in_flight_--;
                               if (ok)
                                 finish(true, {});
                               else
                                 fail(error);
                             });
    progress = true;
  }
  return progress;
}

void StagedPart::write_chunk(size_t chunk, int buffer, const Grant* grant) {
  const StageChunk& ch = chunks_[chunk];
  const MemoryRegion& src = *job_->src;
  auto op = std::make_unique<Op>();
  op->deadline = deadline_after(options_.op_timeout(ch.bytes));
  op->keep_region = job_->src;
  uint32_t d = static_cast<uint32_t>(chunk % worker_.num_domains());
  const auto& rk = dst().domains[d % dst().domains.size()];
  op->targets.push_back({dst().domains[0].endpoint, 0, 0, 0, 0});
  auto add = [&](void* local, void* desc, uint64_t len, uint64_t remote, uint64_t key) {
    op->wrs.emplace_back();
    auto& wr = op->wrs.back();
    wr.domain = d;
    wr.local = local;
    wr.length = len;
    wr.desc = desc;
    wr.peer_endpoint = rk.endpoint;
    wr.remote_addr = remote;
    wr.remote_key = key;
    wr.flags = FI_DELIVERY_COMPLETE;  // placed at the target before we announce it / send imms
  };
  BouncePool* pool = buffer >= 0 ? &transport_.send_pool() : nullptr;
  if (buffer >= 0 && grant) {
    add(pool->slot(buffer), pool->regs[d].desc, ch.bytes, grant->remote_address, grant->keys[d % grant->keys.size()]);
  } else {
    uint64_t off = 0;
    for (const auto& sg : ch.segments) {
      void* local = buffer >= 0 ? static_cast<void*>(pool->slot(buffer) + off)
                                : reinterpret_cast<void*>(src.base() + sg.src_offset);
      void* desc = buffer >= 0 ? pool->regs[d].desc : src.desc(d);
      uint64_t remote = grant ? grant->remote_address + off : dst().remote_address(sg.dst_offset);
      uint64_t key = grant ? grant->keys[d % grant->keys.size()] : rk.key;
      add(local, desc, sg.length, remote, key);
      off += sg.length;
    }
  }
  bool has_grant = grant != nullptr;
  uint32_t slot = grant ? grant->slot : 0;
  ops_in_flight_++;
  op->on_done = [this, chunk, buffer, has_grant, slot](bool ok, const std::string& error) {
    progress_role.assert_held();  // run by the worker under its lock
    ops_in_flight_--;
    if (buffer >= 0) {
      transport_.send_pool().free.push_back(static_cast<uint32_t>(buffer));
      buffers_held_--;
    }
    if (!ok) {
      fail(str_cat("staged data write failed: ", error));
      return;
    }
    chunks_written_++;
    if (!has_grant || failed_ || cancelled_) return;
    StageChunkMsg m;
    m.xfer = xfer_;
    m.slot = slot;
    for (const auto& sg : chunks_[chunk].segments) m.segments.emplace_back(sg.dst_offset, sg.length);
    ops_in_flight_++;
    control_.send(dst().domains[0].endpoint, MsgKind::kStageChunk, encode(m),
                       [this](bool ok2, const std::string& error2) {
                         progress_role.assert_held();  // run by the worker under its lock
                         ops_in_flight_--;
                         if (!ok2) fail(str_cat("staged transfer: announcing a chunk failed: ", error2));
                       });
  };
  worker_.post_internal(std::move(op));
}

}  // namespace jax_garden::fabric
