#include "fabric/transport/jobs.h"

#include "common/error.h"

namespace jax_garden::fabric {

void Part::finish(bool ok, const std::string& error) {
  if (finished_) return;
  finished_ = true;
  job_->part_finished(ok, error);
}

void Job::part_finished(bool ok, const std::string& error) {
  parts_finished++;
  if (!ok) {
    fail(TransferState::Status::kFailed, error);
  } else if (parts_finished == parts.size() && !failed) {
    state->finish(TransferState::Status::kDone);
  }
}

void Job::fail(TransferState::Status status, const std::string& error) {
  if (failed) return;
  failed = true;
  state->finish(status, error);
  for (auto& p : parts)
    if (!p->finished()) p->cancel();
}

bool Job::removable() const {
  if (parts_finished < parts.size()) return false;
  for (const auto& p : parts)
    if (!p->idle()) return false;
  return true;
}

bool FabricPart::advance() {
  if (finished_ || !op_) return false;
  if (cancelled_) {
    op_.reset();
    finish(false, "cancelled");
    return true;
  }
  in_flight_ = true;
  op_->on_done = [this](bool ok, const std::string& error) {
    progress_role.assert_held();  // run by the worker under its lock
    in_flight_ = false;
    finish(ok, error);
  };
  worker_.post_internal(std::move(op_));
  return true;
}

void JobRunner::submit(std::unique_ptr<Job> job) {
  job->state->set_driver(worker_);
  {
    MutexLock lk(inbox_mu_);
    inbox_.push_back(std::move(job));
    has_inbox_.store(true, std::memory_order_release);
  }
  worker_->wake();
}

void JobRunner::install(std::unique_ptr<Job> job) {
  if (worker_->stopped()) {
    job->state->finish(TransferState::Status::kFailed, "the engine is closed");
    return;
  }
  if (job->parts.empty()) {
    job->state->finish(TransferState::Status::kDone);
    return;
  }
  uint64_t id = job->state->id();
  jobs_.emplace(id, std::move(job));
}

bool JobRunner::busy() const { return !jobs_.empty() || has_inbox_.load(std::memory_order_acquire); }

bool JobRunner::advance_jobs() {
  bool progress = false;
  std::vector<uint64_t> done;
  for (auto& [id, job] : jobs_) {
    for (auto& p : job->parts)
      if (!p->finished()) progress |= p->advance();
    if (job->removable()) done.push_back(id);
  }
  for (uint64_t id : done) jobs_.erase(id);
  return progress || !done.empty();
}

bool JobRunner::advance(Clock::time_point now) {
  if (has_inbox_.load(std::memory_order_acquire)) {
    std::vector<std::unique_ptr<Job>> inbox;
    {
      MutexLock lk(inbox_mu_);
      inbox.swap(inbox_);
      has_inbox_.store(false, std::memory_order_release);
    }
    for (auto& j : inbox) install(std::move(j));
  }
  for (auto& [id, job] : jobs_) {
    if (job->failed || now < job->deadline) continue;
    job->fail(TransferState::Status::kTimedOut,
              str_cat("no completion within the engine timeout (", timeout_s_,
                      " s + size allowance); the peer may be dead or unreachable"));
  }
  return advance_jobs();
}

void JobRunner::close() {
  {
    MutexLock lk(inbox_mu_);
    for (auto& j : inbox_) j->state->finish(TransferState::Status::kFailed, "the engine was closed");
    inbox_.clear();
    has_inbox_.store(false);
  }
  for (auto& [id, job] : jobs_) job->state->finish(TransferState::Status::kFailed, "the engine was closed");
  jobs_.clear();  // destroys parts (copy jobs wait for nothing: their events are simply destroyed)
}

}  // namespace jax_garden::fabric
