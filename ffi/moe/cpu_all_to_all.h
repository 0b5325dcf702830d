// CPU reference of MoE dispatch/combine across the CPU devices of one process.
//
// XLA:CPU runs each device's share of a shard_map program on its own thread, so the R ranks of
// one AllToAll are R threads of this process. They meet inside a CpuAllToAll: each phase is a
// rendezvous on per-rank completion counters under one mutex, and every wait has a timeout that
// turns a missing rank into an error naming the phase and the ranks, never a hang.
//
// Data flow (one generation n of each phase; ranks may drift by at most one phase):
//   dispatch_send(r): copy x, x_scale, indices, bound_m into r's send staging. It first waits until
//                     every rank finished dispatch_recv #n-1, which read that staging.
//   dispatch_recv(d): wait for dispatch_send #n of every rank, then pull the rows routed to d's
//                     experts into expert_x in layout.h order; remember, per row, its source
//                     (rank, token, k) for combine.
//   combine_send(d):  push each used row of expert_y into its source rank's combine slots
//                     [T*K, H] at slot t*K+k, stamped with the combine generation. Waits first
//                     until every rank finished combine_recv #n-1 (the slots are reused).
//   combine_recv(s):  wait for combine_send #n of every rank, then y[t] = Σ_k w[t,k] * slot(t,k)
//                     over the slots stamped #n, in f32, k order.
// Each rank writes only its own outputs; staging written by one rank is read by others only
// after the mutex-protected counter says it is complete.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/thread_annotations.h"
#include "moe/dtype.h"
#include "moe/host_all_to_all.h"
#include "moe/layout.h"

namespace jax_garden::moe {

class CpuAllToAll final : public HostAllToAll {
 public:
  CpuAllToAll(const MoeShape& shape, DType dispatch_dtype, DType combine_dtype, double timeout_s);

  const MoeShape& shape() const override { return shape_; }

  uint32_t dispatch_send(int32_t rank, const ArrayRef& x, const ArrayRef& x_scale,
                         const ArrayRef& indices, const ArrayRef& weights, int32_t bound_m) override;
  void dispatch_recv(int32_t rank, uint32_t send_done, const ArrayRef& expert_x,
                     const ArrayRef& expert_scale, const ArrayRef& expert_counts) override;
  uint32_t combine_send(int32_t rank, const ArrayRef& expert_y, const ArrayRef& expert_counts) override;
  void combine_recv(int32_t rank, uint32_t send_done, const ArrayRef& indices,
                    const ArrayRef& weights, int32_t bound_m, const ArrayRef& y) override;

  std::vector<int64_t> dropped_rows() const override;
  std::pair<std::string, bool> error() override;
  // Ranks still inside a call fail at once instead of waiting for peers that can no longer find
  // the context.
  void close() override;

 private:
  struct Rank {
    // Written by dispatch_send of this rank, read by every rank's dispatch_recv.
    std::unique_ptr<std::byte[]> x;        // [T, H] dispatch dtype
    std::unique_ptr<float[]> x_scale;      // [T, S]
    std::unique_ptr<int32_t[]> indices;    // [T, K]
    int32_t bound_m = 0;                   // clamped
    // Private to this rank: written by its dispatch_recv, read by its combine phases.
    std::vector<int32_t> kept;             // [L] rows per local expert
    std::vector<int32_t> row_source;       // [M] source s*T*K + t*K + k, or -1 for padding
    int64_t used_rows = 0;
    std::unique_ptr<int32_t[]> routed_indices;  // [T, K] indices of the dispatch combine undoes
    int32_t routed_bound_m = 0;
    // Written by every rank's combine_send, read by this rank's combine_recv.
    std::unique_ptr<std::byte[]> slots;    // [T*K, H] combine dtype
    std::unique_ptr<uint64_t[]> slot_gen;  // [T*K] combine generation that last wrote the slot
  };
  // Completed calls per phase of one rank: the rendezvous every rank reads (progress_, under mu_).
  struct Progress {
    uint64_t dispatch_sent = 0, dispatch_recvd = 0, combine_sent = 0, combine_recvd = 0;
    uint64_t combine_dispatch_gen = 0;  // dispatch generation the last combine_send used
    int64_t dropped = 0;
  };

  using Counter = uint64_t Progress::*;
  void check_rank(const char* phase, int32_t rank) const;
  void check_usable_locked(const char* phase, int32_t rank) const JG_REQUIRES(mu_);
  // Waits (mu_ held) until every rank's `counter` >= target; throws Timeout naming the rest.
  void wait_all_locked(const char* phase, int32_t rank, Counter counter, uint64_t target,
                       const char* waiting_for) JG_REQUIRES(mu_);
  bool all_reached_locked(Counter counter, uint64_t target) const JG_REQUIRES(mu_);
  [[noreturn]] void fail_locked(const std::string& message, bool timeout) JG_REQUIRES(mu_);

  const MoeShape shape_;
  const DType dispatch_dtype_, combine_dtype_;
  const double timeout_s_;
  std::vector<Rank> ranks_;

  mutable Mutex mu_;
  CondVar cv_;  // progress_ moved, or the context broke
  std::vector<Progress> progress_ JG_GUARDED_BY(mu_);  // by rank
  std::string broken_ JG_GUARDED_BY(mu_);  // non-empty once a call failed: every later call fails with it
  bool broken_by_timeout_ JG_GUARDED_BY(mu_) = false;
};

}  // namespace jax_garden::moe
