// XLA FFI handlers of the MoE dispatch/combine for platform "CUDA" (contract: docs/moe-ffi.md).
// Decode, check shapes against the context, launch, nothing else: no host synchronisation, no
// allocation, identical launches on every call, hence kCmdBufferCompatible (CUDA graphs).
#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "common/error.h"
#include "common/registry.h"
#include "moe/cuda_all_to_all.h"
#include "moe/nvlink_kernels.h"
#include "moe/nvlink_protocol.h"
#include "xla/handler_util.h"

namespace ffi = xla::ffi;

namespace jax_garden::moe {
namespace {

using handlers::check_buffer;

struct Resolved {
  std::shared_ptr<CudaAllToAll> ctx;
  int ordinal = -1;  // the device of this call's rank, in our runtime's numbering
};

ffi::Error resolve(const char* target, uint64_t id, int32_t ordinal, Resolved* out) {
  out->ctx = cuda_contexts().find(id);
  if (!out->ctx) {
    return ffi::Error::InvalidArgument(
        str_cat(target, ": unknown context_id ", id, " (closed, or created in another process)"));
  }
  // Our runtime's number of this call's device, found once per XLA ordinal (cudaGetDevice on the
  // first call only: no runtime call in the steady state).
  out->ordinal = out->ctx->runtime_ordinal(ordinal);
  if (out->ordinal < 0) {
    int current = -1;
    (void)cudaGetDevice(&current);
    std::string have;
    for (int o : out->ctx->ordinals()) have += (have.empty() ? "" : ", ") + std::to_string(o);
    return ffi::Error::InvalidArgument(str_cat(target, ": device ordinal ", ordinal, " (current CUDA device ",
                                               current, ") holds no rank of context ", id,
                                               " (ranks on CUDA devices [", have, "])"));
  }
  out->ctx->count_handler_call();
  // A wait that timed out earlier (or another sticky error) fails every later call loudly.
  std::string msg;
  if (out->ctx->error_code(&msg) != kErrNone) return ffi::Error(ffi::ErrorCode::kInternal, std::move(msg));
  return ffi::Error::Success();
}

ffi::Error launch_result(const char* target, int err) {
  if (err == 0) return ffi::Error::Success();
  const auto e = static_cast<cudaError_t>(err);
  return ffi::Error(ffi::ErrorCode::kInternal,
                    str_cat(target, ": kernel launch failed: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e)));
}

ffi::DataType dispatch_ffi_dtype(const CudaAllToAll& ctx) {
  return ctx.dispatch_dtype() == DType::kF8E4M3FN ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16;
}

ffi::Error dispatch_send(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer x, ffi::AnyBuffer x_scale,
                         ffi::AnyBuffer indices, ffi::AnyBuffer weights, ffi::AnyBuffer bound_m, ffi::AnyBuffer rank,
                         ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  constexpr const char* kT = "jg_moe_dispatch_send";
  Resolved r;
  if (ffi::Error e = resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const MoeShape& s = r.ctx->shape();
  const int64_t T = s.max_tokens, H = s.hidden, K = s.experts_per_token, S = s.scale_cols;
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "x", x, dispatch_ffi_dtype(*r.ctx), {T, H}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "x_scale", x_scale, ffi::DataType::F32, {T, S}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "indices", indices, ffi::DataType::S32, {T, K}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "weights", weights, ffi::DataType::F32, {T, K}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "bound_m", bound_m, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "rank", rank, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "send_done", *send_done, ffi::DataType::U32, {1}));
  return launch_result(kT, r.ctx->dispatch_send(r.ordinal, stream, x.untyped_data(),
                                                static_cast<const float*>(x_scale.untyped_data()),
                                                static_cast<const int32_t*>(indices.untyped_data()),
                                                static_cast<const int32_t*>(bound_m.untyped_data()),
                                                static_cast<const int32_t*>(rank.untyped_data()),
                                                static_cast<uint32_t*>(send_done->untyped_data())));
}

ffi::Error dispatch_recv(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer send_done, ffi::AnyBuffer rank,
                         ffi::Result<ffi::AnyBuffer> expert_x, ffi::Result<ffi::AnyBuffer> expert_scale,
                         ffi::Result<ffi::AnyBuffer> expert_counts, uint64_t context_id) {
  constexpr const char* kT = "jg_moe_dispatch_recv";
  Resolved r;
  if (ffi::Error e = resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const MoeShape& s = r.ctx->shape();
  const int64_t M = s.max_recv_tokens, H = s.hidden, S = s.scale_cols, L = s.local_experts();
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "send_done", send_done, ffi::DataType::U32, {1}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "rank", rank, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_x", *expert_x, dispatch_ffi_dtype(*r.ctx), {M, H}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_scale", *expert_scale, ffi::DataType::F32, {M, S}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_counts", *expert_counts, ffi::DataType::S32, {L}));
  return launch_result(kT, r.ctx->dispatch_recv(r.ordinal, stream,
                                                static_cast<const uint32_t*>(send_done.untyped_data()),
                                                static_cast<const int32_t*>(rank.untyped_data()),
                                                expert_x->untyped_data(),
                                                static_cast<float*>(expert_scale->untyped_data()),
                                                static_cast<int32_t*>(expert_counts->untyped_data())));
}

ffi::Error combine_send(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer expert_y, ffi::AnyBuffer expert_counts,
                        ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  constexpr const char* kT = "jg_moe_combine_send";
  Resolved r;
  if (ffi::Error e = resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const MoeShape& s = r.ctx->shape();
  const int64_t M = s.max_recv_tokens, H = s.hidden, L = s.local_experts();
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_y", expert_y, ffi::DataType::BF16, {M, H}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_counts", expert_counts, ffi::DataType::S32, {L}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "rank", rank, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "send_done", *send_done, ffi::DataType::U32, {1}));
  return launch_result(kT, r.ctx->combine_send(r.ordinal, stream, expert_y.untyped_data(),
                                               static_cast<const int32_t*>(expert_counts.untyped_data()),
                                               static_cast<const int32_t*>(rank.untyped_data()),
                                               static_cast<uint32_t*>(send_done->untyped_data())));
}

ffi::Error combine_recv(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer send_done, ffi::AnyBuffer indices,
                        ffi::AnyBuffer weights, ffi::AnyBuffer bound_m, ffi::AnyBuffer rank,
                        ffi::Result<ffi::AnyBuffer> y, uint64_t context_id) {
  constexpr const char* kT = "jg_moe_combine_recv";
  Resolved r;
  if (ffi::Error e = resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const MoeShape& s = r.ctx->shape();
  const int64_t T = s.max_tokens, H = s.hidden, K = s.experts_per_token;
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "send_done", send_done, ffi::DataType::U32, {1}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "indices", indices, ffi::DataType::S32, {T, K}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "weights", weights, ffi::DataType::F32, {T, K}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "bound_m", bound_m, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "rank", rank, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "y", *y, ffi::DataType::BF16, {T, H}));
  return launch_result(kT, r.ctx->combine_recv(r.ordinal, stream,
                                               static_cast<const uint32_t*>(send_done.untyped_data()),
                                               static_cast<const int32_t*>(indices.untyped_data()),
                                               static_cast<const float*>(weights.untyped_data()),
                                               static_cast<const int32_t*>(bound_m.untyped_data()),
                                               static_cast<const int32_t*>(rank.untyped_data()), y->untyped_data()));
}

// dispatch() in one call: dispatch_send's operands, dispatch_recv's results, and the send token
// (written as dispatch_send would; the context may run both halves as one kernel).
ffi::Error dispatch(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer x, ffi::AnyBuffer x_scale,
                    ffi::AnyBuffer indices, ffi::AnyBuffer weights, ffi::AnyBuffer bound_m, ffi::AnyBuffer rank,
                    ffi::Result<ffi::AnyBuffer> expert_x, ffi::Result<ffi::AnyBuffer> expert_scale,
                    ffi::Result<ffi::AnyBuffer> expert_counts, ffi::Result<ffi::AnyBuffer> send_done,
                    uint64_t context_id) {
  constexpr const char* kT = "jg_moe_dispatch";
  Resolved r;
  if (ffi::Error e = resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const MoeShape& s = r.ctx->shape();
  const int64_t T = s.max_tokens, H = s.hidden, K = s.experts_per_token, S = s.scale_cols, M = s.max_recv_tokens,
                L = s.local_experts();
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "x", x, dispatch_ffi_dtype(*r.ctx), {T, H}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "x_scale", x_scale, ffi::DataType::F32, {T, S}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "indices", indices, ffi::DataType::S32, {T, K}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "weights", weights, ffi::DataType::F32, {T, K}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "bound_m", bound_m, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "rank", rank, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_x", *expert_x, dispatch_ffi_dtype(*r.ctx), {M, H}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_scale", *expert_scale, ffi::DataType::F32, {M, S}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_counts", *expert_counts, ffi::DataType::S32, {L}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "send_done", *send_done, ffi::DataType::U32, {1}));
  return launch_result(kT, r.ctx->dispatch(r.ordinal, stream, x.untyped_data(),
                                           static_cast<const float*>(x_scale.untyped_data()),
                                           static_cast<const int32_t*>(indices.untyped_data()),
                                           static_cast<const int32_t*>(bound_m.untyped_data()),
                                           static_cast<const int32_t*>(rank.untyped_data()), expert_x->untyped_data(),
                                           static_cast<float*>(expert_scale->untyped_data()),
                                           static_cast<int32_t*>(expert_counts->untyped_data()),
                                           static_cast<uint32_t*>(send_done->untyped_data())));
}

// combine() in one call: combine_send's and combine_recv's operands, y and the send token.
ffi::Error combine(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer expert_y, ffi::AnyBuffer expert_counts,
                   ffi::AnyBuffer indices, ffi::AnyBuffer weights, ffi::AnyBuffer bound_m, ffi::AnyBuffer rank,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  constexpr const char* kT = "jg_moe_combine";
  Resolved r;
  if (ffi::Error e = resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const MoeShape& s = r.ctx->shape();
  const int64_t T = s.max_tokens, H = s.hidden, K = s.experts_per_token, M = s.max_recv_tokens,
                L = s.local_experts();
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_y", expert_y, ffi::DataType::BF16, {M, H}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "expert_counts", expert_counts, ffi::DataType::S32, {L}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "indices", indices, ffi::DataType::S32, {T, K}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "weights", weights, ffi::DataType::F32, {T, K}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "bound_m", bound_m, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "rank", rank, ffi::DataType::S32, {}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "y", *y, ffi::DataType::BF16, {T, H}));
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "send_done", *send_done, ffi::DataType::U32, {1}));
  return launch_result(kT, r.ctx->combine(r.ordinal, stream, expert_y.untyped_data(),
                                          static_cast<const int32_t*>(expert_counts.untyped_data()),
                                          static_cast<const int32_t*>(indices.untyped_data()),
                                          static_cast<const float*>(weights.untyped_data()),
                                          static_cast<const int32_t*>(bound_m.untyped_data()),
                                          static_cast<const int32_t*>(rank.untyped_data()), y->untyped_data(),
                                          static_cast<uint32_t*>(send_done->untyped_data())));
}

// Benchmark helper: writes the device's globaltimer (ns, as two uint32 words: low, high; jax
// without x64 has no uint64) when the stream reaches it. The operand only orders it after the
// values it depends on.
ffi::Error timestamp(cudaStream_t stream, ffi::AnyBuffer after, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kT = "jg_moe_cuda_timestamp";
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "out", *out, ffi::DataType::U32, {2}));
  return launch_result(kT, launch_timestamp(stream, static_cast<uint64_t*>(out->untyped_data())));
}

// Setup helper (eager, outside jit): which device this XLA device is, as XLA numbers it
// (DeviceOrdinal) and as our CUDA runtime numbers it (cudaGetDevice); the context allocates
// with the latter. Writes int32[2] = {DeviceOrdinal, cudaGetDevice()}.
ffi::Error device_info(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer after, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kT = "jg_moe_cuda_device_info";
  JG_FFI_RETURN_IF_BAD(check_buffer(kT, "out", *out, ffi::DataType::S32, {2}));
  int current = -1;
  if (const cudaError_t e = cudaGetDevice(&current); e != cudaSuccess) return launch_result(kT, e);
  return launch_result(kT, launch_write_ints(stream, static_cast<int32_t*>(out->untyped_data()), ordinal, current));
}

}  // namespace
}  // namespace jax_garden::moe

namespace jgm = jax_garden::moe;

XLA_FFI_DEFINE_HANDLER(kMoeDeviceInfoCuda, jgm::device_info,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()    // after (ordering only)
                           .Ret<ffi::AnyBuffer>());  // out: s32[2]

#define JG_MOE_BINDING_DISPATCH_SEND                                  \
  ffi::Ffi::Bind()                                                    \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                       \
      .Ctx<ffi::DeviceOrdinal>()                                      \
      .Arg<ffi::AnyBuffer>() /* x */                                  \
      .Arg<ffi::AnyBuffer>() /* x_scale */                            \
      .Arg<ffi::AnyBuffer>() /* indices */                            \
      .Arg<ffi::AnyBuffer>() /* weights */                            \
      .Arg<ffi::AnyBuffer>() /* bound_m */                            \
      .Arg<ffi::AnyBuffer>() /* rank */                               \
      .Ret<ffi::AnyBuffer>() /* send_done */                          \
      .Attr<uint64_t>("context_id")
#define JG_MOE_BINDING_DISPATCH_RECV                                  \
  ffi::Ffi::Bind()                                                    \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                       \
      .Ctx<ffi::DeviceOrdinal>()                                      \
      .Arg<ffi::AnyBuffer>() /* send_done */                          \
      .Arg<ffi::AnyBuffer>() /* rank */                               \
      .Ret<ffi::AnyBuffer>() /* expert_x */                           \
      .Ret<ffi::AnyBuffer>() /* expert_scale */                       \
      .Ret<ffi::AnyBuffer>() /* expert_counts */                      \
      .Attr<uint64_t>("context_id")
#define JG_MOE_BINDING_COMBINE_SEND                                   \
  ffi::Ffi::Bind()                                                    \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                       \
      .Ctx<ffi::DeviceOrdinal>()                                      \
      .Arg<ffi::AnyBuffer>() /* expert_y */                           \
      .Arg<ffi::AnyBuffer>() /* expert_counts */                      \
      .Arg<ffi::AnyBuffer>() /* rank */                               \
      .Ret<ffi::AnyBuffer>() /* send_done */                          \
      .Attr<uint64_t>("context_id")
#define JG_MOE_BINDING_COMBINE_RECV                                   \
  ffi::Ffi::Bind()                                                    \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                       \
      .Ctx<ffi::DeviceOrdinal>()                                      \
      .Arg<ffi::AnyBuffer>() /* send_done */                          \
      .Arg<ffi::AnyBuffer>() /* indices */                            \
      .Arg<ffi::AnyBuffer>() /* weights */                            \
      .Arg<ffi::AnyBuffer>() /* bound_m */                            \
      .Arg<ffi::AnyBuffer>() /* rank */                               \
      .Ret<ffi::AnyBuffer>() /* y */                                  \
      .Attr<uint64_t>("context_id")

#define JG_MOE_BINDING_DISPATCH                                       \
  ffi::Ffi::Bind()                                                    \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                       \
      .Ctx<ffi::DeviceOrdinal>()                                      \
      .Arg<ffi::AnyBuffer>() /* x */                                  \
      .Arg<ffi::AnyBuffer>() /* x_scale */                            \
      .Arg<ffi::AnyBuffer>() /* indices */                            \
      .Arg<ffi::AnyBuffer>() /* weights */                            \
      .Arg<ffi::AnyBuffer>() /* bound_m */                            \
      .Arg<ffi::AnyBuffer>() /* rank */                               \
      .Ret<ffi::AnyBuffer>() /* expert_x */                           \
      .Ret<ffi::AnyBuffer>() /* expert_scale */                       \
      .Ret<ffi::AnyBuffer>() /* expert_counts */                      \
      .Ret<ffi::AnyBuffer>() /* send_done */                          \
      .Attr<uint64_t>("context_id")
#define JG_MOE_BINDING_COMBINE                                        \
  ffi::Ffi::Bind()                                                    \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                       \
      .Ctx<ffi::DeviceOrdinal>()                                      \
      .Arg<ffi::AnyBuffer>() /* expert_y */                           \
      .Arg<ffi::AnyBuffer>() /* expert_counts */                      \
      .Arg<ffi::AnyBuffer>() /* indices */                            \
      .Arg<ffi::AnyBuffer>() /* weights */                            \
      .Arg<ffi::AnyBuffer>() /* bound_m */                            \
      .Arg<ffi::AnyBuffer>() /* rank */                               \
      .Ret<ffi::AnyBuffer>() /* y */                                  \
      .Ret<ffi::AnyBuffer>() /* send_done */                          \
      .Attr<uint64_t>("context_id")

// Each handler under two names: with kCmdBufferCompatible (XLA may capture the launches in CUDA
// graphs) and, suffixed "_no_cuda_graph", without. moe.py picks per call from the setting
// moe_cuda_graphs (JAX_GARDEN_MOE_CUDA_GRAPHS=0: an escape hatch should an XLA version mishandle
// the capture of these calls).
XLA_FFI_DEFINE_HANDLER(kMoeDispatchSendCuda, jgm::dispatch_send, JG_MOE_BINDING_DISPATCH_SEND,
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeDispatchRecvCuda, jgm::dispatch_recv, JG_MOE_BINDING_DISPATCH_RECV,
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeCombineSendCuda, jgm::combine_send, JG_MOE_BINDING_COMBINE_SEND,
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeCombineRecvCuda, jgm::combine_recv, JG_MOE_BINDING_COMBINE_RECV,
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeDispatchCuda, jgm::dispatch, JG_MOE_BINDING_DISPATCH, {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeCombineCuda, jgm::combine, JG_MOE_BINDING_COMBINE, {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeDispatchCudaNoGraph, jgm::dispatch, JG_MOE_BINDING_DISPATCH);
XLA_FFI_DEFINE_HANDLER(kMoeCombineCudaNoGraph, jgm::combine, JG_MOE_BINDING_COMBINE);
XLA_FFI_DEFINE_HANDLER(kMoeDispatchSendCudaNoGraph, jgm::dispatch_send, JG_MOE_BINDING_DISPATCH_SEND);
XLA_FFI_DEFINE_HANDLER(kMoeDispatchRecvCudaNoGraph, jgm::dispatch_recv, JG_MOE_BINDING_DISPATCH_RECV);
XLA_FFI_DEFINE_HANDLER(kMoeCombineSendCudaNoGraph, jgm::combine_send, JG_MOE_BINDING_COMBINE_SEND);
XLA_FFI_DEFINE_HANDLER(kMoeCombineRecvCudaNoGraph, jgm::combine_recv, JG_MOE_BINDING_COMBINE_RECV);

XLA_FFI_DEFINE_HANDLER(kMoeTimestampCuda, jgm::timestamp,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()   // after (ordering only)
                           .Ret<ffi::AnyBuffer>(),  // out: u32[2] (ns, low word first)
                       {ffi::Traits::kCmdBufferCompatible});

JG_REGISTER_FFI_TARGET("jg_moe_dispatch_send", "CUDA", kMoeDispatchSendCuda);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch_recv", "CUDA", kMoeDispatchRecvCuda);
JG_REGISTER_FFI_TARGET("jg_moe_combine_send", "CUDA", kMoeCombineSendCuda);
JG_REGISTER_FFI_TARGET("jg_moe_combine_recv", "CUDA", kMoeCombineRecvCuda);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch", "CUDA", kMoeDispatchCuda);
JG_REGISTER_FFI_TARGET("jg_moe_combine", "CUDA", kMoeCombineCuda);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch_no_cuda_graph", "CUDA", kMoeDispatchCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_combine_no_cuda_graph", "CUDA", kMoeCombineCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch_send_no_cuda_graph", "CUDA", kMoeDispatchSendCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch_recv_no_cuda_graph", "CUDA", kMoeDispatchRecvCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_combine_send_no_cuda_graph", "CUDA", kMoeCombineSendCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_combine_recv_no_cuda_graph", "CUDA", kMoeCombineRecvCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_cuda_timestamp", "CUDA", kMoeTimestampCuda);
JG_REGISTER_FFI_TARGET("jg_moe_cuda_device_info", "CUDA", kMoeDeviceInfoCuda);
