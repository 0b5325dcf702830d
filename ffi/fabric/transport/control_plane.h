// The engine's internal control plane, run by the worker: internal control messages (imm batches,
// failure queries, and the frames of the transports that subscribed to their kinds), imm delivery
// for the paths that do not carry imms with their data (CUDA IPC copies, staging), and the triage of
// failed writes (asking the owner whether the region still exists, to say why the write failed and
// to fail later ones at once). It knows no transport: a transport that speaks its own kinds (the
// staging rendezvous) subscribes a handler for them when it is built.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "fabric/wire/control.h"
#include "fabric/core/engine_parts.h"
#include "fabric/core/region.h"
#include "fabric/core/worker.h"


namespace jax_garden::fabric {

using DoneCallback = std::function<void(bool ok, const std::string& error)>;
// Runs on the worker (progress held) for each internal frame of a subscribed kind.
using FrameHandler = std::function<void(Frame& frame)>;

class ControlPlane final : public WorkerTask {
 public:
  // worker: posts its messages and imm deliveries, counts imm batches; address_bytes: this engine's
  // address, the sender of its frames; imm_target: where single imms go; regions: answers failure
  // queries; peers: unreachable peers (not asked) and gone regions (remembered); timeout_s: the
  // engine timeout (a triage waits at most half of it, 1 s at most).
  ControlPlane(Worker& worker, const Bytes& address_bytes, const ImmTarget& imm_target, RegionTable& regions,
               PeerKnowledge& peers, double timeout_s);

  // A two-sided message op to `endpoint` (a frame with this engine as the sender). Any thread.
  std::unique_ptr<Op> make_send_op(const Bytes& endpoint, MsgKind kind, const Bytes& payload) const;
  // Internal message, posted now; on_done(ok, error) runs on the worker later.
  void send(const Bytes& endpoint, MsgKind kind, const Bytes& payload, DoneCallback on_done) JG_REQUIRES_PROGRESS;

  // Delivers `count` arrivals of `imm` to dst's owner: a zero-byte write to its imm target for one,
  // one imm-batch message for more.
  void deliver_imms(const MemoryDescriptor& dst, uint32_t imm, uint64_t count, DoneCallback on_done)
      JG_REQUIRES_PROGRESS;
  // The same, coalesced: every request queued in one worker pass toward the same peer and imm goes
  // out as one delivery of the summed count (each callback runs on its completion).
  void queue_imms(std::shared_ptr<const MemoryDescriptor> dst, uint32_t imm, uint64_t count, DoneCallback on_done)
      JG_REQUIRES_PROGRESS;

  // Routes every later frame of `kinds` to `handler` (run in advance()). Only before the worker
  // starts (the table is read without a lock afterwards); one handler per kind; not kUser (user
  // messages go to recv(), never here).
  void subscribe(std::initializer_list<MsgKind> kinds, FrameHandler handler);

  // From the worker's sink.
  void on_frame(Frame&& frame) JG_REQUIRES_PROGRESS;  // internal kinds, handled in advance()
  bool triage(Op& op, const std::string& error) JG_REQUIRES_PROGRESS;

  bool advance(Clock::time_point now) override JG_REQUIRES_PROGRESS;
  bool busy() const override JG_REQUIRES_PROGRESS;

 private:
  struct PendingImms {
    std::shared_ptr<const MemoryDescriptor> dst;
    uint64_t count = 0;
    std::vector<DoneCallback> callbacks;
  };
  // A failed user op waiting for its owners' answers.
  struct Case {
    std::shared_ptr<TransferState> state;
    std::string error;
    std::vector<OpTarget> targets;
    std::vector<int> verdict;  // per target: -1 unknown, 0 gone, 1 live
    size_t answered = 0;
    Clock::time_point deadline;
  };
  struct Query {
    Bytes owner;
    std::vector<std::pair<std::shared_ptr<Case>, size_t>> entries;  // (case, target index)
  };

  void handle(Frame& f) JG_REQUIRES_PROGRESS;
  void answer_query(const Frame& f) JG_REQUIRES_PROGRESS;
  bool flush_imms() JG_REQUIRES_PROGRESS;
  // Adversarial mode: one imm delivery cut into parts, delivered (and held back) independently.
  void deliver_split(const MemoryDescriptor& dst, uint32_t imm, const std::vector<uint64_t>& parts,
                     std::shared_ptr<std::vector<DoneCallback>> cbs) JG_REQUIRES_PROGRESS;
  bool send_queries() JG_REQUIRES_PROGRESS;
  void on_reply(const RegionReplyMsg& m) JG_REQUIRES_PROGRESS;
  void on_query_failed(uint64_t query, const std::string& error) JG_REQUIRES_PROGRESS;
  void conclude(Case& c) JG_REQUIRES_PROGRESS;

  Worker& worker_;
  const Bytes& address_bytes_;
  const ImmTarget& imm_target_;
  RegionTable& regions_;
  PeerKnowledge& peers_;
  const double timeout_s_;
  // By kind: filled before the worker starts, read-only afterwards. The control plane's own kinds
  // (imm batches, region queries and replies) are in it too.
  std::array<FrameHandler, kMaxMsgKind + 1> handlers_;
  std::deque<Frame> frames_ JG_GUARDED_BY_PROGRESS;
  std::map<std::pair<Bytes, uint32_t>, PendingImms> pending_imms_ JG_GUARDED_BY_PROGRESS;  // (peer, imm)
  std::map<Bytes, std::vector<std::pair<std::shared_ptr<Case>, size_t>>> unasked_ JG_GUARDED_BY_PROGRESS;
  std::map<uint64_t, Query> queries_ JG_GUARDED_BY_PROGRESS;
  // Queries whose send failed (the connection is being re-established): asked again after a pause.
  std::vector<std::pair<Clock::time_point, Query>> retry_ JG_GUARDED_BY_PROGRESS;
  std::vector<std::shared_ptr<Case>> cases_ JG_GUARDED_BY_PROGRESS;
  uint64_t next_query_ JG_GUARDED_BY_PROGRESS = 1;
};

}  // namespace jax_garden::fabric
