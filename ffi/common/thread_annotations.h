// Clang thread-safety annotations (no-ops for other compilers) and a mutex type that carries them,
// so that `clang -Wthread-safety` checks who may touch guarded state (.ci/thread_safety.sh).
// libstdc++'s std::mutex is not annotated, hence the small wrappers.
#pragma once

#include <condition_variable>
#include <mutex>

#if defined(__clang__)
#define JG_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define JG_THREAD_ANNOTATION(x)
#endif

#define JG_CAPABILITY(x) JG_THREAD_ANNOTATION(capability(x))
#define JG_SCOPED_CAPABILITY JG_THREAD_ANNOTATION(scoped_lockable)
#define JG_GUARDED_BY(x) JG_THREAD_ANNOTATION(guarded_by(x))
#define JG_PT_GUARDED_BY(x) JG_THREAD_ANNOTATION(pt_guarded_by(x))
#define JG_REQUIRES(...) JG_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define JG_EXCLUDES(...) JG_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define JG_ACQUIRE(...) JG_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define JG_TRY_ACQUIRE(...) JG_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
#define JG_RELEASE(...) JG_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define JG_ASSERT_CAPABILITY(x) JG_THREAD_ANNOTATION(assert_capability(x))
#define JG_RETURN_CAPABILITY(x) JG_THREAD_ANNOTATION(lock_returned(x))
#define JG_NO_THREAD_SAFETY_ANALYSIS JG_THREAD_ANNOTATION(no_thread_safety_analysis)

namespace jax_garden {

class JG_CAPABILITY("mutex") Mutex {
 public:
  void lock() JG_ACQUIRE() { m_.lock(); }
  void unlock() JG_RELEASE() { m_.unlock(); }
  bool try_lock() JG_TRY_ACQUIRE(true) { return m_.try_lock(); }
  // For condition variables (std::condition_variable_any waits on the Mutex itself).
  std::mutex& native() { return m_; }

 private:
  std::mutex m_;
};

class JG_SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& m) JG_ACQUIRE(m) : m_(m) { m_.lock(); }
  // Takes over a mutex the caller already locked (after a successful try_lock()).
  MutexLock(Mutex& m, std::adopt_lock_t) JG_REQUIRES(m) : m_(m) {}
  ~MutexLock() JG_RELEASE() { m_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& m_;
};

using CondVar = std::condition_variable_any;

}  // namespace jax_garden
