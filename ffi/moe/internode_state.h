// Private to InternodeAllToAll's sources (internode_all_to_all.cc and the internode_*.cc files
// of its phases): the state of one rank this process holds (Local), the helpers every phase uses,
// and wait_local (a template every phase instantiates). Not included outside ffi/moe/internode_*.
#pragma once

#include <algorithm>
#include <chrono>
#include <mutex>
#include <string>
#include <vector>

#include "moe/internode_all_to_all.h"

namespace jax_garden::moe {
namespace internode {

// Waits poll the peers' abort mailboxes at least this often.
inline constexpr double kSliceS = 0.02;

inline uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count());
}

inline std::string rank_list(const std::vector<int32_t>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

}  // namespace internode

// One rank this process holds.
struct InternodeAllToAll::Local {
  int32_t rank = -1;
  bool remote = false;  // has peers in other node groups (then it has a receive region)
  std::shared_ptr<std::byte> send_mem, recv_mem;
  std::byte* send = nullptr;
  std::byte* recv = nullptr;
  std::shared_ptr<fabric::MemoryRegion> send_region, recv_region;
  std::vector<std::shared_ptr<fabric::ImmCounter>> counters;  // [kind][generation mod 8][peer]

  // Calls completed per phase. Guarded by mu_ (the ranks of this node read them).
  uint64_t dispatch_sent = 0, dispatch_recvd = 0, combine_sent = 0, combine_recvd = 0;
  uint64_t combine_dispatch_gen = 0;  // the dispatch whose rows the last combine_send sent
  int64_t dropped = 0;

  // Private to this rank's own calls (one at a time, on its device's thread).
  std::vector<int32_t> sent_indices;     // [T*K] indices of the last dispatch_send
  int32_t sent_bound = 0;
  std::vector<int32_t> sent_entries_to;  // [R] (t, k) entries the last dispatch_send routed to each rank
  std::vector<int64_t> sent_offset_to;   // [R] where each rank's combine message goes in our combine area
  std::vector<int32_t> routed_indices;   // the same four, of the dispatch combine undoes
  int32_t routed_bound = 0;
  std::vector<int32_t> routed_entries_to;
  std::vector<int64_t> routed_offset_to;
  std::vector<int32_t> kept;             // [L] rows per local expert of the last dispatch_recv
  std::vector<int32_t> row_source;       // [M] s*T*K + t*K + k, or -1 for padding
  int64_t used_rows = 0;
  std::vector<int32_t> kept_from;        // [R*L] rows kept from each source per local expert
  std::vector<int64_t> combine_offset_at;  // [R] for each source: where our combine message goes there
  std::vector<int32_t> combine_rows_at;    // [R] rows it reserved for us there
  std::vector<int64_t> pack_offset;        // [R] our combine message for each source (send combine area)
  std::vector<int32_t> pack_rows;          // [R]
  std::vector<Pending> dispatch_ops, combine_ops, signal_ops;

  std::array<uint64_t, kPhases> bytes{}, ops{}, calls{};
  std::array<uint64_t, kPhases> post_ns{}, wait_ns{};  // time spent posting to the engine, waiting
  std::vector<std::array<uint64_t, 2>> timing;  // [kPhases][kTimingRing]
};

// Waits (mu_ taken here) until ready() holds for a rank of this node; false once the deadline
// passed. Polls the other nodes' aborts every kSliceS.
template <typename Ready>
bool InternodeAllToAll::wait_local(const char* phase, int32_t rank, Clock::time_point deadline, Ready ready) {
  std::unique_lock lk(mu_);
  while (true) {
    if (!broken_.empty()) {
      lk.unlock();
      throw_broken(phase, rank);
    }
    if (ready()) return true;
    const auto now = Clock::now();
    if (now >= deadline) return false;
    cv_.wait_until(lk, std::min(deadline, now + seconds_to_duration(internode::kSliceS)));
    if (engine_) {
      lk.unlock();
      poll_aborts();
      lk.lock();
    }
  }
}

}  // namespace jax_garden::moe
