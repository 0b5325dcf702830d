// CUDA kernels of the NVLink MoE dispatch/combine (protocol: nvlink_protocol.h; routing and
// layout math: layout.h, the same functions the CPU reference runs).
//
// Every kernel runs its work in the frame of nvlink_frame.cuh: a prologue (read the generation),
// bounded waits for the peers' words, the work (a grid-stride body where one warp moves one chunk
// of one row with 16-byte accesses), and an epilogue that tells the peers (SyncMode) and advances
// the generation. Four split kernels (dispatch_send, dispatch_recv, combine_send, combine_recv:
// the split phases, for overlap) and, with SyncMode::kArrive, one fused kernel per phase for
// dispatch() and combine(): the send work, this block's arrivals, a wait for every source's
// arrivals, the receive work, in one launch whose blocks are all resident (cooperative launch),
// so a decode step pays two kernels per round trip instead of four. Each kernel launches the blocks
// its static work can use (DeviceView::grid_*).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "moe/layout.h"
#include "moe/nvlink_frame.cuh"
#include "moe/nvlink_kernels.h"

namespace jax_garden::moe {
namespace {

using namespace nvlink;  // NOLINT: the frame of these kernels

constexpr int kRouteTile = 2048;  // routing entries staged in shared memory at a time
constexpr int kRowBatch = 16;     // 16-byte vectors per lane in flight when a warp copies a row

__device__ __forceinline__ int64_t round16(int64_t n) { return (n + 15) & ~int64_t{15}; }
__device__ __forceinline__ int4 ldcg4(const char* p) { return __ldcg(reinterpret_cast<const int4*>(p)); }
__device__ __forceinline__ int4 ldg4(const char* p) { return __ldg(reinterpret_cast<const int4*>(p)); }
__device__ __forceinline__ void st4(char* p, int4 v) { *reinterpret_cast<int4*>(p) = v; }

// ---------------------------------------------------------------------------------------------
// dispatch_send's work: route lists (warp e < E: stable list of the (t*K+k) routed to expert e,
// built with ballots over the token-major order, so the receiver's row order is deterministic) and
// token data (each token once per destination rank, 16-byte NVLink stores). The grid has at least
// (E + kWarps - 1) / kWarps blocks.
__device__ __forceinline__ void dispatch_send_work(const DeviceView& v, Shared& s, int32_t* s_idx,
                                                   const char* __restrict__ x, const float* __restrict__ xs,
                                                   const int32_t* __restrict__ idx) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (s.ok) {
    const int bm = s.bm;
    const int N = bm * v.K;
    const int64_t TK = static_cast<int64_t>(v.T) * v.K;
    const int route_blocks = (v.E + kWarps - 1) / kWarps;  // the grid has at least this many
    if (static_cast<int>(blockIdx.x) < route_blocks) {
      const int e = blockIdx.x * kWarps + warp;
      const bool active = e < v.E;
      const int d = active ? owner_rank(e, v.L) : 0, el = active ? e - d * v.L : 0;
      int32_t* list = reinterpret_cast<int32_t*>(s.sym[d] + v.off_routes) + (static_cast<int64_t>(v.rank) * v.L + el) * TK;
      int base = 0;
      for (int start = 0; start < N; start += kRouteTile) {
        const int n = min(kRouteTile, N - start);
#pragma unroll 8
        for (int i = threadIdx.x; i < n; i += kThreads) s_idx[i] = __ldg(idx + start + i);
        __syncthreads();
        if (active) {
          for (int i0 = 0; i0 < n; i0 += 32) {
            const int i = i0 + lane;
            const int val = i < n ? s_idx[i] : -1;
            const unsigned m = __ballot_sync(kFull, val == e);
            if (val == e) list[base + __popc(m & lanemask_lt())] = start + i;
            base += __popc(m);
          }
        }
        __syncthreads();
      }
      if (active && lane == 0) reinterpret_cast<int32_t*>(s.sym[d] + v.off_counts)[v.rank * v.L + el] = base;
    }

    // Token data: unit = (token, chunk_bytes of its row); the first units go to the warps after the routing
    // warps so that data starts moving at once.
    const bool vec = (v.xbytes & 15) == 0;
    const int chunk = v.chunk_bytes;
    const int nchunk = (v.xbytes + chunk - 1) / chunk;
    const int64_t units = static_cast<int64_t>(bm) * nchunk;
    const int nw = gridDim.x * kWarps;
    int first = static_cast<int>(blockIdx.x * kWarps + warp) - route_blocks * kWarps;
    if (first < 0) first += nw;
    const int64_t xs_off = round16(v.xbytes);
    for (int64_t u = first; u < units; u += nw) {
      const int t = static_cast<int>(u / nchunk), c = static_cast<int>(u % nchunk);
      const char* src = x + static_cast<int64_t>(t) * v.xbytes;
      const int64_t slot = v.off_data + (static_cast<int64_t>(v.rank) * v.T + t) * v.rec_stride;
      const int o0 = c * chunk, o1 = min(v.xbytes, o0 + chunk);
      // The token's chunk is loaded before its destinations are known: both latencies overlap.
      int4 r[4];
      if (vec) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int o = o0 + (j * 32 + lane) * 16;
          if (o < o1) r[j] = ldg4(src + o);
        }
      }
      unsigned mine = 0;
      if (lane < v.K) {
        const int e = __ldg(idx + static_cast<int64_t>(t) * v.K + lane);
        if (valid_expert(e, v.E)) mine = 1u << owner_rank(e, v.L);
        if (c == 0) v.routed_idx[static_cast<int64_t>(t) * v.K + lane] = e;
      }
      const unsigned dmask = __reduce_or_sync(kFull, mine);
      if (dmask == 0) continue;
      if (vec) {
        for (unsigned m = dmask; m != 0; m &= m - 1) {
          char* dst = s.sym[__ffs(m) - 1] + slot;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int o = o0 + (j * 32 + lane) * 16;
            if (o < o1) st4(dst + o, r[j]);
          }
        }
      } else {
        for (unsigned m = dmask; m != 0; m &= m - 1) {
          char* dst = s.sym[__ffs(m) - 1] + slot;
          for (int o = o0 + lane; o < o1; o += 32) dst[o] = __ldg(src + o);
        }
      }
      if (c == 0 && v.S > 0) {
        const float* srow = xs + static_cast<int64_t>(t) * v.S;
        for (unsigned m = dmask; m != 0; m &= m - 1) {
          float* dst = reinterpret_cast<float*>(s.sym[__ffs(m) - 1] + slot + xs_off);
          for (int i = lane; i < v.S; i += 32) dst[i] = __ldg(srow + i);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dispatch_recv's work (every source's data has arrived): per-expert segments (padded), rows by
// source rank then (t, k); gathers the deduplicated slots into expert_x, zeroes padding and unused
// rows, records row -> (src, t, k) and, for this rank's own rows, (t, k) -> row.
__device__ __forceinline__ void dispatch_recv_work(const DeviceView& v, Shared& s, int32_t* s_scan, int32_t* smem,
                                                   char* expert_x, float* expert_scale, int32_t* expert_counts) {
  const int R = v.R, L = v.L;
  int32_t* s_cnt_src = smem;           // [R][L] rows from each source per local expert
  int32_t* s_cnt = s_cnt_src + R * L;  // [L] rows per local expert: received, then kept
  int32_t* s_srcoff = s_cnt + L;       // [L][R] first row of each source inside the segment
  int32_t* s_seg = s_srcoff + L * R;   // [L+1] segment starts, s_seg[L] = rows used
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  char* me = s.sym[v.rank];
  const int64_t TK = static_cast<int64_t>(v.T) * v.K;
  if (s.ok) {
    const int32_t* counts = reinterpret_cast<const int32_t*>(me + v.off_counts);
    for (int i = threadIdx.x; i < R * L; i += kThreads) s_cnt_src[i] = __ldcg(counts + i);
  }
  __syncthreads();
  // Items per thread for the block scan over L experts.
  const int per = (L + kThreads - 1) / kThreads;
  int local_sum = 0;
  for (int q = 0; q < per; ++q) {
    const int el = threadIdx.x * per + q;
    if (el < L) {
      int acc = 0;
      for (int r = 0; r < R; ++r) {
        s_srcoff[el * R + r] = acc;
        acc += s.ok ? s_cnt_src[r * L + el] : 0;
      }
      s_cnt[el] = acc;
      local_sum += static_cast<int>(round_up(acc, v.pad));
    }
  }
  // Block exclusive scan of the padded sizes.
  int incl = local_sum;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int n = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) s_scan[warp] = incl;
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int n = s_scan[w];
      s_scan[w] = acc;
      acc += n;
    }
  }
  __syncthreads();
  // Capacity M (layout.h): a segment that does not fit keeps its first rows in (source, token, k)
  // order.
  int run = s_scan[warp] + incl - local_sum;
  int dropped = 0;
  for (int q = 0; q < per; ++q) {
    const int el = threadIdx.x * per + q;
    if (el < L) {
      const int start = static_cast<int>(segment_start(run, v.M));
      const int kept = static_cast<int>(segment_kept(s_cnt[el], start, v.M));
      dropped += s_cnt[el] - kept;
      run += static_cast<int>(round_up(s_cnt[el], v.pad));
      s_seg[el] = start;
      s_cnt[el] = kept;
      if (el == L - 1) s_seg[L] = static_cast<int>(segment_start(run, v.M));
    }
  }
  __syncthreads();
  const int total = s_seg[L];  // rows in use; the rest of expert_x is zero
  if (blockIdx.x == 0) {
    for (int el = threadIdx.x; el < L; el += kThreads) {
      expert_counts[el] = s_cnt[el];
      v.kept[el] = s_cnt[el];
    }
    if (dropped != 0) atomicAdd(reinterpret_cast<unsigned long long*>(v.state + kDropped), static_cast<unsigned long long>(dropped));
    if (threadIdx.x == 0) v.state[kTotalRows] = static_cast<uint32_t>(total);
  }

  // One warp per row: the row's source is looked up once, then the row moves in batches of
  // 16 x 16 B per lane (8 KiB per warp) with every load of a batch in flight before its stores.
  const bool vec = (v.xbytes & 15) == 0;
  const int nw = gridDim.x * kWarps;
  const int64_t xs_off = round16(v.xbytes);
  for (int r = blockIdx.x * kWarps + warp; r < v.M; r += nw) {
    char* dst = expert_x + static_cast<int64_t>(r) * v.xbytes;
    const char* src = nullptr;
    if (r < total) {
      int lo = 0, hi = L - 1;  // last expert whose segment starts at or before r
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_seg[mid] <= r) lo = mid; else hi = mid - 1;
      }
      const int el = lo;
      const int o = r - s_seg[el];
      int32_t packed = -1;
      if (o < s_cnt[el]) {
        int sr = 0;
        while (o >= s_srcoff[el * R + sr] + s_cnt_src[sr * L + el]) ++sr;
        const int j = o - s_srcoff[el * R + sr];
        const int32_t n = __ldcg(reinterpret_cast<const int32_t*>(me + v.off_routes) + (static_cast<int64_t>(sr) * L + el) * TK + j);
        src = me + v.off_data + (static_cast<int64_t>(sr) * v.T + n / v.K) * v.rec_stride;
        packed = static_cast<int32_t>(sr * TK + n);
      }
      if (lane == 0) {
        v.row_map[r] = packed;
        // Rows this rank keeps for itself: the fused combine reads them from expert_y in place.
        if (packed >= 0 && static_cast<int>(packed / TK) == v.rank) {
          v.local_row[packed % TK] = (static_cast<uint64_t>(s.gen + 1) << 32) | static_cast<uint32_t>(r);
        }
      }
    }
    if (vec) {
      for (int o0 = 0; o0 < v.xbytes; o0 += kRowBatch * 512) {
        int4 q[kRowBatch];
#pragma unroll
        for (int j = 0; j < kRowBatch; ++j) {
          const int o = o0 + (j * 32 + lane) * 16;
          q[j] = (src != nullptr && o < v.xbytes) ? ldcg4(src + o) : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < kRowBatch; ++j) {
          const int o = o0 + (j * 32 + lane) * 16;
          if (o < v.xbytes) st4(dst + o, q[j]);
        }
      }
    } else {
      for (int o = lane; o < v.xbytes; o += 32) dst[o] = src != nullptr ? __ldcg(src + o) : 0;
    }
    if (v.S > 0) {
      float* sdst = expert_scale + static_cast<int64_t>(r) * v.S;
      for (int i = lane; i < v.S; i += 32) {
        sdst[i] = src != nullptr ? __ldcg(reinterpret_cast<const float*>(src + xs_off) + i) : 0.0f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// combine_send's work: expert_y[row] -> slot [t*K+k] of the source rank of that row, stamped with
// the combine generation. skip_own: rows of this rank stay where they are (fused combine).
__device__ __forceinline__ void combine_send_work(const DeviceView& v, Shared& s, const char* __restrict__ expert_y,
                                                  bool skip_own) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (s.ok && !(skip_own && v.R == 1)) {  // one rank skipping its own rows has nothing to send
    const int64_t TK = static_cast<int64_t>(v.T) * v.K;
    const bool vec = (v.cbytes & 15) == 0;
    const int chunk = v.chunk_bytes;
    const int nchunk = (v.cbytes + chunk - 1) / chunk;
    const int64_t units = static_cast<int64_t>(s.total) * nchunk;
    const int nw = gridDim.x * kWarps;
    for (int64_t u = blockIdx.x * kWarps + warp; u < units; u += nw) {
      const int r = static_cast<int>(u / nchunk), c = static_cast<int>(u % nchunk);
      const int32_t p = __ldcg(v.row_map + r);
      if (p < 0) continue;
      const int sr = static_cast<int>(p / TK);
      if (skip_own && sr == v.rank) continue;  // the fused combine reads our own rows in place
      const int64_t n = p % TK;
      char* dst = s.sym[sr] + v.off_cdata + n * v.crec_stride;
      const char* src = expert_y + static_cast<int64_t>(r) * v.cbytes;
      // Slot stamp: combine_recv adds only slots written by this combine.
      if (c == 0 && lane == 0) reinterpret_cast<uint32_t*>(s.sym[sr] + v.off_cgen)[n] = s.gen + 1;
      const int o0 = c * chunk, o1 = min(v.cbytes, o0 + chunk);
      if (vec) {
        int4 q[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int o = o0 + (j * 32 + lane) * 16;
          if (o < o1) q[j] = ldg4(src + o);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int o = o0 + (j * 32 + lane) * 16;
          if (o < o1) st4(dst + o, q[j]);
        }
      } else {
        for (int o = o0 + lane; o < o1; o += 32) dst[o] = __ldg(src + o);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// combine_recv's work (every expert rank's rows have arrived): y[t] = sum_k w[t,k] * row(t, k),
// f32, k ascending, product and sum rounded separately (no FMA contraction), so the result is the
// reference's bit for bit. row(t, k) is its combine slot when this combine stamped it (entries
// ignored or dropped at dispatch were not); own_rows (the fused combine): an entry this rank kept
// for itself is read from expert_y in place instead (local_row, tagged by the last dispatch).
__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

__device__ __forceinline__ void combine_recv_work(const DeviceView& v, Shared& s, const int32_t* __restrict__ idx,
                                                  const float* __restrict__ w, __nv_bfloat16* y,
                                                  const char* __restrict__ own_rows) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const char* slots = s.sym[v.rank] + v.off_cdata;
  const uint32_t* slot_gen = reinterpret_cast<const uint32_t*>(s.sym[v.rank] + v.off_cgen);
  const int H = v.H, K = v.K;
  const bool vec = (H & 7) == 0;
  const int nchunk = (H + kCombineChunk - 1) / kCombineChunk;
  const int64_t units = static_cast<int64_t>(v.T) * nchunk;
  const int nw = gridDim.x * kWarps;
  const bool ok = s.ok != 0;
  for (int64_t u = blockIdx.x * kWarps + warp; u < units; u += nw) {
    const int t = static_cast<int>(u / nchunk), c = static_cast<int>(u % nchunk);
    __nv_bfloat16* yrow = y + static_cast<int64_t>(t) * H;
    if (!ok || t >= s.bm) {
      if (vec) {
        const int ch = c * kCombineChunk + lane * 8;
        if (ch < H) st4(reinterpret_cast<char*>(yrow + ch), make_int4(0, 0, 0, 0));
      } else {
        for (int i = 0; i < 8; ++i) {
          const int ch = c * kCombineChunk + lane + 32 * i;
          if (ch < H) yrow[ch] = __float2bfloat16_rn(0.0f);
        }
      }
      continue;
    }
    // Lane k: entry (t, k), whether it adds to y[t] and where its row is.
    float wk = 0.0f;
    bool valid = false;
    const char* row = nullptr;
    if (lane < K) {
      const int64_t n = static_cast<int64_t>(t) * K + lane;
      const int32_t e = __ldg(idx + n);
      wk = __ldg(w + n);
      if (valid_expert(e, v.E)) {
        if (own_rows != nullptr && owner_rank(e, v.L) == v.rank) {
          const uint64_t lr = v.local_row[n];
          valid = static_cast<uint32_t>(lr >> 32) == s.dgen;
          row = own_rows + static_cast<int64_t>(static_cast<uint32_t>(lr)) * v.cbytes;
        } else {
          valid = __ldcg(slot_gen + n) == s.gen + 1;
          row = slots + n * v.crec_stride;
        }
      }
      if (c == 0) {  // combine undoes the last dispatch: its routing must be the one given here
        const int32_t routed = v.routed_idx[n];
        if (routed != e) record_error(v, kErrRoutingMismatch, static_cast<int32_t>(n), e, false, routed);
      }
    }
    const unsigned vmask = __ballot_sync(kFull, valid);
    const auto row_of = [&](int k) {
      return reinterpret_cast<const char*>(__shfl_sync(kFull, reinterpret_cast<unsigned long long>(row), k & 31));
    };
    if (vec) {
      const int ch = c * kCombineChunk + lane * 8;
      const bool active = ch < H;
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      for (int kb = 0; kb < K; kb += 8) {
        float wv[8];
        const char* rows[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          wv[i] = __shfl_sync(kFull, wk, (kb + i) & 31);
          rows[i] = row_of(kb + i);
        }
        int4 q[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int k = kb + i;
          if (active && k < K && ((vmask >> k) & 1u)) q[i] = ldcg4(rows[i] + ch * 2);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int k = kb + i;
          if (active && k < K && ((vmask >> k) & 1u)) {
            const uint32_t words[4] = {static_cast<uint32_t>(q[i].x), static_cast<uint32_t>(q[i].y),
                                       static_cast<uint32_t>(q[i].z), static_cast<uint32_t>(q[i].w)};
#pragma unroll
            for (int h = 0; h < 4; ++h) {
              acc[2 * h] = __fadd_rn(acc[2 * h], __fmul_rn(wv[i], bf16_bits_to_f32(words[h] & 0xffffu)));
              acc[2 * h + 1] = __fadd_rn(acc[2 * h + 1], __fmul_rn(wv[i], bf16_bits_to_f32(words[h] >> 16)));
            }
          }
        }
      }
      if (active) {
        uint32_t packed[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          packed[h] = static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * h]))) |
                      (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(acc[2 * h + 1]))) << 16);
        }
        st4(reinterpret_cast<char*>(yrow + ch), make_int4(static_cast<int>(packed[0]), static_cast<int>(packed[1]),
                                                          static_cast<int>(packed[2]), static_cast<int>(packed[3])));
      }
    } else {
      for (int i = 0; i < 8; ++i) {
        const int ch = c * kCombineChunk + lane + 32 * i;
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
          const float wkk = __shfl_sync(kFull, wk, k & 31);
          const char* rk = row_of(k);
          if (ch < H && ((vmask >> k) & 1u)) {
            const uint16_t bits = __ldcg(reinterpret_cast<const unsigned short*>(rk) + ch);
            acc = __fadd_rn(acc, __fmul_rn(wkk, bf16_bits_to_f32(bits)));
          }
        }
        if (ch < H) yrow[ch] = __float2bfloat16_rn(acc);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Phase checks (block 0, thread 0): the calls of each rank come in the order of the contract.
__device__ void check_dispatch_send(const DeviceView& v, const Shared& s) {
  const uint32_t recvd = vload(v.state + kGenDRecv);
  if (recvd != s.gen) record_error(v, kErrPhaseOrder, kCallDispatchSend, s.gen, recvd, false);
  v.state[kRoutedBm] = static_cast<uint32_t>(s.bm);  // combine_recv checks its bound_m
}
__device__ void check_combine_send(const DeviceView& v, const Shared& s) {
  const uint32_t recvd = vload(v.state + kGenCRecv), dispatched = vload(v.state + kGenDRecv);
  if (dispatched == 0) record_error(v, kErrPhaseOrder, kCallCombineBeforeDispatch, s.gen, 0, false);
  if (recvd != s.gen) record_error(v, kErrPhaseOrder, kCallCombineSend, s.gen, recvd, false);
}
__device__ void check_combine_bound(const DeviceView& v, const Shared& s) {
  const int32_t routed_bm = static_cast<int32_t>(vload(v.state + kRoutedBm));
  if (s.bm != routed_bm) record_error(v, kErrRoutingMismatch, -1, s.bm, false, routed_bm);
}
// expert_counts must be those of the last dispatch (-1: not given); block 0, all threads.
__device__ void check_counts(const DeviceView& v, const int32_t* counts_in) {
  for (int el = threadIdx.x; el < v.L; el += kThreads) {
    const int32_t given = counts_in[el];
    if (given != -1 && given != v.kept[el]) record_error(v, kErrCountsMismatch, el, given, false, v.kept[el]);
  }
}

// ---------------------------------------------------------------------------------------------
// The split kernels.
__global__ void __launch_bounds__(kThreads, 2) dispatch_send_kernel(DeviceView v, const char* __restrict__ x,
                                                                 const float* __restrict__ xs,
                                                                 const int32_t* __restrict__ idx,
                                                                 const int32_t* bound_m_p, const int32_t* rank_p,
                                                                 uint32_t* send_done) {
  __shared__ Shared s;
  __shared__ int32_t s_idx[kRouteTile];
  prologue(v, s, kKDSend, kGenDSend, rank_p, bound_m_p);
  if (blockIdx.x == 0 && threadIdx.x == 0) check_dispatch_send(v, s);
  // Every destination must have consumed our previous dispatch before we overwrite its slots.
  wait_peers(v, s, kFlagDFree, s.gen, kErrTimeoutDispatchFree);
  stamp0(v, kKDSend, s.gen, kStampWaited);
  dispatch_send_work(v, s, s_idx, x, xs, idx);
  if (finish_block(v, s, kKDSend, kCtrDSend, kFlagDData)) publish(v, s, kKDSend, kGenDSend, kFlagDData, send_done);
}

__global__ void __launch_bounds__(kThreads, 2) dispatch_recv_kernel(DeviceView v, const uint32_t* send_done,
                                                                    const int32_t* rank_p, char* expert_x,
                                                                    float* expert_scale, int32_t* expert_counts) {
  __shared__ Shared s;
  __shared__ int32_t s_scan[kWarps];
  extern __shared__ int32_t smem[];
  prologue(v, s, kKDRecv, kGenDRecv, rank_p, nullptr);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint32_t sent = vload(v.state + kGenDSend);
    if (sent != s.gen + 1 || *send_done != s.gen + 1) record_error(v, kErrPhaseOrder, kCallDispatchRecv, s.gen, sent, false);
  }
  wait_peers(v, s, kFlagDData, s.gen + 1, kErrTimeoutDispatchData);
  stamp0(v, kKDRecv, s.gen, kStampWaited);
  dispatch_recv_work(v, s, s_scan, smem, expert_x, expert_scale, expert_counts);
  // Our reads of every source's slots are complete: the sources may overwrite them.
  if (finish_block(v, s, kKDRecv, kCtrDRecv, kFlagDFree)) publish(v, s, kKDRecv, kGenDRecv, kFlagDFree, nullptr);
}

__global__ void __launch_bounds__(kThreads, 2) combine_send_kernel(DeviceView v, const char* __restrict__ expert_y,
                                                                const int32_t* counts_in, const int32_t* rank_p,
                                                                uint32_t* send_done) {
  __shared__ Shared s;
  prologue(v, s, kKCSend, kGenCSend, rank_p, nullptr);
  if (threadIdx.x == 0) s.total = static_cast<int>(vload(v.state + kTotalRows));
  if (blockIdx.x == 0 && threadIdx.x == 0) check_combine_send(v, s);
  if (blockIdx.x == 0) check_counts(v, counts_in);
  // Every source must have summed our previous combine before we overwrite its slots.
  wait_peers(v, s, kFlagCFree, s.gen, kErrTimeoutCombineFree);
  stamp0(v, kKCSend, s.gen, kStampWaited);
  combine_send_work(v, s, expert_y, false);
  if (finish_block(v, s, kKCSend, kCtrCSend, kFlagCData)) publish(v, s, kKCSend, kGenCSend, kFlagCData, send_done);
}

__global__ void __launch_bounds__(kThreads, 2) combine_recv_kernel(DeviceView v, const uint32_t* send_done,
                                                                   const int32_t* __restrict__ idx,
                                                                   const float* __restrict__ w,
                                                                   const int32_t* bound_m_p, const int32_t* rank_p,
                                                                   __nv_bfloat16* y) {
  __shared__ Shared s;
  prologue(v, s, kKCRecv, kGenCRecv, rank_p, bound_m_p);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint32_t sent = vload(v.state + kGenCSend);
    if (sent != s.gen + 1 || *send_done != s.gen + 1) record_error(v, kErrPhaseOrder, kCallCombineRecv, s.gen, sent, false);
    check_combine_bound(v, s);
  }
  wait_peers(v, s, kFlagCData, s.gen + 1, kErrTimeoutCombineData);
  stamp0(v, kKCRecv, s.gen, kStampWaited);
  combine_recv_work(v, s, idx, w, y, nullptr);
  // Our reads of the combine slots are complete: every rank may overwrite them.
  if (finish_block(v, s, kKCRecv, kCtrCRecv, kFlagCFree)) publish(v, s, kKCRecv, kGenCRecv, kFlagCFree, nullptr);
}

// ---------------------------------------------------------------------------------------------
// The fused kernels (SyncMode::kArrive, every block resident): the send work and this block's
// arrivals in the destinations, then the wait for every source's arrivals and the receive work.
// Stamps: the send slot from the kernel's entry to block 0's arrivals, the receive slot from there
// to the end. Both generations advance in the last block.
__global__ void __launch_bounds__(kThreads, 2) dispatch_fused_kernel(DeviceView v, const char* __restrict__ x,
                                                                  const float* __restrict__ xs,
                                                                  const int32_t* __restrict__ idx,
                                                                  const int32_t* bound_m_p, const int32_t* rank_p,
                                                                  char* expert_x, float* expert_scale,
                                                                  int32_t* expert_counts, uint32_t* send_done) {
  __shared__ Shared s;
  __shared__ int32_t s_idx[kRouteTile];
  __shared__ int32_t s_scan[kWarps];
  extern __shared__ int32_t smem[];
  prologue(v, s, kKDSend, kGenDSend, rank_p, bound_m_p);
  if (blockIdx.x == 0 && threadIdx.x == 0) check_dispatch_send(v, s);
  wait_peers(v, s, kFlagDFree, s.gen, kErrTimeoutDispatchFree);
  stamp0(v, kKDSend, s.gen, kStampWaited);
  dispatch_send_work(v, s, s_idx, x, xs, idx);
  __syncthreads();
  stamp0(v, kKDSend, s.gen, kStampBody);
  arrive_peers(v, s, kFlagDData);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint64_t t = globaltimer();
    stamp_at(v, kKDSend, s.gen, kStampEnd, t);
    stamp_at(v, kKDRecv, s.gen, kStampEntry, t);
    stamp_at(v, kKDRecv, s.gen, kStampStart, t);
  }
  wait_peers(v, s, kFlagDData, s.gen + 1, kErrTimeoutDispatchData);
  stamp0(v, kKDRecv, s.gen, kStampWaited);
  dispatch_recv_work(v, s, s_scan, smem, expert_x, expert_scale, expert_counts);
  if (finish_block(v, s, kKDRecv, kCtrDRecv, kFlagDFree)) {
    if (threadIdx.x == 0) v.state[kGenDSend] = s.gen + 1;
    publish(v, s, kKDRecv, kGenDRecv, kFlagDFree, send_done);
  }
}

__global__ void __launch_bounds__(kThreads, 2) combine_fused_kernel(DeviceView v, const char* __restrict__ expert_y,
                                                                 const int32_t* counts_in,
                                                                 const int32_t* __restrict__ idx,
                                                                 const float* __restrict__ w,
                                                                 const int32_t* bound_m_p, const int32_t* rank_p,
                                                                 __nv_bfloat16* y, uint32_t* send_done) {
  __shared__ Shared s;
  prologue(v, s, kKCSend, kGenCSend, rank_p, bound_m_p);
  if (threadIdx.x == 0) {
    s.total = static_cast<int>(vload(v.state + kTotalRows));
    s.dgen = vload(v.state + kGenDRecv);
    if (blockIdx.x == 0) {
      check_combine_send(v, s);
      check_combine_bound(v, s);
    }
  }
  if (blockIdx.x == 0) check_counts(v, counts_in);
  wait_peers(v, s, kFlagCFree, s.gen, kErrTimeoutCombineFree);
  stamp0(v, kKCSend, s.gen, kStampWaited);
  combine_send_work(v, s, expert_y, true);
  __syncthreads();
  stamp0(v, kKCSend, s.gen, kStampBody);
  arrive_peers(v, s, kFlagCData);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint64_t t = globaltimer();
    stamp_at(v, kKCSend, s.gen, kStampEnd, t);
    stamp_at(v, kKCRecv, s.gen, kStampEntry, t);
    stamp_at(v, kKCRecv, s.gen, kStampStart, t);
  }
  // Our own rows are read from expert_y: only the other ranks' arrivals are waited for.
  wait_peers(v, s, kFlagCData, s.gen + 1, kErrTimeoutCombineData, /*skip_self=*/true);
  stamp0(v, kKCRecv, s.gen, kStampWaited);
  combine_recv_work(v, s, idx, w, y, expert_y);
  if (finish_block(v, s, kKCRecv, kCtrCRecv, kFlagCFree)) {
    if (threadIdx.x == 0) v.state[kGenCSend] = s.gen + 1;
    publish(v, s, kKCRecv, kGenCRecv, kFlagCFree, send_done);
  }
}

__global__ void timestamp_kernel(uint64_t* out) { out[0] = globaltimer(); }
__global__ void write_ints_kernel(int32_t* out, int32_t a, int32_t b) {
  out[0] = a;
  out[1] = b;
}

// A launch with every block resident at once when `cooperative` (the fused kernels wait, inside
// the kernel, for what other blocks of the same grid send).
template <typename... Params, typename... Args>
int launch(void (*kernel)(Params...), int grid, size_t smem, void* stream, bool cooperative, Args... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = cooperative ? 1 : 0;
  return static_cast<int>(cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...));
}

}  // namespace

size_t recv_shared_bytes(const DeviceView& v) {
  return sizeof(int32_t) * (2 * static_cast<size_t>(v.R) * v.L + 2 * static_cast<size_t>(v.L) + 1);
}

int launch_dispatch_send(const DeviceView& v, void* stream, const void* x, const float* x_scale,
                         const int32_t* indices, const int32_t* bound_m, const int32_t* rank,
                         uint32_t* send_done) {
  dispatch_send_kernel<<<v.grid_dsend, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      v, static_cast<const char*>(x), x_scale, indices, bound_m, rank, send_done);
  return static_cast<int>(cudaGetLastError());
}

int launch_dispatch_recv(const DeviceView& v, void* stream, const uint32_t* send_done,
                         const int32_t* rank, void* expert_x, float* expert_scale,
                         int32_t* expert_counts) {
  dispatch_recv_kernel<<<v.grid_drecv, kThreads, recv_shared_bytes(v), static_cast<cudaStream_t>(stream)>>>(
      v, send_done, rank, static_cast<char*>(expert_x), expert_scale, expert_counts);
  return static_cast<int>(cudaGetLastError());
}

int launch_combine_send(const DeviceView& v, void* stream, const void* expert_y,
                        const int32_t* expert_counts, const int32_t* rank, uint32_t* send_done) {
  combine_send_kernel<<<v.grid_csend, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      v, static_cast<const char*>(expert_y), expert_counts, rank, send_done);
  return static_cast<int>(cudaGetLastError());
}

int launch_combine_recv(const DeviceView& v, void* stream, const uint32_t* send_done,
                        const int32_t* indices, const float* weights, const int32_t* bound_m,
                        const int32_t* rank, void* y) {
  combine_recv_kernel<<<v.grid_crecv, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      v, send_done, indices, weights, bound_m, rank, static_cast<__nv_bfloat16*>(y));
  return static_cast<int>(cudaGetLastError());
}

int launch_dispatch_fused(const DeviceView& v, void* stream, bool cooperative, const void* x, const float* x_scale,
                          const int32_t* indices, const int32_t* bound_m, const int32_t* rank, void* expert_x,
                          float* expert_scale, int32_t* expert_counts, uint32_t* send_done) {
  return launch(dispatch_fused_kernel, v.grid_dfused, recv_shared_bytes(v), stream, cooperative, v,
                static_cast<const char*>(x), x_scale, indices, bound_m, rank, static_cast<char*>(expert_x),
                expert_scale, expert_counts, send_done);
}

int launch_combine_fused(const DeviceView& v, void* stream, bool cooperative, const void* expert_y,
                         const int32_t* expert_counts, const int32_t* indices, const float* weights,
                         const int32_t* bound_m, const int32_t* rank, void* y, uint32_t* send_done) {
  return launch(combine_fused_kernel, v.grid_cfused, 0, stream, cooperative, v, static_cast<const char*>(expert_y),
                expert_counts, indices, weights, bound_m, rank, static_cast<__nv_bfloat16*>(y), send_done);
}

int fused_resident_blocks(const DeviceView& v, bool dispatch, int* blocks_per_sm) {
  *blocks_per_sm = 0;
  return dispatch ? static_cast<int>(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                        blocks_per_sm, dispatch_fused_kernel, kThreads, recv_shared_bytes(v)))
                  : static_cast<int>(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                        blocks_per_sm, combine_fused_kernel, kThreads, 0));
}

int launch_timestamp(void* stream, uint64_t* out) {
  timestamp_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(out);
  return static_cast<int>(cudaGetLastError());
}

int launch_write_ints(void* stream, int32_t* out, int32_t a, int32_t b) {
  write_ints_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>(out, a, b);
  return static_cast<int>(cudaGetLastError());
}

int preload_kernels(std::string* report) {
  struct Entry {
    const char* name;
    const void* fn;
  };
  const Entry entries[] = {
      {"dispatch_send", reinterpret_cast<const void*>(&dispatch_send_kernel)},
      {"dispatch_recv", reinterpret_cast<const void*>(&dispatch_recv_kernel)},
      {"combine_send", reinterpret_cast<const void*>(&combine_send_kernel)},
      {"combine_recv", reinterpret_cast<const void*>(&combine_recv_kernel)},
      {"dispatch_fused", reinterpret_cast<const void*>(&dispatch_fused_kernel)},
      {"combine_fused", reinterpret_cast<const void*>(&combine_fused_kernel)},
      {"timestamp", reinterpret_cast<const void*>(&timestamp_kernel)},
  };
  for (const Entry& e : entries) {
    cudaFuncAttributes attr{};
    const cudaError_t err = cudaFuncGetAttributes(&attr, e.fn);
    if (err != cudaSuccess) return static_cast<int>(err);
    if (report != nullptr) {
      char line[160];
      std::snprintf(line, sizeof(line), "%s: %d regs, %zu B local (spills), %zu B static smem\n", e.name,
                    attr.numRegs, attr.localSizeBytes, attr.sharedSizeBytes);
      *report += line;
    }
  }
  return 0;
}

}  // namespace jax_garden::moe
