// TransferEngine: one device group (1..8 domains) of one-sided RDMA writes with immediate data.
// Delivery is reliable but unordered: nothing here relies on the order in which writes land, and a
// receiver learns completion only by counting imms (imm_counter.h).
//
// This class is the facade: it validates requests, plans them (imm_accounting.h), picks a path per
// destination (policy.h) and routes them: plain RMA ops go to the Worker (worker.h, which owns the
// domains, the per-peer queues and the completion loop; its header states the threading rules),
// CUDA IPC and staged ops become Jobs (jobs.h, transport_ipc.h, transport_staged.h), internal
// messages and failure triage live in the ControlPlane (control_plane.h). Registration is
// region.h; counters imm_counter.h; watchers watcher.h.
//
// Completion: by default a Transfer completes once the target placed the data (FI_DELIVERY_COMPLETE,
// CompletionMode::kDelivery), so no op is reported successful while its bytes did not land; with
// kTransmit it completes once the source may be reused. Either way only imm counting at the
// receiver proves placement to the receiver.
//
// Failures: every op completes, with success or an error, within its deadline (timeout + size
// allowance). A write the provider refused is triaged with the owner (does it still have the
// region?) so that its error says why; a region found gone, or a peer found unreachable, makes later
// ops toward it fail at once, before anything is posted.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "fabric/core/adversary.h"
#include "fabric/core/callbacks.h"
#include "fabric/core/domain.h"
#include "fabric/core/engine_parts.h"
#include "fabric/core/imm_counter.h"
#include "fabric/core/imm_mailbox.h"
#include "fabric/core/keys.h"
#include "fabric/core/options.h"
#include "fabric/core/region.h"
#include "fabric/core/requests.h"
#include "fabric/transport/transport_staged.h"
#include "fabric/core/watcher.h"
#include "fabric/core/worker.h"

namespace jax_garden::fabric {

class ControlPlane;
class IpcOp;
class IpcTransport;
class JobRunner;

class Engine : public std::enable_shared_from_this<Engine> {
 public:
  static std::shared_ptr<Engine> create(const EngineOptions& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const NetAddress& address() const { return own_.address; }
  const std::string& provider() const { return own_.provider->name; }
  bool provider_supports_hmem() const { return own_.provider->hmem; }
  uint32_t num_domains() const { return own_.num_domains(); }
  const EngineOptions& options() const { return own_.options; }
  bool closed() const { return closed_.load(std::memory_order_acquire); }

  // cuda: the pointer is CUDA device memory (its device is looked up); staged: do not register it
  // with the provider, move data through bounce buffers (GPU memory on providers without FI_HMEM
  // is staged automatically).
  std::shared_ptr<MemoryRegion> register_memory(uint64_t ptr, uint64_t length, bool cuda, bool staged = false);

  std::shared_ptr<TransferState> write(const WriteRequest& req);
  std::shared_ptr<TransferState> write_paged(const PagedWriteRequest& req);
  std::shared_ptr<TransferState> scatter(const ScatterRequest& req);
  std::shared_ptr<TransferState> write_imm(const ImmRequest& req);  // OpKind::kImm or kBarrier
  // A control message; `kind` other than kUser: an internal message (tests forge them).
  std::shared_ptr<TransferState> send(const NetAddress& to, const Bytes& payload, MsgKind kind = MsgKind::kUser);
  Message recv(double timeout_s);
  // The path an op from `src` to `dst` takes with this override (kAuto: the engine's default), and
  // in words why (not per op: for path_for(..., why=True) and errors).
  PathChoice path_for(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) const;
  std::string path_reason(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) const;
  // Sets up now what the first op from `src` to `dst` would (on the ipc path: maps dst's GPU memory,
  // claims a ring in its owner's mailbox), so that no driver mapping call runs later, on a thread
  // whose process may have kernels in flight, and the first op pays nothing extra. Returns the path.
  // Throws TransferFailed when dst cannot be mapped; a no-op beyond the path query on other paths.
  PathChoice prepare(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path = TransferPath::kAuto);

  std::shared_ptr<ImmCounter> imm_counter(uint32_t imm);
  std::shared_ptr<Watcher> watcher(Watcher::Callback cb);
  // Errors noticed asynchronously (a GPU wait that stalled past the timeout): raises the oldest as
  // TransferFailed and forgets it.
  void check();
  StagingStats staging_stats();
  // The adversarial delivery mode (adversary.h): its settings, or null when it is off; what it did;
  // and the targeted holds of tests (pieces whose imm matches under `mask`, after `skip` of them).
  const AdversaryOptions* adversary() const { return adversary_ ? &*adversary_ : nullptr; }
  AdversaryStats adversary_stats();
  void adversary_hold(uint32_t imm, uint32_t mask, uint64_t skip);
  uint64_t adversary_release(uint32_t imm, uint32_t mask);  // pieces released
  uint64_t adversary_holding(uint32_t imm, uint32_t mask);  // pieces held by that rule now
  // Fails every op in flight, stops the threads, closes the endpoints. Idempotent.
  void close();
  bool on_own_thread() const;

 private:
  class Sink;
  class GpuWaitTask;
  explicit Engine(const EngineOptions& options);
  void start();
  void check_open(OpKind op) const;
  void check_destination(const MemoryDescriptor& dst, const char* op) const;
  // A Transfer that already failed, when dst is known to be gone or unreachable (nothing posted).
  std::shared_ptr<TransferState> known_failure(const MemoryDescriptor& dst, const OpName& what);
  std::shared_ptr<TransferState> new_state(const OpName& what);
  std::unique_ptr<Job> new_job(const OpName& what, uint64_t bytes, const std::shared_ptr<MemoryRegion>& src);
  void add_staged_part(Job& job, const PathChoice& choice, const MemoryDescriptor& dst,
                       std::vector<StageSegment> segments, std::optional<uint32_t> imm, uint64_t imm_count);
  std::shared_ptr<IpcOp> new_ipc_op(const OpName& what, uint32_t parts);
  PathQuery path_query(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) const;
  void check_ipc_range(const MemoryDescriptor& dst, uint64_t offset, uint64_t length, const char* op) const;
  std::shared_ptr<TransferState> submit_rma(OpKind kind, const OpName& what, uint64_t bytes,
                                            const std::shared_ptr<MemoryRegion>& src, const MemoryDescriptor& dst,
                                            const std::vector<WritePiece>& pieces, std::optional<uint32_t> imm);
  static OpTarget target_of(const MemoryDescriptor& dst, uint32_t domain);

  // What the engine owns, in construction order: each component is destroyed before what it was
  // given. No component sees this struct; each gets in its constructor the objects it uses.
  struct Owned {
    EngineOptions options;
    std::unique_ptr<ProviderInfo> provider;
    std::shared_ptr<Worker> worker;
    NetAddress address;
    Bytes address_bytes;  // this engine's NetAddress, as frames carry it
    std::unique_ptr<ImmTarget> imm_target;
    std::shared_ptr<RegionTable> regions;
    std::shared_ptr<ImmCounterTable> counters;
    std::shared_ptr<ImmMailbox> mailbox;  // where same-host engines deliver imms (null: none)
    MessageQueue messages;
    std::unique_ptr<PeerKnowledge> peers;
    // Transports, run by the worker in its passes (worker tasks).
    std::unique_ptr<ControlPlane> control;
    std::unique_ptr<StagingTransport> staging;
    std::unique_ptr<IpcTransport> ipc;
    std::unique_ptr<JobRunner> jobs;

    uint32_t num_domains() const { return static_cast<uint32_t>(address.domains.size()); }
  };

  Owned own_;
  KeyAllocator keys_;
  std::shared_ptr<CallbackThread> callbacks_;
  WatcherThread watchers_;
  std::unique_ptr<Sink> sink_;
  std::unique_ptr<GpuWaitTask> gpu_waits_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<uint32_t> round_robin_{0};
  std::atomic<bool> closed_{false};
  Mutex close_mu_;
  std::optional<AdversaryOptions> adversary_;  // fixed at creation
};

}  // namespace jax_garden::fabric
