// TransferEngine: one device group (1..8 domains) driven by one progress worker thread, plus a
// callback thread and (lazily) a watcher thread. All libfabric calls happen on the worker; the
// public methods validate their arguments, build the op's write plan (imm_accounting.h) and hand
// it to the worker through a command queue. Delivery is reliable but unordered: nothing here relies
// on the order in which writes land.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fabric/control.h"
#include "fabric/domain.h"
#include "fabric/imm_accounting.h"
#include "fabric/policy.h"
#include "fabric/wire_format.h"

namespace jax_garden::fabric {

using Clock = std::chrono::steady_clock;

struct EngineOptions {
  std::string provider;          // "" = auto (efa > verbs;ofi_rxm > tcp)
  std::string node;              // source address to bind; "" = provider default
  uint32_t domains = 1;          // NICs (tcp: loopback endpoints) in the group
  double timeout_s = 10.0;       // per-op stall timeout: a silent peer fails ops within this
  double min_rate_bytes_per_s = 200e6;  // big ops get timeout + bytes / min_rate
  uint32_t max_message_bytes = 256 * 1024;  // two-sided control messages
  uint32_t recv_slots = 16;
  uint32_t max_outstanding_per_domain = 256;
  ShardingPolicy sharding;
  TransferPath default_path = TransferPath::kAuto;  // per-op `path` overrides it
  uint32_t stage_chunk_bytes = 1u << 20;  // staging: bounce buffer / slot size
  uint32_t stage_slots = 8;               // staging: bounce buffers per side (send pool, receive slots)
};

class EngineCore;

// Completion of one operation, shared between the worker and the caller.
class TransferState {
 public:
  enum class Status { kPending, kDone, kFailed, kTimedOut };
  explicit TransferState(uint64_t id, std::string what) : id_(id), what_(std::move(what)) {}
  uint64_t id() const { return id_; }
  const std::string& what() const { return what_; }
  // First final status wins; later ones are ignored.
  bool finish(Status status, const std::string& error = {});
  // Waits up to timeout_s (< 0: forever). Throws TransferFailed / Timeout.
  void wait(double timeout_s);
  Status status() const;
  std::string error() const;
  void on_finish(std::function<void(Status, const std::string&)> cb);
  // The engine whose CQs a waiter may poll inline (set when the op is submitted).
  void set_engine(std::weak_ptr<EngineCore> engine) { engine_ = std::move(engine); }

 private:
  uint64_t id_;
  std::string what_;
  std::weak_ptr<EngineCore> engine_;
  std::atomic<bool> finished_{false};
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Status status_ = Status::kPending;
  std::string error_;
  std::vector<std::function<void(Status, const std::string&)>> callbacks_;
};

class EngineCore;

// Credit counter of arrivals of one imm value: arrivals before a wait are kept (banked).
// credits = arrivals - taken; GPU waits reserve credits ahead (credits may go negative) and wait
// on a host-mapped mirror of the arrival total (mirror() >= target).
class ImmCounter {
 public:
  ImmCounter(uint32_t imm, std::weak_ptr<EngineCore> core);
  ~ImmCounter();
  uint32_t imm() const { return imm_; }
  uint64_t id() const { return id_; }
  std::shared_ptr<EngineCore> core() const { return core_.lock(); }
  bool mirror_pinned() const { return mirror_pinned_; }
  int64_t credits() const { return credits_.load(std::memory_order_acquire); }
  uint64_t total() const { return total_.load(std::memory_order_acquire); }  // monotonic arrivals
  // Blocks until `count` credits are there, then takes them. Throws Timeout (nothing taken) or
  // TransferFailed if the engine closes meanwhile or a GPU wait on this counter stalled (once).
  void wait(int64_t count, double timeout_s);
  // One-shot: when `count` credits are there, take them and run cb on the callback thread.
  void on_count(int64_t count, std::function<void()> cb);
  void add(int64_t n);   // worker: n arrivals
  void abort(const std::string& why);

  // GPU waits (jg_fabric_wait on CUDA). reserve() takes `count` credits ahead of their arrival and
  // returns the arrival total the stream must wait for. The mirror is a host-mapped word that always
  // holds max(total, released floor); release(target) raises the floor so a stalled stream resumes.
  uint64_t reserve(int64_t count);
  volatile uint64_t* mirror() const { return mirror_.load(std::memory_order_acquire); }
  volatile uint64_t* ensure_mirror();  // allocates it (host-mapped pinned memory when a GPU exists)
  void set_mirror(volatile uint64_t* m);
  void release(uint64_t target);
  void record_error(const std::string& error);  // the next wait()/take_error() reports it
  std::string take_error();

 private:
  void publish_mirror();

  uint32_t imm_;
  uint64_t id_;
  std::weak_ptr<EngineCore> core_;
  std::atomic<int64_t> credits_{0};
  std::atomic<uint64_t> total_{0};
  std::atomic<uint64_t> taken_{0};
  std::atomic<uint64_t> floor_{0};
  std::atomic<int> waiters_{0};
  std::atomic<int64_t> wake_at_{std::numeric_limits<int64_t>::max()};
  std::mutex take_mu_;  // orders credit takes with GPU reservations
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, std::function<void()>>> expectations_;
  std::string aborted_;
  std::string error_;
  std::atomic<volatile uint64_t*> mirror_{nullptr};
  void* mirror_alloc_ = nullptr;
  bool mirror_pinned_ = false;
};

// Process-wide lookup for the jit ops: counter id -> counter, watcher slot address -> alive.
std::shared_ptr<ImmCounter> find_imm_counter(uint64_t id);
bool is_live_watcher_slot(uint64_t address);
bool is_gpu_writable_watcher_slot(uint64_t address);  // live and in host-mapped pinned memory

// A page of 64-bit slots that a (CPU or GPU) program bumps; a thread polls them and reports
// changes as callback(slot, old, new). Increments between two polls coalesce.
class Watcher {
 public:
  static constexpr uint32_t kSlots = 512;
  Watcher(EngineCore* core, std::function<void(uint32_t, uint64_t, uint64_t)> cb);
  ~Watcher();
  uint64_t slot_address(uint32_t index);  // marks the slot as watched
  volatile uint64_t* slots() const { return slots_; }
  void poll();  // watcher thread
  void detach() { core_ = nullptr; }

 private:
  EngineCore* core_;
  std::function<void(uint32_t, uint64_t, uint64_t)> callback_;
  volatile uint64_t* slots_;
  bool pinned_ = false;  // cudaHostAlloc(Portable|Mapped): GPU streams can write the slots
  std::mutex mu_;
  std::vector<uint32_t> watched_;
  std::vector<uint64_t> last_;
};

// A registered local region: per domain, an MR handle (none for staged regions, which the provider
// cannot reach: writes from and to them go through bounce buffers).
class MemoryRegion {
 public:
  ~MemoryRegion();
  uint64_t base() const { return base_; }
  uint64_t length() const { return length_; }
  const MemoryDescriptor& descriptor() const { return descriptor_; }
  void* desc(uint32_t domain) const { return descs_.empty() ? nullptr : descs_[domain]; }
  bool cuda() const { return descriptor_.kind == MemoryKind::kCuda; }
  bool staged() const { return descriptor_.staged; }
  int device() const { return descriptor_.device; }
  RegistrationMode mode() const { return mode_; }
  const std::string& registration_note() const { return note_; }

 private:
  friend class EngineCore;
  std::shared_ptr<EngineCore> core_;
  uint64_t id_ = 0;  // key of its registrations in EngineCore::registrations_ (and region_index_)
  uint64_t base_ = 0, length_ = 0;
  std::vector<void*> descs_;  // per-domain local descriptors, valid until unregistered (empty: staged)
  MemoryDescriptor descriptor_;
  RegistrationMode mode_ = RegistrationMode::kSystem;
  std::string note_;
};

struct WorkRequest;
struct Op;
struct RecvSlot;
struct Job;
class Part;
class IpcPart;
class StagedPart;
struct StagingState;
struct Inbound;
struct PagedCopy;

struct ScatterDestination {
  MemoryDescriptor dst;
  uint64_t length, src_offset, dst_offset;
};

struct Message {
  NetAddress sender;
  Bytes payload;
};

struct StagingStats {
  uint32_t send_buffers = 0, send_buffers_free = 0;  // local bounce buffers (source staging)
  uint32_t recv_slots = 0, recv_slots_free = 0;      // bounce slots peers write into
  uint32_t inbound = 0, outbound = 0;                // staged transfers in progress
  uint64_t chunk_bytes = 0;
  uint64_t ipc_mappings = 0;
};

class EngineCore : public std::enable_shared_from_this<EngineCore> {
 public:
  static std::shared_ptr<EngineCore> create(const EngineOptions& options);
  ~EngineCore();

  const NetAddress& address() const { return address_; }
  const std::string& provider() const { return provider_->name; }
  bool provider_supports_hmem() const { return provider_->hmem; }
  uint32_t num_domains() const { return static_cast<uint32_t>(address_.domains.size()); }
  const EngineOptions& options() const { return options_; }
  bool closed() const { return closed_.load(); }

  // cuda: the pointer is CUDA device memory (its device is looked up); staged: do not register it
  // with the provider, move data through bounce buffers (GPU memory on providers without FI_HMEM
  // is staged automatically).
  std::shared_ptr<MemoryRegion> register_memory(uint64_t ptr, uint64_t length, bool cuda, int device,
                                                bool staged = false);

  // `path`: kAuto = the engine's default_path, else forced (InvalidArgument when impossible).
  std::shared_ptr<TransferState> write(const std::shared_ptr<MemoryRegion>& src, const MemoryDescriptor& dst,
                                       uint64_t length, uint64_t src_offset, uint64_t dst_offset,
                                       std::optional<uint32_t> imm, TransferPath path = TransferPath::kAuto);
  std::shared_ptr<TransferState> write_paged(const std::shared_ptr<MemoryRegion>& src, const MemoryDescriptor& dst,
                                             uint64_t page_bytes, const std::vector<uint32_t>& src_pages,
                                             const std::vector<uint32_t>& dst_pages, uint64_t src_stride,
                                             uint64_t dst_stride, uint64_t src_offset, uint64_t dst_offset,
                                             std::optional<uint32_t> imm, TransferPath path = TransferPath::kAuto);
  std::shared_ptr<TransferState> scatter(const std::shared_ptr<MemoryRegion>& src,
                                         const std::vector<ScatterDestination>& dsts, ScatterSharding sharding,
                                         std::optional<uint32_t> imm, TransferPath path = TransferPath::kAuto);
  // The path an op from `src` to `dst` takes.
  PathChoice path_for(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) const;
  std::shared_ptr<TransferState> write_imm(const MemoryDescriptor& dst, uint32_t imm);
  std::shared_ptr<TransferState> barrier(const std::vector<MemoryDescriptor>& peers, uint32_t imm);
  std::shared_ptr<TransferState> imm_only(const MemoryDescriptor* peers, size_t n, uint32_t imm);
  std::shared_ptr<TransferState> send(const NetAddress& to, const Bytes& payload);
  Message recv(double timeout_s);

  std::shared_ptr<ImmCounter> imm_counter(uint32_t imm);
  std::shared_ptr<Watcher> watcher(std::function<void(uint32_t, uint64_t, uint64_t)> cb);

  // Runs fn on the callback thread (never on the worker).
  void post_callback(std::function<void()> fn);
  void close();
  bool on_own_thread() const;

  // Errors noticed asynchronously (a GPU wait that stalled past the timeout): check() raises the
  // oldest one as TransferFailed and forgets it.
  void record_error(const std::string& error);
  void check();
  StagingStats staging_stats();

  // A GPU stream waits for counter->mirror() >= target (jg_fabric_wait on CUDA). The worker releases
  // it (ImmCounter::release) and records an error if the target is not reached by `deadline`.
  void watch_gpu_wait(const std::shared_ptr<ImmCounter>& counter, uint64_t target, Clock::time_point deadline);

  // Internal (worker / counters).
  void waiter_enter() { waiters_.fetch_add(1); wake(); }
  void waiter_leave() { waiters_.fetch_sub(1); }
  void on_imm(uint32_t imm, int64_t n);
  // One pass of posting and CQ polling on the caller's thread, if no one else is progressing right
  // now (try-lock). Waiters call it while they spin, so a reply is seen without a thread handoff.
  bool progress_once();
  struct InlinePoller {  // while alive, the worker naps instead of competing for the CPU
    EngineCore* core;
    explicit InlinePoller(EngineCore* c) : core(c) { core->inline_pollers_.fetch_add(1); }
    ~InlinePoller() { core->inline_pollers_.fetch_sub(1); }
  };

 private:
  explicit EngineCore(const EngineOptions& options);
  void start();
  void check_descriptor(const MemoryDescriptor& dst, const char* op) const;
  void check_open(const char* op) const;
  std::shared_ptr<TransferState> submit(std::unique_ptr<Op> op);
  void run_on_worker(std::function<void()> fn);  // synchronous
  void enqueue(std::function<void()> fn);
  void wake();
  double deadline_for(uint64_t bytes) const;

  void worker_main();
  bool run_commands();
  bool post_pending(uint32_t d);
  bool poll_cq(uint32_t d);
  void complete_wr(WorkRequest* wr, int error, const std::string& message);
  void finish_op(Op* op);
  void check_timeouts();
  void post_recv(RecvSlot* slot);
  void shutdown_on_worker();
  void callback_main();
  void watcher_main();

  // ---- transports beyond plain RMA (transports.cc) ----
  friend struct Job;
  friend class Part;
  friend class IpcPart;
  friend class FabricPart;
  friend class StagedPart;
  Bytes make_frame(MsgKind kind, const Bytes& payload) const;
  // Worker only: posts an internal op now; on_done(ok, error) runs later on the worker.
  void submit_internal(std::unique_ptr<Op> op);
  std::unique_ptr<Op> make_send_op(const Bytes& endpoint, MsgKind kind, const Bytes& payload,
                                   std::function<void(bool, const std::string&)> on_done);
  void send_internal(const Bytes& endpoint, MsgKind kind, const Bytes& payload,
                     std::function<void(bool, const std::string&)> on_done);
  // Delivers `count` arrivals of `imm` to dst's owner: zero-byte writes to its imm target for small
  // counts, one imm-batch control message for large ones.
  void deliver_imms(const MemoryDescriptor& dst, uint32_t imm, uint64_t count,
                    std::function<void(bool, const std::string&)> on_done);
  // Like deliver_imms, but coalesced: every request queued during one worker pass toward the same
  // peer and imm goes out as one delivery of the summed count (all callbacks run on its completion).
  void queue_imms(const MemoryDescriptor& dst, uint32_t imm, uint64_t count,
                  std::function<void(bool, const std::string&)> on_done);
  bool flush_imms();
  std::shared_ptr<TransferState> submit_job(std::unique_ptr<Job> job);
  std::unique_ptr<Job> make_job(const std::string& what, uint64_t bytes, const std::shared_ptr<MemoryRegion>& src);
  void add_path_part(Job& job, const PathChoice& choice, const MemoryDescriptor& dst,
                     std::vector<StageSegment> segments, std::optional<uint32_t> imm, uint64_t imm_count,
                     const PagedCopy* paged);
  bool run_deferred();
  bool handle_internal_messages();
  void handle_internal(Frame& frame);
  bool advance_jobs();
  bool advance_inbound();
  void check_job_timeouts(Clock::time_point now);
  void check_gpu_waits(Clock::time_point now);
  void shutdown_transports();
  uint64_t ipc_map(const MemoryDescriptor& dst, int device);  // region base mapped in this process
  bool gpu_can_map(const MemoryRegion& src, const MemoryDescriptor& dst) const;
  void ensure_send_pool();
  void ensure_recv_pool();
  MemoryRegistration register_system(uint32_t domain, void* addr, size_t length);
  EngineOptions options_;
  std::unique_ptr<ProviderInfo> provider_;
  std::vector<std::unique_ptr<Domain>> domains_;
  NetAddress address_;
  Bytes address_bytes_;

  // worker-owned
  std::unordered_map<uint64_t, std::unique_ptr<Op>> active_;
  std::vector<std::deque<WorkRequest*>> pending_;
  std::vector<uint32_t> outstanding_;
  std::vector<std::unique_ptr<RecvSlot>> recv_slots_;
  std::vector<uint8_t> recv_buffer_;
  MemoryRegistration recv_reg_;
  std::vector<uint8_t> scratch_;  // 64 bytes on every domain: source of imm-only writes and imm target
  std::vector<MemoryRegistration> scratch_regs_;
  // Registrations of live regions, by region id. Owned by the worker: a dropped region enqueues its
  // own unregistration, and shutdown closes whatever is left before the domains.
  std::unordered_map<uint64_t, std::vector<MemoryRegistration>> registrations_;
  // Live regions by id (staged regions too), for receivers of staged transfers. Worker-owned.
  std::unordered_map<uint64_t, std::weak_ptr<MemoryRegion>> region_index_;
  Clock::time_point last_activity_;
  Clock::time_point last_timeout_check_;
  std::deque<std::function<void()>> deferred_;  // op completions of internal ops, run by the worker
  std::deque<Frame> internal_msgs_;
  std::map<uint64_t, std::unique_ptr<Job>> jobs_;  // by id: submission order
  // Copies on one stream complete in order: once an IPC copy on a device's outbound stream is found
  // pending in a pass, later ones are not polled in that pass.
  std::vector<int> copy_blocked_;
  std::vector<struct IpcBatchEntry> ipc_batch_;
  void start_ipc_batch();
  std::unique_ptr<StagingState> staging_;
  struct PendingImms {
    MemoryDescriptor dst;
    uint64_t count = 0;
    std::vector<std::function<void(bool, const std::string&)>> callbacks;
  };
  std::map<std::pair<Bytes, uint32_t>, PendingImms> pending_imms_;  // (peer endpoint, imm)
  bool transports_busy() const;  // jobs or inbound staged transfers exist (worker only)

  std::atomic<uint64_t> next_id_{1};
  std::atomic<uint32_t> round_robin_{0};
  std::atomic<uint64_t> next_key_{1};
  std::atomic<int> waiters_{0};
  std::atomic<bool> closed_{false};
  std::atomic<bool> stop_worker_{false};

  std::mutex cmd_mu_;
  std::condition_variable cmd_cv_;
  std::deque<std::function<void()>> commands_;
  std::atomic<bool> has_commands_{false};
  std::thread worker_;

  std::mutex imm_mu_;
  std::unordered_map<uint32_t, std::shared_ptr<ImmCounter>> counters_;
  std::unordered_map<uint32_t, int64_t> banked_;  // arrivals before any counter existed

  std::mutex msg_mu_;
  std::condition_variable msg_cv_;
  std::deque<Message> messages_;

  std::mutex cb_mu_;
  std::condition_variable cb_cv_;
  std::deque<std::function<void()>> callbacks_;
  bool cb_stop_ = false;
  std::thread callback_thread_;
  std::thread::id callback_thread_id_;

  std::mutex watch_mu_;
  std::vector<std::weak_ptr<Watcher>> watchers_;
  std::atomic<bool> watch_stop_{false};
  std::thread watcher_thread_;

  std::mutex errors_mu_;
  std::deque<std::string> errors_;

  struct GpuWait {
    std::weak_ptr<ImmCounter> counter;
    uint64_t target;
    Clock::time_point deadline;
  };
  std::mutex gpu_wait_mu_;
  std::vector<GpuWait> gpu_waits_;
  std::atomic<int> gpu_wait_count_{0};
  // Everything the worker loop touches (domains, pending queues, active ops, transports) is owned by
  // whoever holds progress_mu_: the worker for its passes, or a caller posting or polling inline.
  std::mutex progress_mu_;
  std::atomic<int> inline_pollers_{0};
  // Set by each worker pass: IPC/staged jobs, inbound staging or internal completions need the
  // worker itself (inline pollers only post and poll CQs), so it must not nap for them.
  std::atomic<bool> worker_work_{false};
  void install_op(std::unique_ptr<Op> op);
  bool worker_pass();

  std::mutex close_mu_;
  friend class MemoryRegion;
};

}  // namespace jax_garden::fabric
