// InternodeAllToAll::dispatch_recv: waits for every source's dispatch message, checks the
// headers, places the rows into expert_x in (source, token, k) order (layout.h, bit for bit the
// CPU reference), remembers the routing combine undoes, and frees the slots (acks).
#include "moe/internode_state.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "fabric/core/transfer.h"
#include "moe/host_math.h"

namespace jax_garden::moe {

using internode::Kind;
using internode::now_ns;

void InternodeAllToAll::dispatch_recv(int32_t rank, uint32_t send_done, const ArrayRef& expert_x,
                                      const ArrayRef& expert_scale, const ArrayRef& expert_counts) {
  constexpr const char* kPhase = "dispatch_recv";
  Local& me = local(kPhase, rank);
  const uint64_t t0 = now_ns();
  const int32_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int32_t S = shape_.scale_cols, L = shape_.local_experts();
  const int64_t M = shape_.max_recv_tokens;
  std::string bad = check_array("expert_x", expert_x, dispatch_dtype_, {M, H});
  if (bad.empty()) bad = check_array("expert_scale", expert_scale, DType::kF32, {M, S});
  if (bad.empty()) bad = check_array("expert_counts", expert_counts, DType::kS32, {L});
  check_usable(kPhase, rank);
  if (!bad.empty()) fail(kPhase, rank, bad);
  check_pending(me, kPhase);
  uint64_t gen, sent;
  {
    MutexLock lk(mu_);
    gen = progress_[me.index].dispatch_recvd + 1;
    sent = progress_[me.index].dispatch_sent;
  }
  if (sent != gen || send_done != static_cast<uint32_t>(gen)) {
    fail(kPhase, rank,
         str_cat("send_done token ", send_done, " does not come from this AllToAll's pending dispatch_send (expected #",
                 gen, ", dispatch_send ran ", sent, " times)"));
  }
  const auto deadline = deadline_after(timeout_s_);

  // Every source's message: ranks of this node publish through their counter; the others' one
  // write delivers message_imms() imms whatever its length.
  const uint64_t w0 = now_ns();
  wait_messages(me, kPhase, rank, Kind::kDispatch, &Progress::dispatch_sent, "dispatch_send", gen, deadline);
  me.wait_ns[kDispatchRecv] += now_ns() - w0;

  // Check every header, count rows per local expert over every source's routes, then place them
  // in (source, token, k) order: the layout of layout.h, bit for bit that of the CPU reference.
  const int64_t kHeader = sizeof(internode::DispatchHeader);
  const int32_t first = rank * L;
  std::vector<int32_t> counts(L, 0), start(L), kept(L), cursor(L, 0);
  for (int32_t s = 0; s < R; ++s) {
    const auto& h = *reinterpret_cast<const internode::DispatchHeader*>(dispatch_slot(me, s));
    if (h.magic != internode::kDispatchMagic || h.generation != static_cast<uint32_t>(gen) || h.source != s ||
        h.tokens < 0 || h.tokens > T || h.combine_rows < 0 || h.combine_rows > T * K || h.combine_offset < 0 ||
        h.combine_offset + layout_.combine_header_bytes + int64_t{h.combine_rows} * layout_.combine_row_bytes >
            layout_.recv_combine_bytes) {
      fail(kPhase, rank,
           str_cat("rank ", s, " sent a malformed dispatch message (magic 0x", std::hex, h.magic, std::dec,
                   ", generation ", h.generation, " expected ", gen, ", source ", h.source, ", tokens ", h.tokens,
                   ", combine rows ", h.combine_rows, " at ", h.combine_offset, ")"));
    }
    const auto lay = internode::dispatch_layout(shape_, layout_.row_bytes, h.tokens);
    const std::byte* msg = dispatch_slot(me, s) + kHeader;
    const auto* ids = reinterpret_cast<const int32_t*>(msg + lay.token_ids);
    const auto* ind = reinterpret_cast<const int32_t*>(msg + lay.indices);
    int32_t prev = -1;
    for (int32_t i = 0; i < h.tokens; ++i) {
      if (ids[i] <= prev || ids[i] >= T) {
        fail(kPhase, rank,
             str_cat("rank ", s, " sent a malformed dispatch message: token id ", ids[i], " at position ", i,
                     " (ids must ascend within [0, ", T, "))"));
      }
      prev = ids[i];
      for (int32_t k = 0; k < K; ++k) {
        const int32_t e = ind[int64_t{i} * K + k];
        if (valid_expert(e, shape_.num_experts) && owner_rank(e, L) == rank) ++counts[e - first];
      }
    }
    me.combine_offset_at[s] = h.combine_offset;
    me.combine_rows_at[s] = h.combine_rows;
  }
  int64_t used_rows = 0;
  const int64_t dropped =
      compute_segments(counts.data(), L, shape_.expert_padding, M, start.data(), kept.data(), &used_rows);

  const int64_t row_bytes = layout_.row_bytes;
  auto* out_x = static_cast<std::byte*>(expert_x.data);
  auto* out_scale = static_cast<float*>(expert_scale.data);
  // Padding rows and the tail are zero; kept rows are written below (each row once).
  auto zero_rows = [&](int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    std::memset(out_x + lo * row_bytes, 0, size_t(hi - lo) * size_t(row_bytes));
    if (S > 0) std::memset(out_scale + lo * S, 0, size_t(hi - lo) * S * sizeof(float));
  };
  for (int32_t le = 0; le < L; ++le)
    zero_rows(int64_t{start[le]} + kept[le], le + 1 < L ? int64_t{start[le + 1]} : used_rows);
  zero_rows(used_rows, M);
  std::fill(me.row_source.begin(), me.row_source.begin() + used_rows, -1);
  std::fill(me.kept_from.begin(), me.kept_from.end(), 0);
  for (int32_t s = 0; s < R; ++s) {
    const auto& h = *reinterpret_cast<const internode::DispatchHeader*>(dispatch_slot(me, s));
    const auto lay = internode::dispatch_layout(shape_, layout_.row_bytes, h.tokens);
    const std::byte* msg = dispatch_slot(me, s) + kHeader;
    const auto* ids = reinterpret_cast<const int32_t*>(msg + lay.token_ids);
    const auto* ind = reinterpret_cast<const int32_t*>(msg + lay.indices);
    for (int32_t i = 0; i < h.tokens; ++i) {
      for (int32_t k = 0; k < K; ++k) {
        const int32_t e = ind[int64_t{i} * K + k];
        if (!valid_expert(e, shape_.num_experts) || owner_rank(e, L) != rank) continue;
        const int32_t le = e - first;
        if (cursor[le] >= kept[le]) continue;  // overflow: dropped, counted above
        const int64_t row = start[le] + cursor[le]++;
        std::memcpy(out_x + row * row_bytes, msg + lay.x + int64_t{i} * row_bytes, size_t(row_bytes));
        if (S > 0)
          std::memcpy(out_scale + row * S, msg + lay.scales + int64_t{i} * S * 4, size_t(S) * sizeof(float));
        me.row_source[row] = static_cast<int32_t>((int64_t{s} * T + ids[i]) * K + k);
        ++me.kept_from[size_t(s) * L + le];
      }
    }
  }
  std::memcpy(expert_counts.data, kept.data(), size_t(L) * sizeof(int32_t));
  me.kept = kept;
  me.used_rows = used_rows;
  me.routed_indices = me.sent_indices;
  me.routed_bound = me.sent_bound;
  me.routed_entries_to = me.sent_entries_to;
  me.routed_offset_to = me.sent_offset_to;

  // The other nodes may overwrite our slots from now on.
  for (int32_t s = 0; s < R; ++s) {
    if (same_node(s, rank)) continue;
    try {
      me.signal_ops.push_back({s, "dispatch free ack", post_signal(me, kDispatchRecv, s, Kind::kDispatchFree, gen)});
    } catch (const std::exception& e) {
      fail(kPhase, rank, str_cat("could not acknowledge the dispatch of rank ", s, ": ", e.what()),
           Failure::kTransfer);
    }
  }
  {
    MutexLock lk(mu_);
    progress_[me.index].dropped += dropped;
    progress_[me.index].dispatch_recvd = gen;
  }
  cv_.notify_all();
  record_timing(me, kDispatchRecv, t0);
}

}  // namespace jax_garden::moe
