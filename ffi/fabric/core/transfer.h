// Transfer completion: one per user operation, shared by the caller and the engine.
#pragma once

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/thread_annotations.h"
#include "fabric/core/progress.h"

namespace jax_garden::fabric {

// A short description of an op ("write of 4096 bytes to tcp;ofi_rxm[1a2b]"), built and kept without
// the heap: ops are described on every submission, and read only in errors and reprs.
class OpName {
 public:
  static constexpr size_t kMax = 95;
  OpName() = default;
  OpName(std::string_view s) { *this << s; }  // NOLINT: implicit, from literals and strings
  OpName& operator<<(std::string_view s) {
    size_t n = std::min(s.size(), kMax - len_);
    std::memcpy(buf_ + len_, s.data(), n);
    len_ += n;
    return *this;
  }
  OpName& operator<<(uint64_t v) {
    auto r = std::to_chars(buf_ + len_, buf_ + kMax, v);
    if (r.ec == std::errc()) len_ = static_cast<size_t>(r.ptr - buf_);
    return *this;
  }
  std::string_view view() const { return {buf_, len_}; }

 private:
  char buf_[kMax + 1];
  size_t len_ = 0;
};

class TransferState {
 public:
  enum class Status { kPending, kDone, kFailed, kTimedOut };
  TransferState(uint64_t id, const OpName& what) : id_(id), what_(what) {}
  uint64_t id() const { return id_; }
  std::string what() const { return std::string(what_.view()); }
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
  const OpName what_;
  std::weak_ptr<ProgressDriver> driver_;
  std::atomic<bool> finished_{false};
  mutable Mutex mu_;
  CondVar cv_;
  Status status_ JG_GUARDED_BY(mu_) = Status::kPending;
  std::string error_ JG_GUARDED_BY(mu_);
  std::vector<std::function<void(Status, const std::string&)>> callbacks_ JG_GUARDED_BY(mu_);
};

}  // namespace jax_garden::fabric
