// Staging, for regions the provider cannot reach (GPU memory on tcp, or regions registered with
// staged=True). Sender: chunks are copied (D2H / memcpy) into a bounded pool of local pinned bounce
// buffers ahead of the network, so the copy of chunk i+1 overlaps the RMA of chunk i. Receiver
// (destination staged): the sender opens a transfer naming the destination's region key (the owner
// refuses a key it does not have), the receiver grants bounce slots as they free up (round robin
// over concurrent senders), the sender writes a chunk into its slot with delivery completion and
// then announces it, the receiver copies the slot into the region (H2D / memcpy) and frees the
// slot; once every chunk is in, it counts the imms and tells the sender. Unordered delivery is never
// assumed: an announcement is sent only after its data write completed with delivery semantics,
// and imms are counted only after the copies. A silent sender's slots are reclaimed after
// 2 x timeout; a sender whose op failed sends an abort once its writes drained.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "fabric/transport/control_plane.h"
#include "fabric/core/gpu_runtime.h"
#include "fabric/transport/jobs.h"
#include "fabric/core/options.h"
#include "fabric/core/region.h"

namespace jax_garden::fabric {

class StagingTransport;

struct BouncePool {
  uint8_t* base = nullptr;
  uint64_t slot_bytes = 0;
  uint32_t slots = 0;
  bool pinned = false;                   // cudaHostAlloc'd (else aligned_alloc)
  std::vector<MemoryRegistration> regs;  // per local domain
  std::vector<uint32_t> free;
  uint8_t* slot(uint32_t i) const { return base + uint64_t(i) * slot_bytes; }
};

class StagedPart final : public Part {
 public:
  struct Spec {
    std::shared_ptr<const MemoryDescriptor> dst;
    std::vector<StageSegment> segments;
    bool stage_src = false, stage_dst = false;
    bool has_imm = false;
    uint32_t imm = 0;
    uint64_t imm_count = 0;
  };
  // Made by StagingTransport::make_part, which passes its own dependencies.
  StagedPart(Job* job, Spec spec, StagingTransport& staging, ControlPlane& control, Worker& worker,
             const EngineOptions& options, const Bytes& address_bytes);
  ~StagedPart() override;
  bool advance() override JG_REQUIRES_PROGRESS;
  bool idle() const override JG_REQUIRES_PROGRESS;
  void cancel() override JG_REQUIRES_PROGRESS;

  // From control messages.
  void on_grant(const StageGrantMsg& g) JG_REQUIRES_PROGRESS;
  void on_done_msg() { done_received_ = true; }
  void on_error_msg(const std::string& error) JG_REQUIRES_PROGRESS;

 private:
  struct Grant {
    uint32_t slot;
    uint64_t remote_address;
    uint64_t slot_bytes;
    std::vector<uint64_t> keys;
  };
  struct Staging {
    size_t chunk;
    uint32_t buffer;
    std::unique_ptr<CopyJob> copy;
  };
  void write_chunk(size_t chunk, int buffer, const Grant* grant) JG_REQUIRES_PROGRESS;
  void fail(const std::string& error) JG_REQUIRES_PROGRESS;
  uint32_t buffer_cap() const;
  const MemoryDescriptor& dst() const { return *spec_.dst; }

  StagingTransport& transport_;  // bounce buffers, transfer ids
  ControlPlane& control_;      // the rendezvous messages, the imms
  Worker& worker_;             // posts the chunk writes
  const EngineOptions& options_;
  const Bytes& address_bytes_;
  Spec spec_;
  std::vector<StageChunk> chunks_;
  uint64_t xfer_ = 0;
  bool registered_ = false;  // in the transport's outbound map
  bool open_sent_ = false;
  bool done_received_ = false;
  bool imms_started_ = false;
  size_t next_stage_ = 0;                     // next chunk to stage / make ready
  std::deque<std::pair<size_t, int>> ready_;  // (chunk, local buffer or -1)
  std::vector<Staging> staging_;              // local copies in flight
  std::deque<Grant> grants_;
  uint32_t buffers_held_ = 0;
  size_t chunks_written_ = 0;
  int ops_in_flight_ = 0;  // data writes and control messages
  bool failed_ = false;
};

struct StagingStats {
  uint32_t send_buffers = 0, send_buffers_free = 0;  // local bounce buffers (source staging)
  uint32_t recv_slots = 0, recv_slots_free = 0;      // bounce slots peers write into
  uint32_t inbound = 0, outbound = 0;                // staged transfers in progress
  uint64_t chunk_bytes = 0;
  uint64_t ipc_mappings = 0;
  // ipc destinations started by this engine, by how their imm records are stored: by the copy's GPU
  // stream (the fast path), by the worker after the copy's event, or by the host (host memory).
  uint64_t ipc_stream_records = 0, ipc_event_records = 0, ipc_host_records = 0;
  uint64_t ipc_kernel_records = 0;  // of ipc_stream_records: stored by the copy kernel itself
};

class StagingTransport final : public WorkerTask {
 public:
  // Subscribes to the staging kinds of `control` (before the worker starts). options: slot sizes
  // and counts, timeouts; provider: its addressing; worker: registers the pools, posts, counts imms;
  // regions: the local regions inbound transfers name; address_bytes: this engine's address.
  StagingTransport(const EngineOptions& options, const ProviderInfo& provider, Worker& worker, ControlPlane& control,
                   RegionTable& regions, const Bytes& address_bytes);
  ~StagingTransport() override;

  bool advance(Clock::time_point now) override JG_REQUIRES_PROGRESS;
  bool busy() const override JG_REQUIRES_PROGRESS { return !inbound_.empty(); }
  StagingStats stats() const JG_REQUIRES_PROGRESS;
  void close() JG_REQUIRES_PROGRESS;  // unregisters the pools (their memory is freed later)

  // A staged part of `job` (sender side) toward spec.dst.
  std::unique_ptr<StagedPart> make_part(Job* job, StagedPart::Spec spec);

  // Sender side, for StagedPart.
  BouncePool& send_pool() JG_REQUIRES_PROGRESS;
  uint64_t open(StagedPart* part) JG_REQUIRES_PROGRESS;  // a new transfer id, routed to `part`
  void forget(uint64_t xfer) JG_REQUIRES_PROGRESS;

 private:
  void on_frame(Frame& f) JG_REQUIRES_PROGRESS;  // the staging kinds, from the control plane
  // Receiver side of one staged transfer into a local region.
  struct Inbound {
    NetAddress sender;
    Bytes sender_endpoint;  // domain 0 of the sender: where grants and replies go
    uint64_t xfer = 0;
    std::shared_ptr<MemoryRegion> region;
    uint64_t total_bytes = 0, landed = 0;
    uint64_t chunks = 0, chunks_granted = 0, chunks_landed = 0;
    bool has_imm = false;
    uint32_t imm = 0;
    uint64_t imm_count = 0;
    std::vector<uint32_t> granted;  // slots granted, chunk not yet announced
    struct Copy {
      uint32_t slot;
      uint64_t bytes;
      std::unique_ptr<CopyJob> job;
    };
    std::vector<Copy> copies;
    Clock::time_point last_activity;
    bool dead = false;  // aborted, failed or timed out: drain copies, then drop
  };
  void make_pool(BouncePool& p) JG_REQUIRES_PROGRESS;
  BouncePool& recv_pool() JG_REQUIRES_PROGRESS;
  void reply_error(const Bytes& endpoint, uint64_t xfer, const std::string& error) JG_REQUIRES_PROGRESS;
  bool grant_slots(Clock::time_point now) JG_REQUIRES_PROGRESS;

  const EngineOptions& options_;
  const ProviderInfo& provider_;
  Worker& worker_;
  ControlPlane& control_;
  RegionTable& regions_;
  const Bytes& address_bytes_;
  BouncePool send_ JG_GUARDED_BY_PROGRESS;
  BouncePool recv_ JG_GUARDED_BY_PROGRESS;
  uint64_t next_xfer_ JG_GUARDED_BY_PROGRESS = 1;
  std::unordered_map<uint64_t, StagedPart*> outbound_ JG_GUARDED_BY_PROGRESS;
  std::map<std::pair<Bytes, uint64_t>, std::unique_ptr<Inbound>> inbound_ JG_GUARDED_BY_PROGRESS;  // (sender, xfer)
  size_t grant_cursor_ JG_GUARDED_BY_PROGRESS = 0;
};

}  // namespace jax_garden::fabric
