// Transfer completion: one per user operation, shared by the caller and the engine.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/thread_annotations.h"
#include "fabric/progress.h"

namespace jax_garden::fabric {

class TransferState {
 public:
  enum class Status { kPending, kDone, kFailed, kTimedOut };
  TransferState(uint64_t id, std::string what) : id_(id), what_(std::move(what)) {}
  uint64_t id() const { return id_; }
  const std::string& what() const { return what_; }
  // First final status wins; later ones are ignored. Returns whether this call finished it.
  bool finish(Status status, const std::string& error = {});
  bool finished() const { return finished_.load(std::memory_order_acquire); }
  // Waits up to timeout_s (< 0: forever), polling the engine inline for a short while first.
  // Throws TransferFailed / Timeout.
  void wait(double timeout_s);
  Status status() const;
  std::string error() const;
  void on_finish(std::function<void(Status, const std::string&)> cb);
  // Whose queues a waiter may poll (set when the op is submitted).
  void set_driver(std::weak_ptr<ProgressDriver> driver) { driver_ = std::move(driver); }

 private:
  const uint64_t id_;
  const std::string what_;
  std::weak_ptr<ProgressDriver> driver_;
  std::atomic<bool> finished_{false};
  mutable Mutex mu_;
  CondVar cv_;
  Status status_ JG_GUARDED_BY(mu_) = Status::kPending;
  std::string error_ JG_GUARDED_BY(mu_);
  std::vector<std::function<void(Status, const std::string&)>> callbacks_ JG_GUARDED_BY(mu_);
};

}  // namespace jax_garden::fabric
