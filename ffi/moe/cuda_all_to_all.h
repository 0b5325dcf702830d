// CudaAllToAll: what the CUDA FFI handlers (ffi/xla/moe_cuda.cc) need from a CUDA MoE context,
// whichever it is: the NVLink context (nvlink_all_to_all.h: every rank in one node group) or the
// proxy context (proxy_all_to_all.h: node groups, the host proxy and the TransferEngine between
// them). Plain C++ (no CUDA headers): the handlers decode, find the context by id, and delegate.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "common/object_registry.h"
#include "moe/dtype.h"
#include "moe/layout.h"

namespace jax_garden::moe {

class CudaAllToAll {
 public:
  virtual ~CudaAllToAll() = default;

  virtual const MoeShape& shape() const = 0;
  virtual DType dispatch_dtype() const = 0;
  // True when a finalized rank of this context lives on CUDA device `ordinal` (our runtime's numbering).
  virtual bool holds(int ordinal) const = 0;
  virtual std::vector<int> ordinals() const = 0;
  // Sticky error of any local rank: kErrNone if none; else the code, and *message names the values.
  virtual int32_t error_code(std::string* message) const = 0;

  // The kernels of one FFI call for the rank on `ordinal`, in `stream` (cudaStream_t as void*):
  // a cudaError_t value (0 = success). No host synchronisation, the same launches every call.
  virtual int dispatch_send(int ordinal, void* stream, const void* x, const float* x_scale, const int32_t* indices,
                            const int32_t* bound_m, const int32_t* rank, uint32_t* send_done) = 0;
  virtual int dispatch_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* rank,
                            void* expert_x, float* expert_scale, int32_t* expert_counts) = 0;
  virtual int combine_send(int ordinal, void* stream, const void* expert_y, const int32_t* expert_counts,
                           const int32_t* rank, uint32_t* send_done) = 0;
  virtual int combine_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* indices,
                           const float* weights, const int32_t* bound_m, const int32_t* rank, void* y) = 0;
  // dispatch() and combine() in one call each (the FFI targets jg_moe_dispatch / jg_moe_combine):
  // by default the two halves back to back, send_done being the token between them; a context may
  // launch one kernel instead.
  virtual int dispatch(int ordinal, void* stream, const void* x, const float* x_scale, const int32_t* indices,
                       const int32_t* bound_m, const int32_t* rank, void* expert_x, float* expert_scale,
                       int32_t* expert_counts, uint32_t* send_done) {
    if (int err = dispatch_send(ordinal, stream, x, x_scale, indices, bound_m, rank, send_done); err != 0) return err;
    return dispatch_recv(ordinal, stream, send_done, rank, expert_x, expert_scale, expert_counts);
  }
  virtual int combine(int ordinal, void* stream, const void* expert_y, const int32_t* expert_counts,
                      const int32_t* indices, const float* weights, const int32_t* bound_m, const int32_t* rank,
                      void* y, uint32_t* send_done) {
    if (int err = combine_send(ordinal, stream, expert_y, expert_counts, rank, send_done); err != 0) return err;
    return combine_recv(ordinal, stream, send_done, indices, weights, bound_m, rank, y);
  }

  // The CUDA device (our runtime's numbering) of an FFI call on XLA device `xla_ordinal`, or -1
  // when no rank of this context is there. The device XLA made current on the calling thread is
  // authoritative (XLA's ordinal may count only visible devices), then the XLA ordinal itself;
  // found once per XLA ordinal, then read from a table (no runtime call per call).
  int runtime_ordinal(int xla_ordinal);
  // FFI handler invocations so far (a CUDA-graph replay launches the kernels without one).
  uint64_t handler_calls() const { return handler_calls_.load(std::memory_order_relaxed); }
  void count_handler_call() { handler_calls_.fetch_add(1, std::memory_order_relaxed); }

 private:
  static constexpr int kOrdinalTable = 64;  // XLA ordinals remembered (larger ones are looked up each call)
  std::atomic<uint64_t> handler_calls_{0};
  std::atomic<int> runtime_ordinal_[kOrdinalTable] = {};  // runtime ordinal + 1; 0: not looked up yet
};

// Process-wide registry: the XLA handlers find a finalized context by the id baked into the HLO.
ObjectRegistry<CudaAllToAll>& cuda_contexts();

}  // namespace jax_garden::moe
