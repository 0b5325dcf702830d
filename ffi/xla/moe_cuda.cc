// XLA FFI handlers of the MoE dispatch/combine for platform "CUDA" (contract: docs/moe-ffi.md).
// Decode, check shapes against the context, launch, nothing else: no host synchronisation, no
// allocation, identical launches on every call, hence kCmdBufferCompatible (CUDA graphs).
#include <cuda_runtime.h>

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <string_view>

#include "common/error.h"
#include "common/registry.h"
#include "moe/moe_cuda.h"

// The XLA headers are not warning-clean under -Wall -Wextra; keep our own diagnostics on.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wreturn-type"
#include "xla/ffi/api/ffi.h"
#pragma GCC diagnostic pop

namespace ffi = xla::ffi;

namespace jax_garden::moe_cuda {
namespace {

const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F8E4M3FN: return "float8_e4m3fn";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::U32: return "uint32";
    case ffi::DataType::U64: return "uint64";
    case ffi::DataType::F16: return "float16";
    default: return "another dtype";
  }
}

std::string DimsStr(ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + (d.size() == 1 ? ",)" : ")");
}

// Empty string if `b` has dtype `t` and exactly `dims`; else a message naming the wrong value.
std::string CheckBuf(const char* target, const char* name, ffi::DataType dtype, ffi::Span<const int64_t> dims,
                     ffi::DataType want, std::initializer_list<int64_t> want_dims) {
  bool same = dims.size() == want_dims.size();
  size_t i = 0;
  for (int64_t w : want_dims) same = same && dims[i++] == w;
  if (dtype == want && same) return {};
  std::string wd = "(";
  i = 0;
  for (int64_t w : want_dims) wd += (i++ ? ", " : "") + std::to_string(w);
  wd += want_dims.size() == 1 ? ",)" : ")";
  return str_cat(target, ": ", name, " is ", DtypeName(dtype), DimsStr(dims), ", expected ", DtypeName(want), wd);
}

#define JG_FFI_CHECK(expr)                                                  \
  do {                                                                      \
    std::string _msg = (expr);                                              \
    if (!_msg.empty()) return ffi::Error::InvalidArgument(std::move(_msg)); \
  } while (0)

struct Resolved {
  std::shared_ptr<Context> ctx;
  const RankState* rank = nullptr;
};

ffi::Error Resolve(const char* target, uint64_t id, int32_t ordinal, Resolved* out) {
  out->ctx = LookupContext(id);
  if (!out->ctx) {
    return ffi::Error::InvalidArgument(
        str_cat(target, ": unknown context_id ", id, " (closed, or created in another process)"));
  }
  // The device XLA made current on this thread, in our runtime's numbering (the one the context
  // allocated with), is authoritative; XLA's DeviceOrdinal may count only visible devices.
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess) out->rank = out->ctx->Find(current);
  if (out->rank == nullptr) out->rank = out->ctx->Find(ordinal);
  if (out->rank == nullptr) {
    std::string have;
    for (int o : out->ctx->Ordinals()) have += (have.empty() ? "" : ", ") + std::to_string(o);
    return ffi::Error::InvalidArgument(str_cat(target, ": device ordinal ", ordinal, " (current CUDA device ",
                                               current, ") holds no rank of context ", id,
                                               " (ranks on CUDA devices [", have, "])"));
  }
  out->ctx->CountHandlerCall();
  // A wait that timed out earlier (or another sticky error) fails every later call loudly.
  std::string msg;
  if (out->ctx->ErrorCode(&msg) != 0) return ffi::Error(ffi::ErrorCode::kInternal, std::move(msg));
  return ffi::Error::Success();
}

ffi::Error LaunchResult(const char* target, int err) {
  if (err == 0) return ffi::Error::Success();
  const auto e = static_cast<cudaError_t>(err);
  return ffi::Error(ffi::ErrorCode::kInternal,
                    str_cat(target, ": kernel launch failed: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e)));
}

ffi::DataType DispatchDtype(const Config& c) {
  return c.dispatch_elem_bytes == 1 ? ffi::DataType::F8E4M3FN : ffi::DataType::BF16;
}

ffi::Error DispatchSendImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer x, ffi::AnyBuffer x_scale,
                            ffi::AnyBuffer indices, ffi::AnyBuffer weights, ffi::AnyBuffer bound_m,
                            ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  constexpr const char* kT = "jg_moe_dispatch_send";
  Resolved r;
  if (ffi::Error e = Resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const Config& c = r.ctx->config();
  const int64_t T = c.max_tokens, H = c.hidden, K = c.experts_per_token, S = c.scale_cols;
  JG_FFI_CHECK(CheckBuf(kT, "x", x.element_type(), x.dimensions(), DispatchDtype(c), {T, H}));
  JG_FFI_CHECK(CheckBuf(kT, "x_scale", x_scale.element_type(), x_scale.dimensions(), ffi::DataType::F32, {T, S}));
  JG_FFI_CHECK(CheckBuf(kT, "indices", indices.element_type(), indices.dimensions(), ffi::DataType::S32, {T, K}));
  JG_FFI_CHECK(CheckBuf(kT, "weights", weights.element_type(), weights.dimensions(), ffi::DataType::F32, {T, K}));
  JG_FFI_CHECK(CheckBuf(kT, "bound_m", bound_m.element_type(), bound_m.dimensions(), ffi::DataType::S32, {}));
  JG_FFI_CHECK(CheckBuf(kT, "rank", rank.element_type(), rank.dimensions(), ffi::DataType::S32, {}));
  JG_FFI_CHECK(CheckBuf(kT, "send_done", send_done->element_type(), send_done->dimensions(), ffi::DataType::U32, {1}));
  return LaunchResult(kT, LaunchDispatchSend(r.rank->view, stream, x.untyped_data(),
                                             static_cast<const float*>(x_scale.untyped_data()),
                                             static_cast<const int32_t*>(indices.untyped_data()),
                                             static_cast<const int32_t*>(bound_m.untyped_data()),
                                             static_cast<const int32_t*>(rank.untyped_data()),
                                             static_cast<uint32_t*>(send_done->untyped_data())));
}

ffi::Error DispatchRecvImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer send_done, ffi::AnyBuffer rank,
                            ffi::Result<ffi::AnyBuffer> expert_x, ffi::Result<ffi::AnyBuffer> expert_scale,
                            ffi::Result<ffi::AnyBuffer> expert_counts, uint64_t context_id) {
  constexpr const char* kT = "jg_moe_dispatch_recv";
  Resolved r;
  if (ffi::Error e = Resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const Config& c = r.ctx->config();
  const int64_t M = c.max_recv_tokens, H = c.hidden, S = c.scale_cols, L = c.num_experts / c.num_ranks;
  JG_FFI_CHECK(CheckBuf(kT, "send_done", send_done.element_type(), send_done.dimensions(), ffi::DataType::U32, {1}));
  JG_FFI_CHECK(CheckBuf(kT, "rank", rank.element_type(), rank.dimensions(), ffi::DataType::S32, {}));
  JG_FFI_CHECK(CheckBuf(kT, "expert_x", expert_x->element_type(), expert_x->dimensions(), DispatchDtype(c), {M, H}));
  JG_FFI_CHECK(CheckBuf(kT, "expert_scale", expert_scale->element_type(), expert_scale->dimensions(),
                        ffi::DataType::F32, {M, S}));
  JG_FFI_CHECK(CheckBuf(kT, "expert_counts", expert_counts->element_type(), expert_counts->dimensions(),
                        ffi::DataType::S32, {L}));
  return LaunchResult(kT, LaunchDispatchRecv(r.rank->view, stream, static_cast<const uint32_t*>(send_done.untyped_data()),
                                             static_cast<const int32_t*>(rank.untyped_data()),
                                             expert_x->untyped_data(), static_cast<float*>(expert_scale->untyped_data()),
                                             static_cast<int32_t*>(expert_counts->untyped_data())));
}

ffi::Error CombineSendImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer expert_y,
                           ffi::AnyBuffer expert_counts, ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> send_done,
                           uint64_t context_id) {
  constexpr const char* kT = "jg_moe_combine_send";
  Resolved r;
  if (ffi::Error e = Resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const Config& c = r.ctx->config();
  const int64_t M = c.max_recv_tokens, H = c.hidden, L = c.num_experts / c.num_ranks;
  JG_FFI_CHECK(CheckBuf(kT, "expert_y", expert_y.element_type(), expert_y.dimensions(), ffi::DataType::BF16, {M, H}));
  JG_FFI_CHECK(CheckBuf(kT, "expert_counts", expert_counts.element_type(), expert_counts.dimensions(),
                        ffi::DataType::S32, {L}));
  JG_FFI_CHECK(CheckBuf(kT, "rank", rank.element_type(), rank.dimensions(), ffi::DataType::S32, {}));
  JG_FFI_CHECK(CheckBuf(kT, "send_done", send_done->element_type(), send_done->dimensions(), ffi::DataType::U32, {1}));
  return LaunchResult(kT, LaunchCombineSend(r.rank->view, stream, expert_y.untyped_data(),
                                            static_cast<const int32_t*>(expert_counts.untyped_data()),
                                            static_cast<const int32_t*>(rank.untyped_data()),
                                            static_cast<uint32_t*>(send_done->untyped_data())));
}

ffi::Error CombineRecvImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer send_done, ffi::AnyBuffer indices,
                           ffi::AnyBuffer weights, ffi::AnyBuffer bound_m, ffi::AnyBuffer rank,
                           ffi::Result<ffi::AnyBuffer> y, uint64_t context_id) {
  constexpr const char* kT = "jg_moe_combine_recv";
  Resolved r;
  if (ffi::Error e = Resolve(kT, context_id, ordinal, &r); e.failure()) return e;
  const Config& c = r.ctx->config();
  const int64_t T = c.max_tokens, H = c.hidden, K = c.experts_per_token;
  JG_FFI_CHECK(CheckBuf(kT, "send_done", send_done.element_type(), send_done.dimensions(), ffi::DataType::U32, {1}));
  JG_FFI_CHECK(CheckBuf(kT, "indices", indices.element_type(), indices.dimensions(), ffi::DataType::S32, {T, K}));
  JG_FFI_CHECK(CheckBuf(kT, "weights", weights.element_type(), weights.dimensions(), ffi::DataType::F32, {T, K}));
  JG_FFI_CHECK(CheckBuf(kT, "bound_m", bound_m.element_type(), bound_m.dimensions(), ffi::DataType::S32, {}));
  JG_FFI_CHECK(CheckBuf(kT, "rank", rank.element_type(), rank.dimensions(), ffi::DataType::S32, {}));
  JG_FFI_CHECK(CheckBuf(kT, "y", y->element_type(), y->dimensions(), ffi::DataType::BF16, {T, H}));
  return LaunchResult(kT, LaunchCombineRecv(r.rank->view, stream, static_cast<const uint32_t*>(send_done.untyped_data()),
                                            static_cast<const int32_t*>(indices.untyped_data()),
                                            static_cast<const float*>(weights.untyped_data()),
                                            static_cast<const int32_t*>(bound_m.untyped_data()),
                                            static_cast<const int32_t*>(rank.untyped_data()), y->untyped_data()));
}

// Benchmark helper: writes the device's globaltimer (ns, as two uint32 words: low, high; jax
// without x64 has no uint64) when the stream reaches it. The operand only orders it after the
// values it depends on.
ffi::Error TimestampImpl(cudaStream_t stream, ffi::AnyBuffer after, ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kT = "jg_moe_cuda_timestamp";
  JG_FFI_CHECK(CheckBuf(kT, "out", out->element_type(), out->dimensions(), ffi::DataType::U32, {2}));
  return LaunchResult(kT, LaunchTimestamp(stream, static_cast<uint64_t*>(out->untyped_data())));
}

// Setup helper (eager, outside jit): which device this XLA device is, as XLA numbers it
// (DeviceOrdinal) and as our CUDA runtime numbers it (cudaGetDevice); the context allocates
// with the latter. Writes int32[2] = {DeviceOrdinal, cudaGetDevice()}.
ffi::Error DeviceInfoImpl(cudaStream_t stream, int32_t ordinal, ffi::AnyBuffer after,
                          ffi::Result<ffi::AnyBuffer> out) {
  constexpr const char* kT = "jg_moe_cuda_device_info";
  JG_FFI_CHECK(CheckBuf(kT, "out", out->element_type(), out->dimensions(), ffi::DataType::S32, {2}));
  int current = -1;
  if (const cudaError_t e = cudaGetDevice(&current); e != cudaSuccess) return LaunchResult(kT, e);
  return LaunchResult(kT, LaunchWriteInts(stream, static_cast<int32_t*>(out->untyped_data()), ordinal, current));
}

}  // namespace
}  // namespace jax_garden::moe_cuda

namespace jgm = jax_garden::moe_cuda;

XLA_FFI_DEFINE_HANDLER(kMoeDeviceInfoCuda, jgm::DeviceInfoImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Ctx<ffi::DeviceOrdinal>()
                           .Arg<ffi::AnyBuffer>()    // after (ordering only)
                           .Ret<ffi::AnyBuffer>());  // out: s32[2]

// Each handler twice: with kCmdBufferCompatible (default: XLA may capture the launches in CUDA
// graphs) and without (JAX_GARDEN_MOE_CUDA_GRAPHS=0 at import: an escape hatch should an XLA
// version mishandle the capture of these calls).
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

XLA_FFI_DEFINE_HANDLER(kMoeDispatchSendCuda, jgm::DispatchSendImpl, JG_MOE_BINDING_DISPATCH_SEND,
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeDispatchRecvCuda, jgm::DispatchRecvImpl, JG_MOE_BINDING_DISPATCH_RECV,
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeCombineSendCuda, jgm::CombineSendImpl, JG_MOE_BINDING_COMBINE_SEND,
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeCombineRecvCuda, jgm::CombineRecvImpl, JG_MOE_BINDING_COMBINE_RECV,
                       {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER(kMoeDispatchSendCudaNoGraph, jgm::DispatchSendImpl, JG_MOE_BINDING_DISPATCH_SEND);
XLA_FFI_DEFINE_HANDLER(kMoeDispatchRecvCudaNoGraph, jgm::DispatchRecvImpl, JG_MOE_BINDING_DISPATCH_RECV);
XLA_FFI_DEFINE_HANDLER(kMoeCombineSendCudaNoGraph, jgm::CombineSendImpl, JG_MOE_BINDING_COMBINE_SEND);
XLA_FFI_DEFINE_HANDLER(kMoeCombineRecvCudaNoGraph, jgm::CombineRecvImpl, JG_MOE_BINDING_COMBINE_RECV);

XLA_FFI_DEFINE_HANDLER(kMoeTimestampCuda, jgm::TimestampImpl,
                       ffi::Ffi::Bind()
                           .Ctx<ffi::PlatformStream<cudaStream_t>>()
                           .Arg<ffi::AnyBuffer>()   // after (ordering only)
                           .Ret<ffi::AnyBuffer>(),  // out: u32[2] (ns, low word first)
                       {ffi::Traits::kCmdBufferCompatible});

namespace {
bool CudaGraphsAllowed() {
  const char* v = std::getenv("JAX_GARDEN_MOE_CUDA_GRAPHS");
  return v == nullptr || std::string_view(v) != "0";
}
}  // namespace

JG_REGISTER_FFI_TARGET("jg_moe_dispatch_send", "CUDA",
                       CudaGraphsAllowed() ? kMoeDispatchSendCuda : kMoeDispatchSendCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch_recv", "CUDA",
                       CudaGraphsAllowed() ? kMoeDispatchRecvCuda : kMoeDispatchRecvCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_combine_send", "CUDA",
                       CudaGraphsAllowed() ? kMoeCombineSendCuda : kMoeCombineSendCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_combine_recv", "CUDA",
                       CudaGraphsAllowed() ? kMoeCombineRecvCuda : kMoeCombineRecvCudaNoGraph);
JG_REGISTER_FFI_TARGET("jg_moe_cuda_timestamp", "CUDA", kMoeTimestampCuda);
JG_REGISTER_FFI_TARGET("jg_moe_cuda_device_info", "CUDA", kMoeDeviceInfoCuda);
