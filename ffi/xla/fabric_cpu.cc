// XLA FFI handlers (CPU) for the fabric jit ops. They decode and delegate:
//   jg_fabric_signal: store a value into a watcher slot, in program order.
//   jg_fabric_wait:   block until an imm counter holds `count` credits, then take them.
// Both pass their remaining operands through, which is how callers order other work after them
// (signal's results alias its operands; wait copies its operands into its results after the wait,
// so consumers see memory that peers wrote before the imms arrived). The static_value /
// static_count attributes serve the CUDA handlers (fabric_cuda.cc); here the operands are used.
// Errors: handler_util.h's one mapping, as on CUDA.
#include <cstring>

#include "common/error.h"
#include "common/registry.h"
#include "fabric/core/imm_counter.h"
#include "fabric/core/watcher.h"
#include "xla/handler_util.h"

namespace ffi = xla::ffi;

namespace jax_garden::fabric {
namespace {

using handlers::FailedPrecondition;
using handlers::guarded;

// When XLA did not alias a pass-through operand with its result, copy it.
void copy_through(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  handlers::pass_through(args, rets, [](void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); });
}

ffi::Error SignalCpuImpl(uint64_t address,          // host address of a live watcher slot
                         int64_t static_value,      // (CUDA only)
                         ffi::Buffer<ffi::U32> value,  // scalar stored into the slot (zero-extended; jax defaults to 32 bits)
                         ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return guarded("fabric.signal: ", [&] {
    if (!is_live_watcher_slot(address)) {
      throw FailedPrecondition(
          str_cat("0x", std::hex, address, " is not a slot of a live watcher (was the watcher or engine closed?)"));
    }
    copy_through(args, rets);
    __atomic_store_n(reinterpret_cast<uint64_t*>(address), uint64_t{value.typed_data()[0]}, __ATOMIC_RELEASE);
  });
}

ffi::Error WaitCpuImpl(uint64_t counter_id,         // ImmCounter.id
                       double timeout,              // seconds; the engine's timeout by default
                       int64_t static_count,        // (CUDA only)
                       ffi::Buffer<ffi::S32> count,  // scalar: credits to take
                       ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return guarded("fabric.wait: ", [&] {
    auto counter = find_imm_counter(counter_id);
    if (!counter) throw FailedPrecondition(str_cat("imm counter id ", counter_id, " does not exist any more"));
    counter->wait(count.typed_data()[0], timeout);
    copy_through(args, rets);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kSignalCpu, SignalCpuImpl,
                              ffi::Ffi::Bind()
                                  .Attr<uint64_t>("address")
                                  .Attr<int64_t>("static_value")
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kWaitCpu, WaitCpuImpl,
                              ffi::Ffi::Bind()
                                  .Attr<uint64_t>("counter_id")
                                  .Attr<double>("timeout")
                                  .Attr<int64_t>("static_count")
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

JG_REGISTER_FFI_TARGET("jg_fabric_signal", "cpu", kSignalCpu);
JG_REGISTER_FFI_TARGET("jg_fabric_wait", "cpu", kWaitCpu);

}  // namespace jax_garden::fabric
