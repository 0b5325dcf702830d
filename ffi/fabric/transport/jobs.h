// Jobs: user operations with at least one destination outside plain RMA (CUDA IPC, staging). A job
// has parts (one per destination path: a group of RMA targets, an IPC copy, a staged stream); it
// finishes when every part did, and fails at the first failed part or at its deadline. It is
// destroyed only once every part is idle (nothing of it in flight), so buffers and contexts never
// dangle. The JobRunner owns the jobs and advances them in the worker's passes.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "fabric/core/worker.h"

namespace jax_garden::fabric {

struct Job;

class Part {
 public:
  explicit Part(Job* job) : job_(job) {}
  virtual ~Part() = default;
  virtual bool advance() JG_REQUIRES_PROGRESS = 0;  // progress; true if something happened
  virtual bool idle() const JG_REQUIRES_PROGRESS = 0;  // nothing of this part is in flight
  virtual void cancel() JG_REQUIRES_PROGRESS { cancelled_ = true; }
  bool finished() const { return finished_; }

 protected:
  void finish(bool ok, const std::string& error) JG_REQUIRES_PROGRESS;
  Job* job_;
  bool cancelled_ = false;
  bool finished_ = false;
};

struct Job {
  std::shared_ptr<TransferState> state;
  Clock::time_point deadline;
  std::shared_ptr<MemoryRegion> src;
  std::vector<std::unique_ptr<Part>> parts;
  size_t parts_finished = 0;
  bool failed = false;

  void part_finished(bool ok, const std::string& error) JG_REQUIRES_PROGRESS;
  void fail(TransferState::Status status, const std::string& error) JG_REQUIRES_PROGRESS;
  bool removable() const JG_REQUIRES_PROGRESS;
};

// The plain RMA targets of a mixed scatter: one internal op.
class FabricPart final : public Part {
 public:
  FabricPart(Job* job, std::unique_ptr<Op> op, Worker& worker) : Part(job), worker_(worker), op_(std::move(op)) {}
  bool advance() override JG_REQUIRES_PROGRESS;
  bool idle() const override JG_REQUIRES_PROGRESS { return !in_flight_; }

 private:
  Worker& worker_;  // posts the op
  std::unique_ptr<Op> op_;
  bool in_flight_ = false;
};

class JobRunner final : public WorkerTask {
 public:
  // worker: drives the jobs' states and runs this task; timeout_s: the engine timeout (for errors).
  JobRunner(std::shared_ptr<Worker> worker, double timeout_s) : worker_(std::move(worker)), timeout_s_(timeout_s) {}
  // Any thread: the job starts in the worker's next pass.
  void submit(std::unique_ptr<Job> job) JG_EXCLUDES(progress_role);
  bool advance(Clock::time_point now) override JG_REQUIRES_PROGRESS;
  bool busy() const override JG_REQUIRES_PROGRESS;
  void close() JG_REQUIRES_PROGRESS;  // engine close: fail and drop every job

 private:
  void install(std::unique_ptr<Job> job) JG_REQUIRES_PROGRESS;
  bool advance_jobs() JG_REQUIRES_PROGRESS;

  const std::shared_ptr<Worker> worker_;
  const double timeout_s_;
  Mutex inbox_mu_;
  std::vector<std::unique_ptr<Job>> inbox_ JG_GUARDED_BY(inbox_mu_);
  std::atomic<bool> has_inbox_{false};
  std::map<uint64_t, std::unique_ptr<Job>> jobs_ JG_GUARDED_BY_PROGRESS;  // by id: submission order
};

}  // namespace jax_garden::fabric
