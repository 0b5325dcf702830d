#include "fabric/engine.h"

#include <rdma/fi_cm.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <sched.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <future>
#include <limits>
#include <unordered_set>

#include "common/error.h"
#include "fabric/engine_internal.h"
#include "fabric/gpu_runtime.h"

namespace jax_garden::fabric {

namespace {

std::mutex g_registry_mu;
std::unordered_map<uint64_t, std::weak_ptr<ImmCounter>> g_counters;
// Base address of a live watcher's slot array -> pinned. Bases need not be page aligned
// (cudaHostAlloc sub-allocates small blocks), so lookups go by range.
std::map<uint64_t, bool> g_watcher_pages;

// The watcher page holding `address`, or end().
std::map<uint64_t, bool>::const_iterator find_watcher_page(uint64_t address) {
  auto it = g_watcher_pages.upper_bound(address);
  if (it == g_watcher_pages.begin()) return g_watcher_pages.end();
  --it;
  if (address - it->first >= Watcher::kSlots * 8 || (address - it->first) % 8 != 0) return g_watcher_pages.end();
  return it;
}
std::atomic<uint64_t> g_next_counter_id{1};

Clock::time_point deadline_after(double seconds) {
  if (seconds < 0) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

bool fits(uint64_t offset, uint64_t length, uint64_t size) { return offset <= size && length <= size - offset; }

// "<what> to tcp;ofi_rxm[1a2b]": cheap enough to build for every op (no stream formatting).
std::string describe(const std::string& what, const MemoryDescriptor& dst) {
  uint32_t h = dst.domains.empty() ? 0 : checksum32(dst.domains[0].endpoint.data(), dst.domains[0].endpoint.size());
  char tag[16];
  std::snprintf(tag, sizeof(tag), "%04x", h & 0xffff);
  return what + " to " + dst.provider + "[" + tag + (dst.domains.size() > 1 ? ",..]" : "]");
}

}  // namespace

std::shared_ptr<ImmCounter> find_imm_counter(uint64_t id) {
  std::lock_guard lk(g_registry_mu);
  auto it = g_counters.find(id);
  return it == g_counters.end() ? nullptr : it->second.lock();
}

bool is_live_watcher_slot(uint64_t address) {
  std::lock_guard lk(g_registry_mu);
  return find_watcher_page(address) != g_watcher_pages.end();
}

bool is_gpu_writable_watcher_slot(uint64_t address) {
  std::lock_guard lk(g_registry_mu);
  auto it = find_watcher_page(address);
  return it != g_watcher_pages.end() && it->second;
}

// ---------------------------------------------------------------------------------------------
// TransferState

bool TransferState::finish(Status status, const std::string& error) {
  std::vector<std::function<void(Status, const std::string&)>> cbs;
  {
    std::lock_guard lk(mu_);
    if (status_ != Status::kPending) return false;
    status_ = status;
    finished_.store(true, std::memory_order_release);
    error_ = error;
    cbs.swap(callbacks_);
  }
  cv_.notify_all();
  for (auto& cb : cbs) cb(status, error);
  return true;
}

void TransferState::wait(double timeout_s) {
  // As in ImmCounter::wait: a short spin that polls the engine's CQs on this thread, so a local
  // completion is reaped without waiting for the worker.
  if (!finished_.load(std::memory_order_acquire)) {
    if (auto core = engine_.lock()) {
      EngineCore::InlinePoller poller(core.get());
      auto spin_until = Clock::now() + std::chrono::microseconds(100);
      while (!finished_.load(std::memory_order_acquire) && Clock::now() < spin_until) core->progress_once();
    }
  }
  std::unique_lock lk(mu_);
  auto deadline = deadline_after(timeout_s);
  while (status_ == Status::kPending) {
    if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && status_ == Status::kPending) {
      throw Timeout(str_cat(what_, ": not complete after ", timeout_s, " s (still pending; wait again or close)"));
    }
  }
  if (status_ == Status::kFailed) throw TransferFailed(str_cat(what_, " failed: ", error_));
  if (status_ == Status::kTimedOut) throw Timeout(str_cat(what_, " timed out: ", error_));
}

TransferState::Status TransferState::status() const {
  std::lock_guard lk(mu_);
  return status_;
}

std::string TransferState::error() const {
  std::lock_guard lk(mu_);
  return error_;
}

void TransferState::on_finish(std::function<void(Status, const std::string&)> cb) {
  std::unique_lock lk(mu_);
  if (status_ == Status::kPending) {
    callbacks_.push_back(std::move(cb));
    return;
  }
  auto s = status_;
  auto e = error_;
  lk.unlock();
  cb(s, e);
}

// ---------------------------------------------------------------------------------------------
// ImmCounter

ImmCounter::ImmCounter(uint32_t imm, std::weak_ptr<EngineCore> core)
    : imm_(imm), id_(g_next_counter_id.fetch_add(1)), core_(std::move(core)) {}

ImmCounter::~ImmCounter() {
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
  std::lock_guard lk(mu_);
  if (auto* m = mirror_.load()) return m;
  void* p = gpu_runtime().host_alloc(64);
  mirror_pinned_ = p != nullptr;
  if (!p) {
    p = std::aligned_alloc(64, 64);
    if (!p) throw std::bad_alloc();
  }
  std::memset(p, 0, 64);
  mirror_alloc_ = p;
  mirror_.store(static_cast<volatile uint64_t*>(p), std::memory_order_release);
  publish_mirror();
  return static_cast<volatile uint64_t*>(p);
}

void ImmCounter::set_mirror(volatile uint64_t* m) {
  mirror_.store(m, std::memory_order_release);
  publish_mirror();
}

uint64_t ImmCounter::reserve(int64_t count) {
  JG_CHECK_ARG(count >= 0, "ImmCounter.reserve: count must be >= 0, got ", count);
  std::lock_guard lk(take_mu_);
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
    std::lock_guard lk(mu_);
    error_ = error;
  }
  cv_.notify_all();
}

std::string ImmCounter::take_error() {
  std::lock_guard lk(mu_);
  std::string e;
  e.swap(error_);
  return e;
}

void ImmCounter::add(int64_t n) {
  credits_.fetch_add(n, std::memory_order_acq_rel);
  total_.fetch_add(n, std::memory_order_acq_rel);
  publish_mirror();
  std::vector<std::function<void()>> fire;
  {
    std::lock_guard lk(mu_);
    std::lock_guard tk(take_mu_);
    while (!expectations_.empty() && credits_.load() >= expectations_.front().first) {
      credits_.fetch_sub(expectations_.front().first);
      taken_.fetch_add(expectations_.front().first);
      fire.push_back(std::move(expectations_.front().second));
      expectations_.pop_front();
    }
  }
  if (waiters_.load(std::memory_order_acquire) > 0 &&
      credits_.load(std::memory_order_acquire) >= wake_at_.load(std::memory_order_acquire)) {
    std::lock_guard lk(mu_);  // pairs with the waiter's check-then-sleep
    cv_.notify_all();
  }
  if (fire.empty()) return;
  if (auto core = core_.lock())
    for (auto& f : fire) core->post_callback(std::move(f));
}

void ImmCounter::wait(int64_t count, double timeout_s) {
  JG_CHECK_ARG(count >= 0, "ImmCounter.wait: count must be >= 0, got ", count);
  if (std::string e = take_error(); !e.empty()) throw TransferFailed(str_cat("imm counter ", imm_, ": ", e));
  auto try_take = [&]() {
    std::lock_guard tk(take_mu_);
    if (credits_.load(std::memory_order_acquire) < count) return false;
    credits_.fetch_sub(count, std::memory_order_acq_rel);
    taken_.fetch_add(count, std::memory_order_acq_rel);
    return true;
  };
  if (try_take()) return;
  auto core = core_.lock();
  if (!core) throw TransferFailed(str_cat("imm counter ", imm_, ": the engine is gone"));
  // Spin first, polling the CQs on this thread: a futex wake plus a worker handoff cost more than
  // the small-write round trip we are waiting for. The worker is not woken for this phase (it
  // would only compete for the progress lock and the CPU).
  {
    EngineCore::InlinePoller poller(core.get());
    auto spin_until = Clock::now() + std::chrono::microseconds(100);
    while (Clock::now() < spin_until) {
      if (try_take()) return;
      core->progress_once();
    }
  }
  core->waiter_enter();  // from here the worker polls at full rate while we sleep
  struct Leave {
    EngineCore* c;
    ~Leave() { c->waiter_leave(); }
  } leave{core.get()};
  auto deadline = deadline_after(timeout_s);
  std::unique_lock lk(mu_);
  waiters_.fetch_add(1);
  // Arrivals wake sleepers only once the smallest waiting count is reachable (a wait for 4,096
  // page imms must not be woken 4,096 times).
  if (count < wake_at_.load()) wake_at_.store(count);
  struct Dec {
    ImmCounter* c;
    ~Dec() {
      if (c->waiters_.fetch_sub(1) == 1) c->wake_at_.store(std::numeric_limits<int64_t>::max());
    }
  } dec{this};
  while (true) {
    if (try_take()) return;
    if (!aborted_.empty()) throw TransferFailed(str_cat("imm counter ", imm_, ": ", aborted_));
    if (!error_.empty()) {
      std::string e;
      e.swap(error_);
      throw TransferFailed(str_cat("imm counter ", imm_, ": ", e));
    }
    if (cv_.wait_until(lk, deadline) == std::cv_status::timeout) {
      if (try_take()) return;
      throw Timeout(str_cat("imm counter ", imm_, ": ", std::max<int64_t>(credits_.load(), 0), " of ", count,
                            " arrivals after ", timeout_s, " s"));
    }
  }
}

void ImmCounter::on_count(int64_t count, std::function<void()> cb) {
  JG_CHECK_ARG(count > 0, "ImmCounter.on_count: count must be > 0, got ", count);
  {
    std::lock_guard lk(mu_);
    std::lock_guard tk(take_mu_);
    if (!expectations_.empty() || credits_.load() < count) {
      expectations_.emplace_back(count, std::move(cb));
      return;
    }
    credits_.fetch_sub(count);
    taken_.fetch_add(count);
  }
  if (auto core = core_.lock()) core->post_callback(std::move(cb));
}

void ImmCounter::abort(const std::string& why) {
  std::lock_guard lk(mu_);
  aborted_ = why;
  cv_.notify_all();
}

// ---------------------------------------------------------------------------------------------
// Watcher

Watcher::Watcher(EngineCore* core, std::function<void(uint32_t, uint64_t, uint64_t)> cb)
    : core_(core), callback_(std::move(cb)) {
  // Host-mapped pinned memory when a GPU runtime exists, so that a GPU stream can store into the
  // slots (fabric.signal on CUDA); plain host memory otherwise.
  void* p = gpu_runtime().available() ? gpu_runtime().host_alloc(kSlots * 8) : nullptr;
  pinned_ = p != nullptr;
  if (!p) p = std::aligned_alloc(kSlots * 8, kSlots * 8);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, kSlots * 8);
  slots_ = static_cast<volatile uint64_t*>(p);
  last_.assign(kSlots, 0);
  std::lock_guard lk(g_registry_mu);
  g_watcher_pages[reinterpret_cast<uint64_t>(p)] = pinned_;
}

Watcher::~Watcher() {
  {
    std::lock_guard lk(g_registry_mu);
    g_watcher_pages.erase(reinterpret_cast<uint64_t>(slots_));
  }
  if (pinned_)
    gpu_runtime().host_free(const_cast<uint64_t*>(slots_));
  else
    std::free(const_cast<uint64_t*>(slots_));
}

uint64_t Watcher::slot_address(uint32_t index) {
  JG_CHECK_ARG(index < kSlots, "watcher slot ", index, " out of range (", kSlots, " slots)");
  std::lock_guard lk(mu_);
  bool known = false;
  for (uint32_t w : watched_) known |= (w == index);
  if (!known) {
    last_[index] = __atomic_load_n(&slots_[index], __ATOMIC_ACQUIRE);
    watched_.push_back(index);
  }
  return reinterpret_cast<uint64_t>(&slots_[index]);
}

void Watcher::poll() {
  std::lock_guard lk(mu_);
  for (uint32_t i : watched_) {
    uint64_t v = __atomic_load_n(&slots_[i], __ATOMIC_ACQUIRE);
    if (v != last_[i]) {
      uint64_t old = last_[i];
      last_[i] = v;
      if (core_) {
        auto cb = callback_;
        core_->post_callback([cb, i, old, v]() { cb(i, old, v); });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// MemoryRegion

MemoryRegion::~MemoryRegion() {
  // Asynchronous: the worker unregisters when it gets to it. Commands left after shutdown are never
  // run, and shutdown itself closes every registration still in the map.
  if (!core_ || core_->closed()) return;
  EngineCore* core = core_.get();
  uint64_t id = id_;
  core->enqueue([core, id]() {
    core->region_index_.erase(id);
    auto it = core->registrations_.find(id);
    if (it == core->registrations_.end()) return;
    for (size_t d = 0; d < it->second.size(); ++d) core->domains_[d]->unregister(it->second[d]);
    core->registrations_.erase(it);
  });
}

// ---------------------------------------------------------------------------------------------
// EngineCore: construction and threads

EngineCore::EngineCore(const EngineOptions& options) : options_(options) {}

std::shared_ptr<EngineCore> EngineCore::create(const EngineOptions& options) {
  JG_CHECK_ARG(options.domains >= 1 && options.domains <= kMaxDomains, "domains must be in 1..", kMaxDomains,
               ", got ", options.domains);
  JG_CHECK_ARG(options.timeout_s > 0, "timeout must be > 0 seconds, got ", options.timeout_s);
  JG_CHECK_ARG(options.max_message_bytes >= 1024, "max_message_bytes must be >= 1024, got ",
               options.max_message_bytes);
  JG_CHECK_ARG(options.stage_chunk_bytes >= 4096 && options.stage_chunk_bytes % 4096 == 0,
               "staging_chunk_bytes must be a multiple of 4096 (>= 4096), got ", options.stage_chunk_bytes);
  JG_CHECK_ARG(options.stage_slots >= 1 && options.stage_slots <= 4096, "staging_slots must be in 1..4096, got ",
               options.stage_slots);
  // The last reference may be dropped on one of the engine's own threads (an op on the worker
  // holding the last region, a Python callback). Those threads cannot join themselves, so the
  // engine is then closed and freed from a short-lived reaper thread instead.
  std::shared_ptr<EngineCore> core(new EngineCore(options), [](EngineCore* p) {
    if (p->on_own_thread())
      std::thread([p] { delete p; }).detach();
    else
      delete p;
  });
  core->start();
  return core;
}

void EngineCore::start() {
  std::string node = options_.node;
  provider_ = ProviderInfo::select(options_.provider, node);
  address_.provider = provider_->name;
  for (uint32_t d = 0; d < options_.domains; ++d) {
    domains_.push_back(std::make_unique<Domain>(*provider_, d));
    address_.domains.push_back(domains_.back()->name());
  }
  address_bytes_ = address_.to_bytes();
  pending_.resize(domains_.size());
  outstanding_.assign(domains_.size(), 0);

  // The scratch region is both the source of imm-only writes and this engine's imm target: peers
  // send zero-byte writes carrying an imm here (descriptors carry its address and keys), so imm
  // traffic never needs the destination region itself to be registered.
  scratch_.assign(64, 0);
  for (auto& d : domains_) scratch_regs_.push_back(d->register_host(scratch_.data(), scratch_.size(), next_key_.fetch_add(1)));

  // Control-message receive slots on domain 0, one registration for all of them.
  size_t slot_size = options_.max_message_bytes;
  recv_buffer_.assign(slot_size * options_.recv_slots, 0);
  recv_reg_ = domains_[0]->register_host(recv_buffer_.data(), recv_buffer_.size(), next_key_.fetch_add(1));
  for (uint32_t i = 0; i < options_.recv_slots; ++i) {
    auto slot = std::make_unique<RecvSlot>();
    slot->hdr.kind = ContextKind::kRecv;
    slot->buffer = recv_buffer_.data() + i * slot_size;
    slot->size = slot_size;
    post_recv(slot.get());
    recv_slots_.push_back(std::move(slot));
  }

  last_activity_ = last_timeout_check_ = Clock::now();
  callback_thread_ = std::thread([this] { callback_main(); });
  callback_thread_id_ = callback_thread_.get_id();
  worker_ = std::thread([this] { worker_main(); });
}

EngineCore::~EngineCore() { close(); }

bool EngineCore::on_own_thread() const {
  auto me = std::this_thread::get_id();
  return me == worker_.get_id() || me == callback_thread_id_ || me == watcher_thread_.get_id();
}

void EngineCore::close() {
  std::lock_guard close_lk(close_mu_);
  if (closed_.exchange(true)) return;
  watch_stop_ = true;
  if (watcher_thread_.joinable()) watcher_thread_.join();
  {
    std::lock_guard lk(watch_mu_);
    for (auto& w : watchers_)
      if (auto s = w.lock()) s->detach();
  }
  stop_worker_ = true;
  wake();
  if (worker_.joinable()) {
    if (std::this_thread::get_id() == worker_.get_id())
      worker_.detach();  // close() called from a command on the worker (the engine object lives on)
    else
      worker_.join();  // fails pending ops and closes the domains
  }
  {
    std::lock_guard lk(imm_mu_);
    for (auto& [imm, c] : counters_) c->abort("engine closed");
  }
  msg_cv_.notify_all();
  {
    std::lock_guard lk(cb_mu_);
    cb_stop_ = true;
  }
  cb_cv_.notify_all();
  if (callback_thread_.joinable()) {
    if (std::this_thread::get_id() == callback_thread_id_)
      callback_thread_.detach();  // close() called from a callback: the thread ends after it returns
    else
      callback_thread_.join();
  }
}

void EngineCore::check_open(const char* op) const {
  if (closed_.load()) throw TransferFailed(str_cat(op, ": the engine is closed"));
}

void EngineCore::wake() {
  std::lock_guard lk(cmd_mu_);
  cmd_cv_.notify_one();
}

void EngineCore::enqueue(std::function<void()> fn) {
  {
    std::lock_guard lk(cmd_mu_);
    commands_.push_back(std::move(fn));
    has_commands_.store(true, std::memory_order_release);
  }
  cmd_cv_.notify_one();
}

void EngineCore::run_on_worker(std::function<void()> fn) {
  if (std::this_thread::get_id() == worker_.get_id()) {
    fn();
    return;
  }
  auto done = std::make_shared<std::promise<void>>();
  auto fut = done->get_future();
  enqueue([fn = std::move(fn), done]() {
    try {
      fn();
      done->set_value();
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  });
  if (fut.wait_for(std::chrono::duration<double>(options_.timeout_s * 3)) != std::future_status::ready) {
    throw Timeout("engine worker did not answer a command in time");
  }
  fut.get();
}

void EngineCore::post_callback(std::function<void()> fn) {
  {
    std::lock_guard lk(cb_mu_);
    if (cb_stop_) return;
    callbacks_.push_back(std::move(fn));
  }
  cb_cv_.notify_one();
}

void EngineCore::callback_main() {
  while (true) {
    std::function<void()> fn;
    {
      std::unique_lock lk(cb_mu_);
      cb_cv_.wait(lk, [&] { return cb_stop_ || !callbacks_.empty(); });
      if (callbacks_.empty()) return;  // stopping and drained
      fn = std::move(callbacks_.front());
      callbacks_.pop_front();
    }
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "jax_garden.fabric: callback raised: %s\n", e.what());
    }
  }
}

void EngineCore::watcher_main() {
  // Poll fast right after a change, back off when nothing moves (a layer takes >= 100 us anyway).
  auto sleep = std::chrono::microseconds(20);
  while (!watch_stop_.load()) {
    std::vector<std::shared_ptr<Watcher>> live;
    {
      std::lock_guard lk(watch_mu_);
      for (auto& w : watchers_)
        if (auto s = w.lock()) live.push_back(std::move(s));
    }
    for (auto& w : live) w->poll();
    std::this_thread::sleep_for(sleep);
  }
}

std::shared_ptr<Watcher> EngineCore::watcher(std::function<void(uint32_t, uint64_t, uint64_t)> cb) {
  check_open("watcher");
  auto w = std::make_shared<Watcher>(this, std::move(cb));
  std::lock_guard lk(watch_mu_);
  watchers_.push_back(w);
  if (!watcher_thread_.joinable()) watcher_thread_ = std::thread([this] { watcher_main(); });
  return w;
}

std::shared_ptr<ImmCounter> EngineCore::imm_counter(uint32_t imm) {
  check_open("imm_counter");
  std::lock_guard lk(imm_mu_);
  auto it = counters_.find(imm);
  if (it != counters_.end()) return it->second;
  auto c = std::make_shared<ImmCounter>(imm, weak_from_this());
  auto banked = banked_.find(imm);
  if (banked != banked_.end()) {
    c->add(banked->second);
    banked_.erase(banked);
  }
  counters_.emplace(imm, c);
  std::lock_guard rk(g_registry_mu);
  g_counters[c->id()] = c;
  return c;
}

void EngineCore::on_imm(uint32_t imm, int64_t n) {
  std::shared_ptr<ImmCounter> c;
  {
    std::lock_guard lk(imm_mu_);
    auto it = counters_.find(imm);
    if (it == counters_.end()) {
      banked_[imm] += n;
      return;
    }
    c = it->second;
  }
  c->add(n);
}

// ---------------------------------------------------------------------------------------------
// Registration and validation

std::shared_ptr<MemoryRegion> EngineCore::register_memory(uint64_t ptr, uint64_t length, bool cuda, int device,
                                                          bool staged) {
  check_open("register");
  JG_CHECK_ARG(ptr != 0, "register: null pointer");
  JG_CHECK_ARG(length > 0, "register: length must be > 0, got ", length);
  JG_CHECK_ARG(ptr + length > ptr, "register: region [0x", std::hex, ptr, ", +0x", length, ") wraps around");
  auto region = std::shared_ptr<MemoryRegion>(new MemoryRegion());
  region->core_ = shared_from_this();
  region->id_ = next_id_.fetch_add(1);
  region->base_ = ptr;
  region->length_ = length;
  auto& desc = region->descriptor_;
  desc.provider = provider_->name;
  desc.base = ptr;
  desc.length = length;
  desc.virtual_addressing = provider_->virtual_addressing;
  desc.kind = cuda ? MemoryKind::kCuda : MemoryKind::kHost;
  desc.device = -1;
  desc.imm_base = reinterpret_cast<uint64_t>(scratch_.data());
  desc.stage_chunk_bytes = options_.stage_chunk_bytes;
  desc.host_id = host_id();
  desc.pid = static_cast<uint32_t>(getpid());
  desc.process_nonce = process_nonce();

  RegistrationCaps caps;
  caps.provider_hmem = provider_->hmem;
#ifdef FI_MR_DMABUF
  caps.headers_dmabuf = true;
#endif
  caps.runtime_dmabuf = fi_version() >= FI_VERSION(1, 20);
  if (cuda) {
    GpuRuntime& rt = gpu_runtime();
    if (!rt.available()) {
      throw InvalidArgument(str_cat("register: provider '", provider_->name, "' cannot use GPU memory here: ",
                                    rt.status()));
    }
    PointerInfo pi = rt.query(ptr);
    if (!pi.is_device) {
      throw InvalidArgument(str_cat("register: provider '", provider_->name, "' was given GPU memory at 0x",
                                    std::hex, ptr, " but CUDA does not know the pointer as device memory"));
    }
    JG_CHECK_ARG(ptr + length <= pi.alloc_base + pi.alloc_size, "register: [0x", std::hex, ptr, ", +0x", length,
                 ") runs past the end of its CUDA allocation [0x", pi.alloc_base, ", +0x", pi.alloc_size, ")");
    device = pi.device;
    desc.device = device;
    if (!pi.is_managed) {
      try {
        desc.ipc_handle = rt.ipc_export(pi.alloc_base);
        desc.ipc_offset = ptr - pi.alloc_base;
        desc.pci_bus_id = rt.pci_bus_id(device);
        desc.has_ipc = !desc.pci_bus_id.empty();
      } catch (const std::exception& e) {
        region->note_ = str_cat("no CUDA IPC export (", e.what(), ")");
        desc.has_ipc = false;
      }
    }
    struct utsname u{};
    caps.kernel_dmabuf = uname(&u) == 0 && kernel_release_at_least(u.release, 5, 12);
    caps.device_dmabuf = rt.dmabuf_supported(device);
  }
  RegistrationArgs args = plan_registration(desc.kind, device, staged, caps);
  int dmabuf_fd = -1;
  uint64_t dmabuf_offset = 0;
  PointerInfo pi;
  if (args.mode == RegistrationMode::kHmemDmabuf) {
    pi = gpu_runtime().query(ptr);
    dmabuf_fd = gpu_runtime().dmabuf_fd(pi.alloc_base, pi.alloc_size);
    dmabuf_offset = ptr - pi.alloc_base;
    if (dmabuf_fd < 0) {
      RegistrationCaps no_dmabuf = caps;
      no_dmabuf.device_dmabuf = false;
      args = plan_registration(desc.kind, device, staged, no_dmabuf);
    }
  }
  std::vector<MemoryRegistration> regs;
  std::weak_ptr<MemoryRegion> weak = region;
  run_on_worker([&]() {
    if (args.mode != RegistrationMode::kStaged) {
      try {
        for (auto& d : domains_) {
          regs.push_back(d->register_memory(reinterpret_cast<void*>(ptr), length, args,
                                            provider_->provider_keys ? 0 : next_key_.fetch_add(1), dmabuf_fd,
                                            dmabuf_offset));
        }
      } catch (const std::exception& e) {
        for (size_t d = 0; d < regs.size(); ++d) domains_[d]->unregister(regs[d]);
        regs.clear();
        if (args.mode == RegistrationMode::kSystem) throw;
        // The provider advertised FI_HMEM but cannot pin this GPU memory (no peermem / DMA-BUF):
        // fall back to staging, which always works.
        region->note_ = str_cat("FI_HMEM registration failed (", e.what(), "); staged instead");
        args.mode = RegistrationMode::kStaged;
      }
      if (!regs.empty()) registrations_[region->id_] = regs;
    }
    region_index_[region->id_] = weak;
  });
  if (dmabuf_fd >= 0) ::close(dmabuf_fd);
  region->mode_ = args.mode;
  if (region->note_.empty()) region->note_ = args.reason;
  desc.staged = args.mode == RegistrationMode::kStaged;
  for (size_t d = 0; d < domains_.size(); ++d) {
    if (!desc.staged) region->descs_.push_back(regs[d].desc);
    desc.domains.push_back({address_.domains[d], desc.staged ? 0 : regs[d].key, scratch_regs_[d].key});
  }
  return region;
}

void EngineCore::check_descriptor(const MemoryDescriptor& dst, const char* op) const {
  JG_CHECK_ARG(dst.provider == provider_->name, op, ": the destination descriptor is for provider '", dst.provider,
               "' but this engine uses '", provider_->name, "'");
  JG_CHECK_ARG(!dst.domains.empty(), op, ": the destination descriptor has no domains");
}

double EngineCore::deadline_for(uint64_t bytes) const {
  return options_.timeout_s + double(bytes) / options_.min_rate_bytes_per_s;
}

namespace {

void fill_rma_wr(WorkRequest& wr, const WritePiece& p, const MemoryRegion& src, const MemoryDescriptor& dst,
                 std::optional<uint32_t> imm) {
  auto& rk = dst.domains[p.domain % dst.domains.size()];
  wr.domain = p.domain;
  wr.local = reinterpret_cast<void*>(src.base() + p.src_offset);
  wr.length = p.length;
  wr.desc = src.desc(p.domain);
  wr.peer_endpoint = rk.endpoint;
  wr.remote_addr = dst.remote_address(p.dst_offset);
  wr.remote_key = rk.key;
  wr.has_imm = imm.has_value();
  wr.imm = imm.value_or(0);
}

}  // namespace

std::unique_ptr<Job> EngineCore::make_job(const std::string& what, uint64_t bytes,
                                          const std::shared_ptr<MemoryRegion>& src) {
  auto job = std::make_unique<Job>();
  job->state = std::make_shared<TransferState>(next_id_.fetch_add(1), what);
  job->deadline = deadline_after(deadline_for(bytes));
  job->src = src;
  return job;
}

void EngineCore::add_path_part(Job& job, const PathChoice& choice, const MemoryDescriptor& dst,
                               std::vector<StageSegment> segments, std::optional<uint32_t> imm, uint64_t imm_count,
                               const PagedCopy* paged) {
  if (choice.path == TransferPath::kIpc) {
    IpcPart::Spec spec;
    spec.dst = dst;
    for (auto& sg : segments) spec.segments.push_back({sg.dst_offset, sg.src_offset, sg.length});
    if (paged) {
      spec.paged = true;
      spec.pages = *paged;
    }
    spec.has_imm = imm.has_value();
    spec.imm = imm.value_or(0);
    spec.imm_count = imm ? imm_count : 0;
    job.parts.push_back(std::make_unique<IpcPart>(this, &job, std::move(spec)));
    return;
  }
  StagedPart::Spec spec;
  spec.dst = dst;
  spec.segments = std::move(segments);
  spec.stage_src = choice.stage_src;
  spec.stage_dst = choice.stage_dst;
  spec.has_imm = imm.has_value();
  spec.imm = imm.value_or(0);
  spec.imm_count = imm ? imm_count : 0;
  job.parts.push_back(std::make_unique<StagedPart>(this, &job, std::move(spec)));
}

std::shared_ptr<TransferState> EngineCore::write(const std::shared_ptr<MemoryRegion>& src,
                                                 const MemoryDescriptor& dst, uint64_t length, uint64_t src_offset,
                                                 uint64_t dst_offset, std::optional<uint32_t> imm, TransferPath path) {
  check_open("write");
  JG_CHECK_ARG(src && src->core_.get() == this, "write: the source region was not registered with this engine");
  check_descriptor(dst, "write");
  JG_CHECK_ARG(fits(src_offset, length, src->length()), "write: source bytes [", src_offset, ", ",
               src_offset + length, ") run past the end of the source region (", src->length(), " bytes)");
  JG_CHECK_ARG(fits(dst_offset, length, dst.length), "write: destination bytes [", dst_offset, ", ",
               dst_offset + length, ") run past the end of the destination region (", dst.length, " bytes)");
  PathChoice choice = path_for(*src, dst, path);
  std::string what = describe("write of " + std::to_string(length) + " bytes", dst);
  if (choice.path != TransferPath::kFabric) {
    auto job = make_job(what, length, src);
    uint64_t count = imm_writes("write", num_domains(), length, 0, ScatterSharding::kTargets, options_.sharding);
    add_path_part(*job, choice, dst, {{src_offset, dst_offset, length}}, imm, count, nullptr);
    return submit_job(std::move(job));
  }
  auto pieces = plan_write(length, src_offset, dst_offset, num_domains(), round_robin_.fetch_add(1),
                           options_.sharding);
  auto op = std::make_unique<Op>();
  op->state = std::make_shared<TransferState>(next_id_.fetch_add(1), what);
  op->deadline = deadline_after(deadline_for(length));
  op->keep_region = src;
  op->wrs.resize(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) fill_rma_wr(op->wrs[i], pieces[i], *src, dst, imm);
  return submit(std::move(op));
}

std::shared_ptr<TransferState> EngineCore::write_paged(const std::shared_ptr<MemoryRegion>& src,
                                                       const MemoryDescriptor& dst, uint64_t page_bytes,
                                                       const std::vector<uint32_t>& src_pages,
                                                       const std::vector<uint32_t>& dst_pages, uint64_t src_stride,
                                                       uint64_t dst_stride, uint64_t src_offset, uint64_t dst_offset,
                                                       std::optional<uint32_t> imm, TransferPath path) {
  check_open("write_paged");
  JG_CHECK_ARG(src && src->core_.get() == this, "write_paged: the source region was not registered with this engine");
  check_descriptor(dst, "write_paged");
  JG_CHECK_ARG(src_pages.size() == dst_pages.size(), "write_paged: ", src_pages.size(), " source pages but ",
               dst_pages.size(), " destination pages");
  JG_CHECK_ARG(page_bytes > 0, "write_paged: page_bytes must be > 0");
  JG_CHECK_ARG(src_stride >= page_bytes || src_pages.size() <= 1, "write_paged: src_stride ", src_stride,
               " is smaller than page_bytes ", page_bytes, " (pages would overlap)");
  JG_CHECK_ARG(dst_stride >= page_bytes || dst_pages.size() <= 1, "write_paged: dst_stride ", dst_stride,
               " is smaller than page_bytes ", page_bytes, " (pages would overlap)");
  uint64_t max_src = 0, max_dst = 0;
  for (uint32_t p : src_pages) max_src = std::max<uint64_t>(max_src, p);
  for (uint32_t p : dst_pages) max_dst = std::max<uint64_t>(max_dst, p);
  if (!src_pages.empty()) {
    JG_CHECK_ARG(max_src <= (std::numeric_limits<uint64_t>::max() - src_offset) / std::max<uint64_t>(src_stride, 1) &&
                     fits(src_offset + max_src * src_stride, page_bytes, src->length()),
                 "write_paged: source page ", max_src, " (offset ", src_offset, " + ", max_src, " x stride ",
                 src_stride, ", ", page_bytes, " bytes) runs past the end of the source region (", src->length(),
                 " bytes)");
    JG_CHECK_ARG(max_dst <= (std::numeric_limits<uint64_t>::max() - dst_offset) / std::max<uint64_t>(dst_stride, 1) &&
                     fits(dst_offset + max_dst * dst_stride, page_bytes, dst.length),
                 "write_paged: destination page ", max_dst, " (offset ", dst_offset, " + ", max_dst, " x stride ",
                 dst_stride, ", ", page_bytes, " bytes) runs past the end of the destination region (", dst.length,
                 " bytes)");
  }
  PathChoice choice = path_for(*src, dst, path);
  std::string what = describe(
      "paged write of " + std::to_string(src_pages.size()) + " x " + std::to_string(page_bytes) + " bytes", dst);
  std::vector<WritePiece> pieces;
  if (choice.path != TransferPath::kIpc)
    pieces = plan_paged(page_bytes, src_pages, dst_pages, src_stride, dst_stride, src_offset, dst_offset,
                        num_domains(), round_robin_.fetch_add(1));
  if (choice.path != TransferPath::kFabric) {
    auto job = make_job(what, page_bytes * src_pages.size(), src);
    std::vector<StageSegment> segs;
    PagedCopy pc;
    if (choice.path == TransferPath::kIpc) {
      // offsets: resolved against the mapped bases when the copy starts
      pc.src = src_offset;
      pc.dst = dst_offset;
      pc.page_bytes = page_bytes;
      pc.src_stride = src_stride;
      pc.dst_stride = dst_stride;
      pc.src_pages = src_pages;
      pc.dst_pages = dst_pages;
    } else {
      segs.reserve(pieces.size());
      for (auto& p : pieces) segs.push_back({p.src_offset, p.dst_offset, p.length});
    }
    uint64_t count = imm_writes("paged", num_domains(), 0, src_pages.size(), ScatterSharding::kTargets,
                                options_.sharding);
    add_path_part(*job, choice, dst, std::move(segs), imm, count, choice.path == TransferPath::kIpc ? &pc : nullptr);
    return submit_job(std::move(job));
  }
  auto op = std::make_unique<Op>();
  op->state = std::make_shared<TransferState>(next_id_.fetch_add(1), what);
  op->deadline = deadline_after(deadline_for(page_bytes * src_pages.size()));
  op->keep_region = src;
  op->wrs.resize(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) fill_rma_wr(op->wrs[i], pieces[i], *src, dst, imm);
  return submit(std::move(op));
}

std::shared_ptr<TransferState> EngineCore::scatter(const std::shared_ptr<MemoryRegion>& src,
                                                   const std::vector<ScatterDestination>& dsts,
                                                   ScatterSharding sharding, std::optional<uint32_t> imm,
                                                   TransferPath path) {
  check_open("scatter");
  JG_CHECK_ARG(src && src->core_.get() == this, "scatter: the source region was not registered with this engine");
  JG_CHECK_ARG(!dsts.empty(), "scatter: the destination list is empty");
  std::vector<ScatterTarget> targets;
  std::vector<PathChoice> choices;
  uint64_t total = 0;
  bool all_fabric = true;
  for (size_t i = 0; i < dsts.size(); ++i) {
    const auto& d = dsts[i];
    check_descriptor(d.dst, "scatter");
    JG_CHECK_ARG(fits(d.src_offset, d.length, src->length()), "scatter: target ", i, ": source bytes [",
                 d.src_offset, ", ", d.src_offset + d.length, ") run past the end of the source region (",
                 src->length(), " bytes)");
    JG_CHECK_ARG(fits(d.dst_offset, d.length, d.dst.length), "scatter: target ", i, ": destination bytes [",
                 d.dst_offset, ", ", d.dst_offset + d.length, ") run past the end of the destination region (",
                 d.dst.length, " bytes)");
    targets.push_back({d.length, d.src_offset, d.dst_offset});
    total += d.length;
    choices.push_back(path_for(*src, d.dst, path));
    all_fabric &= choices.back().path == TransferPath::kFabric;
  }
  auto pieces = plan_scatter(targets, num_domains(), sharding, round_robin_.fetch_add(1));
  std::string what = str_cat("scatter of ", total, " bytes to ", dsts.size(), " targets");
  auto op = std::make_unique<Op>();
  op->keep_region = src;
  for (const auto& p : pieces) {
    if (choices[p.target].path != TransferPath::kFabric) continue;
    op->wrs.emplace_back();
    fill_rma_wr(op->wrs.back(), p, *src, dsts[p.target].dst, imm);
  }
  if (all_fabric) {
    op->state = std::make_shared<TransferState>(next_id_.fetch_add(1), what);
    op->deadline = deadline_after(deadline_for(total));
    return submit(std::move(op));
  }
  // Mixed or non-RMA targets: one job, a part per non-RMA target plus one for the RMA targets.
  auto job = make_job(what, total, src);
  uint64_t per_target = imm_writes("scatter", num_domains(), 0, 0, sharding, options_.sharding);
  for (size_t i = 0; i < dsts.size(); ++i) {
    if (choices[i].path == TransferPath::kFabric) continue;
    add_path_part(*job, choices[i], dsts[i].dst, {{dsts[i].src_offset, dsts[i].dst_offset, dsts[i].length}}, imm,
                  per_target, nullptr);
  }
  if (!op->wrs.empty()) {
    op->state = std::make_shared<TransferState>(next_id_.fetch_add(1), what + " (RMA targets)");
    op->deadline = job->deadline;
    job->parts.push_back(std::make_unique<FabricPart>(this, job.get(), std::move(op)));
  }
  return submit_job(std::move(job));
}

std::shared_ptr<TransferState> EngineCore::write_imm(const MemoryDescriptor& dst, uint32_t imm) {
  return imm_only(&dst, 1, imm);
}

std::shared_ptr<TransferState> EngineCore::barrier(const std::vector<MemoryDescriptor>& peers, uint32_t imm) {
  return imm_only(peers.data(), peers.size(), imm);
}

// One zero-byte write with `imm` to each of `peers` (write_imm and barrier; no descriptor copies,
// no stream formatting: this is the small-message hot path).
std::shared_ptr<TransferState> EngineCore::imm_only(const MemoryDescriptor* peers, size_t n, uint32_t imm) {
  check_open("barrier");
  JG_CHECK_ARG(n > 0, "barrier: the peer list is empty");
  for (size_t i = 0; i < n; ++i) check_descriptor(peers[i], "barrier");
  auto op = std::make_unique<Op>();
  op->state = std::make_shared<TransferState>(
      next_id_.fetch_add(1), n == 1 ? describe("imm write", peers[0]) : "barrier to " + std::to_string(n) + " peers");
  op->deadline = deadline_after(options_.timeout_s);
  op->wrs.resize(n);
  uint32_t first = round_robin_.fetch_add(1);
  for (size_t i = 0; i < n; ++i) {
    auto& wr = op->wrs[i];
    uint32_t d = (first + i) % num_domains();
    auto& rk = peers[i].domains[d % peers[i].domains.size()];
    wr.domain = d;
    wr.local = scratch_.data();
    wr.length = 0;  // imm only: a zero-byte write
    wr.desc = scratch_regs_[d].desc;
    wr.peer_endpoint = rk.endpoint;
    wr.remote_addr = peers[i].imm_address();  // the owner engine's imm target
    wr.remote_key = rk.imm_key;
    wr.has_imm = true;
    wr.imm = imm;
  }
  return submit(std::move(op));
}

Bytes EngineCore::make_frame(MsgKind kind, const Bytes& payload) const {
  return encode_frame(kind, address_bytes_, payload.data(), payload.size());
}

std::shared_ptr<TransferState> EngineCore::send(const NetAddress& to, const Bytes& payload) {
  check_open("send");
  JG_CHECK_ARG(to.provider == provider_->name, "send: the address is for provider '", to.provider,
               "' but this engine uses '", provider_->name, "'");
  size_t header = frame_header_bytes(address_bytes_);
  JG_CHECK_ARG(payload.size() + header <= options_.max_message_bytes, "send: payload of ", payload.size(),
               " bytes exceeds the control-message limit of ", options_.max_message_bytes - header,
               " bytes (max_message_bytes=", options_.max_message_bytes, " minus a ", header,
               "-byte header); use a write for bulk data");
  auto op = make_send_op(to.domains[0], MsgKind::kUser, payload, nullptr);
  op->state = std::make_shared<TransferState>(next_id_.fetch_add(1),
                                              str_cat("send of ", payload.size(), " bytes to ", to.to_string()));
  op->deadline = deadline_after(options_.timeout_s);
  return submit(std::move(op));
}

Message EngineCore::recv(double timeout_s) {
  check_open("recv");
  waiter_enter();
  struct Leave {
    EngineCore* c;
    ~Leave() { c->waiter_leave(); }
  } leave{this};
  std::unique_lock lk(msg_mu_);
  auto deadline = deadline_after(timeout_s);
  while (messages_.empty()) {
    if (closed_.load()) throw TransferFailed("recv: the engine is closed");
    if (msg_cv_.wait_until(lk, deadline) == std::cv_status::timeout && messages_.empty()) {
      throw Timeout(str_cat("recv: no message within ", timeout_s, " s"));
    }
  }
  Message m = std::move(messages_.front());
  messages_.pop_front();
  return m;
}

std::shared_ptr<TransferState> EngineCore::submit(std::unique_ptr<Op> op) {
  op->state->set_engine(weak_from_this());
  for (auto& wr : op->wrs) {
    if (wr.hdr.kind != ContextKind::kSend) wr.hdr.kind = ContextKind::kWrite;
    wr.op = op.get();
  }
  auto state = op->state;
  // Fast path: post on the caller's thread when nothing is queued ahead of us and no one else is
  // progressing; saves the handoff to the worker (a few microseconds on a small write).
  if (!has_commands_.load(std::memory_order_acquire) && progress_mu_.try_lock()) {
    std::lock_guard pl(progress_mu_, std::adopt_lock);
    if (!stop_worker_.load()) {
      install_op(std::move(op));
      for (uint32_t d = 0; d < domains_.size(); ++d) post_pending(d);
      last_activity_ = Clock::now();
      wake();  // the worker reaps the completions if nobody polls inline
      return state;
    }
  }
  Op* raw = op.release();
  enqueue([this, raw]() { install_op(std::unique_ptr<Op>(raw)); });
  return state;
}

void EngineCore::install_op(std::unique_ptr<Op> owned) {
  Op* raw = owned.get();
  if (stop_worker_.load()) {
    raw->state->finish(TransferState::Status::kFailed, "the engine is closed");
    return;
  }
  if (raw->owned.size() && provider_->mr_local) {
    raw->owned_regs.push_back(domains_[0]->register_host(raw->owned.data(), raw->owned.size(),
                                                         provider_->provider_keys ? 0 : next_key_.fetch_add(1)));
    raw->wrs[0].desc = raw->owned_regs[0].desc;
  }
  if (raw->wrs.empty()) {
    raw->state->finish(TransferState::Status::kDone);
    if (raw->on_done) deferred_.push_back([cb = std::move(raw->on_done)]() { cb(true, {}); });
    return;
  }
  uint64_t id = raw->state->id();
  active_.emplace(id, std::move(owned));
  for (auto& wr : raw->wrs) pending_[wr.domain].push_back(&wr);
}

bool EngineCore::progress_once() {
  std::unique_lock pl(progress_mu_, std::try_to_lock);
  if (!pl.owns_lock() || stop_worker_.load(std::memory_order_acquire)) return false;
  bool progress = false;
  for (uint32_t d = 0; d < domains_.size(); ++d) {
    progress |= post_pending(d);
    progress |= poll_cq(d);
  }
  if (progress) last_activity_ = Clock::now();
  if (!deferred_.empty() || !internal_msgs_.empty()) worker_work_.store(true, std::memory_order_release);
  return progress;
}

// ---------------------------------------------------------------------------------------------
// Worker

bool EngineCore::worker_pass() {
  bool progress = run_commands();
  for (uint32_t d = 0; d < domains_.size(); ++d) {
    progress |= post_pending(d);
    progress |= poll_cq(d);
  }
  progress |= run_deferred();
  progress |= handle_internal_messages();
  if (transports_busy()) {
    progress |= advance_jobs();
    progress |= advance_inbound();
  }
  auto now = Clock::now();
  if (now - last_timeout_check_ > std::chrono::milliseconds(1)) {
    check_timeouts();
    last_timeout_check_ = now;
  }
  if (progress) last_activity_ = now;
  worker_work_.store(transports_busy() || !deferred_.empty() || !internal_msgs_.empty(),
                     std::memory_order_release);
  return progress;
}

void EngineCore::worker_main() {
  uint32_t idle = 0;
  while (!stop_worker_.load(std::memory_order_acquire)) {
    // A caller spinning in a wait polls the CQs itself; on small machines two spinning threads
    // per process only slow each other down, so nap while one does (it gives up within ~100 us).
    if (inline_pollers_.load(std::memory_order_acquire) > 0 && !has_commands_.load(std::memory_order_acquire) &&
        !worker_work_.load(std::memory_order_acquire)) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    bool progress, busy;
    {
      std::unique_lock pl(progress_mu_, std::try_to_lock);
      if (!pl.owns_lock()) {
        sched_yield();
        continue;
      }
      progress = worker_pass();
      // Spin (yielding, these machines may have 2 cores) while anything is in flight or awaited;
      // otherwise sleep in short naps so an incoming write is still noticed within ~200 us.
      busy = !active_.empty() || waiters_.load(std::memory_order_acquire) > 0 || transports_busy() ||
             gpu_wait_count_.load(std::memory_order_relaxed) > 0 ||
             Clock::now() - last_activity_ < std::chrono::milliseconds(2);
    }
    if (progress) {
      idle = 0;
      continue;
    }
    if (busy || ++idle < 16) {
      sched_yield();
      continue;
    }
    std::unique_lock lk(cmd_mu_);
    cmd_cv_.wait_for(lk, std::chrono::microseconds(200), [&] {
      return !commands_.empty() || stop_worker_.load() || waiters_.load() > 0 || gpu_wait_count_.load() > 0;
    });
  }
  std::lock_guard pl(progress_mu_);
  shutdown_on_worker();
}

bool EngineCore::run_commands() {
  if (!has_commands_.load(std::memory_order_acquire)) return false;
  std::deque<std::function<void()>> cmds;
  {
    std::lock_guard lk(cmd_mu_);
    cmds.swap(commands_);
    has_commands_.store(false, std::memory_order_release);
  }
  for (auto& c : cmds) {
    try {
      c();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "jax_garden.fabric: worker command failed: %s\n", e.what());
    }
  }
  return !cmds.empty();
}

bool EngineCore::post_pending(uint32_t d) {
  auto& queue = pending_[d];
  bool progress = false;
  Domain& dom = *domains_[d];
  while (!queue.empty() && outstanding_[d] < options_.max_outstanding_per_domain) {
    WorkRequest* wr = queue.front();
    Op* op = wr->op;
    if (op->failed) {  // the op already failed or timed out: drop what was not posted
      queue.pop_front();
      op->done++;
      if (op->done == op->wrs.size()) finish_op(op);
      progress = true;
      continue;
    }
    fi_addr_t peer;
    try {
      peer = dom.resolve(wr->peer_endpoint);
    } catch (const std::exception& e) {
      queue.pop_front();
      complete_wr(wr, -FI_EINVAL, e.what());
      progress = true;
      continue;
    }
    ssize_t rc;
    iovec iov{wr->local, static_cast<size_t>(wr->length)};
    if (wr->hdr.kind == ContextKind::kSend) {
      fi_msg msg{};
      msg.msg_iov = &iov;
      msg.desc = &wr->desc;
      msg.iov_count = 1;
      msg.addr = peer;
      msg.context = &wr->hdr.ctx;
      rc = fi_sendmsg(dom.ep(), &msg, FI_COMPLETION);
    } else {
      fi_rma_iov rma{wr->remote_addr, static_cast<size_t>(wr->length), wr->remote_key};
      fi_msg_rma msg{};
      msg.msg_iov = &iov;
      msg.desc = &wr->desc;
      msg.iov_count = 1;
      msg.addr = peer;
      msg.rma_iov = &rma;
      msg.rma_iov_count = 1;
      msg.context = &wr->hdr.ctx;
      msg.data = wr->imm;
      rc = fi_writemsg(dom.ep(), &msg, FI_COMPLETION | wr->flags | (wr->has_imm ? FI_REMOTE_CQ_DATA : 0));
    }
    if (rc == -FI_EAGAIN) break;  // provider queue full: progress the CQ, retry next pass
    queue.pop_front();
    progress = true;
    if (rc != 0) {
      complete_wr(wr, static_cast<int>(rc), str_cat("posting failed: ", fi_error_string(static_cast<int>(rc))));
      continue;
    }
    wr->posted = true;
    op->in_flight++;
    outstanding_[d]++;
  }
  return progress;
}

bool EngineCore::poll_cq(uint32_t d) {
  fi_cq_data_entry entries[32];
  Domain& dom = *domains_[d];
  ssize_t n = fi_cq_read(dom.cq(), entries, 32);
  if (n == -FI_EAGAIN) return false;
  if (n == -FI_EAVAIL) {
    fi_cq_err_entry err{};
    if (fi_cq_readerr(dom.cq(), &err, 0) != 1) return false;
    std::string msg = fi_cq_strerror(dom.cq(), err.prov_errno, err.err_data, nullptr, 0);
    msg = str_cat(fi_error_string(err.err), err.prov_errno ? str_cat(" (provider: ", msg, ")") : "");
    if (!err.op_context) return true;  // an error without a context (e.g. a peer's failed write)
    auto* hdr = reinterpret_cast<ContextHeader*>(err.op_context);
    if (hdr->kind == ContextKind::kRecv) {
      auto* slot = reinterpret_cast<RecvSlot*>(hdr);
      slot->posted = false;
      if (!stop_worker_.load()) post_recv(slot);
    } else {
      auto* wr = reinterpret_cast<WorkRequest*>(hdr);
      outstanding_[wr->domain]--;
      wr->op->in_flight--;
      complete_wr(wr, -static_cast<int>(err.err), msg);
    }
    return true;
  }
  if (n < 0) {
    std::fprintf(stderr, "jax_garden.fabric: fi_cq_read on domain %u: %s\n", d,
                 fi_error_string(static_cast<int>(n)).c_str());
    return false;
  }
  for (ssize_t i = 0; i < n; ++i) {
    auto& e = entries[i];
    if (e.flags & FI_RECV) {
      auto* slot = reinterpret_cast<RecvSlot*>(e.op_context);
      slot->posted = false;
      try {
        Frame f = decode_frame(slot->buffer, e.len);
        if (f.kind == MsgKind::kUser) {
          {
            std::lock_guard lk(msg_mu_);
            messages_.push_back(Message{std::move(f.sender), std::move(f.payload)});
          }
          msg_cv_.notify_all();
        } else {
          internal_msgs_.push_back(std::move(f));  // handled by the worker loop, never by recv()
        }
      } catch (const std::exception& ex) {
        std::fprintf(stderr, "jax_garden.fabric: dropped a malformed %zu-byte control message: %s\n",
                     static_cast<size_t>(e.len), ex.what());
      }
      post_recv(slot);
    } else if ((e.flags & FI_REMOTE_CQ_DATA) && (e.flags & (FI_REMOTE_WRITE | FI_RMA))) {
      on_imm(static_cast<uint32_t>(e.data & 0xffffffffu), 1);
    } else if (e.op_context) {
      auto* wr = reinterpret_cast<WorkRequest*>(e.op_context);
      outstanding_[wr->domain]--;
      wr->op->in_flight--;
      complete_wr(wr, 0, {});
    }
  }
  return true;
}

void EngineCore::complete_wr(WorkRequest* wr, int error, const std::string& message) {
  Op* op = wr->op;
  if (error != 0 && !op->failed) {
    op->failed = true;
    op->error = message;
    op->state->finish(TransferState::Status::kFailed, message);
  }
  op->done++;
  if (op->done == op->wrs.size()) finish_op(op);
}

void EngineCore::finish_op(Op* op) {
  if (!op->failed) op->state->finish(TransferState::Status::kDone);
  if (op->on_done) {
    deferred_.push_back([cb = std::move(op->on_done), ok = !op->failed, err = op->error]() { cb(ok, err); });
  }
  for (auto& r : op->owned_regs) domains_[0]->unregister(r);
  active_.erase(op->state->id());  // frees op
}

void EngineCore::check_timeouts() {
  auto now = Clock::now();
  for (auto& [id, op] : active_) {
    if (op->failed || now < op->deadline) continue;
    op->failed = true;
    op->error = str_cat("no completion from the peer within the engine timeout (", options_.timeout_s,
                        " s + size allowance); the peer may be dead or unreachable");
    op->state->finish(TransferState::Status::kTimedOut, op->error);
  }
  // Ops whose unposted work requests were all dropped and which have nothing in flight are done.
  std::vector<Op*> finished;
  for (auto& [id, op] : active_)
    if (op->failed && op->in_flight == 0 && op->done == op->wrs.size()) finished.push_back(op.get());
  for (Op* op : finished) finish_op(op);
  check_job_timeouts(now);
  check_gpu_waits(now);
}

void EngineCore::post_recv(RecvSlot* slot) {
  iovec iov{slot->buffer, slot->size};
  void* desc = recv_reg_.desc;
  fi_msg msg{};
  msg.msg_iov = &iov;
  msg.desc = &desc;
  msg.iov_count = 1;
  msg.addr = FI_ADDR_UNSPEC;
  msg.context = &slot->hdr.ctx;
  for (int attempt = 0; attempt < 1000; ++attempt) {
    ssize_t rc = fi_recvmsg(domains_[0]->ep(), &msg, 0);
    if (rc == 0) {
      slot->posted = true;
      return;
    }
    if (rc != -FI_EAGAIN) {
      std::fprintf(stderr, "jax_garden.fabric: fi_recvmsg: %s\n", fi_error_string(static_cast<int>(rc)).c_str());
      return;
    }
  }
  std::fprintf(stderr, "jax_garden.fabric: could not re-post a control-message receive (queue full)\n");
}

void EngineCore::shutdown_on_worker() {
  // Everything still pending fails: the caller sees an error, never silence.
  for (auto& [id, op] : active_) op->state->finish(TransferState::Status::kFailed, "the engine was closed");
  for (auto& [id, job] : jobs_) job->state->finish(TransferState::Status::kFailed, "the engine was closed");
  // Run what is queued so that submits fail (stop_worker_ is set) and synchronous callers return.
  std::deque<std::function<void()>> cmds;
  {
    std::lock_guard lk(cmd_mu_);
    cmds.swap(commands_);
  }
  for (auto& c : cmds) {
    try {
      c();
    } catch (...) {
    }
  }
  for (auto& [id, regs] : registrations_)
    for (size_t d = 0; d < regs.size(); ++d) domains_[d]->unregister(regs[d]);
  registrations_.clear();
  region_index_.clear();
  for (size_t d = 0; d < domains_.size(); ++d) domains_[d]->unregister(scratch_regs_[d]);
  domains_[0]->unregister(recv_reg_);
  for (auto& [id, op] : active_)
    for (auto& r : op->owned_regs) domains_[0]->unregister(r);
  shutdown_transports();  // unregisters the bounce pools (their memory is freed after the domains)
  // Closing the endpoints cancels what is still posted; only then may the contexts be freed.
  domains_.clear();
  active_.clear();
  for (auto& q : pending_) q.clear();
  deferred_.clear();
  pending_imms_.clear();
  jobs_.clear();  // destroys parts (copy jobs wait for nothing: their events are simply destroyed)
  staging_.reset();
}

}  // namespace jax_garden::fabric
