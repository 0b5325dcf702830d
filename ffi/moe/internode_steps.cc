// The steps InternodeAllToAll's phases share: waiting for imms and for our own writes (each
// bounded by the call's deadline, each failing at once when the context is poisoned), posting
// messages and free acks (counted per phase), per-phase timing, and where a message to a local
// rank lies (in the sender's memory within a node, in the receive region across nodes).
#include "moe/internode_state.h"

#include <algorithm>

#include "common/error.h"
#include "fabric/core/transfer.h"
#include "moe/internode_post.h"

namespace jax_garden::moe {

using internode::Kind;
using internode::now_ns;
using internode::rank_list;

namespace {

// Waits poll the peers' abort mailboxes at least this often.
constexpr double kSliceS = 0.02;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Waits

fabric::ImmCounter& InternodeAllToAll::counter(Local& me, Kind kind, uint64_t generation, int32_t peer) {
  const size_t i =
      (size_t(static_cast<uint32_t>(kind)) * internode::kGenerations + generation % internode::kGenerations) *
          shape_.num_ranks + peer;
  return *me.counters[i];
}

bool InternodeAllToAll::wait_local(const char* phase, int32_t rank, Clock::time_point deadline, int32_t peer,
                                   Counter counter, uint64_t target) {
  const size_t index = static_cast<size_t>(local_index_[peer]);
  while (true) {
    bool broken;
    {
      MutexLock lk(mu_);
      broken = !broken_.empty();
      if (!broken) {
        if (progress_[index].*counter >= target) return true;
        const auto now = Clock::now();
        if (now >= deadline) return false;
        cv_.wait_until(mu_, std::min(deadline, now + seconds_to_duration(kSliceS)));
      }
    }
    if (broken) throw_broken(phase, rank);
    if (engine_) poll_aborts();
  }
}

void InternodeAllToAll::wait_messages(Local& me, const char* phase, int32_t rank, Kind kind, Counter sent,
                                      const char* sender_phase, uint64_t generation, Clock::time_point deadline) {
  const int32_t R = shape_.num_ranks;
  std::vector<int32_t> missing;
  for (int32_t s = 0; s < R; ++s) {
    const bool ok = same_node(s, rank)
                        ? wait_local(phase, rank, deadline, s, sent, generation)
                        : wait_imms(me, phase, kind, generation, s, internode::message_imms(peers_[s].sender), deadline);
    if (!ok) missing.push_back(s);
  }
  if (!missing.empty()) fail_timeout(phase, rank, sender_phase, generation, missing);
}

bool InternodeAllToAll::wait_imms(Local& me, const char* phase, Kind kind, uint64_t generation, int32_t peer,
                                  uint64_t count, Clock::time_point deadline) {
  if (count == 0) return true;
  fabric::ImmCounter& c = counter(me, kind, generation, peer);
  while (true) {
    const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
    try {
      c.wait(static_cast<int64_t>(count), std::clamp(left, 0.0, kSliceS));
      return true;
    } catch (const Timeout&) {
    } catch (const TransferFailed& e) {
      fail(phase, me.rank,
           str_cat("the TransferEngine failed while waiting for the ", internode::kind_name(kind), " of rank ", peer,
                   ": ", e.what()),
           Failure::kTransfer);
    }
    check_usable(phase, me.rank);
    check_pending(me, phase);
    if (Clock::now() >= deadline) return false;
  }
}

bool InternodeAllToAll::wait_transfers(Local& me, const char* phase, std::vector<Pending>& ops,
                                       Clock::time_point deadline) {
  for (Pending& op : ops) {
    try {
      op.state->wait(std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count()));
    } catch (const Timeout&) {
      return false;
    } catch (const std::exception& e) {
      fail(phase, me.rank, str_cat("the ", op.what, " write to rank ", op.peer, " failed: ", e.what()),
           Failure::kTransfer);
    }
  }
  ops.clear();
  return true;
}

void InternodeAllToAll::fail_timeout(const char* phase, int32_t rank, const char* waiting_for, uint64_t generation,
                                     const std::vector<int32_t>& missing, const std::string& detail) {
  fail(phase, rank,
       str_cat("timed out after ", timeout_s_, " s waiting for ", waiting_for, " #", generation, " of ranks [",
               rank_list(missing), "]", detail,
               "; every rank of the AllToAll must run the same sequence of dispatch/combine calls (a rank in "
               "another node that died or stalls looks like this too)"),
       Failure::kTimeout);
}

// ---------------------------------------------------------------------------------------------
// Posting

std::shared_ptr<fabric::TransferState> InternodeAllToAll::post_message(Local& me, Phase phase, int32_t peer,
                                                                       int64_t src_offset, int64_t dst_offset,
                                                                       int64_t bytes, Kind kind, uint64_t generation) {
  // One piece (one imm) per sender domain whatever the length (internode_post.h).
  const uint64_t t0 = now_ns();
  auto state = internode::post_message(*engine_, me.send_region, peers_[peer].receive, src_offset, dst_offset, bytes,
                                       internode::make_imm(kind, generation, me.rank, peer));
  me.post_ns[phase] += now_ns() - t0;
  me.bytes[phase] += static_cast<uint64_t>(bytes);
  me.ops[phase] += 1;
  return state;
}

std::shared_ptr<fabric::TransferState> InternodeAllToAll::post_signal(Local& me, Phase phase, int32_t peer, Kind kind,
                                                                      uint64_t generation) {
  const uint64_t t0 = now_ns();
  auto state = internode::post_signal(*engine_, peers_[peer].receive, internode::make_imm(kind, generation, me.rank, peer));
  me.post_ns[phase] += now_ns() - t0;
  me.ops[phase] += 1;
  return state;
}

void InternodeAllToAll::record_timing(Local& me, Phase phase, uint64_t start_ns) {
  me.timing[size_t(phase) * kTimingRing + me.calls[phase] % kTimingRing] = {start_ns, now_ns()};
  me.calls[phase] += 1;
}

// ---------------------------------------------------------------------------------------------
// Messages in place

const std::byte* InternodeAllToAll::dispatch_slot(const Local& me, int32_t source) const {
  return same_node(source, me.rank)
             ? locals_[local_index_[source]]->send + layout_.send_dispatch_slots +
                   int64_t{me.rank} * layout_.dispatch_slot_bytes
             : me.recv + layout_.recv_dispatch_slots + int64_t{source} * layout_.dispatch_slot_bytes;
}

const std::byte* InternodeAllToAll::combine_message(const Local& me, int32_t expert_rank) const {
  if (same_node(expert_rank, me.rank)) {
    const Local& d = *locals_[local_index_[expert_rank]];
    return d.send + layout_.send_combine + d.pack_offset[me.rank];
  }
  return me.recv + layout_.recv_combine + me.routed_offset_to[expert_rank];
}

}  // namespace jax_garden::moe
