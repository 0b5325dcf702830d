#include "fabric/core/imm_counter.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "common/object_registry.h"
#include "fabric/core/gpu_runtime.h"

namespace jax_garden::fabric {
namespace {

ObjectRegistry<ImmCounter, Hold::kWeak>& registry() {
  static ObjectRegistry<ImmCounter, Hold::kWeak> r;
  return r;
}

}  // namespace

std::shared_ptr<ImmCounter> find_imm_counter(uint64_t id) { return registry().find(id); }

// ---------------------------------------------------------------------------------------------
// ImmCounter

ImmCounter::ImmCounter(uint64_t id, uint32_t imm, std::weak_ptr<ProgressDriver> driver,
                       std::weak_ptr<CallbackRunner> callbacks, std::weak_ptr<ImmCounterTable> table)
    : imm_(imm),
      id_(id),
      driver_(std::move(driver)),
      callbacks_(std::move(callbacks)),
      table_(std::move(table)) {}

ImmCounter::~ImmCounter() {
  registry().remove(id_);
  MutexLock lk(mu_);
  if (!mirror_alloc_) return;
  if (mirror_pinned_)
    gpu_runtime().host_free(mirror_alloc_);
  else
    std::free(mirror_alloc_);
}

void ImmCounter::publish_mirror() {
  volatile uint64_t* m = mirror_.load(std::memory_order_acquire);
  if (!m) return;
  uint64_t v = std::max(total_.load(std::memory_order_acquire), floor_.load(std::memory_order_acquire));
  // Never lower the word: a stream may be about to compare against what it holds.
  uint64_t* w = const_cast<uint64_t*>(m);
  uint64_t cur = __atomic_load_n(w, __ATOMIC_ACQUIRE);
  while (cur < v && !__atomic_compare_exchange_n(w, &cur, v, true, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
  }
}

volatile uint64_t* ImmCounter::ensure_mirror() {
  {
    MutexLock lk(mu_);
    if (auto* m = mirror_.load()) return m;
    void* p = gpu_runtime().host_alloc(64);
    mirror_pinned_ = p != nullptr;
    if (!p) {
      p = std::aligned_alloc(64, 64);
      if (!p) throw std::bad_alloc();
    }
    std::memset(p, 0, 64);
    mirror_alloc_ = p;
    if (!mirror_pinned_) {
      throw TransferFailed("fabric.wait (GPU): could not allocate host-mapped pinned memory for the counter");
    }
    mirror_.store(static_cast<volatile uint64_t*>(p), std::memory_order_release);
  }
  publish_mirror();
  return mirror_.load();
}

uint64_t ImmCounter::reserve(int64_t count) {
  MutexLock tk(take_mu_);
  credits_.fetch_sub(count, std::memory_order_acq_rel);
  return taken_.fetch_add(count, std::memory_order_acq_rel) + count;
}

void ImmCounter::release(uint64_t target) {
  uint64_t f = floor_.load();
  while (f < target && !floor_.compare_exchange_weak(f, target)) {
  }
  publish_mirror();
}

void ImmCounter::record_error(const std::string& error) {
  {
    MutexLock lk(mu_);
    error_ = error;
  }
  cv_.notify_all();
}

std::string ImmCounter::take_error() {
  MutexLock lk(mu_);
  std::string e;
  e.swap(error_);
  return e;
}

void ImmCounter::enqueue_gpu_wait(void* stream, int64_t count, double timeout_s) {
  JG_CHECK_ARG(count >= 0, "fabric.wait: count must be >= 0, got ", count);
  if (std::string e = take_error(); !e.empty()) throw TransferFailed(e);
  auto table = table_.lock();
  if (!table || table->closed()) throw TransferFailed("the counter's engine is closed");
  GpuRuntime& rt = gpu_runtime();
  volatile uint64_t* mirror = ensure_mirror();
  uint64_t target = reserve(count);
  rt.stream_wait_geq_u64(stream, rt.device_address(const_cast<uint64_t*>(mirror)), target);
  table->watch_gpu_wait(registry().find(id_), target, deadline_after(timeout_s));
}

// Arrivals wake sleepers only once the smallest count a sleeper waits for is reachable (a wait
// for 4,096 page imms must not be woken 4,096 times). Made and dropped under mu_.
ImmCounter::SleepingOn::SleepingOn(ImmCounter& c, int64_t count) : c_(c) {
  c_.sleepers_.fetch_add(1);
  if (count < c_.wake_at_.load()) c_.wake_at_.store(count);
}

ImmCounter::SleepingOn::~SleepingOn() {
  if (c_.sleepers_.fetch_sub(1) == 1) c_.wake_at_.store(std::numeric_limits<int64_t>::max());
}

bool ImmCounter::try_take(int64_t count) {
  MutexLock tk(take_mu_);
  if (credits_.load(std::memory_order_acquire) < count) return false;
  credits_.fetch_sub(count, std::memory_order_acq_rel);
  taken_.fetch_add(count, std::memory_order_acq_rel);
  return true;
}

void ImmCounter::add(int64_t n) {
  credits_.fetch_add(n, std::memory_order_acq_rel);
  total_.fetch_add(n, std::memory_order_acq_rel);
  publish_mirror();
  std::vector<std::function<void()>> fire;
  {
    MutexLock lk(mu_);
    MutexLock tk(take_mu_);
    while (!expectations_.empty() && credits_.load() >= expectations_.front().first) {
      credits_.fetch_sub(expectations_.front().first);
      taken_.fetch_add(expectations_.front().first);
      fire.push_back(std::move(expectations_.front().second));
      expectations_.pop_front();
    }
  }
  if (sleepers_.load(std::memory_order_acquire) > 0 &&
      credits_.load(std::memory_order_acquire) >= wake_at_.load(std::memory_order_acquire)) {
    MutexLock lk(mu_);  // pairs with the sleeper's check-then-sleep
    cv_.notify_all();
  }
  if (fire.empty()) return;
  if (auto cbs = callbacks_.lock())
    for (auto& f : fire) cbs->post(std::move(f));
}

void ImmCounter::wait(int64_t count, double timeout_s) {
  JG_CHECK_ARG(count >= 0, "ImmCounter.wait: count must be >= 0, got ", count);
  // Every wait is bounded: a negative value would mean "never" to deadline_after.
  JG_CHECK_ARG(std::isfinite(timeout_s) && timeout_s >= 0,
               "ImmCounter.wait: timeout must be a finite number of seconds >= 0, got ", timeout_s);
  if (std::string e = take_error(); !e.empty()) throw TransferFailed(str_cat("imm counter ", imm_, ": ", e));
  if (try_take(count)) return;
  auto driver = driver_.lock();
  if (!driver) throw TransferFailed(str_cat("imm counter ", imm_, ": the engine is gone"));
  // Spin first, polling the completion queues on this thread: a futex wake plus a worker handoff
  // cost more than the small-write round trip we are waiting for.
  {
    InlinePollScope scope(*driver);
    auto spin_until = Clock::now() + std::chrono::microseconds(1000);
    while (Clock::now() < spin_until) {
      if (try_take(count)) return;
      driver->poll_once();
    }
  }
  SleeperScope sleeper(*driver);  // from here the worker polls at full rate while we sleep
  auto deadline = deadline_after(timeout_s);
  MutexLock lk(mu_);
  SleepingOn sleeping(*this, count);
  while (true) {
    if (try_take(count)) return;
    if (!aborted_.empty()) throw TransferFailed(str_cat("imm counter ", imm_, ": ", aborted_));
    if (!error_.empty()) {
      std::string e;
      e.swap(error_);
      throw TransferFailed(str_cat("imm counter ", imm_, ": ", e));
    }
    if (cv_.wait_until(mu_, deadline) == std::cv_status::timeout) {
      if (try_take(count)) return;
      throw Timeout(str_cat("imm counter ", imm_, ": ", std::max<int64_t>(credits_.load(), 0), " of ", count,
                            " arrivals after ", timeout_s, " s"));
    }
  }
}

int64_t ImmCounter::wait_any(double timeout_s) {
  JG_CHECK_ARG(std::isfinite(timeout_s) && timeout_s >= 0,
               "ImmCounter.wait_any: timeout must be a finite number of seconds >= 0, got ", timeout_s);
  auto take_all = [this]() -> int64_t {
    MutexLock tk(take_mu_);
    int64_t n = credits_.load(std::memory_order_acquire);
    if (n <= 0) return 0;
    credits_.fetch_sub(n, std::memory_order_acq_rel);
    taken_.fetch_add(n, std::memory_order_acq_rel);
    return n;
  };
  auto deadline = deadline_after(timeout_s);
  MutexLock lk(mu_);
  SleepingOn sleeping(*this, 1);
  while (true) {
    if (int64_t n = take_all(); n > 0) return n;
    if (!aborted_.empty()) throw TransferFailed(str_cat("imm counter ", imm_, ": ", aborted_));
    if (cv_.wait_until(mu_, deadline) == std::cv_status::timeout) return take_all();
  }
}

void ImmCounter::on_count(int64_t count, std::function<void()> cb) {
  JG_CHECK_ARG(count > 0, "ImmCounter.on_count: count must be > 0, got ", count);
  {
    MutexLock lk(mu_);
    MutexLock tk(take_mu_);
    if (!expectations_.empty() || credits_.load() < count) {
      expectations_.emplace_back(count, std::move(cb));
      return;
    }
    credits_.fetch_sub(count);
    taken_.fetch_add(count);
  }
  if (auto cbs = callbacks_.lock()) cbs->post(std::move(cb));
}

void ImmCounter::abort(const std::string& why) {
  MutexLock lk(mu_);
  aborted_ = why;
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// ImmCounterTable

ImmCounterTable::ImmCounterTable(std::weak_ptr<ProgressDriver> driver, std::weak_ptr<CallbackRunner> callbacks,
                                 double timeout_s)
    : driver_(std::move(driver)), callbacks_(std::move(callbacks)), timeout_s_(timeout_s) {}

std::shared_ptr<ImmCounter> ImmCounterTable::counter(uint32_t imm) {
  if (closed()) throw TransferFailed("imm_counter: the engine is closed");
  std::shared_ptr<ImmCounter> c;
  int64_t banked = 0;
  {
    MutexLock lk(mu_);
    auto it = counters_.find(imm);
    if (it != counters_.end()) return it->second;
    c = registry().emplace([&](uint64_t id) {
      return std::make_shared<ImmCounter>(id, imm, driver_, callbacks_, weak_from_this());
    });
    if (auto b = banked_.find(imm); b != banked_.end()) {
      banked = b->second;
      banked_.erase(b);
    }
    counters_.emplace(imm, c);
    if (banked) c->add(banked);  // under mu_: an arrival racing with creation is counted once
  }
  return c;
}

void ImmCounterTable::on_imm(uint32_t imm, int64_t n) {
  std::shared_ptr<ImmCounter> c;
  {
    MutexLock lk(mu_);
    auto it = counters_.find(imm);
    if (it == counters_.end()) {
      banked_[imm] += n;
      return;
    }
    c = it->second;
  }
  c->add(n);
}

void ImmCounterTable::abort_all(const std::string& why) {
  closed_.store(true, std::memory_order_release);
  MutexLock lk(mu_);
  for (auto& [imm, c] : counters_) c->abort(why);
}

void ImmCounterTable::watch_gpu_wait(const std::shared_ptr<ImmCounter>& counter, uint64_t target,
                                     Clock::time_point deadline) {
  MutexLock lk(gpu_mu_);
  gpu_waits_.push_back({counter, target, deadline});
  gpu_wait_count_.store(static_cast<int>(gpu_waits_.size()), std::memory_order_release);
}

void ImmCounterTable::check_gpu_waits(Clock::time_point now) {
  if (!has_gpu_waits()) return;
  MutexLock lk(gpu_mu_);
  for (size_t i = 0; i < gpu_waits_.size();) {
    auto& w = gpu_waits_[i];
    auto c = w.counter.lock();
    bool drop = !c || c->total() >= w.target;
    if (!drop && now >= w.deadline) {
      std::string msg = str_cat("fabric.wait on GPU: imm counter ", c->imm(), " had ", c->total(),
                                " arrivals, short of the ", w.target, " the stream waited for, after the timeout; "
                                "the stream was released and the data it consumed may be incomplete");
      c->release(w.target);
      c->record_error(msg);
      errors_.push_back(std::move(msg));
      drop = true;
    }
    if (drop)
      gpu_waits_.erase(gpu_waits_.begin() + static_cast<std::ptrdiff_t>(i));
    else
      ++i;
  }
  gpu_wait_count_.store(static_cast<int>(gpu_waits_.size()), std::memory_order_release);
}

void ImmCounterTable::release_gpu_waits(const std::string& why) {
  MutexLock lk(gpu_mu_);
  for (auto& w : gpu_waits_) {
    if (auto c = w.counter.lock()) {
      c->release(w.target);
      c->record_error(why);
    }
  }
  gpu_waits_.clear();
  gpu_wait_count_.store(0, std::memory_order_release);
}

std::string ImmCounterTable::take_error() {
  MutexLock lk(gpu_mu_);
  if (errors_.empty()) return {};
  std::string e = std::move(errors_.front());
  errors_.pop_front();
  return e;
}

}  // namespace jax_garden::fabric
