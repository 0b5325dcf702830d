// Private to InternodeAllToAll's sources (internode_all_to_all.cc and the internode_*.cc files
// of its phases): the state of one rank this process holds (Local) and the helpers every phase
// uses. Not included outside ffi/moe/internode_*.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "moe/internode_all_to_all.h"

namespace jax_garden::moe {
namespace internode {

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
  size_t index = 0;  // position in locals_ and progress_
  int32_t rank = -1;
  bool remote = false;  // has peers in other node groups (then it has a receive region)
  std::shared_ptr<std::byte> send_mem, recv_mem;
  std::byte* send = nullptr;
  std::byte* recv = nullptr;
  std::shared_ptr<fabric::MemoryRegion> send_region, recv_region;
  std::vector<std::shared_ptr<fabric::ImmCounter>> counters;  // [kind][generation mod 8][peer]

  // Calls completed per phase: progress_[index] (under mu_: the ranks of this node read them).

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

}  // namespace jax_garden::moe
