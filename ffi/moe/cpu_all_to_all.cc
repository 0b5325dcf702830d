#include "moe/cpu_all_to_all.h"

#include <algorithm>
#include <cstring>

#include "common/deadline.h"
#include "common/error.h"
#include "moe/host_math.h"

namespace jax_garden::moe {

CpuAllToAll::CpuAllToAll(const MoeShape& shape, DType dispatch_dtype, DType combine_dtype,
                         double timeout_s)
    : shape_(shape), dispatch_dtype_(dispatch_dtype), combine_dtype_(combine_dtype),
      timeout_s_(timeout_s) {
  validate_shape(shape_);
  validate_dispatch_dtype(shape_, dispatch_dtype_);
  JG_CHECK_ARG(combine_dtype == DType::kBF16, "MoE: combine dtype must be bfloat16, got ",
               dtype_name(combine_dtype));
  JG_CHECK_ARG(timeout_s > 0, "MoE: timeout must be > 0 seconds, got ", timeout_s);

  const size_t T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const size_t S = shape_.scale_cols;
  ranks_.resize(shape_.num_ranks);
  progress_.resize(shape_.num_ranks);  // (constructors are not analysed: nothing runs concurrently yet)
  // new T[n] leaves memory untouched: a context costs address space until used.
  for (Rank& r : ranks_) {
    r.x.reset(new std::byte[T * H * dtype_size(dispatch_dtype_)]);
    r.x_scale.reset(new float[std::max<size_t>(T * S, 1)]);
    r.indices.reset(new int32_t[T * K]);
    r.routed_indices.reset(new int32_t[T * K]);
    r.kept.assign(shape_.local_experts(), 0);
    r.row_source.assign(shape_.max_recv_tokens, -1);
    r.slots.reset(new std::byte[T * K * H * dtype_size(combine_dtype_)]);
    r.slot_gen.reset(new uint64_t[T * K]());
  }
}

void CpuAllToAll::check_rank(const char* phase, int32_t rank) const {
  if (rank < 0 || rank >= shape_.num_ranks) {
    throw InvalidArgument(str_cat("jg_moe_", phase, ": rank operand ", rank,
                                  " is outside [0, ", shape_.num_ranks,
                                  "); pass jax.lax.axis_index of the AllToAll's axis"));
  }
}

void CpuAllToAll::check_usable_locked(const char* phase, int32_t rank) const {
  if (!broken_.empty()) {
    throw std::runtime_error(str_cat("jg_moe_", phase, " (rank ", rank,
                                     "): this AllToAll is unusable after an earlier error: ",
                                     broken_));
  }
}

void CpuAllToAll::fail_locked(const std::string& message, bool timeout) {
  // Poison the context so the other ranks fail at once instead of waiting for the timeout.
  if (broken_.empty()) {
    broken_ = message;
    broken_by_timeout_ = timeout;
  }
  cv_.notify_all();
  if (timeout) throw Timeout(message);
  throw InvalidArgument(message);
}

bool CpuAllToAll::all_reached_locked(Counter counter, uint64_t target) const {
  for (const Progress& p : progress_) {
    if (p.*counter < target) return false;
  }
  return true;
}

void CpuAllToAll::wait_all_locked(const char* phase, int32_t rank, Counter counter, uint64_t target,
                                  const char* waiting_for) {
  const auto deadline = deadline_after(timeout_s_);
  bool ready = !broken_.empty() || all_reached_locked(counter, target);
  while (!ready) {
    const bool timed_out = cv_.wait_until(mu_, deadline) == std::cv_status::timeout;
    ready = !broken_.empty() || all_reached_locked(counter, target);
    if (timed_out) break;
  }
  if (!ready) {
    std::string missing;
    for (size_t i = 0; i < progress_.size(); ++i) {
      if (progress_[i].*counter < target) missing += (missing.empty() ? "" : ", ") + std::to_string(i);
    }
    fail_locked(str_cat("jg_moe_", phase, " (rank ", rank, "): timed out after ", timeout_s_,
                        " s waiting for ", waiting_for, " #", target, " of ranks [", missing,
                        "]; every rank of the AllToAll must run the same sequence of "
                        "dispatch/combine calls"),
                /*timeout=*/true);
  }
  check_usable_locked(phase, rank);
}

uint32_t CpuAllToAll::dispatch_send(int32_t rank, const ArrayRef& x, const ArrayRef& x_scale,
                                    const ArrayRef& indices, const ArrayRef& weights,
                                    int32_t bound_m) {
  constexpr const char* kPhase = "dispatch_send";
  check_rank(kPhase, rank);
  const int64_t T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int64_t S = shape_.scale_cols;
  std::string bad = check_array("x", x, dispatch_dtype_, {T, H});
  if (bad.empty()) bad = check_array("x_scale", x_scale, DType::kF32, {T, S});
  if (bad.empty()) bad = check_array("indices", indices, DType::kS32, {T, K});
  if (bad.empty()) bad = check_array("weights", weights, DType::kF32, {T, K});

  Rank& me = ranks_[rank];
  uint64_t gen;
  {
    MutexLock lock(mu_);
    check_usable_locked(kPhase, rank);
    if (!bad.empty()) fail_locked(str_cat("jg_moe_dispatch_send (rank ", rank, "): ", bad), false);
    if (progress_[rank].dispatch_sent != progress_[rank].dispatch_recvd) {
      fail_locked(str_cat("jg_moe_dispatch_send (rank ", rank,
                          "): called again before dispatch_recv; one AllToAll has one dispatch in "
                          "flight (use one AllToAll per micro-batch)"),
                  false);
    }
    gen = progress_[rank].dispatch_sent + 1;
    // Our staging is read by every rank's dispatch_recv of the previous generation.
    wait_all_locked(kPhase, rank, &Progress::dispatch_recvd, gen - 1, "dispatch_recv");
  }

  std::memcpy(me.x.get(), x.data, T * H * dtype_size(dispatch_dtype_));
  if (S > 0) std::memcpy(me.x_scale.get(), x_scale.data, T * S * sizeof(float));
  std::memcpy(me.indices.get(), indices.data, T * K * sizeof(int32_t));
  me.bound_m = clamp_bound(bound_m, shape_.max_tokens);

  {
    MutexLock lock(mu_);
    progress_[rank].dispatch_sent = gen;
    cv_.notify_all();
  }
  return static_cast<uint32_t>(gen);
}

void CpuAllToAll::dispatch_recv(int32_t rank, uint32_t send_done, const ArrayRef& expert_x,
                                const ArrayRef& expert_scale, const ArrayRef& expert_counts) {
  constexpr const char* kPhase = "dispatch_recv";
  check_rank(kPhase, rank);
  const int64_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden;
  const int64_t K = shape_.experts_per_token, S = shape_.scale_cols, M = shape_.max_recv_tokens;
  const int32_t L = shape_.local_experts();
  std::string bad = check_array("expert_x", expert_x, dispatch_dtype_, {M, H});
  if (bad.empty()) bad = check_array("expert_scale", expert_scale, DType::kF32, {M, S});
  if (bad.empty()) bad = check_array("expert_counts", expert_counts, DType::kS32, {L});

  Rank& me = ranks_[rank];
  uint64_t gen;
  {
    MutexLock lock(mu_);
    check_usable_locked(kPhase, rank);
    if (!bad.empty()) fail_locked(str_cat("jg_moe_dispatch_recv (rank ", rank, "): ", bad), false);
    gen = progress_[rank].dispatch_recvd + 1;
    if (progress_[rank].dispatch_sent != gen || send_done != static_cast<uint32_t>(gen)) {
      fail_locked(str_cat("jg_moe_dispatch_recv (rank ", rank, "): send_done token ", send_done,
                          " does not come from this AllToAll's pending dispatch_send (expected #",
                          gen, ", dispatch_send ran ", progress_[rank].dispatch_sent, " times)"),
                  false);
    }
    wait_all_locked(kPhase, rank, &Progress::dispatch_sent, gen, "dispatch_send");
  }

  // Every rank's staging is stable now: nobody starts dispatch_send #gen+1 before we finish.
  const int32_t first = rank * L;
  std::vector<int32_t> counts(L, 0), start(L), kept(L), cursor(L, 0);
  for (int64_t s = 0; s < R; ++s) {
    const Rank& src = ranks_[s];
    for (int64_t i = 0; i < int64_t{src.bound_m} * K; ++i) {
      const int32_t e = src.indices[i];
      if (valid_expert(e, shape_.num_experts) && owner_rank(e, L) == rank) ++counts[e - first];
    }
  }
  int64_t used_rows = 0;
  const int64_t dropped =
      compute_segments(counts.data(), L, shape_.expert_padding, M, start.data(), kept.data(),
                       &used_rows);

  const size_t row_bytes = H * dtype_size(dispatch_dtype_);
  auto* out_x = static_cast<std::byte*>(expert_x.data);
  auto* out_scale = static_cast<float*>(expert_scale.data);
  // Padding rows and the tail past the last segment are zero (docs/moe-ffi.md).
  std::memset(out_x, 0, M * row_bytes);
  if (S > 0) std::memset(out_scale, 0, M * S * sizeof(float));
  std::fill(me.row_source.begin(), me.row_source.begin() + used_rows, -1);
  for (int64_t s = 0; s < R; ++s) {
    const Rank& src = ranks_[s];
    for (int64_t t = 0; t < src.bound_m; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int32_t e = src.indices[t * K + k];
        if (!valid_expert(e, shape_.num_experts) || owner_rank(e, L) != rank) continue;
        const int32_t le = e - first;
        if (cursor[le] >= kept[le]) continue;  // overflow: dropped, counted above
        const int64_t row = start[le] + cursor[le]++;
        std::memcpy(out_x + row * row_bytes, src.x.get() + t * row_bytes, row_bytes);
        if (S > 0) std::memcpy(out_scale + row * S, src.x_scale.get() + t * S, S * sizeof(float));
        me.row_source[row] = static_cast<int32_t>((s * T + t) * K + k);
      }
    }
  }
  std::memcpy(expert_counts.data, kept.data(), L * sizeof(int32_t));
  me.kept = kept;
  me.used_rows = used_rows;
  std::memcpy(me.routed_indices.get(), me.indices.get(), T * K * sizeof(int32_t));
  me.routed_bound_m = me.bound_m;

  MutexLock lock(mu_);
  progress_[rank].dropped += dropped;
  progress_[rank].dispatch_recvd = gen;
  cv_.notify_all();
}

uint32_t CpuAllToAll::combine_send(int32_t rank, const ArrayRef& expert_y,
                                   const ArrayRef& expert_counts) {
  constexpr const char* kPhase = "combine_send";
  check_rank(kPhase, rank);
  const int64_t T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int64_t M = shape_.max_recv_tokens;
  const int32_t L = shape_.local_experts();
  std::string bad = check_array("expert_y", expert_y, combine_dtype_, {M, H});
  if (bad.empty()) bad = check_array("expert_counts", expert_counts, DType::kS32, {L});

  Rank& me = ranks_[rank];
  uint64_t gen;
  {
    MutexLock lock(mu_);
    check_usable_locked(kPhase, rank);
    if (!bad.empty()) fail_locked(str_cat("jg_moe_combine_send (rank ", rank, "): ", bad), false);
    if (progress_[rank].dispatch_recvd == 0) {
      fail_locked(str_cat("jg_moe_combine_send (rank ", rank, "): no dispatch ran before it"), false);
    }
    if (progress_[rank].combine_sent != progress_[rank].combine_recvd) {
      fail_locked(str_cat("jg_moe_combine_send (rank ", rank,
                          "): called again before combine_recv; one AllToAll has one combine in "
                          "flight (use one AllToAll per micro-batch)"),
                  false);
    }
    // -1 means "not given" (combine() without expert_counts); other values must match.
    const auto* counts = static_cast<const int32_t*>(expert_counts.data);
    for (int32_t e = 0; e < L; ++e) {
      if (counts[e] != -1 && counts[e] != me.kept[e]) {
        fail_locked(str_cat("jg_moe_combine_send (rank ", rank, "): expert_counts[", e, "] = ",
                            counts[e], " but the last dispatch received ", me.kept[e],
                            " rows for that expert; pass the expert_counts dispatch returned"),
                    false);
      }
    }
    gen = progress_[rank].combine_sent + 1;
    // The slots we write into are read by every rank's combine_recv of the previous generation.
    wait_all_locked(kPhase, rank, &Progress::combine_recvd, gen - 1, "combine_recv");
  }

  const size_t row_bytes = H * dtype_size(combine_dtype_);
  const auto* in = static_cast<const std::byte*>(expert_y.data);
  for (int64_t row = 0; row < me.used_rows; ++row) {
    const int32_t src = me.row_source[row];
    if (src < 0) continue;  // padding
    Rank& dst = ranks_[src / (T * K)];
    const int64_t slot = src % (T * K);
    std::memcpy(dst.slots.get() + slot * row_bytes, in + row * row_bytes, row_bytes);
    dst.slot_gen[slot] = gen;
  }

  {
    MutexLock lock(mu_);
    progress_[rank].combine_dispatch_gen = progress_[rank].dispatch_recvd;
    progress_[rank].combine_sent = gen;
    cv_.notify_all();
  }
  return static_cast<uint32_t>(gen);
}

void CpuAllToAll::combine_recv(int32_t rank, uint32_t send_done, const ArrayRef& indices,
                               const ArrayRef& weights, int32_t bound_m, const ArrayRef& y) {
  constexpr const char* kPhase = "combine_recv";
  check_rank(kPhase, rank);
  const int64_t T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  std::string bad = check_array("indices", indices, DType::kS32, {T, K});
  if (bad.empty()) bad = check_array("weights", weights, DType::kF32, {T, K});
  if (bad.empty()) bad = check_array("y", y, combine_dtype_, {T, H});

  Rank& me = ranks_[rank];
  const int32_t bm = clamp_bound(bound_m, shape_.max_tokens);
  uint64_t gen;
  {
    MutexLock lock(mu_);
    check_usable_locked(kPhase, rank);
    if (!bad.empty()) fail_locked(str_cat("jg_moe_combine_recv (rank ", rank, "): ", bad), false);
    gen = progress_[rank].combine_recvd + 1;
    if (progress_[rank].combine_sent != gen || send_done != static_cast<uint32_t>(gen)) {
      fail_locked(str_cat("jg_moe_combine_recv (rank ", rank, "): send_done token ", send_done,
                          " does not come from this AllToAll's pending combine_send (expected #",
                          gen, ", combine_send ran ", progress_[rank].combine_sent, " times)"),
                  false);
    }
    wait_all_locked(kPhase, rank, &Progress::combine_sent, gen, "combine_send");
    for (size_t d = 0; d < progress_.size(); ++d) {
      if (progress_[d].combine_dispatch_gen != progress_[rank].dispatch_recvd) {
        fail_locked(str_cat("jg_moe_combine_recv (rank ", rank, "): rank ", d,
                            " combined the rows of dispatch #", progress_[d].combine_dispatch_gen,
                            " but this rank's last dispatch is #", progress_[rank].dispatch_recvd),
                    false);
      }
    }
    // combine undoes the last dispatch: its routing must be the one given here.
    const auto* idx = static_cast<const int32_t*>(indices.data);
    if (bm != me.routed_bound_m) {
      fail_locked(str_cat("jg_moe_combine_recv (rank ", rank, "): bound_m = ", bm,
                          " but the matching dispatch used bound_m = ", me.routed_bound_m),
                  false);
    }
    for (int64_t i = 0; i < int64_t{bm} * K; ++i) {
      if (idx[i] != me.routed_indices[i]) {
        fail_locked(str_cat("jg_moe_combine_recv (rank ", rank, "): indices[", i / K, ", ", i % K,
                            "] = ", idx[i], " but the matching dispatch routed it to expert ",
                            me.routed_indices[i], "; combine needs the indices given to dispatch"),
                    false);
      }
    }
  }

  const auto* w = static_cast<const float*>(weights.data);
  auto* out = static_cast<uint16_t*>(y.data);
  std::vector<float> acc(H);
  for (int64_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (t < bm) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t slot = t * K + k;
        // Slots not stamped by this combine were ignored or dropped at dispatch: they add nothing.
        if (me.slot_gen[slot] != gen) continue;
        accumulate_row(acc.data(), reinterpret_cast<const uint16_t*>(me.slots.get()) + slot * H,
                       w[slot], H);
      }
    }
    round_row_to_bf16(acc.data(), out + t * H, H);
  }

  MutexLock lock(mu_);
  progress_[rank].combine_recvd = gen;
  cv_.notify_all();
}

std::vector<int64_t> CpuAllToAll::dropped_rows() const {
  MutexLock lock(mu_);
  std::vector<int64_t> out;
  for (const Progress& p : progress_) out.push_back(p.dropped);
  return out;
}

void CpuAllToAll::close() {
  MutexLock lock(mu_);
  if (broken_.empty()) broken_ = "the AllToAll was closed while a program was still using it";
  cv_.notify_all();
}

std::pair<std::string, bool> CpuAllToAll::error() {
  MutexLock lock(mu_);
  return {broken_, broken_by_timeout_};
}

}  // namespace jax_garden::moe
