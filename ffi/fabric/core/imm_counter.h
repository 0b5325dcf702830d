// Imm counters: how a receiver learns that data arrived (delivery is unordered, so counting imms is
// the whole completion protocol). One counter per imm value and engine, with credit semantics:
// arrivals that come before anyone waits (even before the counter exists) are kept.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/deadline.h"
#include "common/thread_annotations.h"
#include "fabric/core/progress.h"

namespace jax_garden::fabric {

class ImmCounterTable;

// Credit counter of the arrivals of one imm value. credits = arrivals - taken. GPU waits reserve
// credits ahead (credits may go negative) and wait on a host-mapped mirror of the arrival total.
class ImmCounter {
 public:
  ImmCounter(uint64_t id, uint32_t imm, std::weak_ptr<ProgressDriver> driver,
             std::weak_ptr<CallbackRunner> callbacks, std::weak_ptr<ImmCounterTable> table);
  ~ImmCounter();
  uint32_t imm() const { return imm_; }
  uint64_t id() const { return id_; }  // process-wide id (find_imm_counter), for the jit ops
  int64_t credits() const { return credits_.load(std::memory_order_acquire); }
  uint64_t total() const { return total_.load(std::memory_order_acquire); }  // monotonic arrivals

  // Blocks until `count` credits are there, then takes them. Throws Timeout (nothing taken), or
  // TransferFailed if the engine closed meanwhile or a GPU wait on this counter stalled (reported once).
  void wait(int64_t count, double timeout_s);
  // One-shot: when `count` credits are there, take them and run cb on the callback thread.
  void on_count(int64_t count, std::function<void()> cb);
  // For a thread that waits for rare arrivals (a mailbox's doorbells): sleeps until at least one
  // credit is there or timeout_s passed, then takes every credit and returns how many (0 after the
  // timeout). No spinning and no faster polling by the worker: the arrival itself wakes it, one
  // hop fewer than on_count's callback thread. Throws TransferFailed if the engine closed.
  int64_t wait_any(double timeout_s);

  // GPU wait (jg_fabric_wait on CUDA): reserves `count` credits now, enqueues on `stream` a wait for
  // the arrival total to reach them, and has the engine release the stream (and record an error)
  // if they do not arrive within timeout_s. Throws when the engine is closed or a stall is pending.
  void enqueue_gpu_wait(void* stream, int64_t count, double timeout_s);

  // Engine side.
  void add(int64_t n);  // n arrivals
  void abort(const std::string& why);
  void release(uint64_t target);  // raise the mirror's floor: a stalled stream resumes
  void record_error(const std::string& error);  // the next wait / GPU wait reports it
  std::string take_error();

 private:
  // One sleeping thread, counted while it lives (under mu_): arrivals notify cv_ for it.
  class SleepingOn {
   public:
    SleepingOn(ImmCounter& c, int64_t count);
    ~SleepingOn();

   private:
    ImmCounter& c_;
  };

  uint64_t reserve(int64_t count);
  volatile uint64_t* ensure_mirror();  // host-mapped pinned memory when a GPU exists
  void publish_mirror();
  bool try_take(int64_t count);

  const uint32_t imm_;
  const uint64_t id_;
  std::weak_ptr<ProgressDriver> driver_;
  std::weak_ptr<CallbackRunner> callbacks_;
  std::weak_ptr<ImmCounterTable> table_;
  std::atomic<int64_t> credits_{0};
  std::atomic<uint64_t> total_{0};
  std::atomic<uint64_t> taken_{0};
  std::atomic<uint64_t> floor_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int64_t> wake_at_{std::numeric_limits<int64_t>::max()};
  Mutex take_mu_;  // orders credit takes with GPU reservations and expectations
  Mutex mu_;       // sleepers, expectations, errors
  CondVar cv_;
  std::deque<std::pair<int64_t, std::function<void()>>> expectations_ JG_GUARDED_BY(mu_);
  std::string aborted_ JG_GUARDED_BY(mu_);
  std::string error_ JG_GUARDED_BY(mu_);
  std::atomic<volatile uint64_t*> mirror_{nullptr};
  void* mirror_alloc_ JG_GUARDED_BY(mu_) = nullptr;
  bool mirror_pinned_ JG_GUARDED_BY(mu_) = false;
};

// The process-wide lookup for the jit ops (counter ids never repeat).
std::shared_ptr<ImmCounter> find_imm_counter(uint64_t id);

// An engine's counters by imm value, the arrivals banked before a counter existed, and the GPU
// waits it watches. Arrivals are reported by the worker (on_imm).
class ImmCounterTable : public std::enable_shared_from_this<ImmCounterTable> {
 public:
  ImmCounterTable(std::weak_ptr<ProgressDriver> driver, std::weak_ptr<CallbackRunner> callbacks, double timeout_s);
  std::shared_ptr<ImmCounter> counter(uint32_t imm);  // created on first use
  void on_imm(uint32_t imm, int64_t n);
  void abort_all(const std::string& why);  // close(): every wait fails
  bool closed() const { return closed_.load(std::memory_order_acquire); }

  // GPU waits: the worker checks them each pass (check_gpu_waits) and releases the streams whose
  // imms did not arrive by their deadline, recording the error (take_error: TransferEngine.check()).
  void watch_gpu_wait(const std::shared_ptr<ImmCounter>& counter, uint64_t target, Clock::time_point deadline);
  bool has_gpu_waits() const { return gpu_wait_count_.load(std::memory_order_acquire) > 0; }
  void check_gpu_waits(Clock::time_point now);
  void release_gpu_waits(const std::string& why);  // close(): never leave a stream waiting
  std::string take_error();  // the oldest asynchronous error, forgotten once taken

 private:
  struct GpuWait {
    std::weak_ptr<ImmCounter> counter;
    uint64_t target;
    Clock::time_point deadline;
  };
  std::weak_ptr<ProgressDriver> driver_;
  std::weak_ptr<CallbackRunner> callbacks_;
  const double timeout_s_;
  std::atomic<bool> closed_{false};
  Mutex mu_;
  std::unordered_map<uint32_t, std::shared_ptr<ImmCounter>> counters_ JG_GUARDED_BY(mu_);
  std::unordered_map<uint32_t, int64_t> banked_ JG_GUARDED_BY(mu_);
  Mutex gpu_mu_;
  std::vector<GpuWait> gpu_waits_ JG_GUARDED_BY(gpu_mu_);
  std::atomic<int> gpu_wait_count_{0};
  std::deque<std::string> errors_ JG_GUARDED_BY(gpu_mu_);
};

}  // namespace jax_garden::fabric
