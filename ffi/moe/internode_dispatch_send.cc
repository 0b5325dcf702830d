// InternodeAllToAll::dispatch_send: waits until our send slots are free (the previous dispatch
// consumed everywhere), packs one message per destination rank (each token once, t ascending)
// and posts those to other nodes; ranks of this node read them in place.
#include "moe/internode_state.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "fabric/core/transfer.h"
#include "moe/host_math.h"

namespace jax_garden::moe {

using internode::Kind;
using internode::now_ns;

uint32_t InternodeAllToAll::dispatch_send(int32_t rank, const ArrayRef& x, const ArrayRef& x_scale,
                                          const ArrayRef& indices, const ArrayRef& weights, int32_t bound_m) {
  constexpr const char* kPhase = "dispatch_send";
  Local& me = local(kPhase, rank);
  const uint64_t t0 = now_ns();
  const int32_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int32_t S = shape_.scale_cols, L = shape_.local_experts();
  std::string bad = check_array("x", x, dispatch_dtype_, {T, H});
  if (bad.empty()) bad = check_array("x_scale", x_scale, DType::kF32, {T, S});
  if (bad.empty()) bad = check_array("indices", indices, DType::kS32, {T, K});
  if (bad.empty()) bad = check_array("weights", weights, DType::kF32, {T, K});
  check_usable(kPhase, rank);
  if (!bad.empty()) fail(kPhase, rank, bad);
  check_pending(me, kPhase);
  uint64_t gen;
  {
    MutexLock lk(mu_);
    gen = progress_[me.index].dispatch_sent + 1;
    if (progress_[me.index].dispatch_sent != progress_[me.index].dispatch_recvd) gen = 0;
  }
  if (gen == 0) {
    fail(kPhase, rank,
         "called again before dispatch_recv; one AllToAll has one dispatch in flight (use one AllToAll per "
         "micro-batch)");
  }
  const auto deadline = deadline_after(timeout_s_);

  // Our send slots are free once the last dispatch's writes are done and every destination
  // consumed dispatch #gen-1 (ranks of this node: their counter; other nodes: their free ack).
  const uint64_t w0 = now_ns();
  if (!wait_transfers(me, kPhase, me.dispatch_ops, deadline)) {
    fail(kPhase, rank, str_cat("timed out after ", timeout_s_, " s waiting for the engine to complete the writes of ",
                               "dispatch_send #", gen - 1),
         Failure::kTimeout);
  }
  if (gen > 1) {
    std::vector<int32_t> missing;
    for (int32_t d = 0; d < R; ++d) {
      bool ok = same_node(d, rank)
                    ? wait_local(kPhase, rank, deadline, d, &Progress::dispatch_recvd, gen - 1)
                    : wait_imms(me, kPhase, Kind::kDispatchFree, gen - 1, d, internode::signal_imms(peers_[d].sender),
                                deadline);
      if (!ok) missing.push_back(d);
    }
    if (!missing.empty()) fail_timeout(kPhase, rank, "dispatch_recv", gen - 1, missing);
  }
  me.wait_ns[kDispatchSend] += now_ns() - w0;

  // Pack one message per destination: each token once, t ascending.
  const int32_t bm = clamp_bound(bound_m, T);
  const auto* idx = static_cast<const int32_t*>(indices.data);
  std::memcpy(me.sent_indices.data(), idx, size_t(T) * K * sizeof(int32_t));
  me.sent_bound = bm;
  std::vector<int32_t> tokens_to(R, 0), stamp(R, -1);
  std::fill(me.sent_entries_to.begin(), me.sent_entries_to.end(), 0);
  for (int32_t t = 0; t < bm; ++t) {
    for (int32_t k = 0; k < K; ++k) {
      const int32_t e = idx[int64_t{t} * K + k];
      if (!valid_expert(e, shape_.num_experts)) continue;
      const int32_t d = owner_rank(e, L);
      ++me.sent_entries_to[d];
      if (stamp[d] != t) {
        stamp[d] = t;
        ++tokens_to[d];
      }
    }
  }
  internode::combine_offsets(layout_, me.sent_entries_to.data(), R, me.sent_offset_to.data());
  std::vector<internode::DispatchLayout> lay(R);
  for (int32_t d = 0; d < R; ++d) lay[d] = internode::dispatch_layout(shape_, layout_.row_bytes, tokens_to[d]);
  const auto* xs = static_cast<const std::byte*>(x.data);
  const auto* ss = static_cast<const float*>(x_scale.data);
  const int64_t kHeader = sizeof(internode::DispatchHeader);
  std::vector<int32_t> pos(R, 0);
  std::fill(stamp.begin(), stamp.end(), -1);
  for (int32_t t = 0; t < bm; ++t) {
    for (int32_t k = 0; k < K; ++k) {
      const int32_t e = idx[int64_t{t} * K + k];
      if (!valid_expert(e, shape_.num_experts)) continue;
      const int32_t d = owner_rank(e, L);
      if (stamp[d] == t) continue;
      stamp[d] = t;
      std::byte* msg = me.send + layout_.send_dispatch_slots + int64_t{d} * layout_.dispatch_slot_bytes + kHeader;
      const int32_t i = pos[d]++;
      reinterpret_cast<int32_t*>(msg + lay[d].token_ids)[i] = t;
      std::memcpy(msg + lay[d].indices + int64_t{i} * K * 4, idx + int64_t{t} * K, size_t(K) * 4);
      std::memcpy(msg + lay[d].x + int64_t{i} * layout_.row_bytes, xs + int64_t{t} * layout_.row_bytes,
                  size_t(layout_.row_bytes));
      if (S > 0)
        std::memcpy(msg + lay[d].scales + int64_t{i} * S * 4, ss + int64_t{t} * S, size_t(S) * 4);
    }
  }
  for (int32_t d = 0; d < R; ++d) {
    auto* h = reinterpret_cast<internode::DispatchHeader*>(me.send + layout_.send_dispatch_slots +
                                                           int64_t{d} * layout_.dispatch_slot_bytes);
    *h = internode::DispatchHeader{};
    h->magic = internode::kDispatchMagic;
    h->generation = static_cast<uint32_t>(gen);
    h->source = rank;
    h->tokens = tokens_to[d];
    h->combine_rows = me.sent_entries_to[d];
    h->bound_m = bm;
    h->combine_offset = me.sent_offset_to[d];
  }

  // Other nodes: header and rows in one write into the destination's private slot for us.
  for (int32_t d = 0; d < R; ++d) {
    if (same_node(d, rank)) continue;
    try {
      me.dispatch_ops.push_back(
          {d, "dispatch message",
           post_message(me, kDispatchSend, d, layout_.send_dispatch_slots + int64_t{d} * layout_.dispatch_slot_bytes,
                        layout_.recv_dispatch_slots + int64_t{rank} * layout_.dispatch_slot_bytes,
                        kHeader + lay[d].bytes, Kind::kDispatch, gen)});
    } catch (const std::exception& e) {
      fail(kPhase, rank, str_cat("could not post the dispatch to rank ", d, ": ", e.what()), Failure::kTransfer);
    }
  }
  {
    MutexLock lk(mu_);
    progress_[me.index].dispatch_sent = gen;
  }
  cv_.notify_all();
  record_timing(me, kDispatchSend, t0);
  return static_cast<uint32_t>(gen);
}

}  // namespace jax_garden::moe
