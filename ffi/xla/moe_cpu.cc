// XLA FFI handlers (platform "cpu") of MoE dispatch/combine: decode operands, find the context
// by id, delegate to ffi/moe/cpu_all_to_all. Operands, results and attributes follow
// docs/moe-ffi.md exactly. Operands are decoded as AnyBuffer so that a wrong dtype or shape gets
// the context's message naming the operand, not a generic decoding error.
#include <exception>

#include "common/error.h"
#include "common/registry.h"
#include "moe/cpu_all_to_all.h"
// The XLA headers are not warning-clean under -Wall -Wextra; keep our own diagnostics on.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wreturn-type"
#include "xla/ffi/api/ffi.h"
#pragma GCC diagnostic pop

namespace ffi = xla::ffi;

namespace jax_garden::moe {
namespace {

DType to_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::BF16: return DType::kBF16;
    case ffi::DataType::F8E4M3FN: return DType::kF8E4M3FN;
    case ffi::DataType::F32: return DType::kF32;
    case ffi::DataType::S32: return DType::kS32;
    case ffi::DataType::U32: return DType::kU32;
    default: return DType::kOther;
  }
}

ArrayRef ref(const ffi::AnyBuffer& b) {
  auto dims = b.dimensions();
  return ArrayRef{b.untyped_data(), to_dtype(b.element_type()),
                  std::vector<int64_t>(dims.begin(), dims.end())};
}

// Reads a one-element operand: rank and bound_m (int32 scalars) or a send_done token (uint32[1]).
template <typename T>
T scalar(const char* target, const char* what, const ffi::AnyBuffer& b, DType dtype) {
  if (to_dtype(b.element_type()) != dtype || b.element_count() != 1) {
    throw InvalidArgument(str_cat(target, ": operand ", what, " must hold one ", dtype_name(dtype),
                                  ", got ", b.element_count(), " elements of ",
                                  dtype_name(to_dtype(b.element_type()))));
  }
  return *static_cast<const T*>(b.untyped_data());
}

int32_t s32_scalar(const char* target, const char* what, const ffi::AnyBuffer& b) {
  return scalar<int32_t>(target, what, b, DType::kS32);
}
uint32_t token(const char* target, const ffi::AnyBuffer& b) {
  return scalar<uint32_t>(target, "send_done", b, DType::kU32);
}

// Exceptions never cross the FFI boundary.
template <typename F>
ffi::Error guarded(F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const InvalidArgument& e) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, e.what());
  } catch (const Timeout& e) {
    return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

ffi::Error DispatchSend(ffi::AnyBuffer x, ffi::AnyBuffer x_scale, ffi::AnyBuffer indices,
                        ffi::AnyBuffer weights, ffi::AnyBuffer bound_m, ffi::AnyBuffer rank,
                        ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_dispatch_send";
    auto ctx = find_cpu_context(context_id);
    ArrayRef done = ref(*send_done);
    JG_CHECK_ARG(done.dtype == DType::kU32 && done.dims == std::vector<int64_t>{1}, kName,
                 ": result send_done must be uint32[1]");
    const uint32_t gen = ctx->dispatch_send(s32_scalar(kName, "rank", rank), ref(x), ref(x_scale),
                                            ref(indices), ref(weights),
                                            s32_scalar(kName, "bound_m", bound_m));
    *static_cast<uint32_t*>(done.data) = gen;
  });
}

ffi::Error DispatchRecv(ffi::AnyBuffer send_done, ffi::AnyBuffer rank,
                        ffi::Result<ffi::AnyBuffer> expert_x,
                        ffi::Result<ffi::AnyBuffer> expert_scale,
                        ffi::Result<ffi::AnyBuffer> expert_counts, uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_dispatch_recv";
    auto ctx = find_cpu_context(context_id);
    ctx->dispatch_recv(s32_scalar(kName, "rank", rank), token(kName, send_done), ref(*expert_x),
                       ref(*expert_scale), ref(*expert_counts));
  });
}

ffi::Error CombineSend(ffi::AnyBuffer expert_y, ffi::AnyBuffer expert_counts, ffi::AnyBuffer rank,
                       ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_combine_send";
    auto ctx = find_cpu_context(context_id);
    ArrayRef done = ref(*send_done);
    JG_CHECK_ARG(done.dtype == DType::kU32 && done.dims == std::vector<int64_t>{1}, kName,
                 ": result send_done must be uint32[1]");
    const uint32_t gen =
        ctx->combine_send(s32_scalar(kName, "rank", rank), ref(expert_y), ref(expert_counts));
    *static_cast<uint32_t*>(done.data) = gen;
  });
}

ffi::Error CombineRecv(ffi::AnyBuffer send_done, ffi::AnyBuffer indices, ffi::AnyBuffer weights,
                       ffi::AnyBuffer bound_m, ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> y,
                       uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_combine_recv";
    auto ctx = find_cpu_context(context_id);
    ctx->combine_recv(s32_scalar(kName, "rank", rank), token(kName, send_done), ref(indices),
                      ref(weights), s32_scalar(kName, "bound_m", bound_m), ref(*y));
  });
}

}  // namespace
}  // namespace jax_garden::moe

namespace jgm = jax_garden::moe;

XLA_FFI_DEFINE_HANDLER(kMoeDispatchSendCpu, jgm::DispatchSend,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // x[T,H]
                           .Arg<ffi::AnyBuffer>()   // x_scale[T,S] f32
                           .Arg<ffi::AnyBuffer>()   // indices[T,K] i32
                           .Arg<ffi::AnyBuffer>()   // weights[T,K] f32
                           .Arg<ffi::AnyBuffer>()   // bound_m[] i32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // send_done[1] u32
                           .Attr<uint64_t>("context_id"));

XLA_FFI_DEFINE_HANDLER(kMoeDispatchRecvCpu, jgm::DispatchRecv,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // send_done[1] u32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // expert_x[M,H]
                           .Ret<ffi::AnyBuffer>()   // expert_scale[M,S] f32
                           .Ret<ffi::AnyBuffer>()   // expert_counts[L] i32
                           .Attr<uint64_t>("context_id"));

XLA_FFI_DEFINE_HANDLER(kMoeCombineSendCpu, jgm::CombineSend,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // expert_y[M,H]
                           .Arg<ffi::AnyBuffer>()   // expert_counts[L] i32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // send_done[1] u32
                           .Attr<uint64_t>("context_id"));

XLA_FFI_DEFINE_HANDLER(kMoeCombineRecvCpu, jgm::CombineRecv,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // send_done[1] u32
                           .Arg<ffi::AnyBuffer>()   // indices[T,K] i32
                           .Arg<ffi::AnyBuffer>()   // weights[T,K] f32
                           .Arg<ffi::AnyBuffer>()   // bound_m[] i32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // y[T,H]
                           .Attr<uint64_t>("context_id"));

JG_REGISTER_FFI_TARGET("jg_moe_dispatch_send", "cpu", kMoeDispatchSendCpu);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch_recv", "cpu", kMoeDispatchRecvCpu);
JG_REGISTER_FFI_TARGET("jg_moe_combine_send", "cpu", kMoeCombineSendCpu);
JG_REGISTER_FFI_TARGET("jg_moe_combine_recv", "cpu", kMoeCombineRecvCpu);
