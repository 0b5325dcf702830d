// InternodeAllToAll::combine_recv: waits for every expert rank's combine message, checks them
// against our last dispatch's routing, sums each token's rows in k order (host_math.h, as the CPU
// reference), and frees the combine areas (acks).
#include "moe/internode_state.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "fabric/core/transfer.h"
#include "moe/host_math.h"

namespace jax_garden::moe {

using internode::Kind;
using internode::now_ns;

void InternodeAllToAll::combine_recv(int32_t rank, uint32_t send_done, const ArrayRef& indices,
                                     const ArrayRef& weights, int32_t bound_m, const ArrayRef& y) {
  constexpr const char* kPhase = "combine_recv";
  Local& me = local(kPhase, rank);
  const uint64_t t0 = now_ns();
  const int32_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int32_t L = shape_.local_experts();
  std::string bad = check_array("indices", indices, DType::kS32, {T, K});
  if (bad.empty()) bad = check_array("weights", weights, DType::kF32, {T, K});
  if (bad.empty()) bad = check_array("y", y, combine_dtype_, {T, H});
  check_usable(kPhase, rank);
  if (!bad.empty()) fail(kPhase, rank, bad);
  check_pending(me, kPhase);
  uint64_t gen, sent, dispatch_gen;
  {
    MutexLock lk(mu_);
    gen = progress_[me.index].combine_recvd + 1;
    sent = progress_[me.index].combine_sent;
    dispatch_gen = progress_[me.index].dispatch_recvd;
  }
  if (sent != gen || send_done != static_cast<uint32_t>(gen)) {
    fail(kPhase, rank,
         str_cat("send_done token ", send_done, " does not come from this AllToAll's pending combine_send (expected #",
                 gen, ", combine_send ran ", sent, " times)"));
  }
  const auto deadline = deadline_after(timeout_s_);

  const uint64_t w0 = now_ns();
  wait_messages(me, kPhase, rank, Kind::kCombine, &Progress::combine_sent, "combine_send", gen, deadline);
  me.wait_ns[kCombineRecv] += now_ns() - w0;

  // Every expert rank combined the rows of our last dispatch, with our routing.
  for (int32_t d = 0; d < R; ++d) {
    const auto& h = *reinterpret_cast<const internode::CombineHeader*>(combine_message(me, d));
    if (h.magic != internode::kCombineMagic || h.generation != static_cast<uint32_t>(gen) || h.source != d ||
        h.rows < 0 || h.rows > me.routed_entries_to[d]) {
      fail(kPhase, rank,
           str_cat("rank ", d, " sent a malformed combine message (magic 0x", std::hex, h.magic, std::dec,
                   ", generation ", h.generation, " expected ", gen, ", source ", h.source, ", rows ", h.rows,
                   " of at most ", me.routed_entries_to[d], ")"));
    }
    if (h.dispatch_generation != static_cast<uint32_t>(dispatch_gen)) {
      fail(kPhase, rank,
           str_cat("rank ", d, " combined the rows of dispatch #", h.dispatch_generation,
                   " but this rank's last dispatch is #", dispatch_gen));
    }
  }
  const int32_t bm = clamp_bound(bound_m, T);
  const auto* idx = static_cast<const int32_t*>(indices.data);
  if (bm != me.routed_bound) {
    fail(kPhase, rank, str_cat("bound_m = ", bm, " but the matching dispatch used bound_m = ", me.routed_bound));
  }
  for (int64_t i = 0; i < int64_t{bm} * K; ++i) {
    if (idx[i] != me.routed_indices[i]) {
      fail(kPhase, rank,
           str_cat("indices[", i / K, ", ", i % K, "] = ", idx[i], " but the matching dispatch routed it to expert ",
                   me.routed_indices[i], "; combine needs the indices given to dispatch"));
    }
  }

  // Which of our entries each expert rank kept: per local expert of that rank, a prefix of our
  // entries in (t, k) order; its packed rows are the kept entries in (t, k) order.
  std::vector<int32_t> entries(size_t(R) * L, 0);
  for (int64_t i = 0; i < int64_t{bm} * K; ++i) {
    const int32_t e = idx[i];
    if (valid_expert(e, shape_.num_experts)) ++entries[e];  // e = d*L + le
  }
  std::vector<const int32_t*> kept_by(R);
  std::vector<const uint16_t*> rows_by(R);
  for (int32_t d = 0; d < R; ++d) {
    const std::byte* msg = combine_message(me, d);
    const auto& h = *reinterpret_cast<const internode::CombineHeader*>(msg);
    kept_by[d] = reinterpret_cast<const int32_t*>(msg + sizeof(internode::CombineHeader));
    int64_t sum = 0;
    for (int32_t le = 0; le < L; ++le) {
      const int32_t k = kept_by[d][le];
      if (k < 0 || k > entries[size_t(d) * L + le]) {
        fail(kPhase, rank,
             str_cat("rank ", d, " reports ", k, " rows kept for its expert ", le, " from this rank, which routed ",
                     entries[size_t(d) * L + le], " there"));
      }
      sum += k;
    }
    if (sum != h.rows) {
      fail(kPhase, rank, str_cat("rank ", d, " sent ", h.rows, " combine rows but reports ", sum, " kept"));
    }
    rows_by[d] = reinterpret_cast<const uint16_t*>(msg + layout_.combine_header_bytes);
  }

  const auto* w = static_cast<const float*>(weights.data);
  auto* out = static_cast<uint16_t*>(y.data);
  std::vector<int32_t> seen(size_t(R) * L, 0), packed(R, 0);
  std::vector<float> acc(H);
  for (int32_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (t < bm) {
      for (int32_t k = 0; k < K; ++k) {
        const int64_t slot = int64_t{t} * K + k;
        const int32_t e = idx[slot];
        if (!valid_expert(e, shape_.num_experts)) continue;
        const int32_t d = owner_rank(e, L), le = e - d * L;
        if (seen[e]++ >= kept_by[d][le]) continue;  // dropped at dispatch: adds nothing
        accumulate_row(acc.data(), rows_by[d] + int64_t{packed[d]++} * H, w[slot], H);
      }
    }
    round_row_to_bf16(acc.data(), out + int64_t{t} * H, H);
  }

  for (int32_t d = 0; d < R; ++d) {
    if (same_node(d, rank)) continue;
    try {
      me.signal_ops.push_back({d, "combine free ack", post_signal(me, kCombineRecv, d, Kind::kCombineFree, gen)});
    } catch (const std::exception& e) {
      fail(kPhase, rank, str_cat("could not acknowledge the combine of rank ", d, ": ", e.what()),
           Failure::kTransfer);
    }
  }
  {
    MutexLock lk(mu_);
    progress_[me.index].combine_recvd = gen;
  }
  cv_.notify_all();
  record_timing(me, kCombineRecv, t0);
}

}  // namespace jax_garden::moe
