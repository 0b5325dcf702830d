// What the XLA CPU handlers (ffi/xla/moe_cpu.cc) drive: a host MoE context, found by the id baked
// into the HLO. Two implementations share the four FFI targets:
//   * CpuAllToAll (cpu_all_to_all.h): every rank is a CPU device of this process (the reference);
//   * InternodeAllToAll (internode_all_to_all.h): ranks in node groups across processes; inside a
//     group ranks meet in this process's memory, between groups rows travel through the
//     TransferEngine.
// Both produce the same layout and the same bits (docs/moe-ffi.md); the shared row math is
// host_math.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/object_registry.h"
#include "moe/dtype.h"
#include "moe/layout.h"

namespace jax_garden::moe {

// A dense row-major array handed over by an FFI handler (no ownership).
struct ArrayRef {
  void* data = nullptr;
  DType dtype = DType::kOther;
  std::vector<int64_t> dims;
};

class HostAllToAll {
 public:
  virtual ~HostAllToAll() = default;

  virtual const MoeShape& shape() const = 0;

  // Each returns the ordering token (the phase generation) or throws InvalidArgument / Timeout /
  // TransferFailed / std::runtime_error with a message naming the phase, the rank and the wrong
  // value. A failed call poisons the context: every later call fails with the first error.
  virtual uint32_t dispatch_send(int32_t rank, const ArrayRef& x, const ArrayRef& x_scale, const ArrayRef& indices,
                                 const ArrayRef& weights, int32_t bound_m) = 0;
  virtual void dispatch_recv(int32_t rank, uint32_t send_done, const ArrayRef& expert_x, const ArrayRef& expert_scale,
                             const ArrayRef& expert_counts) = 0;
  virtual uint32_t combine_send(int32_t rank, const ArrayRef& expert_y, const ArrayRef& expert_counts) = 0;
  virtual void combine_recv(int32_t rank, uint32_t send_done, const ArrayRef& indices, const ArrayRef& weights,
                            int32_t bound_m, const ArrayRef& y) = 0;

  // Rows dropped because they did not fit in max_recv_tokens, per receiving rank, since creation
  // (-1 for ranks this process does not hold).
  virtual std::vector<int64_t> dropped_rows() const = 0;

  // The first error of any rank ("" if none; every later call fails with it), and whether it was
  // a wait that timed out. Not const: a context may first collect errors its peers reported.
  virtual std::pair<std::string, bool> error() = 0;

  // Called when the context leaves the registry: ranks still inside a call fail at once.
  virtual void close() = 0;
};

// Process-wide registry: the XLA handlers find a context by the id baked into the HLO
// (`context_id` attribute). The registry keeps a context alive until it is closed; a call that
// found it keeps its own reference until it returns.
ObjectRegistry<HostAllToAll>& cpu_contexts();
std::shared_ptr<HostAllToAll> find_cpu_context(uint64_t id);  // throws InvalidArgument if unknown
// Unregisters and closes the context (ranks inside a call fail at once). False if unknown.
bool close_cpu_context(uint64_t id);

}  // namespace jax_garden::moe
