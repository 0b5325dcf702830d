// Watchers: pages of 64-bit slots that a CPU or GPU program bumps (fabric.signal); a thread polls
// them and reports changes as callback(slot, old, new) on the callback thread. This is how a
// running prefill tells a host service "layer l is done" without a host sync in its stream.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "common/thread_annotations.h"
#include "fabric/core/progress.h"

namespace jax_garden::fabric {

class Watcher {
 public:
  static constexpr uint32_t kSlots = 512;
  using Callback = std::function<void(uint32_t slot, uint64_t old_value, uint64_t new_value)>;
  Watcher(std::weak_ptr<CallbackRunner> callbacks, Callback cb);
  ~Watcher();
  uint64_t slot_address(uint32_t index);  // marks the slot as watched
  uint64_t read(uint32_t index) const;
  void store(uint32_t index, uint64_t value);
  void poll();    // watcher thread: report changed slots
  void detach();  // the engine closed: no more callbacks, and the callback (a Python object) is dropped

 private:
  std::weak_ptr<CallbackRunner> callbacks_;
  volatile uint64_t* slots_;
  bool pinned_ = false;  // cudaHostAlloc(Portable|Mapped): GPU streams can write the slots
  Mutex mu_;
  Callback callback_ JG_GUARDED_BY(mu_);
  std::vector<uint32_t> watched_ JG_GUARDED_BY(mu_);
  std::vector<uint64_t> last_ JG_GUARDED_BY(mu_);
};

// The thread that polls an engine's watchers (started with the first watcher).
class WatcherThread {
 public:
  ~WatcherThread() { stop(); }
  void add(const std::shared_ptr<Watcher>& w);
  void stop();  // joins the thread and detaches every watcher
  bool on_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

 private:
  void main();
  Mutex mu_;
  std::vector<std::weak_ptr<Watcher>> watchers_ JG_GUARDED_BY(mu_);
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// For the jit ops: is `address` a slot of a live watcher (and can a GPU stream write it)?
bool is_live_watcher_slot(uint64_t address);
// fabric.signal on a GPU stream: stores static_value (>= 0) with a stream memory op, else the u32
// the device pointer holds, with a one-thread kernel. Throws InvalidArgument for a dead slot.
void store_watcher_slot_on_stream(uint64_t address, int device, void* stream, int64_t static_value,
                                  const void* device_value);

}  // namespace jax_garden::fabric
