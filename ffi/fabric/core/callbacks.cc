#include "fabric/core/callbacks.h"

#include <cstdio>
#include <exception>

namespace jax_garden::fabric {

CallbackThread::CallbackThread() : thread_([this] { main(); }) { id_ = thread_.get_id(); }

CallbackThread::~CallbackThread() { stop(); }

void CallbackThread::post(std::function<void()> fn) {
  {
    MutexLock lk(mu_);
    if (stop_) return;
    queue_.push_back(std::move(fn));
  }
  cv_.notify_one();
}

void CallbackThread::stop() {
  {
    MutexLock lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (!thread_.joinable()) return;
  if (on_thread())
    thread_.detach();  // stop() from a callback: the thread ends once that callback returns
  else
    thread_.join();
}

void CallbackThread::main() {
  while (true) {
    std::function<void()> fn;
    {
      MutexLock lk(mu_);
      while (!stop_ && queue_.empty()) cv_.wait(mu_);
      if (queue_.empty()) return;  // stopping and drained
      fn = std::move(queue_.front());
      queue_.pop_front();
    }
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "jax_garden.fabric: callback raised: %s\n", e.what());
    }
  }
}

}  // namespace jax_garden::fabric
