// The one clock and deadline helper of the native code.
#pragma once

#include <chrono>

namespace jax_garden {

using Clock = std::chrono::steady_clock;

// `seconds` from now; a negative value means never (a wait without a bound).
inline Clock::time_point deadline_after(double seconds) {
  if (seconds < 0) return Clock::time_point::max();
  return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

inline Clock::duration seconds_to_duration(double seconds) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

inline double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

}  // namespace jax_garden
