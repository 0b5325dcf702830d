// InternodeAllToAll::combine_send: waits until our combine area is free (the previous combine
// consumed everywhere), packs per source rank a header and the rows kept for it in its (t, k)
// order, and posts those to other nodes into the area the source reserved for us.
#include "moe/internode_state.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "common/error.h"
#include "fabric/core/transfer.h"
#include "moe/host_math.h"

namespace jax_garden::moe {

using internode::Kind;
using internode::now_ns;

uint32_t InternodeAllToAll::combine_send(int32_t rank, const ArrayRef& expert_y, const ArrayRef& expert_counts) {
  constexpr const char* kPhase = "combine_send";
  Local& me = local(kPhase, rank);
  const uint64_t t0 = now_ns();
  const int32_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int32_t L = shape_.local_experts();
  const int64_t M = shape_.max_recv_tokens;
  std::string bad = check_array("expert_y", expert_y, combine_dtype_, {M, H});
  if (bad.empty()) bad = check_array("expert_counts", expert_counts, DType::kS32, {L});
  check_usable(kPhase, rank);
  if (!bad.empty()) fail(kPhase, rank, bad);
  check_pending(me, kPhase);
  uint64_t gen, dispatch_gen;
  bool in_flight;
  {
    MutexLock lk(mu_);
    dispatch_gen = progress_[me.index].dispatch_recvd;
    in_flight = progress_[me.index].combine_sent != progress_[me.index].combine_recvd;
    gen = progress_[me.index].combine_sent + 1;
  }
  if (dispatch_gen == 0) fail(kPhase, rank, "no dispatch ran before it");
  if (in_flight) {
    fail(kPhase, rank,
         "called again before combine_recv; one AllToAll has one combine in flight (use one AllToAll per "
         "micro-batch)");
  }
  const auto* given = static_cast<const int32_t*>(expert_counts.data);
  for (int32_t e = 0; e < L; ++e) {
    if (given[e] != -1 && given[e] != me.kept[e]) {
      fail(kPhase, rank,
           str_cat("expert_counts[", e, "] = ", given[e], " but the last dispatch received ", me.kept[e],
                   " rows for that expert; pass the expert_counts dispatch returned"));
    }
  }
  const auto deadline = deadline_after(timeout_s_);
  const uint64_t w0 = now_ns();
  if (!wait_transfers(me, kPhase, me.combine_ops, deadline)) {
    fail(kPhase, rank, str_cat("timed out after ", timeout_s_, " s waiting for the engine to complete the writes of ",
                               "combine_send #", gen - 1),
         Failure::kTimeout);
  }
  if (gen > 1) {
    std::vector<int32_t> missing;
    for (int32_t s = 0; s < R; ++s) {
      bool ok = same_node(s, rank)
                    ? wait_local(kPhase, rank, deadline, s, &Progress::combine_recvd, gen - 1)
                    : wait_imms(me, kPhase, Kind::kCombineFree, gen - 1, s, internode::signal_imms(peers_[s].sender),
                                deadline);
      if (!ok) missing.push_back(s);
    }
    if (!missing.empty()) fail_timeout(kPhase, rank, "combine_recv", gen - 1, missing);
  }
  me.wait_ns[kCombineSend] += now_ns() - w0;

  // Pack, per source, a header and the rows kept for it in its (t, k) order, sources in order.
  const int64_t TK = int64_t{T} * K;
  std::vector<std::vector<std::pair<int32_t, int32_t>>> rows_for(R);  // (slot t*K+k, row)
  for (int64_t row = 0; row < me.used_rows; ++row) {
    const int32_t src = me.row_source[row];
    if (src < 0) continue;  // padding
    rows_for[src / TK].push_back({static_cast<int32_t>(src % TK), static_cast<int32_t>(row)});
  }
  const int64_t cb = layout_.combine_row_bytes, chb = layout_.combine_header_bytes;
  const auto* y = static_cast<const std::byte*>(expert_y.data);
  int64_t offset = 0;
  for (int32_t s = 0; s < R; ++s) {
    auto& list = rows_for[s];
    std::sort(list.begin(), list.end());
    me.pack_offset[s] = offset;
    me.pack_rows[s] = static_cast<int32_t>(list.size());
    std::byte* msg = me.send + layout_.send_combine + offset;
    auto* h = reinterpret_cast<internode::CombineHeader*>(msg);
    *h = internode::CombineHeader{};
    h->magic = internode::kCombineMagic;
    h->generation = static_cast<uint32_t>(gen);
    h->dispatch_generation = static_cast<uint32_t>(dispatch_gen);
    h->source = rank;
    h->rows = me.pack_rows[s];
    std::memcpy(msg + sizeof(internode::CombineHeader), &me.kept_from[size_t(s) * L], size_t(L) * sizeof(int32_t));
    for (size_t j = 0; j < list.size(); ++j)
      std::memcpy(msg + chb + int64_t(j) * cb, y + int64_t{list[j].second} * cb, size_t(cb));
    offset += chb + int64_t{me.pack_rows[s]} * cb;
  }

  for (int32_t s = 0; s < R; ++s) {
    if (same_node(s, rank)) continue;
    const int32_t n = me.pack_rows[s];
    if (n > me.combine_rows_at[s]) {  // cannot happen with well-formed headers: never write past them
      fail(kPhase, rank,
           str_cat("rank ", s, " reserved ", me.combine_rows_at[s], " combine rows for this rank but it kept ", n));
    }
    try {
      me.combine_ops.push_back({s, "combine message",
                                post_message(me, kCombineSend, s, layout_.send_combine + me.pack_offset[s],
                                             layout_.recv_combine + me.combine_offset_at[s], chb + int64_t{n} * cb,
                                             Kind::kCombine, gen)});
    } catch (const std::exception& e) {
      fail(kPhase, rank, str_cat("could not post the combine to rank ", s, ": ", e.what()), Failure::kTransfer);
    }
  }
  {
    MutexLock lk(mu_);
    progress_[me.index].combine_dispatch_gen = dispatch_gen;
    progress_[me.index].combine_sent = gen;
  }
  cv_.notify_all();
  record_timing(me, kCombineSend, t0);
  return static_cast<uint32_t>(gen);
}

}  // namespace jax_garden::moe
