// Routing and layout math of MoE dispatch/combine: pure functions, shared by the CPU reference
// and (host side, or device side through JG_MOE_HD) by the CUDA implementation.
//
// Layout of a rank's receive buffer `expert_x[M, H]` (DESIGN.md §3, docs/moe-ffi.md):
//   - one segment per local expert e in 0..L-1, in expert order;
//   - segment e starts at start[e] = Σ_{e' < e} round_up(kept[e'], expert_padding);
//   - inside a segment, rows are ordered by (source rank, token index, k): a token that picks the
//     same expert twice contributes two rows, k order;
//   - routing entries with an expert id outside [0, E) and tokens t >= bound_m are ignored (no row,
//     no contribution to combine);
//   - capacity: when the rows do not fit in M, segment e keeps the first
//     kept[e] = min(count[e], M - start[e]) rows in the order above and drops the rest (they are
//     counted, never written; combine treats them as absent). M is a multiple of expert_padding.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define JG_MOE_HD __host__ __device__
#else
#define JG_MOE_HD
#endif

namespace jax_garden::moe {

// The static description of one AllToAll, identical on every rank.
struct MoeShape {
  int32_t num_ranks = 0;          // R
  int32_t num_experts = 0;        // E (multiple of R)
  int32_t experts_per_token = 0;  // K
  int32_t hidden = 0;             // H
  int32_t max_tokens = 0;         // T
  int64_t max_recv_tokens = 0;    // M (multiple of expert_padding)
  int32_t expert_padding = 1;
  int32_t scale_cols = 0;         // S = H / scale_block for fp8 dispatch, 0 otherwise

  JG_MOE_HD int32_t local_experts() const { return num_experts / num_ranks; }  // L
};

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

// From the unpadded row counts per local expert, the segment starts and the rows kept under the
// capacity M. Returns the number of rows dropped for lack of space (0 when M is the worst case).
// `start` and `kept` have L entries; `used_rows` (optional) receives the padded end of the last
// segment, i.e. the first row that is zero padding to the end of the buffer.
JG_MOE_HD inline int64_t compute_segments(const int32_t* counts, int32_t local_experts,
                                          int32_t expert_padding, int64_t max_recv_tokens,
                                          int32_t* start, int32_t* kept,
                                          int64_t* used_rows = nullptr) {
  int64_t cursor = 0, dropped = 0;
  for (int32_t e = 0; e < local_experts; ++e) {
    const int64_t room = max_recv_tokens - cursor;  // >= 0: cursor never passes M (M % pad == 0)
    const int64_t k = counts[e] < room ? counts[e] : room;
    start[e] = static_cast<int32_t>(cursor);
    kept[e] = static_cast<int32_t>(k);
    dropped += counts[e] - k;
    cursor += round_up(k, expert_padding);
  }
  if (used_rows) *used_rows = cursor;
  return dropped;
}

// Checks a shape for consistency; throws InvalidArgument naming the wrong value.
void validate_shape(const MoeShape& shape);

std::string describe(const MoeShape& shape);

}  // namespace jax_garden::moe
