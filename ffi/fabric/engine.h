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
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fabric/domain.h"
#include "fabric/imm_accounting.h"
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
};

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

 private:
  uint64_t id_;
  std::string what_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Status status_ = Status::kPending;
  std::string error_;
  std::vector<std::function<void(Status, const std::string&)>> callbacks_;
};

class EngineCore;

// Credit counter of arrivals of one imm value: arrivals before a wait are kept (banked).
class ImmCounter {
 public:
  ImmCounter(uint32_t imm, std::weak_ptr<EngineCore> core);
  uint32_t imm() const { return imm_; }
  uint64_t id() const { return id_; }
  int64_t credits() const { return credits_.load(std::memory_order_acquire); }
  uint64_t total() const { return total_.load(std::memory_order_acquire); }  // monotonic arrivals
  // Blocks until `count` credits are there, then takes them. Throws Timeout (nothing taken) or
  // TransferFailed if the engine closes meanwhile.
  void wait(int64_t count, double timeout_s);
  // One-shot: when `count` credits are there, take them and run cb on the callback thread.
  void on_count(int64_t count, std::function<void()> cb);
  void add(int64_t n);   // worker: n arrivals
  void abort(const std::string& why);
  // Host word mirroring total(), for GPU streams that wait on it (cuStreamWaitValue64).
  volatile uint64_t* mirror() const { return mirror_; }
  void set_mirror(volatile uint64_t* m) { mirror_ = m; }

 private:
  uint32_t imm_;
  uint64_t id_;
  std::weak_ptr<EngineCore> core_;
  std::atomic<int64_t> credits_{0};
  std::atomic<uint64_t> total_{0};
  std::atomic<int> waiters_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, std::function<void()>>> expectations_;
  std::string aborted_;
  volatile uint64_t* mirror_ = nullptr;
};

// Process-wide lookup for the jit ops: counter id -> counter, watcher slot address -> alive.
std::shared_ptr<ImmCounter> find_imm_counter(uint64_t id);
bool is_live_watcher_slot(uint64_t address);

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
  std::mutex mu_;
  std::vector<uint32_t> watched_;
  std::vector<uint64_t> last_;
};

// A registered local region: per domain, an MR handle.
class MemoryRegion {
 public:
  ~MemoryRegion();
  uint64_t base() const { return base_; }
  uint64_t length() const { return length_; }
  const MemoryDescriptor& descriptor() const { return descriptor_; }
  void* desc(uint32_t domain) const { return descs_[domain]; }
  bool cuda() const { return descriptor_.kind == MemoryKind::kCuda; }

 private:
  friend class EngineCore;
  std::shared_ptr<EngineCore> core_;
  uint64_t id_ = 0;  // key of its registrations in EngineCore::registrations_
  uint64_t base_ = 0, length_ = 0;
  std::vector<void*> descs_;  // per-domain local descriptors, valid until unregistered
  MemoryDescriptor descriptor_;
};

struct WorkRequest;
struct Op;
struct RecvSlot;

struct ScatterDestination {
  MemoryDescriptor dst;
  uint64_t length, src_offset, dst_offset;
};

struct Message {
  NetAddress sender;
  Bytes payload;
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

  std::shared_ptr<MemoryRegion> register_memory(uint64_t ptr, uint64_t length, bool cuda, int device);

  std::shared_ptr<TransferState> write(const std::shared_ptr<MemoryRegion>& src, const MemoryDescriptor& dst,
                                       uint64_t length, uint64_t src_offset, uint64_t dst_offset,
                                       std::optional<uint32_t> imm);
  std::shared_ptr<TransferState> write_paged(const std::shared_ptr<MemoryRegion>& src, const MemoryDescriptor& dst,
                                             uint64_t page_bytes, const std::vector<uint32_t>& src_pages,
                                             const std::vector<uint32_t>& dst_pages, uint64_t src_stride,
                                             uint64_t dst_stride, uint64_t src_offset, uint64_t dst_offset,
                                             std::optional<uint32_t> imm);
  std::shared_ptr<TransferState> scatter(const std::shared_ptr<MemoryRegion>& src,
                                         const std::vector<ScatterDestination>& dsts, ScatterSharding sharding,
                                         std::optional<uint32_t> imm);
  std::shared_ptr<TransferState> write_imm(const MemoryDescriptor& dst, uint32_t imm);
  std::shared_ptr<TransferState> barrier(const std::vector<MemoryDescriptor>& peers, uint32_t imm);
  std::shared_ptr<TransferState> send(const NetAddress& to, const Bytes& payload);
  Message recv(double timeout_s);

  std::shared_ptr<ImmCounter> imm_counter(uint32_t imm);
  std::shared_ptr<Watcher> watcher(std::function<void(uint32_t, uint64_t, uint64_t)> cb);

  // Runs fn on the callback thread (never on the worker).
  void post_callback(std::function<void()> fn);
  void close();
  bool on_own_thread() const;

  // Internal (worker / counters).
  void waiter_enter() { waiters_.fetch_add(1); wake(); }
  void waiter_leave() { waiters_.fetch_sub(1); }
  void on_imm(uint32_t imm, int64_t n);

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

  EngineOptions options_;
  std::unique_ptr<ProviderInfo> provider_;
  std::vector<std::unique_ptr<Domain>> domains_;
  NetAddress address_;

  // worker-owned
  std::unordered_map<uint64_t, std::unique_ptr<Op>> active_;
  std::vector<std::deque<WorkRequest*>> pending_;
  std::vector<uint32_t> outstanding_;
  std::vector<std::unique_ptr<RecvSlot>> recv_slots_;
  std::vector<uint8_t> recv_buffer_;
  MemoryRegistration recv_reg_;
  std::vector<uint8_t> scratch_;  // 64 bytes registered on every domain, source of imm-only writes
  std::vector<MemoryRegistration> scratch_regs_;
  // Registrations of live regions, by region id. Owned by the worker: a dropped region enqueues its
  // own unregistration, and shutdown closes whatever is left before the domains.
  std::unordered_map<uint64_t, std::vector<MemoryRegistration>> registrations_;
  Clock::time_point last_activity_;
  Clock::time_point last_timeout_check_;

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

  std::mutex close_mu_;
  friend class MemoryRegion;
};

}  // namespace jax_garden::fabric
