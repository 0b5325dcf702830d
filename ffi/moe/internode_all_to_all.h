// InternodeAllToAll: MoE dispatch/combine for ranks in node groups that span processes (one CPU
// device per rank). Inside a node group ranks meet in this process's memory, as in the CPU
// reference (a rendezvous on per-rank generation counters under one mutex; a receiver reads the
// sender's packed message in place). Between node groups rows travel through the TransferEngine
// (one engine per process, tcp or any provider), following internode_protocol.h: per-peer private
// receive slots registered once, rows written with imm-carrying writes before the receiver knows
// the counts, counts and routes in a small header write, completion learned only by counting
// imms, a generation in every imm, free acks for flow control.
//
// Results are bit for bit those of CpuAllToAll (and the NumPy reference) for any node split: the
// receiver builds expert_x from all sources' messages in (source rank, token, k) order with
// layout.h, and combine sums in k order with host_math.h.
//
// Failure: every wait of a call shares one deadline (the timeout). A wait that runs out, a write
// the engine failed, bad input or a broken phase order poisons the context (every later call fails
// with the first error) and sends the reason to every rank of the other nodes (abort mailbox), so
// they fail at once instead of waiting; a rank that died becomes a timeout on every survivor.
//
// Lifecycle, driven by jax_garden/moe.py outside jit: construct (allocates and registers the
// regions, starts the engine), peer_info(rank) for every local rank -> bootstrap exchange ->
// connect(info) for every rank of another node held elsewhere, finalize(), run programs, drain(),
// (cross-process barrier), close().
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/deadline.h"
#include "common/thread_annotations.h"
#include "fabric/engine/engine.h"
#include "moe/host_all_to_all.h"
#include "moe/internode_protocol.h"

namespace jax_garden::moe {

struct InternodeOptions {
  double timeout_s = 30.0;
  int32_t node_size = 1;              // ranks [g*node_size, (g+1)*node_size) form node group g
  std::vector<int32_t> local_ranks;   // the ranks this process holds (whole node groups)
  fabric::EngineOptions engine;       // provider, node, domains, completion (timeout: timeout_s)
};

class InternodeAllToAll final : public HostAllToAll {
 public:
  // Phases, in the order of the FFI targets (timings()).
  enum Phase : int { kDispatchSend = 0, kDispatchRecv = 1, kCombineSend = 2, kCombineRecv = 3, kPhases = 4 };
  static constexpr int kTimingRing = 4096;

  InternodeAllToAll(const MoeShape& shape, DType dispatch_dtype, DType combine_dtype, const InternodeOptions& options);
  ~InternodeAllToAll() override;
  InternodeAllToAll(const InternodeAllToAll&) = delete;
  InternodeAllToAll& operator=(const InternodeAllToAll&) = delete;

  // ---- bootstrap (outside jit) ----
  // What ranks of other nodes need to reach local `rank` (bytes for the bootstrap exchange).
  fabric::Bytes peer_info(int32_t rank) const;
  // A rank of another node, from its peer_info (checked: same shape, dtypes, node size).
  void connect(const fabric::Bytes& info);
  // Every local rank can reach every rank outside its node: creates the imm counters.
  void finalize();
  bool needs_engine() const { return engine_ != nullptr; }
  // Ranks of other nodes that local ranks must reach (those connect() needs).
  std::vector<int32_t> remote_ranks() const;

  // ---- HostAllToAll ----
  const MoeShape& shape() const override { return shape_; }
  uint32_t dispatch_send(int32_t rank, const ArrayRef& x, const ArrayRef& x_scale, const ArrayRef& indices,
                         const ArrayRef& weights, int32_t bound_m) override;
  void dispatch_recv(int32_t rank, uint32_t send_done, const ArrayRef& expert_x, const ArrayRef& expert_scale,
                     const ArrayRef& expert_counts) override;
  uint32_t combine_send(int32_t rank, const ArrayRef& expert_y, const ArrayRef& expert_counts) override;
  void combine_recv(int32_t rank, uint32_t send_done, const ArrayRef& indices, const ArrayRef& weights,
                    int32_t bound_m, const ArrayRef& y) override;
  std::vector<int64_t> dropped_rows() const override;
  std::pair<std::string, bool> error() override;  // includes a peer's reported failure
  void close() override;

  // ---- outside jit ----
  // Waits (at most timeout_s) until this process's writes are complete, so that closing cannot
  // cut a write a peer still counts on. Errors of acks and aborts are ignored here.
  void drain(double timeout_s);
  // Host timestamps (steady clock, ns) of the last `n` calls of each phase of local `rank`:
  // [n][4][2] (start, end); 0 where no such call happened.
  std::vector<uint64_t> timings(int32_t rank, int n) const;
  // Bytes local `rank` wrote through the engine per phase so far (payload and headers): [4].
  std::vector<uint64_t> engine_bytes(int32_t rank) const;
  // Writes (and signals) local `rank` posted per phase so far: [4].
  std::vector<uint64_t> engine_ops(int32_t rank) const;
  // Per phase of local `rank`, ns spent so far posting to the engine and waiting (for peers,
  // transfers and acks): [4][2]. The rest of a phase's time is its own work (pack, place, sum).
  std::vector<uint64_t> phase_costs(int32_t rank) const;
  std::string describe() const;

 private:
  struct Pending {
    int32_t peer;
    const char* what;
    std::shared_ptr<fabric::TransferState> state;
  };
  struct Peer {  // a rank of another node, as a local rank reaches it
    bool connected = false;
    fabric::MemoryDescriptor receive;
    internode::SenderSettings sender;
  };
  struct Local;
  // Calls completed per phase by one local rank: the rendezvous of the ranks of its node
  // (progress_, under mu_).
  struct Progress {
    uint64_t dispatch_sent = 0, dispatch_recvd = 0, combine_sent = 0, combine_recvd = 0;
    uint64_t combine_dispatch_gen = 0;  // the dispatch whose rows the last combine_send sent
    int64_t dropped = 0;
  };
  using Counter = uint64_t Progress::*;

  Local& local(const char* phase, int32_t rank);
  const Local* find_local(int32_t rank) const;
  int32_t node_of(int32_t rank) const { return rank / node_size_; }
  bool same_node(int32_t a, int32_t b) const { return node_of(a) == node_of(b); }

  // Errors. fail() poisons the context, tells the other nodes (once) and throws (InvalidArgument,
  // Timeout or TransferFailed by `kind`); the message is "jg_moe_<phase> (rank r): <what>" as the
  // CPU reference words it.
  enum class Failure { kInvalid, kTimeout, kTransfer };
  [[noreturn]] void fail(const char* phase, int32_t rank, const std::string& what, Failure kind = Failure::kInvalid);
  [[noreturn]] void throw_broken(const char* phase, int32_t rank) JG_EXCLUDES(mu_);
  void check_usable(const char* phase, int32_t rank) JG_EXCLUDES(mu_);  // throws if poisoned (after polling aborts)
  void poll_aborts() JG_EXCLUDES(mu_);                                   // peers' abort mailboxes -> broken_
  void check_pending(Local& me, const char* phase);     // a failed write of `me` -> fail
  void broadcast_abort(const std::string& reason, bool timed_out);

  // Waits. Each returns false when the deadline passed first; all of them fail at once when the
  // context is poisoned (by this process or a peer's abort).
  // Until `counter` of `peer` (a rank of this node, held here) reaches `target`.
  bool wait_local(const char* phase, int32_t rank, Clock::time_point deadline, int32_t peer, Counter counter,
                  uint64_t target) JG_EXCLUDES(mu_);
  bool wait_imms(Local& me, const char* phase, internode::Kind kind, uint64_t generation, int32_t peer,
                 uint64_t count, Clock::time_point deadline);
  bool wait_transfers(Local& me, const char* phase, std::vector<Pending>& ops, Clock::time_point deadline);
  // A receive phase's wait for every rank's message of `generation`: ranks of this node publish
  // through `sent` (their counter, held here), the others' one write delivers message_imms() imms.
  // Fails with the missing ranks (waiting for `sender_phase`) when the deadline passes first.
  void wait_messages(Local& me, const char* phase, int32_t rank, internode::Kind kind, Counter sent,
                     const char* sender_phase, uint64_t generation, Clock::time_point deadline);
  [[noreturn]] void fail_timeout(const char* phase, int32_t rank, const char* waiting_for, uint64_t generation,
                                 const std::vector<int32_t>& missing, const std::string& detail = "");

  fabric::ImmCounter& counter(Local& me, internode::Kind kind, uint64_t generation, int32_t peer);
  std::shared_ptr<fabric::TransferState> post_message(Local& me, Phase phase, int32_t peer, int64_t src_offset,
                                                      int64_t dst_offset, int64_t bytes, internode::Kind kind,
                                                      uint64_t generation);
  std::shared_ptr<fabric::TransferState> post_signal(Local& me, Phase phase, int32_t peer, internode::Kind kind,
                                                     uint64_t generation);
  void record_timing(Local& me, Phase phase, uint64_t start_ns);

  // Messages to local `me` (header first): in the sender's send region for a sender of this
  // node, in me's receive region otherwise.
  const std::byte* dispatch_slot(const Local& me, int32_t source) const;
  const std::byte* combine_message(const Local& me, int32_t expert_rank) const;

  const MoeShape shape_;
  const DType dispatch_dtype_, combine_dtype_;
  const double timeout_s_;
  const int32_t node_size_;
  const internode::RegionLayout layout_;
  std::shared_ptr<fabric::Engine> engine_;  // null when no local rank has peers in other nodes
  internode::SenderSettings my_sender_;
  std::vector<std::unique_ptr<Local>> locals_;  // by position in options.local_ranks
  std::vector<int32_t> local_index_;            // rank -> index into locals_, or -1
  std::vector<Peer> peers_;                      // by rank (ranks of other nodes held elsewhere)
  bool finalized_ = false;

  mutable Mutex mu_;
  CondVar cv_;  // progress_ moved, or the context broke
  std::vector<Progress> progress_ JG_GUARDED_BY(mu_);  // by position in locals_ (Local::index)
  std::string broken_ JG_GUARDED_BY(mu_);  // non-empty once a call failed: every later call fails with it
  bool broken_by_timeout_ JG_GUARDED_BY(mu_) = false;
  bool abort_sent_ JG_GUARDED_BY(mu_) = false;
  bool closed_ JG_GUARDED_BY(mu_) = false;
};

}  // namespace jax_garden::moe
