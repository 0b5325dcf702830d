// The CUDA IPC path: both regions GPU memory on one host (or host memory of one process, which the
// CPU tests and the CPU benchmark use). The peer's allocation is imported once (a legacy CUDA IPC
// handle, or a VMM range's fd from the owner's broker; cached per process).
//
// An op starts on the caller's thread, with no hand-off to the worker:
//   1. admission by the owner's shared region table (the region is live and the copy stays inside
//      it; the owner's deregistration waits for it; shared_regions.h);
//   2. the copy on the runtime's outbound stream of the source GPU (one driver call, batched for
//      several segments; a copy kernel for pages), or a memcpy for host memory;
//   3. right behind it, on the same stream, the imm records into the owner engine's mailbox ring
//      (imm_mailbox.h): a record lands only after the bytes it reports, and the owner's worker
//      counts it, so the receiver's counters, callbacks and GPU waits see exactly what an RMA imm
//      would give them, with no host thread and no network round trip in between. (Host copies
//      store their records at once; where streams cannot store into host memory, the worker polls
//      the copy's event and stores them.)
// The op completes once the owner took its records (completion "delivery") or once they landed
// ("transmit"); its admission and source are released as soon as they landed (the copy is over).
// An owner that dies or stalls never takes them: the op fails at its deadline and the owner is
// marked unreachable; an owner that closed its engine fails the op at once.
//
// In the adversarial delivery mode (adversary.h) a destination may be held back before it reserves
// its records (then later destinations toward the same owner start, land and are taken first), its
// imm record may be cut into several, and with transmit completion a held destination whose source
// is host memory is reported done at once from a copy of its source bytes. The owner holds what it
// takes from its mailbox like any imm arrival (Worker::deliver_imm). Off: one null-pointer branch.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "fabric/core/engine_parts.h"
#include "fabric/core/gpu_runtime.h"
#include "fabric/core/imm_counter.h"
#include "fabric/core/imm_mailbox.h"
#include "fabric/transport/jobs.h"
#include "fabric/core/options.h"
#include "fabric/core/region.h"
#include "fabric/core/shared_regions.h"

namespace jax_garden::fabric {

class IpcTransport;

// The Transfer of an op on the ipc path, counting its destinations down (it is the op's only heap
// object besides the caller's page lists).
class IpcOp final : public TransferState {
 public:
  IpcOp(uint64_t id, const OpName& what, uint32_t parts) : TransferState(id, what), remaining_(parts) {}
  // One destination finished: the op fails at the first failure, and is done when every one is.
  void part_done(bool ok, const std::string& error = {}, Status failure = Status::kFailed);

 private:
  std::atomic<uint32_t> remaining_;
};

// One destination's copy, offsets into the two regions.
struct IpcCopySpec {
  const CopySegment* segments = nullptr;  // single writes, scatter targets
  size_t num_segments = 0;
  const PagedCopy* pages = nullptr;  // or page lists (src / dst hold the offsets)
  bool has_imm = false;
  uint32_t imm = 0;
  uint64_t imm_count = 0;  // imm_writes() for this destination
};

// The IPC part of a job that mixes paths (a scatter with IPC and RMA targets): starts its own ops
// and reports when they finished.
class IpcPart final : public Part {
 public:
  struct Target {
    std::shared_ptr<const MemoryDescriptor> dst;
    std::vector<CopySegment> segments;
    uint64_t imm_count = 0;
  };
  IpcPart(Job* job, std::vector<Target> targets, std::optional<uint32_t> imm, IpcTransport& ipc)
      : Part(job), ipc_(ipc), targets_(std::move(targets)), imm_(imm) {}
  bool advance() override JG_REQUIRES_PROGRESS;
  bool idle() const override JG_REQUIRES_PROGRESS { return !op_ || op_->finished(); }

 private:
  IpcTransport& ipc_;  // starts the copies
  std::vector<Target> targets_;
  std::optional<uint32_t> imm_;
  std::shared_ptr<IpcOp> op_;
};

class IpcTransport final : public WorkerTask {
 public:
  // options: timeouts, completion mode; worker: wakes, the adversary, counts held imms; mailbox: this
  // engine's (null: none), polled for the imms same-host peers delivered; counters: where they are
  // counted; peers: owners that stopped taking records are marked unreachable.
  IpcTransport(const EngineOptions& options, Worker& worker, ImmMailbox* mailbox, ImmCounterTable& counters,
               PeerKnowledge& peers)
      : options_(options), worker_(worker), mailbox_(mailbox), counters_(counters), peers_(peers) {}
  ~IpcTransport() override;

  // Before posting: bytes [offset, offset + length) of dst exist in a live region of the owner.
  // Returns "" when they do; else why not, with *gone telling a deregistered region (TransferFailed)
  // from a bad range (InvalidArgument).
  std::string check_destination(const MemoryDescriptor& dst, uint64_t offset, uint64_t length, bool* gone);
  // Can the GPU holding `src` map dst's GPU (same device or peer access)? *why says why not.
  bool gpu_can_map(const MemoryRegion& src, const MemoryDescriptor& dst, std::string* why = nullptr) const;
  static uint64_t mappings();  // legacy handles opened + VMM ranges imported, process-wide
  // Destinations started, by who stores their records: {GPU stream, worker after the event, host,
  // and of the GPU stream's: the copy kernel itself}.
  std::array<uint64_t, 4> record_counts() const {
    return {by_stream_.load(), by_event_.load(), by_host_.load(), by_kernel_.load()};
  }

  // Maps dst for copies from `device` (-1: host memory) and claims its owner's mailbox ring now, as
  // the first op toward it would (Engine::prepare). Throws TransferFailed when it cannot, or when
  // dst's region is no longer registered.
  void prepare(const MemoryDescriptor& dst, int device);

  // Starts one destination of `op` (any thread; dst and spec only need to outlive the call).
  // Failures are reported through the op, never thrown.
  void start(const std::shared_ptr<IpcOp>& op, const std::shared_ptr<MemoryRegion>& src, const MemoryDescriptor& dst,
             const IpcCopySpec& spec, Clock::time_point deadline);

  // WorkerTask: poll() (every pass and inline waiters) completes ops whose records landed or were
  // taken; advance() also stores the records of event-polled copies, starts ops that waited for
  // ring space and enforces deadlines.
  bool poll() override JG_REQUIRES_PROGRESS;
  bool advance(Clock::time_point now) override JG_REQUIRES_PROGRESS;
  bool busy() const override { return outstanding_.load(std::memory_order_acquire) > 0; }
  // Engine close: fails every op in flight; waits (up to the timeout) for copies still running, so
  // that no admission is released while a copy may still write.
  void close() JG_REQUIRES_PROGRESS;

 private:
  // One destination of an op whose records are reserved: held until they landed (its admission and
  // source) and until the op was told.
  struct Pending {
    std::shared_ptr<IpcOp> op;  // reset once told
    std::shared_ptr<MemoryRegion> src;  // the source stays registered while its copy runs
    std::shared_ptr<SharedRegionTable> table;  // the owner's, while the copy is admitted
    uint32_t slot = kNoRegionSlot;
    uint64_t first = 0, last = 0;  // positions of its records
    uint64_t records = 1;          // how many (records_for(count), or more in the adversarial mode)
    uint32_t imm = 0;
    uint64_t count = 0;  // imm arrivals it delivers (0: an op without imm)
    Clock::time_point deadline;
    std::unique_ptr<CopyJob> copy;  // event-polled copy: the host stores the records after it
    size_t page_lists = ~size_t{0};
    bool landed = false;
  };
  // A destination that waits for ring space (started in order by the worker).
  struct Queued {
    Pending pending;
    int device = -1;
    std::vector<CopySegment> segments;  // addresses resolved
    bool paged = false;
    PagedCopy pages;
    std::vector<uint32_t> src_pages, dst_pages;  // what `pages` points at
    std::vector<uint8_t> source_copy;            // adversarial mode, early completion: the source bytes
  };
  // Adversarial mode: a destination whose start is held back until `at` (then it queues).
  struct Held {
    Clock::time_point at;
    uint64_t seq = 0;  // the adversary's submission order
    Queued queued;
  };
  // Our ring in one owner engine's mailbox, with the destinations in flight through it.
  struct Link {
    std::shared_ptr<MailboxLink> ring;
    uint64_t nonce = 0;
    uint32_t serial = 0;
    Bytes owner;  // the owner engine's endpoint (marked unreachable when it stops taking records)
    Mutex mu;     // one producer: reservations and enqueues in one order
    std::deque<Pending> pending JG_GUARDED_BY(mu);
    std::deque<Queued> queued JG_GUARDED_BY(mu);
    std::vector<Held> held JG_GUARDED_BY(mu);  // adversarial mode only
  };
  // Where a destination region is mapped for one local device, and how to reach its owner.
  struct Target {
    uint64_t region_key = 0;
    int device = -1;
    uint64_t dst_base = 0;  // the region's base, mapped in this process
    std::shared_ptr<SharedRegionTable> table;
    std::shared_ptr<Link> link;
  };

  std::shared_ptr<Target> target(const MemoryDescriptor& dst, int device);
  std::shared_ptr<Link> link(const MemoryDescriptor& dst) JG_REQUIRES(targets_mu_);
  uint64_t map(const MemoryDescriptor& dst, int device);
  uint64_t map_vmm(const MemoryDescriptor& dst, int device);
  // With positions reserved: enqueue the copy and its records (a failure stores empty records, so
  // that the ring moves on, and fails the op).
  void issue(Link& link, Pending p, const CopySegment* segments, size_t n, const PagedCopy* pages, int device)
      JG_REQUIRES(link.mu);
  bool poll_link(Link& link, Clock::time_point now, bool full) JG_REQUIRES_PROGRESS JG_EXCLUDES(link.mu);
  static Queued make_queued(Pending p, int device, const std::vector<CopySegment>& segments, const PagedCopy* pages);
  // Adversarial mode: hold a destination back (reporting it done at once where transmit completion
  // allows); queue the held ones whose time came, fail those of a closed owner or past their deadline.
  void hold(Link& link, Queued q, uint64_t seq, Clock::time_point at) JG_REQUIRES(link.mu);
  bool release_held(Link& link, Clock::time_point now, bool closed, bool full) JG_REQUIRES(link.mu);
  static bool copy_source(Queued& q);  // into q.source_copy (host memory, bounded); false: not copied
  void release(Pending& p);  // admission, page lists, source
  std::vector<std::shared_ptr<Link>> links_snapshot() JG_EXCLUDES(targets_mu_);

  const EngineOptions& options_;
  Worker& worker_;
  ImmMailbox* const mailbox_;
  ImmCounterTable& counters_;
  PeerKnowledge& peers_;
  Mutex targets_mu_;
  std::unordered_map<uint64_t, std::shared_ptr<Target>> targets_ JG_GUARDED_BY(targets_mu_);
  std::map<std::pair<uint64_t, uint32_t>, std::shared_ptr<Link>> links_ JG_GUARDED_BY(targets_mu_);  // (nonce, mailbox)
  std::atomic<uint64_t> links_version_{0};
  std::vector<std::shared_ptr<Link>> polled_ JG_GUARDED_BY_PROGRESS;  // the links, as the worker sees them
  uint64_t polled_version_ JG_GUARDED_BY_PROGRESS = ~uint64_t{0};
  std::atomic<int64_t> outstanding_{0};  // destinations pending or queued
  std::atomic<uint64_t> by_stream_{0}, by_event_{0}, by_host_{0}, by_kernel_{0};
  Clock::time_point last_deadline_check_ JG_GUARDED_BY_PROGRESS;
};

// Opens a legacy CUDA IPC handle for a caller outside the engine's copies (the MoE contexts map
// their peers' buffers). The engine keeps the mappings it opened until the owner's next handle
// needs them gone, so a peer that freed such an allocation and made a new one at that address may
// hand out a handle the driver refuses as already mapped: then the engine's mappings whose regions
// are all gone are closed and the handle opened once more. The caller closes the mapping
// (cudaIpcCloseMemHandle). Throws FabricError.
uint64_t ipc_open_outside_engine(const std::array<uint8_t, kIpcHandleBytes>& handle, int device);

}  // namespace jax_garden::fabric
