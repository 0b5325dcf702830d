// The engine's callback thread: user callbacks (imm counter on_count, watcher changes) and the
// release of Python objects run here, never on the progress worker.
#pragma once

#include <deque>
#include <functional>
#include <thread>

#include "common/thread_annotations.h"
#include "fabric/core/progress.h"

namespace jax_garden::fabric {

class CallbackThread final : public CallbackRunner {
 public:
  CallbackThread();
  ~CallbackThread() override;
  void post(std::function<void()> fn) override;  // dropped after stop()
  // Runs what is queued, then ends the thread (detaches it when called from a callback).
  void stop();
  bool on_thread() const { return std::this_thread::get_id() == id_; }

 private:
  void main();
  Mutex mu_;
  CondVar cv_;
  std::deque<std::function<void()>> queue_ JG_GUARDED_BY(mu_);
  bool stop_ JG_GUARDED_BY(mu_) = false;
  std::thread thread_;
  std::thread::id id_;
};

}  // namespace jax_garden::fabric
