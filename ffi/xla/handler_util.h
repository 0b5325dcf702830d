// Helpers shared by the XLA FFI handlers of every op family (ffi/xla/*.cc): operand checks whose
// messages name the target, the operand and the wrong value, and the one mapping from our C++
// exceptions (common/error.h) to FFI error codes. Handlers decode and delegate; these keep the
// decoding short.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "common/error.h"
// The XLA headers are not warning-clean under -Wall -Wextra; keep our own diagnostics on.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wreturn-type"
#include "xla/ffi/api/ffi.h"
#pragma GCC diagnostic pop

namespace jax_garden::handlers {

// What a handler found gone that the program was built against (a closed watcher, an imm counter of
// a closed engine): FAILED_PRECONDITION, not a bad argument.
struct FailedPrecondition : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// numpy's name of an FFI element type ("another dtype" for those our ops never take).
inline const char* dtype_name(xla::ffi::DataType t) {
  using xla::ffi::DataType;
  switch (t) {
    case DataType::PRED: return "bool";
    case DataType::S8: return "int8";
    case DataType::S16: return "int16";
    case DataType::S32: return "int32";
    case DataType::S64: return "int64";
    case DataType::U8: return "uint8";
    case DataType::U16: return "uint16";
    case DataType::U32: return "uint32";
    case DataType::U64: return "uint64";
    case DataType::F16: return "float16";
    case DataType::F32: return "float32";
    case DataType::F64: return "float64";
    case DataType::BF16: return "bfloat16";
    case DataType::F8E4M3FN: return "float8_e4m3fn";
    case DataType::F8E5M2: return "float8_e5m2";
    default: return "another dtype";
  }
}

// A shape as numpy prints it: (), (4,), (4, 32).
template <typename Dims>
std::string dims_string(const Dims& dims) {
  std::string s = "(";
  size_t i = 0;
  for (int64_t d : dims) s += (i++ ? ", " : "") + std::to_string(d);
  return s + (i == 1 ? ",)" : ")");
}

// "" when `buffer` has element type `want` and exactly the dimensions `want_dims`; otherwise a
// message "target: name is float32(4, 16), expected bfloat16(4, 32)".
inline std::string check_buffer(const char* target, const char* name, const xla::ffi::AnyBuffer& buffer,
                                xla::ffi::DataType want, std::initializer_list<int64_t> want_dims) {
  const auto dims = buffer.dimensions();
  bool same = buffer.element_type() == want && dims.size() == want_dims.size();
  size_t i = 0;
  for (int64_t w : want_dims) same = same && dims[i++] == w;
  if (same) return {};
  return str_cat(target, ": ", name, " is ", dtype_name(buffer.element_type()), dims_string(dims), ", expected ",
                 dtype_name(want), dims_string(want_dims));
}

// The value of a one-element operand of element type `want` (C++ type T); throws InvalidArgument
// "target: operand what must hold one int32, got 2 elements of float32" otherwise.
template <typename T>
T scalar_operand(const char* target, const char* what, const xla::ffi::AnyBuffer& buffer, xla::ffi::DataType want) {
  if (buffer.element_type() != want || buffer.element_count() != 1) {
    throw InvalidArgument(str_cat(target, ": operand ", what, " must hold one ", dtype_name(want), ", got ",
                                  buffer.element_count(), " elements of ", dtype_name(buffer.element_type())));
  }
  return *static_cast<const T*>(buffer.untyped_data());
}

// The one mapping, for CPU and CUDA handlers alike, from an exception of ours to an FFI error:
// InvalidArgument -> INVALID_ARGUMENT, FailedPrecondition -> FAILED_PRECONDITION, Timeout ->
// DEADLINE_EXCEEDED, TransferFailed -> ABORTED, anything else -> INTERNAL; the message is
// `prefix` + what(). Call inside a catch.
inline xla::ffi::Error error_from_current_exception(const char* prefix = "") {
  using xla::ffi::ErrorCode;
  try {
    throw;
  } catch (const InvalidArgument& e) {
    return xla::ffi::Error(ErrorCode::kInvalidArgument, str_cat(prefix, e.what()));
  } catch (const FailedPrecondition& e) {
    return xla::ffi::Error(ErrorCode::kFailedPrecondition, str_cat(prefix, e.what()));
  } catch (const Timeout& e) {
    return xla::ffi::Error(ErrorCode::kDeadlineExceeded, str_cat(prefix, e.what()));
  } catch (const TransferFailed& e) {
    return xla::ffi::Error(ErrorCode::kAborted, str_cat(prefix, e.what()));
  } catch (const std::exception& e) {
    return xla::ffi::Error(ErrorCode::kInternal, str_cat(prefix, e.what()));
  } catch (...) {
    return xla::ffi::Error(ErrorCode::kInternal, str_cat(prefix, "unknown C++ exception"));
  }
}

// Runs `body` (returning void); exceptions never cross the FFI boundary. With `prefix`, every
// message starts with it (the op's name: "fabric.wait: ").
template <typename F>
xla::ffi::Error guarded(const char* prefix, F&& body) {
  try {
    body();
    return xla::ffi::Error::Success();
  } catch (...) {
    return error_from_current_exception(prefix);
  }
}
template <typename F>
xla::ffi::Error guarded(F&& body) {
  return guarded("", std::forward<F>(body));
}

// The operands a jit op passes through to its results (args[i] -> rets[i], which is how callers
// order other work after the op): `copy(dst, src, bytes)` for every non-empty pair XLA did not
// alias. Throws InvalidArgument when they do not pair up.
template <typename Copy>
void pass_through(xla::ffi::RemainingArgs args, xla::ffi::RemainingRets rets, Copy&& copy) {
  if (args.size() != rets.size()) {
    throw InvalidArgument(str_cat("pass-through operands (", args.size(), ") and results (", rets.size(), ") differ"));
  }
  for (size_t i = 0; i < args.size(); ++i) {
    auto in = args.get<xla::ffi::AnyBuffer>(i);
    auto out = rets.get<xla::ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value()) throw InvalidArgument("pass-through operand is not a buffer");
    if (in->untyped_data() != (*out)->untyped_data() && in->size_bytes() > 0) {
      copy((*out)->untyped_data(), in->untyped_data(), in->size_bytes());
    }
  }
}

}  // namespace jax_garden::handlers

// Returns INVALID_ARGUMENT with the message when a check_buffer(...) expression is not "".
#define JG_FFI_RETURN_IF_BAD(expr)                                                       \
  do {                                                                                   \
    std::string jg_ffi_message_ = (expr);                                                \
    if (!jg_ffi_message_.empty()) return ::xla::ffi::Error::InvalidArgument(std::move(jg_ffi_message_)); \
  } while (0)
