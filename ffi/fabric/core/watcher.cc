#include "fabric/core/watcher.h"

#include <cstdlib>
#include <cstring>
#include <map>

#include "common/error.h"
#include "fabric/core/gpu_runtime.h"

namespace jax_garden::fabric {
namespace {

// Base address of each live watcher's slot array -> pinned. Bases need not be page aligned
// (cudaHostAlloc sub-allocates small blocks), so lookups go by range.
Mutex g_pages_mu;
std::map<uint64_t, bool> g_pages JG_GUARDED_BY(g_pages_mu);

// The page holding `address` (a slot boundary) and whether it is pinned; false when none.
bool find_page(uint64_t address, bool* pinned) {
  MutexLock lk(g_pages_mu);
  auto it = g_pages.upper_bound(address);
  if (it == g_pages.begin()) return false;
  --it;
  if (address - it->first >= Watcher::kSlots * 8 || (address - it->first) % 8 != 0) return false;
  *pinned = it->second;
  return true;
}

}  // namespace

bool is_live_watcher_slot(uint64_t address) {
  bool pinned;
  return find_page(address, &pinned);
}

void store_watcher_slot_on_stream(uint64_t address, int device, void* stream, int64_t static_value,
                                  const void* device_value) {
  bool pinned = false;
  JG_CHECK_ARG(find_page(address, &pinned) && pinned, "0x", std::hex, address,
               " is not a slot of a live watcher in host-mapped pinned memory (was the watcher or engine closed, "
               "or created without a GPU runtime?)");
  GpuRuntime& rt = gpu_runtime();
  uint64_t dev = rt.device_address(reinterpret_cast<void*>(address));
  if (static_value >= 0)
    rt.stream_write_u64(stream, dev, static_cast<uint64_t>(static_value));
  else
    rt.stream_store_u32_from_device(device, stream, dev, device_value);
}

Watcher::Watcher(std::weak_ptr<CallbackRunner> callbacks, Callback cb)
    : callbacks_(std::move(callbacks)), callback_(std::move(cb)) {
  // Host-mapped pinned memory when a GPU runtime exists, so that a GPU stream can store into the
  // slots (fabric.signal on CUDA); plain host memory otherwise.
  void* p = gpu_runtime().available() ? gpu_runtime().host_alloc(kSlots * 8) : nullptr;
  pinned_ = p != nullptr;
  if (!p) p = std::aligned_alloc(kSlots * 8, kSlots * 8);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, kSlots * 8);
  slots_ = static_cast<volatile uint64_t*>(p);
  {
    MutexLock lk(mu_);
    last_.assign(kSlots, 0);
  }
  MutexLock lk(g_pages_mu);
  g_pages[reinterpret_cast<uint64_t>(p)] = pinned_;
}

Watcher::~Watcher() {
  {
    MutexLock lk(g_pages_mu);
    g_pages.erase(reinterpret_cast<uint64_t>(slots_));
  }
  if (pinned_)
    gpu_runtime().host_free(const_cast<uint64_t*>(slots_));
  else
    std::free(const_cast<uint64_t*>(slots_));
}

uint64_t Watcher::slot_address(uint32_t index) {
  JG_CHECK_ARG(index < kSlots, "watcher slot ", index, " out of range (", kSlots, " slots)");
  MutexLock lk(mu_);
  bool known = false;
  for (uint32_t w : watched_) known |= (w == index);
  if (!known) {
    last_[index] = __atomic_load_n(&slots_[index], __ATOMIC_ACQUIRE);
    watched_.push_back(index);
  }
  return reinterpret_cast<uint64_t>(&slots_[index]);
}

uint64_t Watcher::read(uint32_t index) const {
  JG_CHECK_ARG(index < kSlots, "watcher slot ", index, " out of range (", kSlots, " slots)");
  return __atomic_load_n(&slots_[index], __ATOMIC_ACQUIRE);
}

void Watcher::store(uint32_t index, uint64_t value) {
  JG_CHECK_ARG(index < kSlots, "watcher slot ", index, " out of range (", kSlots, " slots)");
  __atomic_store_n(&slots_[index], value, __ATOMIC_RELEASE);
}

void Watcher::poll() {
  auto runner = callbacks_.lock();
  MutexLock lk(mu_);
  for (uint32_t i : watched_) {
    uint64_t v = __atomic_load_n(&slots_[i], __ATOMIC_ACQUIRE);
    if (v == last_[i]) continue;
    uint64_t old = last_[i];
    last_[i] = v;
    if (runner && callback_) runner->post([cb = callback_, i, old, v]() { cb(i, old, v); });
  }
}

void Watcher::detach() {
  Callback dropped;
  {
    MutexLock lk(mu_);
    dropped.swap(callback_);
    callbacks_.reset();
  }
  // `dropped` (and the Python callable it may hold) goes here, outside the lock.
}

void WatcherThread::add(const std::shared_ptr<Watcher>& w) {
  MutexLock lk(mu_);
  watchers_.push_back(w);
  if (!thread_.joinable() && !stop_.load()) thread_ = std::thread([this] { main(); });
}

void WatcherThread::stop() {
  stop_.store(true);
  if (thread_.joinable()) {
    if (on_thread())
      thread_.detach();
    else
      thread_.join();
  }
  MutexLock lk(mu_);
  for (auto& w : watchers_)
    if (auto s = w.lock()) s->detach();
  watchers_.clear();
}

void WatcherThread::main() {
  // Poll fast enough that a layer mark is seen within ~20 us (a layer takes >= 100 us anyway).
  while (!stop_.load()) {
    std::vector<std::shared_ptr<Watcher>> live;
    {
      MutexLock lk(mu_);
      size_t keep = 0;
      for (auto& w : watchers_) {
        if (auto s = w.lock()) {
          live.push_back(std::move(s));
          watchers_[keep++] = w;
        }
      }
      watchers_.resize(keep);
    }
    for (auto& w : live) w->poll();
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

}  // namespace jax_garden::fabric
