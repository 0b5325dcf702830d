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
#include <cuda_runtime.h>

#include <chrono>

#include "common/error.h"
#include "common/registry.h"
#include "fabric/gpu_runtime.h"
#include "fabric/imm_counter.h"
#include "fabric/watcher.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_garden::fabric {
namespace {

// Operands are copied into distinct results after the op (stream order), so consumers of the
// results see memory as it was after the signal / wait.
ffi::Error pass_through(int device, cudaStream_t stream, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  if (args.size() != rets.size()) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      str_cat("pass-through operands (", args.size(), ") and results (", rets.size(), ") differ"));
  }
  try {
    for (size_t i = 0; i < args.size(); ++i) {
      auto in = args.get<ffi::AnyBuffer>(i);
      auto out = rets.get<ffi::AnyBuffer>(i);
      if (!in.has_value() || !out.has_value()) return ffi::Error::InvalidArgument("pass-through operand is not a buffer");
      if (in->untyped_data() != (*out)->untyped_data() && in->size_bytes()) {
        gpu_runtime().stream_copy(device, stream, (*out)->untyped_data(), in->untyped_data(), in->size_bytes());
      }
    }
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

ffi::Error SignalCudaImpl(cudaStream_t stream, int32_t device, uint64_t address, int64_t static_value,
                          ffi::Buffer<ffi::U32> value, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  try {
    store_watcher_slot_on_stream(address, device, stream, static_value, value.untyped_data());
  } catch (const InvalidArgument& e) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, str_cat("fabric.signal (GPU): ", e.what()));
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, str_cat("fabric.signal (GPU): ", e.what()));
  }
  return pass_through(device, stream, args, rets);
}

ffi::Error WaitCudaImpl(cudaStream_t stream, int32_t device, uint64_t counter_id, double timeout, int64_t static_count,
                        ffi::Buffer<ffi::S32> count, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  auto counter = find_imm_counter(counter_id);
  if (!counter) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      str_cat("fabric.wait: imm counter id ", counter_id, " does not exist any more"));
  }
  if (static_count < 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "fabric.wait on GPU needs a static count (a Python int): the credits are reserved when the "
                      "wait is enqueued, without reading device memory");
  }
  try {
    counter->enqueue_gpu_wait(stream, static_count, timeout);
  } catch (const TransferFailed& e) {
    return ffi::Error(ffi::ErrorCode::kAborted, str_cat("fabric.wait: ", e.what()));
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, str_cat("fabric.wait (GPU): ", e.what()));
  }
  return pass_through(device, stream, args, rets);
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
