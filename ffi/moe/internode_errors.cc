// InternodeAllToAll's failure handling: poisoning the context (fail), the abort mailbox that
// tells the other nodes at once (broadcast_abort, poll_aborts), and the checks every phase makes
// before it touches anything (check_usable, check_pending).
#include "moe/internode_state.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "fabric/core/region.h"
#include "fabric/core/transfer.h"

namespace jax_garden::moe {

using internode::Kind;

namespace {

// How long a failing rank waits for its abort messages to land before it reports the error.
constexpr double kAbortDeliveryS = 1.0;

}  // namespace

void InternodeAllToAll::fail(const char* phase, int32_t rank, const std::string& what, Failure kind) {
  const bool timeout = kind == Failure::kTimeout;
  const std::string msg = str_cat("jg_moe_", phase, " (rank ", rank, "): ", what);
  bool first = false;
  {
    MutexLock lk(mu_);
    if (broken_.empty()) {
      broken_ = msg;
      broken_by_timeout_ = timeout;
      first = true;
    }
    cv_.notify_all();
  }
  if (first) broadcast_abort(msg, timeout);
  if (kind == Failure::kTimeout) throw Timeout(msg);
  if (kind == Failure::kTransfer) throw TransferFailed(msg);
  throw InvalidArgument(msg);
}

void InternodeAllToAll::throw_broken(const char* phase, int32_t rank) {
  std::string why;
  {
    MutexLock lk(mu_);
    why = broken_;
  }
  throw std::runtime_error(
      str_cat("jg_moe_", phase, " (rank ", rank, "): this AllToAll is unusable after an earlier error: ", why));
}

void InternodeAllToAll::check_usable(const char* phase, int32_t rank) {
  if (engine_) poll_aborts();
  bool broken;
  {
    MutexLock lk(mu_);
    broken = !broken_.empty();
  }
  if (broken) throw_broken(phase, rank);
}

void InternodeAllToAll::poll_aborts() {
  if (!finalized_) return;
  const int32_t R = shape_.num_ranks;
  for (auto& lr : locals_) {
    for (int32_t p = 0; p < R; ++p) {
      if (same_node(p, lr->rank)) continue;
      if (counter(*lr, Kind::kAbort, 0, p).credits() <= 0) continue;
      const auto* m = reinterpret_cast<const internode::AbortMessage*>(lr->recv + layout_.recv_abort +
                                                                       int64_t{p} * internode::kAbortBytes);
      std::string text = "(no reason given)";
      if (m->magic == internode::kAbortMagic && m->length <= sizeof(m->text)) text.assign(m->text, m->length);
      MutexLock lk(mu_);
      if (broken_.empty()) {
        broken_ = str_cat("rank ", p, " failed: ", text);
        broken_by_timeout_ = m->timed_out != 0;
        cv_.notify_all();
      }
      return;
    }
  }
}

void InternodeAllToAll::broadcast_abort(const std::string& reason, bool timed_out) {
  if (!engine_ || !finalized_) return;
  {
    MutexLock lk(mu_);
    if (abort_sent_ || closed_) return;
    abort_sent_ = true;
  }
  const int32_t R = shape_.num_ranks;
  std::vector<std::shared_ptr<fabric::TransferState>> sent;
  for (auto& lr : locals_) {
    auto* m = reinterpret_cast<internode::AbortMessage*>(lr->send + layout_.send_abort);
    m->magic = internode::kAbortMagic;
    m->source = lr->rank;
    m->timed_out = timed_out ? 1 : 0;
    m->length = static_cast<uint32_t>(std::min(reason.size(), sizeof(m->text)));
    std::memcpy(m->text, reason.data(), m->length);
    for (int32_t p = 0; p < R; ++p) {
      if (same_node(p, lr->rank) || local_index_[p] >= 0) continue;  // this process knows already
      try {
        fabric::WriteRequest req;
        req.src = lr->send_region;
        req.dst = &peers_[p].receive;
        req.length = internode::kAbortBytes;
        req.src_offset = static_cast<uint64_t>(layout_.send_abort);
        req.dst_offset = static_cast<uint64_t>(layout_.recv_abort + int64_t{lr->rank} * internode::kAbortBytes);
        req.imm = internode::make_imm(Kind::kAbort, 0, lr->rank, p);
        sent.push_back(engine_->write(req));
      } catch (const std::exception&) {
        // Best effort: a peer that cannot be told times out on its own.
      }
    }
  }
  // Let the reason land before this process reports the error (and perhaps exits).
  auto deadline = deadline_after(std::min(kAbortDeliveryS, timeout_s_));
  for (auto& s : sent) {
    try {
      s->wait(std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count()));
    } catch (const std::exception&) {
    }
  }
}

void InternodeAllToAll::check_pending(Local& me, const char* phase) {
  for (auto* ops : {&me.dispatch_ops, &me.combine_ops}) {
    for (Pending& op : *ops) {
      if (op.state->finished() && op.state->status() != fabric::TransferState::Status::kDone) {
        fail(phase, me.rank, str_cat("the ", op.what, " write to rank ", op.peer, " failed: ", op.state->error()),
             Failure::kTransfer);
      }
    }
  }
  // Acks are never waited for, and a failed one is no error here: it fails when the peer already
  // closed (it needs nothing more from us) or died (then its data never comes, and that wait
  // reports it). Forget them once done.
  auto& acks = me.signal_ops;
  acks.erase(std::remove_if(acks.begin(), acks.end(), [](const Pending& op) { return op.state->finished(); }),
             acks.end());
}

}  // namespace jax_garden::moe
