// The narrow interfaces that the engine's value types (Transfer, ImmCounter, Watcher) use to reach
// the engine, declared below them so that they never call up into it.
#pragma once

#include <functional>

namespace jax_garden::fabric {

// What a waiter may do to hurry its own completion: make progress on its own thread.
class ProgressDriver {
 public:
  virtual ~ProgressDriver() = default;
  // One pass of posting and completion-queue polling, if nobody else is progressing right now.
  virtual bool poll_once() = 0;
  // A caller spins, polling inline: the worker naps meanwhile (two spinners only slow each other).
  virtual void inline_poll_begin() = 0;
  virtual void inline_poll_end() = 0;
  // A caller sleeps until something arrives: the worker polls at full rate meanwhile.
  virtual void sleeper_begin() = 0;
  virtual void sleeper_end() = 0;
};

// Runs callbacks on a thread of their own (never the progress worker).
class CallbackRunner {
 public:
  virtual ~CallbackRunner() = default;
  virtual void post(std::function<void()> fn) = 0;
};

struct InlinePollScope {
  ProgressDriver& driver;
  explicit InlinePollScope(ProgressDriver& d) : driver(d) { driver.inline_poll_begin(); }
  ~InlinePollScope() { driver.inline_poll_end(); }
};

struct SleeperScope {
  ProgressDriver& driver;
  explicit SleeperScope(ProgressDriver& d) : driver(d) { driver.sleeper_begin(); }
  ~SleeperScope() { driver.sleeper_end(); }
};

}  // namespace jax_garden::fabric
