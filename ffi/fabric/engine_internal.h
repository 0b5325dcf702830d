// Worker-side types of the engine, shared by engine.cc (RMA ops, worker loop) and transports.cc
// (CUDA IPC, staging, internal control messages). Only the worker thread touches these after
// submission.
#pragma once

#include <rdma/fabric.h>

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "fabric/engine.h"
#include "fabric/gpu_runtime.h"

namespace jax_garden::fabric {

// Every context handed to libfabric starts with a fi_context2 (some providers require
// FI_CONTEXT/FI_CONTEXT2 space) followed by a tag saying what it is.
enum class ContextKind : uint8_t { kWrite, kSend, kRecv };

struct ContextHeader {
  fi_context2 ctx;  // must stay first: libfabric hands back &ctx
  ContextKind kind;
};

struct WorkRequest {
  ContextHeader hdr;
  Op* op = nullptr;
  uint32_t domain = 0;
  void* local = nullptr;
  uint64_t length = 0;
  void* desc = nullptr;
  Bytes peer_endpoint;  // resolved on the worker
  uint64_t remote_addr = 0;
  uint64_t remote_key = 0;
  bool has_imm = false;
  uint32_t imm = 0;
  uint64_t flags = 0;  // extra fi_writemsg flags (FI_DELIVERY_COMPLETE for staged data)
  bool posted = false;
};

struct Op {
  std::shared_ptr<TransferState> state;
  std::vector<WorkRequest> wrs;  // never resized once submitted (contexts point into it)
  size_t done = 0;               // completed or skipped
  size_t in_flight = 0;          // posted, not yet completed
  bool failed = false;
  std::string error;
  Clock::time_point deadline;
  std::shared_ptr<MemoryRegion> keep_region;  // the source stays registered while posted
  Bytes owned;                                 // send payload
  std::vector<MemoryRegistration> owned_regs;  // per-domain registration of `owned` (FI_MR_LOCAL)
  // Internal ops (parts of IPC / staged transfers, control messages): runs on the worker, from the
  // deferred queue, once the op finished (ok = every work request completed).
  std::function<void(bool ok, const std::string& error)> on_done;
};

struct RecvSlot {
  ContextHeader hdr;
  uint8_t* buffer = nullptr;
  size_t size = 0;
  bool posted = false;
};

// ---------------------------------------------------------------------------------------------
// Jobs: user ops with at least one destination outside plain RMA. A job has parts (one per
// destination path: an RMA group, an IPC copy, a staged stream); it finishes when every part did,
// and fails at the first failed part or at its deadline. It is destroyed only once every part is
// idle (nothing of it in flight), so buffers and contexts never dangle.

class Part {
 public:
  Part(EngineCore* core, Job* job) : core_(core), job_(job) {}
  virtual ~Part() = default;
  virtual bool advance() = 0;      // progress; true if something happened
  virtual bool idle() const = 0;   // nothing of this part is in flight
  virtual void cancel() { cancelled_ = true; }
  bool finished() const { return finished_; }

 protected:
  void finish(bool ok, const std::string& error);
  EngineCore* core_;
  Job* job_;
  bool cancelled_ = false;
  bool finished_ = false;
};

struct Job {
  std::shared_ptr<TransferState> state;
  Clock::time_point deadline;
  std::shared_ptr<MemoryRegion> src;
  std::vector<std::unique_ptr<Part>> parts;
  size_t parts_finished = 0;
  bool failed = false;

  void part_finished(bool ok, const std::string& error);
  void fail(TransferState::Status status, const std::string& error);
  bool removable() const;
};

// Plain RMA targets of a job (scatter with mixed paths): one internal op.
class FabricPart final : public Part {
 public:
  FabricPart(EngineCore* core, Job* job, std::unique_ptr<Op> op) : Part(core, job), op_(std::move(op)) {}
  bool advance() override;
  bool idle() const override { return !in_flight_; }

 private:
  std::unique_ptr<Op> op_;
  bool in_flight_ = false;
};

// CUDA IPC (or same-process host memory): copy with the copy engines / the paged copy kernel, then,
// only once the copy's event completed, deliver the imms through libfabric.
class IpcPart final : public Part {
 public:
  struct Spec {
    MemoryDescriptor dst;
    std::vector<CopySegment> segments;  // single writes / scatter targets: offsets into the regions
    bool paged = false;
    PagedCopy pages;  // offsets into the regions (src/dst hold the offsets until mapped)
    bool has_imm = false;
    uint32_t imm = 0;
    uint64_t imm_count = 0;
  };
  IpcPart(EngineCore* core, Job* job, Spec spec) : Part(core, job), spec_(std::move(spec)) {}
  bool advance() override;
  bool idle() const override { return !copy_ && !imm_in_flight_ && !batched_; }
  // The worker started this part's copy together with the others of its pass (one event for all).
  void set_copy(std::shared_ptr<CopyJob> copy) {
    copy_ = std::move(copy);
    batched_ = false;
  }

 private:
  Spec spec_;
  bool started_ = false;
  bool batched_ = false;  // waiting for the end of the pass to be started in a batch
  std::shared_ptr<CopyJob> copy_;
  bool imm_in_flight_ = false;
};

// Single-write IPC copies started in one worker pass on one device: one cudaMemcpyAsync each, one
// event for all of them (copies on a stream complete in order).
struct IpcBatchEntry {
  IpcPart* part;
  int device;
  std::vector<CopySegment> segments;
};

// Staging (see StagingState): chunks of the op go through local pinned bounce buffers (stage_src)
// and/or the receiver's bounce slots by rendezvous (stage_dst).
class StagedPart final : public Part {
 public:
  struct Spec {
    MemoryDescriptor dst;
    std::vector<StageSegment> segments;
    bool stage_src = false, stage_dst = false;
    bool has_imm = false;
    uint32_t imm = 0;
    uint64_t imm_count = 0;
  };
  StagedPart(EngineCore* core, Job* job, Spec spec);
  ~StagedPart() override;
  bool advance() override;
  bool idle() const override;
  void cancel() override;

  // from control messages
  void on_grant(const StageGrantMsg& g);
  void on_done_msg();
  void on_error_msg(const std::string& error);

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
  void write_chunk(size_t chunk, int buffer, const Grant* grant);
  void fail(const std::string& error);
  uint32_t buffer_cap() const;

  Spec spec_;
  std::vector<StageChunk> chunks_;
  uint64_t xfer_ = 0;
  bool registered_ = false;  // in StagingState::outbound
  bool open_sent_ = false;
  bool done_received_ = false;
  bool imms_started_ = false;
  size_t next_stage_ = 0;                  // next chunk to stage / make ready
  std::deque<std::pair<size_t, int>> ready_;  // (chunk, local buffer or -1)
  std::vector<Staging> staging_;           // local copies in flight
  std::deque<Grant> grants_;
  uint32_t buffers_held_ = 0;
  size_t chunks_written_ = 0;
  int ops_in_flight_ = 0;  // data writes and control messages
  bool failed_ = false;
};

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

struct BouncePool {
  uint8_t* base = nullptr;
  uint64_t slot_bytes = 0;
  uint32_t slots = 0;
  bool pinned = false;  // cudaHostAlloc'd (else aligned_alloc)
  std::vector<MemoryRegistration> regs;  // per local domain
  std::vector<uint32_t> free;
  uint8_t* slot(uint32_t i) const { return base + uint64_t(i) * slot_bytes; }
};

struct StagingState {
  ~StagingState();  // frees the pools' memory (after the engine unregistered them and closed the domains)
  BouncePool send;  // source staging
  BouncePool recv;  // slots peers write into
  uint64_t next_xfer = 1;
  std::unordered_map<uint64_t, StagedPart*> outbound;  // xfer -> part
  std::map<std::pair<Bytes, uint64_t>, std::unique_ptr<Inbound>> inbound;  // (sender address, xfer)
  size_t grant_cursor = 0;
};

}  // namespace jax_garden::fabric
