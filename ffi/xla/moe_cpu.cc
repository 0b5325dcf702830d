// XLA FFI handlers (platform "cpu") of MoE dispatch/combine: decode operands, find the context
// by id, delegate to ffi/moe/cpu_all_to_all. Operands, results and attributes follow
// docs/moe-ffi.md exactly. Operands are decoded as AnyBuffer so that a wrong dtype or shape gets
// the context's message naming the operand, not a generic decoding error.
#include <vector>

#include "common/error.h"
#include "common/registry.h"
#include "moe/cpu_all_to_all.h"
#include "xla/handler_util.h"

namespace ffi = xla::ffi;

namespace jax_garden::moe {
namespace {

using handlers::guarded;
using handlers::scalar_operand;

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

// rank and bound_m are int32 scalars; send_done tokens are uint32[1].
int32_t s32_scalar(const char* target, const char* what, const ffi::AnyBuffer& b) {
  return scalar_operand<int32_t>(target, what, b, ffi::DataType::S32);
}
uint32_t token(const char* target, const ffi::AnyBuffer& b) {
  return scalar_operand<uint32_t>(target, "send_done", b, ffi::DataType::U32);
}
void check_token_result(const char* target, const ffi::AnyBuffer& b) {
  std::string bad = handlers::check_buffer(target, "result send_done", b, ffi::DataType::U32, {1});
  if (!bad.empty()) throw InvalidArgument(bad);
}

ffi::Error dispatch_send(ffi::AnyBuffer x, ffi::AnyBuffer x_scale, ffi::AnyBuffer indices,
                        ffi::AnyBuffer weights, ffi::AnyBuffer bound_m, ffi::AnyBuffer rank,
                        ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_dispatch_send";
    auto ctx = find_cpu_context(context_id);
    check_token_result(kName, *send_done);
    const uint32_t gen = ctx->dispatch_send(s32_scalar(kName, "rank", rank), ref(x), ref(x_scale),
                                            ref(indices), ref(weights),
                                            s32_scalar(kName, "bound_m", bound_m));
    *static_cast<uint32_t*>(send_done->untyped_data()) = gen;
  });
}

ffi::Error dispatch_recv(ffi::AnyBuffer send_done, ffi::AnyBuffer rank,
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

ffi::Error combine_send(ffi::AnyBuffer expert_y, ffi::AnyBuffer expert_counts, ffi::AnyBuffer rank,
                       ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_combine_send";
    auto ctx = find_cpu_context(context_id);
    check_token_result(kName, *send_done);
    const uint32_t gen =
        ctx->combine_send(s32_scalar(kName, "rank", rank), ref(expert_y), ref(expert_counts));
    *static_cast<uint32_t*>(send_done->untyped_data()) = gen;
  });
}

ffi::Error combine_recv(ffi::AnyBuffer send_done, ffi::AnyBuffer indices, ffi::AnyBuffer weights,
                       ffi::AnyBuffer bound_m, ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> y,
                       uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_combine_recv";
    auto ctx = find_cpu_context(context_id);
    ctx->combine_recv(s32_scalar(kName, "rank", rank), token(kName, send_done), ref(indices),
                      ref(weights), s32_scalar(kName, "bound_m", bound_m), ref(*y));
  });
}

// dispatch() in one call (jg_moe_dispatch): the two halves back to back; send_done gets the token
// between them.
ffi::Error dispatch(ffi::AnyBuffer x, ffi::AnyBuffer x_scale, ffi::AnyBuffer indices, ffi::AnyBuffer weights,
                    ffi::AnyBuffer bound_m, ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> expert_x,
                    ffi::Result<ffi::AnyBuffer> expert_scale, ffi::Result<ffi::AnyBuffer> expert_counts,
                    ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_dispatch";
    auto ctx = find_cpu_context(context_id);
    check_token_result(kName, *send_done);
    const int32_t r = s32_scalar(kName, "rank", rank);
    const uint32_t gen = ctx->dispatch_send(r, ref(x), ref(x_scale), ref(indices), ref(weights),
                                            s32_scalar(kName, "bound_m", bound_m));
    *static_cast<uint32_t*>(send_done->untyped_data()) = gen;
    ctx->dispatch_recv(r, gen, ref(*expert_x), ref(*expert_scale), ref(*expert_counts));
  });
}

// combine() in one call (jg_moe_combine).
ffi::Error combine(ffi::AnyBuffer expert_y, ffi::AnyBuffer expert_counts, ffi::AnyBuffer indices,
                   ffi::AnyBuffer weights, ffi::AnyBuffer bound_m, ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Result<ffi::AnyBuffer> send_done, uint64_t context_id) {
  return guarded([&] {
    constexpr const char* kName = "jg_moe_combine";
    auto ctx = find_cpu_context(context_id);
    check_token_result(kName, *send_done);
    const int32_t r = s32_scalar(kName, "rank", rank);
    const uint32_t gen = ctx->combine_send(r, ref(expert_y), ref(expert_counts));
    *static_cast<uint32_t*>(send_done->untyped_data()) = gen;
    ctx->combine_recv(r, gen, ref(indices), ref(weights), s32_scalar(kName, "bound_m", bound_m), ref(*y));
  });
}

}  // namespace
}  // namespace jax_garden::moe

namespace jgm = jax_garden::moe;

XLA_FFI_DEFINE_HANDLER(kMoeDispatchSendCpu, jgm::dispatch_send,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // x[T,H]
                           .Arg<ffi::AnyBuffer>()   // x_scale[T,S] f32
                           .Arg<ffi::AnyBuffer>()   // indices[T,K] i32
                           .Arg<ffi::AnyBuffer>()   // weights[T,K] f32
                           .Arg<ffi::AnyBuffer>()   // bound_m[] i32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // send_done[1] u32
                           .Attr<uint64_t>("context_id"));

XLA_FFI_DEFINE_HANDLER(kMoeDispatchRecvCpu, jgm::dispatch_recv,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // send_done[1] u32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // expert_x[M,H]
                           .Ret<ffi::AnyBuffer>()   // expert_scale[M,S] f32
                           .Ret<ffi::AnyBuffer>()   // expert_counts[L] i32
                           .Attr<uint64_t>("context_id"));

XLA_FFI_DEFINE_HANDLER(kMoeCombineSendCpu, jgm::combine_send,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // expert_y[M,H]
                           .Arg<ffi::AnyBuffer>()   // expert_counts[L] i32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // send_done[1] u32
                           .Attr<uint64_t>("context_id"));

XLA_FFI_DEFINE_HANDLER(kMoeCombineRecvCpu, jgm::combine_recv,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // send_done[1] u32
                           .Arg<ffi::AnyBuffer>()   // indices[T,K] i32
                           .Arg<ffi::AnyBuffer>()   // weights[T,K] f32
                           .Arg<ffi::AnyBuffer>()   // bound_m[] i32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // y[T,H]
                           .Attr<uint64_t>("context_id"));

XLA_FFI_DEFINE_HANDLER(kMoeDispatchCpu, jgm::dispatch,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // x[T,H]
                           .Arg<ffi::AnyBuffer>()   // x_scale[T,S] f32
                           .Arg<ffi::AnyBuffer>()   // indices[T,K] i32
                           .Arg<ffi::AnyBuffer>()   // weights[T,K] f32
                           .Arg<ffi::AnyBuffer>()   // bound_m[] i32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // expert_x[M,H]
                           .Ret<ffi::AnyBuffer>()   // expert_scale[M,S] f32
                           .Ret<ffi::AnyBuffer>()   // expert_counts[L] i32
                           .Ret<ffi::AnyBuffer>()   // send_done[1] u32
                           .Attr<uint64_t>("context_id"));

XLA_FFI_DEFINE_HANDLER(kMoeCombineCpu, jgm::combine,
                       ffi::Ffi::Bind()
                           .Arg<ffi::AnyBuffer>()   // expert_y[M,H]
                           .Arg<ffi::AnyBuffer>()   // expert_counts[L] i32
                           .Arg<ffi::AnyBuffer>()   // indices[T,K] i32
                           .Arg<ffi::AnyBuffer>()   // weights[T,K] f32
                           .Arg<ffi::AnyBuffer>()   // bound_m[] i32
                           .Arg<ffi::AnyBuffer>()   // rank[] i32
                           .Ret<ffi::AnyBuffer>()   // y[T,H]
                           .Ret<ffi::AnyBuffer>()   // send_done[1] u32
                           .Attr<uint64_t>("context_id"));

JG_REGISTER_FFI_TARGET("jg_moe_dispatch", "cpu", kMoeDispatchCpu);
JG_REGISTER_FFI_TARGET("jg_moe_combine", "cpu", kMoeCombineCpu);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch_send", "cpu", kMoeDispatchSendCpu);
JG_REGISTER_FFI_TARGET("jg_moe_dispatch_recv", "cpu", kMoeDispatchRecvCpu);
JG_REGISTER_FFI_TARGET("jg_moe_combine_send", "cpu", kMoeCombineSendCpu);
JG_REGISTER_FFI_TARGET("jg_moe_combine_recv", "cpu", kMoeCombineRecvCpu);
