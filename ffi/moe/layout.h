// The shape of an MoE AllToAll and the routing/layout math of dispatch/combine: pure functions,
// the one definition used by the CPU reference (cpu_all_to_all.cc), the CUDA kernels
// (nvlink_kernels.cu, through JG_MOE_HD) and Python (the `_jax_garden.moe` bindings).
//
// Layout of a rank's receive buffer `expert_x[M, H]` (jax_garden/moe.py's docstring, docs/moe-ffi.md):
//   - one segment per local expert e in 0..L-1, in expert order;
//   - segment e starts at start[e] = min(Σ_{e' < e} round_up(count[e'], expert_padding), M);
//   - inside a segment, rows are ordered by (source rank, token index, k): a token that picks the
//     same expert twice contributes two rows, k order;
//   - routing entries with an expert id outside [0, E) and tokens t >= bound_m are ignored (no row,
//     no contribution to combine);
//   - capacity: segment e keeps the first kept[e] = min(count[e], M - start[e]) rows in the order
//     above and drops the rest (they are counted, never written; combine treats them as absent).
//     M is a multiple of expert_padding, so every start is too and at most one segment is cut.
#pragma once

#include <cstdint>
#include <string>

#include "moe/dtype.h"

#if defined(__CUDACC__)
#define JG_MOE_HD __host__ __device__
#else
#define JG_MOE_HD
#endif

namespace jax_garden::moe {

// The static description of one AllToAll, identical on every rank and on every implementation.
struct MoeShape {
  int32_t num_ranks = 0;          // R
  int32_t num_experts = 0;        // E (multiple of R)
  int32_t experts_per_token = 0;  // K (<= E)
  int32_t hidden = 0;             // H
  int32_t max_tokens = 0;         // T
  int64_t max_recv_tokens = 0;    // M (multiple of expert_padding)
  int32_t expert_padding = 1;
  int32_t scale_cols = 0;         // S = H / scale_block for fp8 dispatch, 0 otherwise

  JG_MOE_HD int32_t local_experts() const { return num_experts / num_ranks; }  // L
};

template <typename T>
JG_MOE_HD inline T min_of(T a, T b) {
  return b < a ? b : a;
}

JG_MOE_HD inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Worst-case receive rows: every (token, k) of every rank lands on one rank, and each of its L
// segments wastes at most expert_padding - 1 rows of padding.
JG_MOE_HD inline int64_t worst_case_recv_tokens(int64_t num_ranks, int64_t max_tokens,
                                                int64_t experts_per_token, int64_t local_experts,
                                                int64_t expert_padding) {
  return round_up(num_ranks * max_tokens * experts_per_token + local_experts * (expert_padding - 1),
                  expert_padding);
}

// bound_m is a device scalar: values outside [0, T] are clamped rather than trusted.
JG_MOE_HD inline int32_t clamp_bound(int32_t bound_m, int32_t max_tokens) {
  return bound_m < 0 ? 0 : (bound_m > max_tokens ? max_tokens : bound_m);
}

JG_MOE_HD inline bool valid_expert(int32_t expert, int32_t num_experts) {
  return expert >= 0 && expert < num_experts;
}

// Rank owning a (valid) global expert id.
JG_MOE_HD inline int32_t owner_rank(int32_t expert, int32_t local_experts) {
  return expert / local_experts;
}

// First row of a segment whose predecessors take `padded_before` rows (Σ round_up(count, pad))
// under the capacity M; min(padded total, M) is likewise the number of rows in use.
JG_MOE_HD inline int64_t segment_start(int64_t padded_before, int64_t max_recv_tokens) {
  return min_of(padded_before, max_recv_tokens);
}

// Rows a segment of `count` rows starting at `start` keeps under the capacity M.
JG_MOE_HD inline int64_t segment_kept(int64_t count, int64_t start, int64_t max_recv_tokens) {
  return min_of(count, max_recv_tokens - start);
}

// From the unpadded row counts per local expert, the segment starts and the rows kept under the
// capacity M. Returns the number of rows dropped for lack of space (0 when M is the worst case).
// `start` and `kept` have L entries; `used_rows` (optional) receives the padded end of the last
// segment, i.e. the first row that is zero padding to the end of the buffer.
JG_MOE_HD inline int64_t compute_segments(const int32_t* counts, int32_t local_experts,
                                          int32_t expert_padding, int64_t max_recv_tokens,
                                          int32_t* start, int32_t* kept,
                                          int64_t* used_rows = nullptr) {
  int64_t padded = 0, dropped = 0;
  for (int32_t e = 0; e < local_experts; ++e) {
    const int64_t s = segment_start(padded, max_recv_tokens);
    const int64_t k = segment_kept(counts[e], s, max_recv_tokens);
    start[e] = static_cast<int32_t>(s);
    kept[e] = static_cast<int32_t>(k);
    dropped += counts[e] - k;
    padded += round_up(counts[e], expert_padding);
  }
  if (used_rows) *used_rows = segment_start(padded, max_recv_tokens);
  return dropped;
}

// Checks a shape for consistency; throws InvalidArgument naming the wrong value.
void validate_shape(const MoeShape& shape);
// Checks the dispatch dtype (bfloat16, or float8_e4m3fn with f32 scales) against the shape's
// scale_cols; throws InvalidArgument naming the wrong value.
void validate_dispatch_dtype(const MoeShape& shape, DType dispatch_dtype);

std::string describe(const MoeShape& shape);

}  // namespace jax_garden::moe
