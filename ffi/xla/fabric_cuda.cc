// XLA FFI handlers (CUDA) for the fabric jit ops; same target names and operands as the CPU ones.
// No host thread blocks and nothing synchronises the stream:
//   jg_fabric_signal: stores the value into a host-mapped watcher slot in stream order
//     (cuStreamWriteValue64 when the value is static, else a one-thread kernel that reads the device
//     scalar); the engine's watcher thread sees the store and runs the callback.
//   jg_fabric_wait: reserves `count` credits of the imm counter at enqueue time (the stream's
//     target = credits taken so far + count) and enqueues cuStreamWaitValue64(mirror >= target) on a
//     host-mapped word the engine's worker keeps equal to the counter's arrivals. If the target is
//     not reached within the timeout, the worker releases the stream and records an error that the
//     next fabric.wait / ImmCounter.wait / TransferEngine.check() raises.
// Not command-buffer compatible: the wait's target is computed on the host at enqueue time, so a
// captured CUDA graph would replay a stale target. Both therefore run as plain stream work.
// Errors: handler_util.h's one mapping, as on the CPU.
#include <cuda_runtime.h>

#include "common/error.h"
#include "common/registry.h"
#include "fabric/core/gpu_runtime.h"
#include "fabric/core/imm_counter.h"
#include "fabric/core/watcher.h"
#include "xla/handler_util.h"

namespace ffi = xla::ffi;

namespace jax_garden::fabric {
namespace {

using handlers::FailedPrecondition;
using handlers::guarded;

// Operands are copied into distinct results after the op (stream order), so consumers of the
// results see memory as it was after the signal / wait.
void copy_through(int device, cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  handlers::pass_through(args, rets, [&](void* dst, const void* src, size_t bytes) {
    gpu_runtime().stream_copy(device, stream, dst, src, bytes);
  });
}

ffi::Error SignalCudaImpl(cudaStream_t stream,           // the program's stream: the store is in its order
                          int32_t device,                // XLA's device ordinal of this call
                          uint64_t address,              // host address of a live watcher slot (host-mapped)
                          int64_t static_value,          // >= 0: stored with a stream memory op; < 0: use `value`
                          ffi::Buffer<ffi::U32> value,   // device scalar stored by a one-thread kernel
                          ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return guarded("fabric.signal (GPU): ", [&] {
    try {
      store_watcher_slot_on_stream(address, device, stream, static_value, value.untyped_data());
    } catch (const InvalidArgument& e) {
      // Its only InvalidArgument: the slot is gone or not host-mapped, a precondition as on the CPU.
      throw FailedPrecondition(e.what());
    }
    copy_through(device, stream, args, rets);
  });
}

ffi::Error WaitCudaImpl(cudaStream_t stream,           // the program's stream: it waits, no host thread does
                        int32_t device,                // XLA's device ordinal of this call
                        uint64_t counter_id,           // ImmCounter.id
                        double timeout,                // seconds; then the stream is released with an error
                        int64_t static_count,          // credits to take (>= 0; a traced count is refused)
                        ffi::Buffer<ffi::S32> count,   // (CPU only)
                        ffi::RemainingArgs args, ffi::RemainingRets rets) {
  return guarded("fabric.wait (GPU): ", [&] {
    auto counter = find_imm_counter(counter_id);
    if (!counter) throw FailedPrecondition(str_cat("imm counter id ", counter_id, " does not exist any more"));
    JG_CHECK_ARG(static_count >= 0,
                 "needs a static count (a Python int): the credits are reserved when the wait is enqueued, "
                 "without reading device memory");
    counter->enqueue_gpu_wait(stream, static_count, timeout);
    copy_through(device, stream, args, rets);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(kSignalCuda, SignalCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<uint64_t>("address")
                                  .Attr<int64_t>("static_value")
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(kWaitCuda, WaitCudaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Attr<uint64_t>("counter_id")
                                  .Attr<double>("timeout")
                                  .Attr<int64_t>("static_count")
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

JG_REGISTER_FFI_TARGET("jg_fabric_signal", "CUDA", kSignalCuda);
JG_REGISTER_FFI_TARGET("jg_fabric_wait", "CUDA", kWaitCuda);

}  // namespace jax_garden::fabric
