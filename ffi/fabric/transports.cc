// Transports beyond plain RMA, all driven by the engine's worker thread:
//
// * CUDA IPC (IpcPart): same host, both regions GPU memory. The peer's allocation is imported once
//   (cudaIpcOpenMemHandle, cached per process); single writes are cudaMemcpyAsync on the runtime's
//   streams, paged writes one copy kernel. The worker polls the copy's event and, only once it
//   completed, delivers the imms through libfabric to the peer's imm target (or as one imm-batch
//   control message for large counts), so the receiver counts exactly as with RMA.
//
// * Staging (StagedPart + Inbound): when the provider cannot reach a region (GPU memory on tcp, or
//   a region registered with staged=True). Sender: chunks are copied (D2H / memcpy) into a bounded
//   pool of local pinned bounce buffers, ahead of the network, so the copy of chunk i+1 overlaps the
//   RMA of chunk i. Receiver (destination staged): the sender opens a transfer, the receiver grants
//   bounce slots as they free up (round robin over concurrent senders), the sender writes a chunk
//   into its slot with FI_DELIVERY_COMPLETE and then announces it, the receiver copies the slot into
//   the region (H2D / memcpy) and frees the slot; once every chunk is in, it counts the imms and
//   tells the sender. Unordered delivery is never assumed: an announcement is sent only after its
//   data write completed with delivery semantics, and imms are counted only after the copies.
//   A silent sender's slots are reclaimed after 2 x timeout; a sender whose op failed sends an abort
//   once its writes drained.
#include <rdma/fi_rma.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "common/error.h"
#include "fabric/engine_internal.h"

namespace jax_garden::fabric {
namespace {

// One imm travels as a zero-byte write to the peer's imm target (the normal libfabric path); more
// than one (paged writes, coalesced completions) as one imm-batch control message.
constexpr uint64_t kMaxImmWrites = 1;

// Process-wide CUDA IPC mappings: a handle may be opened only once per process.
std::mutex g_ipc_mu;
std::map<std::pair<uint64_t, std::array<uint8_t, kIpcHandleBytes>>, uint64_t> g_ipc_maps;

Clock::time_point after(double seconds) {
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

void free_pool(BouncePool& p) {
  if (!p.base) return;
  if (p.pinned)
    gpu_runtime().host_free(p.base);
  else
    std::free(p.base);
  p.base = nullptr;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Jobs and parts

void Part::finish(bool ok, const std::string& error) {
  if (finished_) return;
  finished_ = true;
  job_->part_finished(ok, error);
}

void Job::part_finished(bool ok, const std::string& error) {
  parts_finished++;
  if (!ok) {
    fail(TransferState::Status::kFailed, error);
  } else if (parts_finished == parts.size() && !failed) {
    state->finish(TransferState::Status::kDone);
  }
}

void Job::fail(TransferState::Status status, const std::string& error) {
  if (failed) return;
  failed = true;
  state->finish(status, error);
  for (auto& p : parts)
    if (!p->finished()) p->cancel();
}

bool Job::removable() const {
  if (parts_finished < parts.size()) return false;
  for (const auto& p : parts)
    if (!p->idle()) return false;
  return true;
}

bool FabricPart::advance() {
  if (finished_) return false;
  if (op_) {
    if (cancelled_) {
      op_.reset();
      finish(false, "cancelled");
      return true;
    }
    in_flight_ = true;
    op_->on_done = [this](bool ok, const std::string& error) {
      in_flight_ = false;
      finish(ok, error);
    };
    core_->submit_internal(std::move(op_));
    return true;
  }
  return false;
}

StagingState::~StagingState() {
  free_pool(send);
  free_pool(recv);
}

bool EngineCore::transports_busy() const {
  return !jobs_.empty() || (staging_ && !staging_->inbound.empty());
}

std::shared_ptr<TransferState> EngineCore::submit_job(std::unique_ptr<Job> job) {
  auto state = job->state;
  state->set_engine(weak_from_this());
  Job* raw = job.release();
  enqueue([this, raw]() {
    std::unique_ptr<Job> owned(raw);
    if (stop_worker_.load()) {
      raw->state->finish(TransferState::Status::kFailed, "the engine is closed");
      return;
    }
    if (raw->parts.empty()) {
      raw->state->finish(TransferState::Status::kDone);
      return;
    }
    jobs_.emplace(raw->state->id(), std::move(owned));
  });
  return state;
}

bool EngineCore::advance_jobs() {
  bool progress = false;
  std::fill(copy_blocked_.begin(), copy_blocked_.end(), 0);
  std::vector<uint64_t> done;
  for (auto& [id, job] : jobs_) {
    for (auto& p : job->parts)
      if (!p->finished()) progress |= p->advance();
    if (job->removable()) done.push_back(id);
  }
  for (uint64_t id : done) jobs_.erase(id);
  start_ipc_batch();
  progress |= flush_imms();
  return progress || !done.empty();
}

void EngineCore::check_job_timeouts(Clock::time_point now) {
  for (auto& [id, job] : jobs_) {
    if (job->failed || now < job->deadline) continue;
    job->fail(TransferState::Status::kTimedOut,
              str_cat("no completion within the engine timeout (", options_.timeout_s,
                      " s + size allowance); the peer may be dead or unreachable"));
  }
}

bool EngineCore::run_deferred() {
  if (deferred_.empty()) return false;
  std::deque<std::function<void()>> run;
  run.swap(deferred_);
  for (auto& fn : run) {
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "jax_garden.fabric: internal completion failed: %s\n", e.what());
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Internal ops and messages

void EngineCore::submit_internal(std::unique_ptr<Op> op) {
  for (auto& wr : op->wrs) {
    if (wr.hdr.kind != ContextKind::kSend) wr.hdr.kind = ContextKind::kWrite;
    wr.op = op.get();
  }
  if (!op->state) op->state = std::make_shared<TransferState>(next_id_.fetch_add(1), "internal");
  if (op->deadline == Clock::time_point{}) op->deadline = after(options_.timeout_s);
  install_op(std::move(op));
}

std::unique_ptr<Op> EngineCore::make_send_op(const Bytes& endpoint, MsgKind kind, const Bytes& payload,
                                             std::function<void(bool, const std::string&)> on_done) {
  auto op = std::make_unique<Op>();
  op->owned = make_frame(kind, payload);
  op->wrs.resize(1);
  auto& wr = op->wrs[0];
  wr.hdr.kind = ContextKind::kSend;
  wr.domain = 0;
  wr.local = op->owned.data();
  wr.length = op->owned.size();
  wr.peer_endpoint = endpoint;
  op->on_done = std::move(on_done);
  return op;
}

void EngineCore::send_internal(const Bytes& endpoint, MsgKind kind, const Bytes& payload,
                               std::function<void(bool, const std::string&)> on_done) {
  submit_internal(make_send_op(endpoint, kind, payload, std::move(on_done)));
}

void EngineCore::deliver_imms(const MemoryDescriptor& dst, uint32_t imm, uint64_t count,
                              std::function<void(bool, const std::string&)> on_done) {
  if (count == 0) {
    deferred_.push_back([cb = std::move(on_done)]() { cb(true, {}); });
    return;
  }
  if (count > kMaxImmWrites) {
    send_internal(dst.domains[0].endpoint, MsgKind::kImmBatch, encode(ImmBatchMsg{imm, count}), std::move(on_done));
    return;
  }
  auto op = std::make_unique<Op>();
  op->wrs.resize(count);
  uint32_t first = round_robin_.fetch_add(1);
  for (uint64_t i = 0; i < count; ++i) {
    auto& wr = op->wrs[i];
    uint32_t d = static_cast<uint32_t>((first + i) % num_domains());
    auto& rk = dst.domains[d % dst.domains.size()];
    wr.domain = d;
    wr.local = scratch_.data();
    wr.length = 0;
    wr.desc = scratch_regs_[d].desc;
    wr.peer_endpoint = rk.endpoint;
    wr.remote_addr = dst.imm_address();
    wr.remote_key = rk.imm_key;
    wr.has_imm = true;
    wr.imm = imm;
  }
  op->on_done = std::move(on_done);
  submit_internal(std::move(op));
}

void EngineCore::queue_imms(const MemoryDescriptor& dst, uint32_t imm, uint64_t count,
                            std::function<void(bool, const std::string&)> on_done) {
  auto& p = pending_imms_[{dst.domains[0].endpoint, imm}];
  if (p.callbacks.empty()) p.dst = dst;
  p.count += count;
  p.callbacks.push_back(std::move(on_done));
}

bool EngineCore::flush_imms() {
  if (pending_imms_.empty()) return false;
  std::map<std::pair<Bytes, uint32_t>, PendingImms> batch;
  batch.swap(pending_imms_);
  for (auto& [key, p] : batch) {
    auto cbs = std::make_shared<std::vector<std::function<void(bool, const std::string&)>>>(std::move(p.callbacks));
    deliver_imms(p.dst, key.second, p.count, [cbs](bool ok, const std::string& error) {
      for (auto& cb : *cbs) cb(ok, error);
    });
  }
  return true;
}

bool EngineCore::handle_internal_messages() {
  if (internal_msgs_.empty()) return false;
  std::deque<Frame> msgs;
  msgs.swap(internal_msgs_);
  for (auto& f : msgs) {
    try {
      handle_internal(f);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "jax_garden.fabric: dropped an internal message (kind %d) from %s: %s\n", int(f.kind),
                   f.sender.to_string().c_str(), e.what());
    }
  }
  return true;
}

void EngineCore::handle_internal(Frame& f) {
  switch (f.kind) {
    case MsgKind::kImmBatch: {
      auto m = decode_imm_batch(f.payload);
      on_imm(m.imm, static_cast<int64_t>(m.count));
      return;
    }
    case MsgKind::kStageGrant:
    case MsgKind::kStageDone:
    case MsgKind::kStageError: {
      uint64_t xfer = f.kind == MsgKind::kStageGrant   ? decode_stage_grant(f.payload).xfer
                      : f.kind == MsgKind::kStageDone ? decode_stage_xfer(f.payload).xfer
                                                      : decode_stage_error(f.payload).xfer;
      if (!staging_) return;
      auto it = staging_->outbound.find(xfer);
      if (it == staging_->outbound.end()) return;  // the transfer is gone (failed); the receiver frees on abort
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
      ensure_recv_pool();
      auto key = std::make_pair(f.sender.to_bytes(), m.xfer);
      if (staging_->inbound.count(key)) return;  // duplicate
      Bytes reply_to = f.sender.domains[0];
      std::shared_ptr<MemoryRegion> region;
      for (auto& [id, weak] : region_index_) {
        auto r = weak.lock();
        if (r && r->base_ == m.dst_base && r->length_ == m.dst_length) {
          region = std::move(r);
          break;
        }
      }
      std::string refuse;
      if (!region)
        refuse = str_cat("no live region [0x", std::hex, m.dst_base, ", +0x", m.dst_length, ") in this engine");
      else if (m.total_bytes > m.dst_length)
        refuse = str_cat(m.total_bytes, " bytes do not fit the region of ", m.dst_length, " bytes");
      if (!refuse.empty()) {
        send_internal(reply_to, MsgKind::kStageError, encode(StageErrorMsg{m.xfer, refuse}),
                      [](bool, const std::string&) {});
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
      staging_->inbound.emplace(std::move(key), std::move(in));
      return;
    }
    case MsgKind::kStageChunk: {
      auto m = decode_stage_chunk(f.payload);
      if (!staging_) return;
      auto it = staging_->inbound.find({f.sender.to_bytes(), m.xfer});
      if (it == staging_->inbound.end()) return;
      Inbound& in = *it->second;
      if (in.dead) return;
      auto g = std::find(in.granted.begin(), in.granted.end(), m.slot);
      JG_CHECK_ARG(g != in.granted.end(), "stage chunk for slot ", m.slot, " which was not granted to it");
      in.granted.erase(g);
      in.last_activity = Clock::now();
      BouncePool& pool = staging_->recv;
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
        send_internal(in.sender_endpoint, MsgKind::kStageError, encode(StageErrorMsg{in.xfer, bad}),
                      [](bool, const std::string&) {});
        return;
      }
      std::unique_ptr<CopyJob> job = in.region->cuda() ? gpu_runtime().copy(in.region->device(), 1, segs) : host_copy(segs);
      in.copies.push_back({m.slot, bytes, std::move(job)});
      return;
    }
    case MsgKind::kStageAbort: {
      auto m = decode_stage_xfer(f.payload);
      if (!staging_) return;
      auto it = staging_->inbound.find({f.sender.to_bytes(), m.xfer});
      if (it != staging_->inbound.end()) it->second->dead = true;
      return;
    }
    case MsgKind::kUser:
      return;
  }
}

// ---------------------------------------------------------------------------------------------
// Bounce pools

MemoryRegistration EngineCore::register_system(uint32_t domain, void* addr, size_t length) {
  return domains_[domain]->register_host(addr, length, provider_->provider_keys ? 0 : next_key_.fetch_add(1));
}

namespace {

void make_pool(BouncePool& p, uint64_t slot_bytes, uint32_t slots) {
  p.slot_bytes = slot_bytes;
  p.slots = slots;
  size_t bytes = slot_bytes * slots;
  void* mem = gpu_runtime().available() ? gpu_runtime().host_alloc(bytes) : nullptr;  // pinned: async copies
  p.pinned = mem != nullptr;
  if (!mem) mem = std::aligned_alloc(4096, bytes);
  if (!mem) throw std::bad_alloc();
  p.base = static_cast<uint8_t*>(mem);
  for (uint32_t i = slots; i-- > 0;) p.free.push_back(i);
}

}  // namespace

void EngineCore::ensure_send_pool() {
  if (!staging_) staging_ = std::make_unique<StagingState>();
  auto& p = staging_->send;
  if (p.base) return;
  make_pool(p, options_.stage_chunk_bytes, options_.stage_slots);
  for (uint32_t d = 0; d < num_domains(); ++d) p.regs.push_back(register_system(d, p.base, p.slot_bytes * p.slots));
}

void EngineCore::ensure_recv_pool() {
  if (!staging_) staging_ = std::make_unique<StagingState>();
  auto& p = staging_->recv;
  if (p.base) return;
  make_pool(p, options_.stage_chunk_bytes, options_.stage_slots);
  for (uint32_t d = 0; d < num_domains(); ++d) p.regs.push_back(register_system(d, p.base, p.slot_bytes * p.slots));
}

void EngineCore::shutdown_transports() {
  {
    std::lock_guard lk(gpu_wait_mu_);
    for (auto& w : gpu_waits_) {
      if (auto c = w.counter.lock()) {
        c->release(w.target);  // never leave a stream waiting on a closed engine
        c->record_error("fabric.wait on GPU: the engine was closed before the imms arrived");
      }
    }
    gpu_waits_.clear();
    gpu_wait_count_ = 0;
  }
  if (!staging_) return;
  for (auto* pool : {&staging_->send, &staging_->recv}) {
    for (size_t d = 0; d < pool->regs.size(); ++d) domains_[d]->unregister(pool->regs[d]);
    pool->regs.clear();
  }
}

StagingStats EngineCore::staging_stats() {
  StagingStats s;
  s.chunk_bytes = options_.stage_chunk_bytes;
  run_on_worker([&]() {
    if (staging_) {
      s.send_buffers = staging_->send.slots;
      s.send_buffers_free = static_cast<uint32_t>(staging_->send.free.size());
      s.recv_slots = staging_->recv.slots;
      s.recv_slots_free = static_cast<uint32_t>(staging_->recv.free.size());
      s.inbound = static_cast<uint32_t>(staging_->inbound.size());
      s.outbound = static_cast<uint32_t>(staging_->outbound.size());
    }
  });
  std::lock_guard lk(g_ipc_mu);
  s.ipc_mappings = g_ipc_maps.size();
  return s;
}

// ---------------------------------------------------------------------------------------------
// Receiver side of staging

bool EngineCore::advance_inbound() {
  if (!staging_ || staging_->inbound.empty()) return false;
  bool progress = false;
  auto now = Clock::now();
  BouncePool& pool = staging_->recv;
  auto grace = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(2 * options_.timeout_s));
  std::vector<std::pair<Bytes, uint64_t>> erase;
  for (auto& [key, inp] : staging_->inbound) {
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
        send_internal(in.sender_endpoint, MsgKind::kStageError, encode(StageErrorMsg{in.xfer, err}),
                      [](bool, const std::string&) {});
      }
      in.copies.erase(in.copies.begin() + i);
    }
    if (!in.dead && in.chunks_landed == in.chunks) {
      if (in.landed != in.total_bytes) {
        in.dead = true;
        send_internal(in.sender_endpoint, MsgKind::kStageError,
                      encode(StageErrorMsg{in.xfer, str_cat("received ", in.landed, " of ", in.total_bytes, " bytes")}),
                      [](bool, const std::string&) {});
      } else {
        // Every byte is in the region (the copies completed): only now do the imms count.
        if (in.has_imm && in.imm_count) on_imm(in.imm, static_cast<int64_t>(in.imm_count));
        send_internal(in.sender_endpoint, MsgKind::kStageDone, encode(StageXferMsg{in.xfer}),
                      [](bool, const std::string&) {});
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
  for (auto& k : erase) staging_->inbound.erase(k);

  // Grants: one slot at a time, round robin over the transfers that still need slots.
  std::vector<Inbound*> wanting;
  for (auto& [key, inp] : staging_->inbound)
    if (!inp->dead && inp->chunks_granted < inp->chunks) wanting.push_back(inp.get());
  if (wanting.empty() || pool.free.empty()) return progress;
  size_t cap = std::max<size_t>(1, pool.slots / wanting.size());
  size_t start = staging_->grant_cursor++ % wanting.size();
  bool any = true;
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
      g.remote_address = provider_->virtual_addressing ? addr : addr - reinterpret_cast<uint64_t>(pool.base);
      g.slot_bytes = pool.slot_bytes;
      for (auto& r : pool.regs) g.keys.push_back(r.key);
      auto key = std::make_pair(in.sender.to_bytes(), in.xfer);
      send_internal(in.sender_endpoint, MsgKind::kStageGrant, encode(g), [this, key](bool ok, const std::string&) {
        if (ok || !staging_) return;
        auto it = staging_->inbound.find(key);  // the sender is unreachable: give up on it
        if (it != staging_->inbound.end()) it->second->dead = true;
      });
      any = progress = true;
    }
  }
  return progress;
}

// ---------------------------------------------------------------------------------------------
// Sender side of staging

StagedPart::StagedPart(EngineCore* core, Job* job, Spec spec) : Part(core, job), spec_(std::move(spec)) {
  uint64_t chunk = core_->options_.stage_chunk_bytes;
  if (spec_.stage_dst) chunk = std::min<uint64_t>(chunk, spec_.dst.stage_chunk_bytes);
  size_t header = frame_header_bytes(core_->address_bytes_) + 64;
  size_t max_segs = core_->options_.max_message_bytes > header ? (core_->options_.max_message_bytes - header) / 16 : 1;
  max_segs = std::clamp<size_t>(max_segs, 1, 1024);
  chunks_ = plan_stage_chunks(spec_.segments, chunk, max_segs);
}

StagedPart::~StagedPart() {
  if (registered_ && core_->staging_) core_->staging_->outbound.erase(xfer_);
}

uint32_t StagedPart::buffer_cap() const {
  uint32_t slots = core_->staging_->send.slots;
  return std::max<uint32_t>(1, (slots + 1) / 2);
}

bool StagedPart::idle() const { return staging_.empty() && ops_in_flight_ == 0; }

void StagedPart::cancel() {
  Part::cancel();
  // Buffers whose data was staged but not yet written go back to the pool now.
  if (core_->staging_) {
    for (auto& [chunk, b] : ready_)
      if (b >= 0) {
        core_->staging_->send.free.push_back(static_cast<uint32_t>(b));
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

void StagedPart::on_done_msg() { done_received_ = true; }

void StagedPart::on_error_msg(const std::string& error) {
  done_received_ = true;  // the receiver dropped the transfer: no abort needed
  fail(str_cat("the receiver failed the staged transfer: ", error));
}

bool StagedPart::advance() {
  if (finished_) return false;
  bool progress = false;
  auto& rt = gpu_runtime();
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
      core_->staging_->send.free.push_back(staging_[i].buffer);
      buffers_held_--;
      if (r < 0) fail(str_cat("staging copy failed: ", err));
    }
    staging_.erase(staging_.begin() + i);
  }

  if (cancelled_) {
    if (!idle()) return progress;
    if (spec_.stage_dst && open_sent_ && !done_received_) {
      // Every write toward the receiver's slots has completed: it may free them.
      core_->send_internal(spec_.dst.domains[0].endpoint, MsgKind::kStageAbort, encode(StageXferMsg{xfer_}),
                           [](bool, const std::string&) {});
    }
    if (registered_) core_->staging_->outbound.erase(xfer_);
    registered_ = false;
    finish(false, "cancelled");
    return true;
  }

  if (!core_->staging_) core_->staging_ = std::make_unique<StagingState>();
  if (spec_.stage_dst && !open_sent_) {
    xfer_ = core_->staging_->next_xfer++;
    core_->staging_->outbound[xfer_] = this;
    registered_ = true;
    StageOpenMsg m;
    m.xfer = xfer_;
    m.dst_base = spec_.dst.base;
    m.dst_length = spec_.dst.length;
    for (auto& c : chunks_) m.total_bytes += c.bytes;
    m.chunks = chunks_.size();
    m.has_imm = spec_.has_imm;
    m.imm = spec_.imm;
    m.imm_count = spec_.has_imm ? spec_.imm_count : 0;
    open_sent_ = true;
    ops_in_flight_++;
    core_->send_internal(spec_.dst.domains[0].endpoint, MsgKind::kStageOpen, encode(m),
                         [this](bool ok, const std::string& error) {
                           ops_in_flight_--;
                           if (!ok) {
                             done_received_ = true;  // it never arrived: nothing to abort
                             fail(str_cat("staged transfer: the receiver is unreachable: ", error));
                           }
                         });
    progress = true;
  }

  // Stage chunks ahead of the network into local bounce buffers (bounded per transfer).
  if (spec_.stage_src) {
    core_->ensure_send_pool();
    BouncePool& pool = core_->staging_->send;
    while (next_stage_ < chunks_.size() && buffers_held_ < buffer_cap() && !pool.free.empty()) {
      uint32_t b = pool.free.back();
      pool.free.pop_back();
      buffers_held_++;
      std::vector<CopySegment> segs;
      uint64_t off = 0;
      for (auto& sg : chunks_[next_stage_].segments) {
        segs.push_back({reinterpret_cast<uint64_t>(pool.slot(b)) + off, src.base() + sg.src_offset, sg.length});
        off += sg.length;
      }
      std::unique_ptr<CopyJob> job = src.cuda() ? rt.copy(src.device(), 0, segs) : host_copy(segs);
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
      if (registered_) core_->staging_->outbound.erase(xfer_);
      registered_ = false;
      finish(true, {});
      return true;
    }
  } else if (chunks_written_ == chunks_.size() && !imms_started_) {
    // Every data write completed with delivery semantics: the imms may go now.
    imms_started_ = true;
    ops_in_flight_++;
    core_->queue_imms(spec_.dst, spec_.imm, spec_.has_imm ? spec_.imm_count : 0,
                      [this](bool ok, const std::string& error) {
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
  const MemoryDescriptor& dst = spec_.dst;
  auto op = std::make_unique<Op>();
  op->deadline = after(core_->deadline_for(ch.bytes));
  op->keep_region = job_->src;
  uint32_t d = core_->round_robin_.fetch_add(1) % core_->num_domains();
  const auto& rk = dst.domains[d % dst.domains.size()];
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
  BouncePool& pool = core_->staging_->send;
  if (buffer >= 0 && grant) {
    add(pool.slot(buffer), pool.regs[d].desc, ch.bytes, grant->remote_address, grant->keys[d % grant->keys.size()]);
  } else {
    uint64_t off = 0;
    for (const auto& sg : ch.segments) {
      void* local = buffer >= 0 ? static_cast<void*>(pool.slot(buffer) + off)
                                : reinterpret_cast<void*>(src.base() + sg.src_offset);
      void* desc = buffer >= 0 ? pool.regs[d].desc : src.desc(d);
      uint64_t remote = grant ? grant->remote_address + off : dst.remote_address(sg.dst_offset);
      uint64_t key = grant ? grant->keys[d % grant->keys.size()] : rk.key;
      add(local, desc, sg.length, remote, key);
      off += sg.length;
    }
  }
  bool has_grant = grant != nullptr;
  uint32_t slot = grant ? grant->slot : 0;
  ops_in_flight_++;
  op->on_done = [this, chunk, buffer, has_grant, slot](bool ok, const std::string& error) {
    ops_in_flight_--;
    if (buffer >= 0) {
      core_->staging_->send.free.push_back(static_cast<uint32_t>(buffer));
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
    core_->send_internal(spec_.dst.domains[0].endpoint, MsgKind::kStageChunk, encode(m),
                         [this](bool ok2, const std::string& error2) {
                           ops_in_flight_--;
                           if (!ok2) fail(str_cat("staged transfer: announcing a chunk failed: ", error2));
                         });
  };
  core_->submit_internal(std::move(op));
}

// ---------------------------------------------------------------------------------------------
// CUDA IPC

uint64_t EngineCore::ipc_map(const MemoryDescriptor& dst, int device) {
  if (dst.host_id == host_id() && dst.process_nonce == process_nonce()) return dst.base;  // same process
  JG_CHECK_ARG(dst.has_ipc, "ipc: the destination descriptor carries no CUDA IPC handle");
  auto key = std::make_pair(dst.process_nonce, dst.ipc_handle);
  std::lock_guard lk(g_ipc_mu);
  auto it = g_ipc_maps.find(key);
  if (it == g_ipc_maps.end()) {
    uint64_t mapped = gpu_runtime().ipc_open(dst.ipc_handle, device);
    it = g_ipc_maps.emplace(key, mapped).first;
  }
  return it->second + dst.ipc_offset;
}

bool IpcPart::advance() {
  if (finished_) return false;
  if (copy_) {
    int dev = job_->src->cuda() ? job_->src->device() : -1;
    auto& blocked = core_->copy_blocked_;
    if (dev >= 0 && size_t(dev) < blocked.size() && blocked[dev]) return false;
    std::string err;
    int r = copy_->poll(&err);
    if (r == 0) {
      if (dev >= 0) {
        if (size_t(dev) >= blocked.size()) blocked.resize(dev + 1, 0);
        blocked[dev] = 1;
      }
      return false;
    }
    copy_.reset();
    if (r < 0) {
      job_->fail(TransferState::Status::kFailed, err);
    } else if (!cancelled_) {
      if (!spec_.has_imm || spec_.imm_count == 0) {
        finish(true, {});
      } else {
        // The copy completed (its event fired): only now may the receiver count the imms.
        imm_in_flight_ = true;
        core_->queue_imms(spec_.dst, spec_.imm, spec_.imm_count, [this](bool ok, const std::string& error) {
          imm_in_flight_ = false;
          if (ok)
            finish(true, {});
          else
            job_->fail(TransferState::Status::kFailed, str_cat("delivering the imms after the IPC copy failed: ", error));
        });
      }
    }
    return true;
  }
  if (cancelled_) {
    if (!idle()) return false;
    finish(false, "cancelled");
    return true;
  }
  if (started_) return false;
  started_ = true;
  const MemoryRegion& src = *job_->src;
  try {
    uint64_t dst_base = core_->ipc_map(spec_.dst, src.device());
    if (spec_.paged) {
      PagedCopy pc = spec_.pages;
      pc.src += src.base();
      pc.dst += dst_base;
      copy_ = src.cuda() ? gpu_runtime().paged_copy(src.device(), pc) : host_paged_copy(pc);
    } else {
      std::vector<CopySegment> segs = spec_.segments;
      for (auto& s : segs) {
        s.src += src.base();
        s.dst += dst_base;
      }
      if (src.cuda()) {
        batched_ = true;  // started at the end of this pass with the others
        core_->ipc_batch_.push_back({this, src.device(), std::move(segs)});
      } else {
        copy_ = host_copy(segs);
      }
    }
  } catch (const std::exception& e) {
    job_->fail(TransferState::Status::kFailed, str_cat("ipc: ", e.what()));
  }
  return true;
}

void EngineCore::start_ipc_batch() {
  if (ipc_batch_.empty()) return;
  std::vector<IpcBatchEntry> batch;
  batch.swap(ipc_batch_);
  std::map<int, std::vector<IpcBatchEntry*>> by_device;
  for (auto& e : batch) by_device[e.device].push_back(&e);
  for (auto& [device, entries] : by_device) {
    std::vector<CopySegment> all;
    for (auto* e : entries) all.insert(all.end(), e->segments.begin(), e->segments.end());
    std::shared_ptr<CopyJob> job = gpu_runtime().copy(device, 0, all);
    for (auto* e : entries) e->part->set_copy(job);
  }
}

bool EngineCore::gpu_can_map(const MemoryRegion& src, const MemoryDescriptor& dst) const {
  if (!src.cuda() || dst.kind != MemoryKind::kCuda) return false;
  GpuRuntime& rt = gpu_runtime();
  if (!rt.available()) return false;
  bool same_process = dst.host_id == host_id() && dst.process_nonce == process_nonce();
  int owner = same_process ? dst.device : rt.device_of_pci_bus_id(dst.pci_bus_id);
  return owner >= 0 && rt.can_access(src.device(), owner);
}

PathChoice EngineCore::path_for(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) const {
  PathQuery q;
  q.requested = path == TransferPath::kAuto ? options_.default_path : path;
  q.src_cuda = src.cuda();
  q.src_staged = src.staged();
  q.dst_cuda = dst.kind == MemoryKind::kCuda;
  q.dst_staged = dst.staged;
  q.dst_has_ipc = dst.has_ipc;
  q.same_host = dst.host_id == host_id();
  q.same_process = q.same_host && dst.process_nonce == process_nonce();
  q.gpu_can_map = (q.requested == TransferPath::kAuto || q.requested == TransferPath::kIpc) && gpu_can_map(src, dst);
  return choose_path(q);
}

// ---------------------------------------------------------------------------------------------
// GPU waits and asynchronous errors

void EngineCore::watch_gpu_wait(const std::shared_ptr<ImmCounter>& counter, uint64_t target,
                                Clock::time_point deadline) {
  {
    std::lock_guard lk(gpu_wait_mu_);
    gpu_waits_.push_back({counter, target, deadline});
    gpu_wait_count_ = static_cast<int>(gpu_waits_.size());
  }
  wake();
}

void EngineCore::check_gpu_waits(Clock::time_point now) {
  if (gpu_wait_count_.load(std::memory_order_relaxed) == 0) return;
  std::lock_guard lk(gpu_wait_mu_);
  for (size_t i = 0; i < gpu_waits_.size();) {
    auto& w = gpu_waits_[i];
    auto c = w.counter.lock();
    bool drop = !c || c->total() >= w.target;
    if (!drop && now >= w.deadline) {
      std::string msg = str_cat("fabric.wait on GPU: imm counter ", c->imm(), " had ", c->total(),
                                " arrivals, short of the ", w.target, " the stream waited for, after the engine "
                                "timeout of ", options_.timeout_s,
                                " s; the stream was released and the data it consumed may be incomplete");
      c->release(w.target);
      c->record_error(msg);
      record_error(msg);
      drop = true;
    }
    if (drop) {
      gpu_waits_.erase(gpu_waits_.begin() + i);
    } else {
      ++i;
    }
  }
  gpu_wait_count_ = static_cast<int>(gpu_waits_.size());
}

void EngineCore::record_error(const std::string& error) {
  std::lock_guard lk(errors_mu_);
  errors_.push_back(error);
}

void EngineCore::check() {
  std::string e;
  {
    std::lock_guard lk(errors_mu_);
    if (errors_.empty()) return;
    e = std::move(errors_.front());
    errors_.pop_front();
  }
  throw TransferFailed(e);
}

}  // namespace jax_garden::fabric
