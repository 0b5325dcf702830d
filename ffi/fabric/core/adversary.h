// The adversarial delivery mode: does on purpose, reproducibly from a seed, what a reliable but
// unordered network (EFA's SRD; several domains are several connections) may legally do and what
// loopback tcp never does, so that the protocols on top are tested against it. Off by default
// (TransferEngine(adversary=...) or JAX_GARDEN_ADVERSARY); when off the engine pays one predictable
// branch per hook.
//
// What it does, per path:
//   * every op the worker posts (user RMA writes with their imm, control messages, and the internal
//     writes of the staged path: chunk writes, imm deliveries): each piece may be held back
//     for a bounded random delay before it is posted, so pieces of one op, of different ops and
//     toward different peers land out of order (another piece's imm before this piece's data); the
//     last piece of a multi-piece op, and now and then any piece, may be held by a wide margin;
//   * imms that arrived (RMA completions, imm batches, the staged receiver's count, ipc mailbox
//     records) may be held back before they are counted, so messages overtake them;
//   * the ipc path (same host, imm records through the owner's shared-memory mailbox): a destination's
//     copy may start late (bounded random delay; now and then the wide margin), while later ones toward
//     the same owner start and land before it, their records taken first; its imm record is cut into
//     several records; the owner holds the imms it takes from its mailbox like any other arrival;
//   * staged imm deliveries are cut into several deliveries;
//   * with completion="transmit", an op whose pieces are held (an ipc destination whose start is held)
//     is reported complete at once (its source bytes copied first, so the caller may reuse the source;
//     host memory only: GPU sources complete as usual);
//   * optionally (reset=P) the connection of a multi-piece fabric op is reset mid-op: its first pieces
//     are posted, the rest fail with a connection reset, and the op fails (the ipc path has none).
// What it never does: an imm before its own piece's data, a lost or duplicated piece, a delivery-
// completion op complete before its bytes landed. Held pieces of an op that failed are dropped as
// the worker drops any unposted piece.
//
// Targeted holds (tests): hold(imm, mask, skip) holds every RMA piece whose imm matches after letting
// `skip` of them pass, until release(); e.g. the last data write of a request.
//
// Threading: the fabric hooks run under the worker's progress lock; the ipc hooks (copy_start,
// copy_released, split_imms) on any thread, since an ipc op starts on its caller's thread.
#pragma once

#include <cstdint>
#include <limits>
#include <queue>
#include <string>
#include <vector>

#include <atomic>

#include "common/deadline.h"
#include "common/thread_annotations.h"
#include "fabric/core/work_request.h"
#include "fabric/core/worker.h"

namespace jax_garden::fabric {

struct AdversaryOptions {
  uint64_t seed = 1;
  double hold = 0.5;        // P(a write piece is held back before it is posted)
  double msg = 0.3;         // P(a control message is held back)
  double imm = 0.3;         // P(an arrived imm is held back before it is counted)
  double last = 0.5;        // P(the last piece of a multi-piece op is held by the wide margin)
  double tail = 0.05;       // P(any other write piece is held by the wide margin: one op lands far behind)
  double delay_ms = 4.0;    // a held piece waits uniform(0, delay_ms]
  double last_ms = 25.0;    // the wide margin: such a last piece waits in (delay_ms + last_ms) / 2 .. last_ms
  double reset = 0.0;       // P(a multi-piece op's connection is reset mid-op)
  bool early = true;        // transmit completion: an op with held pieces completes at once
  uint32_t split = 3;       // ipc/staged imm deliveries are cut into up to this many deliveries

  // "seed=7,hold=0.5,..." (a bare number is the seed); throws InvalidArgument naming the bad key or
  // value. Returns false for an empty spec or off/0/no/false (the mode is off).
  static bool parse(const std::string& spec, AdversaryOptions* out);
  std::string to_string() const;
};

// What the mode did (per engine, and summed over the process: totals()).
struct AdversaryStats {
  uint64_t pieces = 0;             // pieces (writes and messages) seen before posting
  uint64_t held = 0;               // pieces held back before posting (messages included)
  uint64_t messages_held = 0;      // of which control messages
  uint64_t reordered = 0;          // held pieces posted after a piece submitted later than them
  uint64_t last_held = 0;          // last pieces of multi-piece ops held by the wide margin
  uint64_t tail_held = 0;          // other write pieces held by the wide margin
  uint64_t imms_held = 0;          // imm arrivals held back before being counted
  uint64_t imm_splits = 0;         // ipc/staged imm deliveries cut into several
  uint64_t copies_delayed = 0;     // ipc copies started late (also counted in held; tail_held: the wide margin)
  uint64_t early_completions = 0;  // transmit ops reported complete while pieces were held
  uint64_t resets = 0;             // ops whose connection was reset mid-op
  uint64_t targeted = 0;           // pieces held by a hold() rule
  uint64_t held_now = 0;           // pieces, ipc copies and imm arrivals held at this moment (not cumulative)

  void add(const AdversaryStats& o);
};

class Adversary {
 public:
  explicit Adversary(const AdversaryOptions& options) : o_(options) {}
  const AdversaryOptions& options() const { return o_; }
  static AdversaryStats totals();  // every engine of this process, closed ones included

  // ---- the worker, under its progress lock ----
  // Decides the fate of a newly installed op: which pieces fail with a reset (WorkRequest::reset),
  // whether it completes early (transmit). Returns an id for piece decisions.
  struct OpDecision {
    uint64_t op_seq = 0;
    bool early = false;
  };
  OpDecision on_install(Op& op, bool delivery_complete) JG_REQUIRES_PROGRESS;
  // True if the piece is held (then the adversary owns the queueing until release_due hands it back).
  bool hold(WorkRequest& wr, uint64_t op_seq, size_t index, size_t pieces, Clock::time_point now) JG_REQUIRES_PROGRESS;
  // The pieces of held ops that may go now (their delay passed, their rule was released, or their
  // op failed), in release order; and the imms that may be counted now.
  void release_due(Clock::time_point now, std::vector<WorkRequest*>* pieces,
                   std::vector<std::pair<uint32_t, int64_t>>* imms) JG_REQUIRES_PROGRESS;
  bool hold_imm(uint32_t imm, int64_t n, Clock::time_point now) JG_REQUIRES_PROGRESS;
  void early_completed() { count(&AdversaryStats::early_completions); }  // any thread
  bool busy() const JG_REQUIRES_PROGRESS { return !timed_.empty() || !imms_.empty() || held_by_rules_ > 0; }
  // Drops every held piece and imm (engine close: their ops are being failed and freed).
  void clear() JG_REQUIRES_PROGRESS;

  // ---- the transports, any thread ----
  // An ipc destination about to start: `at` = Clock::time_point{} starts it now, else not before `at`
  // (then copy_released(seq, ...) once it starts or its op failed). `seq` is its submission order.
  struct CopyStart {
    uint64_t seq = 0;
    Clock::time_point at{};
  };
  CopyStart copy_start(Clock::time_point now) JG_EXCLUDES(ipc_mu_);
  // A held ipc destination starts now (a later one started before it: a reordering), or was dropped.
  void copy_released(uint64_t seq, bool started) JG_EXCLUDES(ipc_mu_);
  // Cuts an imm delivery of `count` into parts (sum = count), possibly one.
  std::vector<uint64_t> split_imms(uint64_t count);

  // ---- tests, under the progress lock ----
  void add_rule(uint32_t imm, uint32_t mask, uint64_t skip) JG_REQUIRES_PROGRESS;
  uint64_t release_rule(uint32_t imm, uint32_t mask) JG_REQUIRES_PROGRESS;  // pieces released; rule removed
  uint64_t holding(uint32_t imm, uint32_t mask) const JG_REQUIRES_PROGRESS;
  AdversaryStats stats() const JG_REQUIRES_PROGRESS;

 private:
  struct Timed {
    Clock::time_point at;
    uint64_t seq;  // submission order of the piece
    WorkRequest* wr;
    bool operator>(const Timed& o) const { return at != o.at ? at > o.at : seq > o.seq; }
  };
  struct HeldImm {
    Clock::time_point at;
    uint64_t seq;
    uint32_t imm;
    int64_t n;
    bool operator>(const HeldImm& o) const { return at != o.at ? at > o.at : seq > o.seq; }
  };
  struct Rule {
    uint32_t imm, mask;
    uint64_t skip;
    bool released = false;
    std::vector<std::pair<uint64_t, WorkRequest*>> held;  // (seq, piece)
  };
  double unit(uint64_t a, uint64_t b, uint64_t salt) const;  // in [0, 1), a pure function of the seed
  Clock::duration ms(double v) const;
  void note_released(uint64_t seq) JG_REQUIRES_PROGRESS;
  void count(uint64_t AdversaryStats::*field, uint64_t n = 1) JG_EXCLUDES(stats_mu_);

  const AdversaryOptions o_;
  mutable Mutex stats_mu_;  // the ipc hooks count on their callers' threads
  AdversaryStats stats_ JG_GUARDED_BY(stats_mu_);
  uint64_t next_op_ JG_GUARDED_BY_PROGRESS = 0;
  uint64_t next_seq_ JG_GUARDED_BY_PROGRESS = 0;       // pieces, in submission order
  uint64_t max_passed_ JG_GUARDED_BY_PROGRESS = 0;     // the latest submitted piece queued so far (+1; 0 = none)
  uint64_t imm_seq_ JG_GUARDED_BY_PROGRESS = 0;
  std::atomic<uint64_t> decisions_{0};                 // imm splits
  Mutex ipc_mu_;
  uint64_t copy_seq_ JG_GUARDED_BY(ipc_mu_) = 0;        // ipc destinations, in submission order
  uint64_t copy_max_started_ JG_GUARDED_BY(ipc_mu_) = 0;  // the latest submitted one started so far (+1)
  std::atomic<uint64_t> copies_held_{0};               // ipc destinations held now
  size_t held_by_rules_ JG_GUARDED_BY_PROGRESS = 0;
  std::priority_queue<Timed, std::vector<Timed>, std::greater<Timed>> timed_ JG_GUARDED_BY_PROGRESS;
  std::priority_queue<HeldImm, std::vector<HeldImm>, std::greater<HeldImm>> imms_ JG_GUARDED_BY_PROGRESS;
  std::vector<Rule> rules_ JG_GUARDED_BY_PROGRESS;
};

}  // namespace jax_garden::fabric
