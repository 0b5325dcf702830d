#include "fabric/core/transfer.h"

#include "common/deadline.h"
#include "common/error.h"

namespace jax_garden::fabric {

bool TransferState::finish(Status status, const std::string& error) {
  std::vector<std::function<void(Status, const std::string&)>> cbs;
  {
    MutexLock lk(mu_);
    if (status_ != Status::kPending) return false;
    status_ = status;
    error_ = error;
    finished_.store(true, std::memory_order_release);
    cbs.swap(callbacks_);
  }
  cv_.notify_all();
  for (auto& cb : cbs) cb(status, error);
  return true;
}

void TransferState::wait(double timeout_s) {
  // A short spin polling the completion queues on this thread: a local completion is reaped
  // without a handoff to the worker thread.
  if (!finished()) {
    if (auto driver = driver_.lock()) {
      InlinePollScope scope(*driver);
      auto spin_until = Clock::now() + std::chrono::microseconds(1000);
      while (!finished() && Clock::now() < spin_until) driver->poll_once();
    }
  }
  auto deadline = deadline_after(timeout_s);
  MutexLock lk(mu_);
  while (status_ == Status::kPending) {
    if (cv_.wait_until(mu_, deadline) == std::cv_status::timeout && status_ == Status::kPending) {
      throw Timeout(str_cat(what_.view(), ": not complete after ", timeout_s, " s (still pending; wait again or close)"));
    }
  }
  if (status_ == Status::kFailed) throw TransferFailed(str_cat(what_.view(), " failed: ", error_));
  if (status_ == Status::kTimedOut) throw Timeout(str_cat(what_.view(), " timed out: ", error_));
}

TransferState::Status TransferState::status() const {
  MutexLock lk(mu_);
  return status_;
}

std::string TransferState::error() const {
  MutexLock lk(mu_);
  return error_;
}

void TransferState::on_finish(std::function<void(Status, const std::string&)> cb) {
  Status s;
  std::string e;
  {
    MutexLock lk(mu_);
    if (status_ == Status::kPending) {
      callbacks_.push_back(std::move(cb));
      return;
    }
    s = status_;
    e = error_;
  }
  cb(s, e);
}

}  // namespace jax_garden::fabric
