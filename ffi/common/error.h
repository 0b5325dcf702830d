// Error types shared by the native layers. Python sees them as:
//   InvalidArgument -> ValueError, TimeoutError -> TimeoutError, TransferError -> fabric.TransferError,
//   FabricError (a libfabric call failed) -> RuntimeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace jax_garden {

struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct Timeout : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct TransferFailed : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct FabricError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Concatenates its arguments with operator<< (for messages that carry the wrong values).
template <typename... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace jax_garden

#define JG_CHECK_ARG(cond, ...) \
  do {                          \
    if (!(cond)) throw ::jax_garden::InvalidArgument(::jax_garden::str_cat(__VA_ARGS__)); \
  } while (0)
