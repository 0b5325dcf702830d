// The progress worker: it alone owns an engine's domains (fabric, domain, endpoint, CQ, AV), the
// per-peer queues, the ops in flight, the completion-queue loop and the op timeouts. It reports what
// it learns upward through CompletionSink, and runs the engine's transports (WorkerTask) in its
// passes.
//
// Threading (the one place this is written down):
//   * progress_mu_ guards everything the loop touches: domains, links, ops, and the state of every
//     WorkerTask. It is held by the worker thread for each pass, by a caller that posts inline
//     (submit's fast path) and by a waiter that polls inline (poll_once: Transfer.wait and
//     ImmCounter.wait spin on it briefly before sleeping). libfabric is opened FI_THREAD_DOMAIN, so
//     holding progress_mu_ is what makes a libfabric call legal.
//   * User threads never touch that state directly: they submit Ops (inline under a try-lock when
//     nothing is queued ahead, else as a command), or take progress_mu_ for short synchronous work
//     (registration).
//   * Commands (cmd_mu_) are typed: install an op, unregister memory. The worker runs them at the
//     start of a pass.
//   * Callbacks never run under progress_mu_: they go to the engine's callback thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <unordered_map>
#include <variant>
#include <vector>

#include "common/deadline.h"
#include "common/thread_annotations.h"
#include "fabric/wire/control.h"
#include "fabric/core/domain.h"
#include "fabric/core/keys.h"
#include "fabric/core/progress.h"
#include "fabric/core/work_request.h"

namespace jax_garden::fabric {

class Worker;
class Adversary;

// For clang's thread-safety analysis: the role of "the thread that holds an engine's progress lock".
// Every progress-owned member and function of the worker and of the transports names this one role
// (per-object mutexes reached through different pointers would look distinct to the analysis).
class JG_CAPABILITY("progress") ProgressRole {
 public:
  // In callbacks the worker runs under its lock (deferred completions): tells the analysis so.
  void assert_held() const JG_ASSERT_CAPABILITY(this) {}
};
extern ProgressRole progress_role;

#define JG_REQUIRES_PROGRESS JG_REQUIRES(::jax_garden::fabric::progress_role)
#define JG_GUARDED_BY_PROGRESS JG_GUARDED_BY(::jax_garden::fabric::progress_role)

// Holds a worker's progress lock (blocking), or takes over one that try_lock_progress() got.
class JG_SCOPED_CAPABILITY ProgressLock {
 public:
  explicit ProgressLock(Worker& worker) JG_ACQUIRE(progress_role);
  ProgressLock(Worker& worker, std::adopt_lock_t) JG_REQUIRES(progress_role) : worker_(worker) {}
  ~ProgressLock() JG_RELEASE();
  ProgressLock(const ProgressLock&) = delete;
  ProgressLock& operator=(const ProgressLock&) = delete;

 private:
  Worker& worker_;
};

// What the worker reports upward (implemented by the engine). Called under progress_mu_, on the
// worker thread or an inline poller's thread: implementations only record or queue.
class CompletionSink {
 public:
  virtual ~CompletionSink() = default;
  virtual void on_imm(uint32_t imm, int64_t n) = 0;
  virtual void on_message(Frame&& frame) = 0;  // a control message (user or internal)
  // A user op failed with an error the provider reported (not a local refusal, not a timeout).
  // Returning true takes over finishing op.state (to find out from the peer why).
  virtual bool on_op_failed(Op& op, const std::string& error) = 0;
  // `owner` did not answer (connection refused, host unreachable, no completion in time).
  virtual void on_peer_unreachable(const Bytes& owner, const std::string& reason) = 0;
};

// Work the worker runs in each of its passes besides posting and polling (transports, GPU waits).
class WorkerTask {
 public:
  virtual ~WorkerTask() = default;
  virtual bool advance(Clock::time_point now) = 0;  // called under progress_mu_; true on progress
  virtual bool busy() const = 0;                    // the worker must keep passing (not nap) for it
  // Cheap polling of shared memory (imm mailboxes, ipc completions), run in every pass and by inline
  // pollers (Transfer.wait, ImmCounter.wait) like the completion queues. Under progress_mu_.
  virtual bool poll() { return false; }
};

struct WorkerOptions {
  double timeout_s = 10.0;
  uint32_t max_outstanding_per_peer = 128;  // posted requests per (domain, peer) link
  uint32_t recv_slots = 16;                 // pre-posted control-message receives on domain 0
  uint32_t max_message_bytes = 256 * 1024;
  bool delivery_complete = true;  // FI_DELIVERY_COMPLETE on writes and sends (see engine.h)
};

class Worker final : public ProgressDriver, public std::enable_shared_from_this<Worker> {
 public:
  // `keys` chooses the keys of the worker's own registrations (providers that let the engine choose).
  // `adversary`: the adversarial delivery mode (adversary.h), or null (off).
  Worker(const ProviderInfo& provider, uint32_t domains, const WorkerOptions& options, CompletionSink* sink,
         std::weak_ptr<CallbackRunner> callbacks, KeyAllocator* keys, std::unique_ptr<Adversary> adversary = nullptr);
  ~Worker() override;
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Posts the control-message receives and starts the thread; `tasks` run in every pass.
  void start(std::vector<WorkerTask*> tasks);
  // Fails every op still pending, stops the thread, closes the domains. Idempotent; after it,
  // submitted ops fail at once.
  void stop();
  bool stopped() const { return stop_.load(std::memory_order_acquire); }
  // After stop() and after the engine unregistered everything it registered: closes the endpoints
  // (which cancels what is still posted) and only then frees the ops whose contexts they held.
  void close_domains() JG_EXCLUDES(progress_role);
  bool on_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

  uint32_t num_domains() const { return static_cast<uint32_t>(names_.size()); }
  const Bytes& endpoint(uint32_t d) const { return names_[d]; }

  // ---- any thread ----
  // Installs `op` and posts it (inline when possible). Its state finishes later (or at once when
  // the worker is stopped).
  void submit(std::unique_ptr<Op> op) JG_EXCLUDES(progress_role);
  // Closes these registrations (on domains 0..n-1, in order), then releases `keepalive` on the
  // callback thread: the memory stays valid until the provider can no longer write into it.
  void unregister(std::vector<MemoryRegistration> regs, std::shared_ptr<void> keepalive) JG_EXCLUDES(progress_role);
  void wake();
  bool try_lock_progress() JG_TRY_ACQUIRE(true, progress_role);  // then ProgressLock(w, std::adopt_lock)

  // ---- ProgressDriver ----
  bool poll_once() override JG_EXCLUDES(progress_role);
  void inline_poll_begin() override { inline_pollers_.fetch_add(1, std::memory_order_acq_rel); }
  void inline_poll_end() override { inline_pollers_.fetch_sub(1, std::memory_order_acq_rel); }
  void sleeper_begin() override {
    sleepers_.fetch_add(1, std::memory_order_acq_rel);
    wake();
  }
  void sleeper_end() override { sleepers_.fetch_sub(1, std::memory_order_acq_rel); }

  // ---- the progress owner (tasks, transports) ----
  void post_internal(std::unique_ptr<Op> op) JG_REQUIRES_PROGRESS;
  void defer(std::function<void()> fn) JG_REQUIRES_PROGRESS;  // runs in the next worker pass
  Domain& domain(uint32_t d) JG_REQUIRES_PROGRESS { return *domains_[d]; }
  // Host memory registration on domain d with a fresh key (or the provider's).
  MemoryRegistration register_host(uint32_t d, void* addr, size_t length) JG_REQUIRES_PROGRESS;
  uint64_t new_key() { return provider_.provider_keys ? 0 : keys_->next(); }
  size_t active_ops() const JG_REQUIRES_PROGRESS { return active_.size(); }
  // Imms that arrived, or that the ipc/staged paths deliver locally: counted now, or held back first
  // in the adversarial mode.
  void deliver_imm(uint32_t imm, int64_t n) JG_REQUIRES_PROGRESS;
  Adversary* adversary() const { return adversary_.get(); }  // null when the mode is off

 private:
  struct InstallOp {
    std::unique_ptr<Op> op;
  };
  struct UnregisterMemory {
    std::vector<MemoryRegistration> regs;
    std::shared_ptr<void> keepalive;
  };
  using Command = std::variant<InstallOp, UnregisterMemory>;
  struct LinkTable {
    std::unordered_map<Bytes, std::unique_ptr<PeerLink>, BytesHash> by_endpoint;
    std::deque<PeerLink*> ready;  // links with pending requests and budget left
  };
  struct RecvSlot {
    ContextHeader hdr;
    uint8_t* buffer = nullptr;
    size_t size = 0;
  };

  void main();
  bool pass() JG_REQUIRES_PROGRESS;
  void enqueue(Command c);
  bool run_commands() JG_REQUIRES_PROGRESS;
  void run(Command& c) JG_REQUIRES_PROGRESS;
  void install(std::unique_ptr<Op> op) JG_REQUIRES_PROGRESS;
  void queue_link(PeerLink* link) JG_REQUIRES_PROGRESS;
  bool post_pending(uint32_t d) JG_REQUIRES_PROGRESS;
  int post(WorkRequest* wr) JG_REQUIRES_PROGRESS;
  bool poll_cq(uint32_t d) JG_REQUIRES_PROGRESS;
  void complete_wr(WorkRequest* wr, int error, const std::string& message) JG_REQUIRES_PROGRESS;
  void fail_op(Op* op, TransferState::Status status, const std::string& message, bool provider_error)
      JG_REQUIRES_PROGRESS;
  void finish_op(Op* op) JG_REQUIRES_PROGRESS;
  void check_timeouts(Clock::time_point now) JG_REQUIRES_PROGRESS;
  bool run_deferred() JG_REQUIRES_PROGRESS;
  void post_recv(RecvSlot* slot) JG_REQUIRES_PROGRESS;
  void release(std::shared_ptr<void> keepalive);
  void shutdown() JG_REQUIRES_PROGRESS;
  // Adversarial mode: copy an op's source bytes so it can be reported complete at once (transmit).
  bool copy_for_early_completion(Op* op) JG_REQUIRES_PROGRESS;
  bool release_held(Clock::time_point now) JG_REQUIRES_PROGRESS;  // pieces and imms whose hold ended
  void unregister_owned(Op* op) JG_REQUIRES_PROGRESS;

  const ProviderInfo& provider_;
  const WorkerOptions options_;
  CompletionSink* const sink_;
  KeyAllocator* const keys_;
  std::weak_ptr<CallbackRunner> callbacks_;
  std::vector<Bytes> names_;  // endpoint names, immutable after construction
  const std::unique_ptr<Adversary> adversary_;  // its state is progress-owned

  friend class ProgressLock;
  Mutex progress_mu_;  // the progress lock itself (progress_role is its name for the analysis)
  std::vector<std::unique_ptr<Domain>> domains_ JG_GUARDED_BY_PROGRESS;
  std::deque<LinkTable> links_ JG_GUARDED_BY_PROGRESS;  // per domain (deque: never relocated)
  std::unordered_map<uint64_t, std::unique_ptr<Op>> active_ JG_GUARDED_BY_PROGRESS;
  std::deque<std::function<void()>> deferred_ JG_GUARDED_BY_PROGRESS;
  std::vector<WorkerTask*> tasks_ JG_GUARDED_BY_PROGRESS;
  std::vector<RecvSlot> recv_slots_ JG_GUARDED_BY_PROGRESS;
  std::vector<uint8_t> recv_buffer_ JG_GUARDED_BY_PROGRESS;
  MemoryRegistration recv_reg_ JG_GUARDED_BY_PROGRESS;
  Clock::time_point last_activity_ JG_GUARDED_BY_PROGRESS;
  Clock::time_point last_timeout_check_ JG_GUARDED_BY_PROGRESS;
  uint64_t next_internal_id_ JG_GUARDED_BY_PROGRESS = 1ull << 63;  // ids of internal ops' states

  Mutex cmd_mu_;
  CondVar cmd_cv_;
  std::deque<Command> commands_ JG_GUARDED_BY(cmd_mu_);
  std::atomic<bool> has_commands_{false};

  std::atomic<bool> stop_{false};
  std::atomic<int> inline_pollers_{0};
  std::atomic<int> sleepers_{0};
  // Set by each pass: tasks, deferred completions or queued work need the worker thread itself
  // (inline pollers only post and poll CQs), so it must not nap.
  std::atomic<bool> worker_work_{false};
  std::thread thread_;
};

}  // namespace jax_garden::fabric
