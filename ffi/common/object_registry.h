// ObjectRegistry: the process-wide id -> object table that XLA FFI handlers use to find the
// long-lived C++ object an attribute names (an imm counter, an MoE context). Ids are never reused,
// so a stale id finds nothing instead of a newer object.
//
//   ObjectRegistry<ImmCounter, Hold::kWeak> g_counters;   // the engine owns counters
//   uint64_t id = g_counters.add(counter);
//   if (auto c = g_counters.find(id)) ...
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace jax_garden {

// kStrong: the registry keeps the object alive until remove(); kWeak: it only finds live objects.
enum class Hold { kStrong, kWeak };

template <typename T, Hold kHold = Hold::kStrong>
class ObjectRegistry {
  using Slot = std::conditional_t<kHold == Hold::kStrong, std::shared_ptr<T>, std::weak_ptr<T>>;

 public:
  // A fresh id (from 1) for `object`.
  uint64_t add(const std::shared_ptr<T>& object) {
    uint64_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lk(mu_);
    slots_.emplace(id, Slot(object));
    return id;
  }

  // For objects that carry their own id: make(id) builds the object, which is then registered.
  template <typename Make>
  std::shared_ptr<T> emplace(Make&& make) {
    uint64_t id = next_id_.fetch_add(1, std::memory_order_relaxed);
    std::shared_ptr<T> object = make(id);
    std::lock_guard lk(mu_);
    slots_.emplace(id, Slot(object));
    return object;
  }

  std::shared_ptr<T> find(uint64_t id) const {
    std::lock_guard lk(mu_);
    auto it = slots_.find(id);
    if (it == slots_.end()) return nullptr;
    if constexpr (kHold == Hold::kStrong)
      return it->second;
    else
      return it->second.lock();
  }

  // The object, now unregistered (nullptr if the id was unknown).
  std::shared_ptr<T> remove(uint64_t id) {
    std::lock_guard lk(mu_);
    auto it = slots_.find(id);
    if (it == slots_.end()) return nullptr;
    std::shared_ptr<T> obj;
    if constexpr (kHold == Hold::kStrong)
      obj = std::move(it->second);
    else
      obj = it->second.lock();
    slots_.erase(it);
    return obj;
  }

  size_t size() const {
    std::lock_guard lk(mu_);
    return slots_.size();
  }

  // Every live object (for shutdown paths that must visit all of them).
  std::vector<std::shared_ptr<T>> snapshot() const {
    std::vector<std::shared_ptr<T>> out;
    std::lock_guard lk(mu_);
    for (const auto& [id, slot] : slots_) {
      if constexpr (kHold == Hold::kStrong)
        out.push_back(slot);
      else if (auto s = slot.lock())
        out.push_back(std::move(s));
    }
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, Slot> slots_;
  std::atomic<uint64_t> next_id_{1};
};

}  // namespace jax_garden
