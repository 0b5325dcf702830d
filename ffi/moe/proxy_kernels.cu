// CUDA kernels of MoE across node groups (protocol: proxy_protocol.h; messages: the CPU inter-node
// protocol's, internode_protocol.h; routing and layout math: layout.h). Written for obviousness over
// speed: each FFI call is a few small kernels in stream order, so no kernel needs a grid-wide
// barrier:
//   dispatch_send = plan (block per destination: wait until it freed our last message, list the
//                   tokens it gets) + pack (header, token ids, indices, rows, scales; then publish);
//   dispatch_recv = wait (block per source: wait, check the header, count rows per local expert)
//                   + route (warp per (source, local expert): the row of each entry, (source,
//                   token, k) order, capacity applied) + copy (rows into expert_x; then free acks);
//   combine_send  = plan (block per source: wait until it freed our last combine, list the rows
//                   kept for it in its (t, k) order) + pack (header, kept counts, rows; publish);
//   combine_recv  = wait (block per expert rank: wait, check the header and kept counts) + route
//                   (block per expert rank: which of our entries it kept, at which packed row) +
//                   sum (k order, f32, no FMA contraction: the reference's bits; then free acks).
// A message goes to a rank of our node group by plain stores into its receive area (mapped here)
// and a release flag there; to a rank of another node group into our send area and a ready record
// for the host proxy. Every wait: thread 0 of a block, globaltimer deadline, __nanosleep backoff,
// gives up when the context died or the proxy set the abort word.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "moe/device_sync.cuh"
#include "moe/internode_protocol.h"
#include "moe/layout.h"
#include "moe/proxy_kernels.h"

namespace jax_garden::moe::proxy {
namespace {

using namespace jax_garden::moe::dev;
using internode::Kind;

constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kChunk = 2048;         // bytes of a row one warp moves at a time (32 lanes x 4 x 16 B)
constexpr int kSumChunk = 256;       // channels of one token one warp sums in combine_recv
constexpr int kHeader = sizeof(internode::DispatchHeader);
constexpr int kCombineHeader = sizeof(internode::CombineHeader);

// Phases of the timing ring (the FFI calls), as the NVLink context records them.
enum Phase : int { kPDispatchSend = 0, kPDispatchRecv = 1, kPCombineSend = 2, kPCombineRecv = 3 };

struct Shared {
  uint32_t gen;
  int ok;
  int closed;
  int bm;
  int last;
  char* node[kMaxNodeSize];
};

__device__ __forceinline__ bool same_node(const ProxyView& v, int r) {
  return r >= v.node_first && r < v.node_first + v.node_size;
}
__device__ __forceinline__ uint32_t* sync_flag(const ProxyView& v, char* area, int which, int writer) {
  return reinterpret_cast<uint32_t*>(area + v.sync + which * v.sync_stride) + writer;
}
__device__ __forceinline__ uint32_t* arrived_word(const ProxyView& v, Kind kind, int peer) {
  return v.arrived + static_cast<int64_t>(kind) * v.R + peer;
}
__device__ __forceinline__ ReadyRecord* ready_record(const ProxyView& v, Kind kind, int peer) {
  return v.ready + static_cast<int64_t>(kind) * v.R + peer;
}
__device__ __forceinline__ int64_t slot_offset(const ProxyView& v, int source) {
  return v.recv_dispatch + static_cast<int64_t>(source) * v.slot_bytes;
}
__device__ __forceinline__ internode::DispatchLayout msg_layout(const ProxyView& v, int64_t tokens) {
  return internode::dispatch_layout(v.K, v.S, v.xbytes, tokens);
}
__device__ __forceinline__ int4 ldcg4(const char* p) { return __ldcg(reinterpret_cast<const int4*>(p)); }
__device__ __forceinline__ int4 ldg4(const char* p) { return __ldg(reinterpret_cast<const int4*>(p)); }
__device__ __forceinline__ void st4(char* p, int4 q) { *reinterpret_cast<int4*>(p) = q; }

__device__ void record_error(const ProxyView& v, int32_t code, int32_t a, int32_t b, bool fatal, int32_t c = 0) {
  if (atomicCAS(v.err_dev, 0, code) == 0) {
    volatile int32_t* h = v.err_host;
    h[1] = a;
    h[2] = b;
    h[3] = v.rank;
    h[4] = c;
    __threadfence_system();
    h[0] = code;  // written last: the host reads the code first
  }
  if (fatal) atomicExch(v.state + kDead, 1u);
}

__device__ __forceinline__ void stamp(const ProxyView& v, int phase, uint32_t gen, int which) {
  v.timing[(static_cast<int64_t>(phase) * kTimingRing + gen % kTimingRing) * 2 + which] = globaltimer();
}

__device__ __forceinline__ void note_progress(const ProxyView& v, const Shared& s, int kernel, int which) {
  if (!s.closed) reinterpret_cast<volatile uint32_t*>(v.progress)[kernel * 2 + which] = s.gen + 1;
}

// Common prologue: generation of the phase, whether the context can still move data, bound_m, the
// node group's receive areas in shared memory (dynamic indexing stays off the parameter space).
// The first kernel of a phase stamps its start and checks the rank operand.
__device__ void prologue(const ProxyView& v, Shared& s, int gen_word, int kernel, int phase_start,
                         const int32_t* rank_p, const int32_t* bound_m_p) {
  if (threadIdx.x == 0) {
    s.gen = vload(v.state + gen_word);
    s.closed = vload(v.state + kClosed) != 0;  // the areas are gone (a CUDA graph may replay this launch)
    s.ok = !s.closed && vload(v.state + kDead) == 0;
    s.bm = bound_m_p != nullptr ? clamp_bound(*bound_m_p, v.T) : v.T;
    if (blockIdx.x == 0) {
      note_progress(v, s, kernel, 0);
      if (phase_start >= 0) {
        stamp(v, phase_start, s.gen, 0);
        const int r = *rank_p;
        if (r != v.rank && !s.closed) record_error(v, kErrRankMismatch, r, v.rank, false);
      }
    }
  }
  if (threadIdx.x < kMaxNodeSize) s.node[threadIdx.x] = v.node_recv[threadIdx.x];
  __syncthreads();
}

// 0: *word reached target ((int32)(word - target) >= 0); 1: deadline passed; 2: the context died
// or the proxy aborted meanwhile.
__device__ int wait_geq(const ProxyView& v, const uint32_t* word, uint32_t target) {
  if (static_cast<int32_t>(ld_acquire_sys(word) - target) >= 0) return 0;
  const uint64_t deadline = globaltimer() + v.timeout_ns;
  Backoff backoff;
  while (true) {
    backoff.pause();
    if (static_cast<int32_t>(ld_acquire_sys(word) - target) >= 0) return 0;
    if (vload(v.state + kDead) != 0 || vload(v.abort) != 0) return 2;
    if (globaltimer() > deadline) return 1;
  }
}

// Thread 0 waits for `peer`: a rank of our node group raises sync flag `flag` in our receive area,
// the proxy the arrival word of `kind` for any other rank. On failure the block's s.ok drops and
// the context is marked dead (a timeout also records `timeout_code`).
__device__ void wait_peer(const ProxyView& v, Shared& s, int peer, int flag, Kind kind, uint32_t target,
                          int32_t timeout_code) {
  if (threadIdx.x == 0 && s.ok) {
    const uint32_t* word = same_node(v, peer) ? sync_flag(v, v.recv, flag, peer) : arrived_word(v, kind, peer);
    const int w = wait_geq(v, word, target);
    if (w != 0) {
      if (w == 1) record_error(v, timeout_code, peer, static_cast<int32_t>(target), true);
      atomicExch(v.state + kDead, 1u);
      s.ok = 0;
    }
  }
  __syncthreads();
}

// Publishes "message/ack `gen` of `kind` to `peer` is ready": a release flag in the peer's receive
// area for a rank of our node group, a ready record for the proxy otherwise. Called after
// grid_last_block (every block's writes are ordered before it at system scope).
__device__ void publish(const ProxyView& v, const Shared& s, int peer, int flag, Kind kind, uint32_t gen,
                        int64_t bytes, int64_t src_offset, int64_t dst_offset) {
  if (same_node(v, peer)) {
    st_release_sys(sync_flag(v, s.node[peer - v.node_first], flag, v.rank), gen);
  } else {
    volatile ReadyRecord* r = ready_record(v, kind, peer);
    r->bytes = bytes;
    r->src_offset = src_offset;
    r->dst_offset = dst_offset;
    __threadfence_system();
    st_release_sys(const_cast<uint32_t*>(&r->generation), gen);
  }
}

// Block-wide exclusive scan of one flag per thread: returns this thread's position among the set
// flags of the block, *total gets their count. Every thread must call it.
__device__ int block_scan(bool flag, int* s_warp, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned m = __ballot_sync(kFull, flag);
  if (lane == 0) s_warp[warp] = __popc(m);
  __syncthreads();
  int before = 0, all = 0;
  for (int w = 0; w < kWarps; ++w) {
    const int n = s_warp[w];
    if (w < warp) before += n;
    all += n;
  }
  __syncthreads();  // s_warp is reused by the next call
  *total = all;
  return before + __popc(m & lanemask_lt());
}

// One warp copies bytes [o0, o1) of a row from src (nullptr: zeros) to dst, 16 B per lane access
// when `vec` (rows 16-byte aligned), else byte by byte. `cg`: src was written by another agent.
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int o0, int o1, bool vec, bool cg) {
  const int lane = threadIdx.x & 31;
  if (vec) {
    for (int o = o0 + lane * 16; o < o1; o += 32 * 16) {
      st4(dst + o, src == nullptr ? make_int4(0, 0, 0, 0) : (cg ? ldcg4(src + o) : ldg4(src + o)));
    }
  } else {
    for (int o = o0 + lane; o < o1; o += 32) dst[o] = src == nullptr ? 0 : (cg ? __ldcg(src + o) : __ldg(src + o));
  }
}

// =============================================================================================
// dispatch_send

// Block d: wait until rank d consumed our previous dispatch message; list the tokens t < bound_m
// with at least one entry owned by d (each once, ascending) and count d's (t, k) entries.
__global__ void __launch_bounds__(kThreads) dispatch_plan_kernel(ProxyView v, const int32_t* __restrict__ idx,
                                                                 const int32_t* bound_m_p, const int32_t* rank_p) {
  __shared__ Shared s;
  __shared__ int s_warp[kWarps];
  __shared__ int s_entries;
  prologue(v, s, kGenDSend, kKDispatchPlan, kPDispatchSend, rank_p, bound_m_p);
  const int d = blockIdx.x;
  if (d == 0 && threadIdx.x == 0 && !s.closed) {
    const uint32_t recvd = vload(v.state + kGenDRecv);
    if (recvd != s.gen) record_error(v, kErrPhaseOrder, kCallDispatchSend, s.gen, false, recvd);
    v.state[kSentBound] = static_cast<uint32_t>(s.bm);
  }
  if (threadIdx.x == 0) s_entries = 0;
  wait_peer(v, s, d, kSyncDispatchFree, Kind::kDispatchFree, s.gen, kErrTimeoutDispatchFree);
  int base = 0, entries = 0;
  if (s.ok) {
    for (int start = 0; start < s.bm; start += kThreads) {
      const int t = start + threadIdx.x;
      bool has = false;
      if (t < s.bm) {
        for (int k = 0; k < v.K; ++k) {
          const int e = __ldg(idx + static_cast<int64_t>(t) * v.K + k);
          if (valid_expert(e, v.E) && owner_rank(e, v.L) == d) {
            has = true;
            ++entries;
          }
        }
      }
      int total;
      const int pos = block_scan(has, s_warp, &total);
      if (has) v.tok_list[static_cast<int64_t>(d) * v.T + base + pos] = t;
      base += total;
    }
    atomicAdd(&s_entries, entries);
  }
  // Every block copies a share of the routing: combine_recv checks its own against it.
  const int64_t TK = static_cast<int64_t>(v.T) * v.K;
  for (int64_t j = static_cast<int64_t>(d) * kThreads + threadIdx.x; j < TK; j += static_cast<int64_t>(gridDim.x) * kThreads) {
    v.sent_idx[j] = __ldg(idx + j);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    v.tok_count[d] = s.ok ? base : 0;
    v.sent_entries[d] = s.ok ? s_entries : 0;
  }
  if (blockIdx.x == 0) note_progress(v, s, kKDispatchPlan, 1);
}

// Grid-stride over (destination, token, chunk): header, token ids, indices, rows and scales of
// every destination's message; the last block publishes them.
__global__ void __launch_bounds__(kThreads) dispatch_pack_kernel(ProxyView v, const char* __restrict__ x,
                                                                 const float* __restrict__ xs,
                                                                 const int32_t* __restrict__ idx, uint32_t* send_done) {
  __shared__ Shared s;
  extern __shared__ int64_t smem64[];
  int64_t* s_uoff = smem64;                 // [R+1] first unit of each destination
  int64_t* s_coff = s_uoff + v.R + 1;       // [R] where its combine message goes in our combine area
  int32_t* s_n = reinterpret_cast<int32_t*>(s_coff + v.R);  // [R] tokens
  prologue(v, s, kGenDSend, kKDispatchPack, -1, nullptr, nullptr);
  const int nchunk = (v.xbytes + kChunk - 1) / kChunk;
  for (int d = threadIdx.x; d < v.R; d += kThreads) s_n[d] = s.ok ? v.tok_count[d] : 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t units = 0, off = 0;
    for (int d = 0; d < v.R; ++d) {
      s_uoff[d] = units;
      units += static_cast<int64_t>(s_n[d]) * nchunk;
      s_coff[d] = off;  // internode::combine_offsets
      off += v.chb + static_cast<int64_t>(s.ok ? v.sent_entries[d] : 0) * v.cbytes;
    }
    s_uoff[v.R] = units;
  }
  __syncthreads();
  const uint32_t next = s.gen + 1;
  auto message = [&](int d) -> char* {
    return same_node(v, d) ? s.node[d - v.node_first] + slot_offset(v, v.rank)
                           : v.send + v.send_dispatch + static_cast<int64_t>(d) * v.slot_bytes;
  };
  if (s.ok && blockIdx.x == 0) {
    for (int d = threadIdx.x; d < v.R; d += kThreads) {
      v.sent_offset[d] = s_coff[d];
      internode::DispatchHeader h{};
      h.magic = internode::kDispatchMagic;
      h.generation = next;
      h.source = v.rank;
      h.tokens = s_n[d];
      h.combine_rows = v.sent_entries[d];
      h.bound_m = static_cast<int32_t>(vload(v.state + kSentBound));  // the plan kernel's clamped bound_m
      h.combine_offset = s_coff[d];
      *reinterpret_cast<internode::DispatchHeader*>(message(d)) = h;
    }
  }
  if (s.ok) {
    const int lane = threadIdx.x & 31;
    const bool vec = (v.xbytes & 15) == 0;
    const int64_t units = s_uoff[v.R];
    const int64_t nw = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); u < units; u += nw) {
      int lo = 0, hi = v.R - 1;  // last destination whose first unit is <= u
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_uoff[mid] <= u) lo = mid; else hi = mid - 1;
      }
      const int d = lo;
      const int64_t rem = u - s_uoff[d];
      const int i = static_cast<int>(rem / nchunk), c = static_cast<int>(rem % nchunk);
      const int t = v.tok_list[static_cast<int64_t>(d) * v.T + i];
      char* msg = message(d) + kHeader;
      const internode::DispatchLayout lay = msg_layout(v, s_n[d]);
      if (c == 0) {
        if (lane == 0) reinterpret_cast<int32_t*>(msg + lay.token_ids)[i] = t;
        if (lane < v.K) {
          reinterpret_cast<int32_t*>(msg + lay.indices)[static_cast<int64_t>(i) * v.K + lane] =
              __ldg(idx + static_cast<int64_t>(t) * v.K + lane);
        }
        float* sdst = reinterpret_cast<float*>(msg + lay.scales) + static_cast<int64_t>(i) * v.S;
        for (int j = lane; j < v.S; j += 32) sdst[j] = __ldg(xs + static_cast<int64_t>(t) * v.S + j);
      }
      const int o0 = c * kChunk, o1 = min(v.xbytes, o0 + kChunk);
      warp_copy(msg + lay.x + static_cast<int64_t>(i) * v.xbytes, x + static_cast<int64_t>(t) * v.xbytes, o0, o1,
                vec, false);
    }
  }
  if (grid_last_block(v.state + kCtrDSend, &s.last)) {
    if (s.ok) {
      for (int d = threadIdx.x; d < v.R; d += kThreads) {
        const int64_t bytes = kHeader + msg_layout(v, s_n[d]).bytes;
        publish(v, s, d, kSyncDispatchData, Kind::kDispatch, next, bytes,
                v.send_dispatch + static_cast<int64_t>(d) * v.slot_bytes, slot_offset(v, v.rank));
      }
    }
    if (threadIdx.x == 0) {
      send_done[0] = next;
      v.state[kGenDSend] = next;
      stamp(v, kPDispatchSend, s.gen, 1);
      note_progress(v, s, kKDispatchPack, 1);
    }
  }
}

// =============================================================================================
// dispatch_recv

// Block s: wait for source s's message, check its header and token ids, count its rows per local
// expert; reset the row tables of this call; take over the routing of the dispatch just sent.
__global__ void __launch_bounds__(kThreads) dispatch_wait_kernel(ProxyView v, const uint32_t* send_done,
                                                                 const int32_t* rank_p) {
  __shared__ Shared s;
  __shared__ int s_valid;
  extern __shared__ int32_t smem32[];
  int32_t* s_cnt = smem32;  // [L]
  prologue(v, s, kGenDRecv, kKDispatchWait, kPDispatchRecv, rank_p, nullptr);
  const int src = blockIdx.x;
  const uint32_t next = s.gen + 1;
  if (src == 0 && threadIdx.x == 0 && !s.closed) {
    const uint32_t sent = vload(v.state + kGenDSend);
    if (sent != next || *send_done != next) record_error(v, kErrPhaseOrder, kCallDispatchRecv, s.gen, false, sent);
  }
  for (int le = threadIdx.x; le < v.L; le += kThreads) s_cnt[le] = 0;
  wait_peer(v, s, src, kSyncDispatchData, Kind::kDispatch, next, kErrTimeoutDispatchData);
  const char* slot = v.recv + slot_offset(v, src);
  const int64_t TK = static_cast<int64_t>(v.T) * v.K;
  if (threadIdx.x == 0) {
    int bad = -1, value = 0;
    internode::DispatchHeader h{};
    if (s.ok) {
      const int32_t* w = reinterpret_cast<const int32_t*>(slot);
      h.magic = static_cast<uint32_t>(__ldcg(w + 0));
      h.generation = static_cast<uint32_t>(__ldcg(w + 1));
      h.source = __ldcg(w + 2);
      h.tokens = __ldcg(w + 3);
      h.combine_rows = __ldcg(w + 4);
      h.bound_m = __ldcg(w + 5);
      h.combine_offset = __ldcg(reinterpret_cast<const long long*>(slot + 24));
      if (h.magic != internode::kDispatchMagic) bad = kFieldMagic, value = static_cast<int>(h.magic);
      else if (h.generation != next) bad = kFieldGeneration, value = static_cast<int>(h.generation);
      else if (h.source != src) bad = kFieldSource, value = h.source;
      else if (h.tokens < 0 || h.tokens > v.T) bad = kFieldTokens, value = h.tokens;
      else if (h.combine_rows < 0 || h.combine_rows > TK) bad = kFieldCombineRows, value = h.combine_rows;
      else if (h.bound_m < 0 || h.bound_m > v.T) bad = kFieldBoundM, value = h.bound_m;
      else if (h.combine_offset < 0 ||
               h.combine_offset + v.chb + static_cast<int64_t>(h.combine_rows) * v.cbytes > v.recv_combine_bytes)
        bad = kFieldCombineOffset, value = static_cast<int>(h.combine_offset);
      if (bad >= 0) record_error(v, kErrMalformedMessage, src, bad, true, value);
    }
    s_valid = s.ok && bad < 0;
    v.msg_tokens[src] = s_valid ? h.tokens : 0;
    v.combine_offset_at[src] = s_valid ? h.combine_offset : 0;
    v.combine_rows_at[src] = s_valid ? h.combine_rows : 0;
  }
  __syncthreads();
  const int n = v.msg_tokens[src];  // written by thread 0 above (same block)
  const internode::DispatchLayout lay = msg_layout(v, n);
  const int32_t* ids = reinterpret_cast<const int32_t*>(slot + kHeader + lay.token_ids);
  const int32_t* ind = reinterpret_cast<const int32_t*>(slot + kHeader + lay.indices);
  if (s_valid) {
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const int id = __ldcg(ids + i), prev = i > 0 ? __ldcg(ids + i - 1) : -1;
      if (id <= prev || id >= v.T) {
        record_error(v, kErrMalformedMessage, src, kFieldTokenIds, true, id);
        s_valid = 0;  // several threads may store 0: benign
      }
    }
  }
  __syncthreads();
  if (s_valid) {
    for (int64_t j = threadIdx.x; j < static_cast<int64_t>(n) * v.K; j += kThreads) {
      const int e = __ldcg(ind + j);
      if (valid_expert(e, v.E) && owner_rank(e, v.L) == v.rank) atomicAdd(&s_cnt[e - v.rank * v.L], 1);
    }
  }
  __syncthreads();
  for (int le = threadIdx.x; le < v.L; le += kThreads) v.counts[static_cast<int64_t>(src) * v.L + le] = s_valid ? s_cnt[le] : 0;
  if (!s_valid && threadIdx.x == 0) v.msg_tokens[src] = 0;
  for (int64_t j = threadIdx.x; j < TK; j += kThreads) v.row_of_entry[static_cast<int64_t>(src) * TK + j] = -1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = static_cast<int64_t>(src) * kThreads + threadIdx.x; r < v.M; r += stride) v.row_src[r] = -1;
  // The dispatch combine will undo is the one sent last (as the CPU context's routed_* state).
  for (int64_t j = static_cast<int64_t>(src) * kThreads + threadIdx.x; j < TK; j += stride) v.routed_idx[j] = v.sent_idx[j];
  if (src == 0) {
    for (int d = threadIdx.x; d < v.R; d += kThreads) {
      v.routed_offset[d] = v.sent_offset[d];
      v.routed_entries[d] = v.sent_entries[d];
    }
    if (threadIdx.x == 0) v.state[kRoutedBm] = vload(v.state + kSentBound);
  }
  if (blockIdx.x == 0) note_progress(v, s, kKDispatchWait, 1);
}

// Segments (every block, from the counts) and, warp per (source, local expert), the row of each of
// that source's entries for that expert: the j-th such entry in (token, k) order sits at row
// start[e] + (rows of earlier sources) + j, kept when that is inside the capacity.
__global__ void __launch_bounds__(kThreads) dispatch_route_kernel(ProxyView v, int32_t* expert_counts) {
  __shared__ Shared s;
  __shared__ int32_t s_scan[kWarps];
  extern __shared__ int32_t smem32[];
  const int R = v.R, L = v.L;
  int32_t* s_cnt_src = smem32;         // [R][L]
  int32_t* s_cnt = s_cnt_src + R * L;  // [L] rows received, then kept
  int32_t* s_srcoff = s_cnt + L;       // [L][R] first row of each source inside the segment
  int32_t* s_seg = s_srcoff + L * R;   // [L+1] segment starts, s_seg[L] = rows in use
  prologue(v, s, kGenDRecv, kKDispatchRoute, -1, nullptr, nullptr);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < R * L; i += kThreads) s_cnt_src[i] = s.ok ? v.counts[i] : 0;
  __syncthreads();
  const int per = (L + kThreads - 1) / kThreads;
  int local_sum = 0;
  for (int q = 0; q < per; ++q) {
    const int el = threadIdx.x * per + q;
    if (el < L) {
      int acc = 0;
      for (int r = 0; r < R; ++r) {
        s_srcoff[el * R + r] = acc;
        acc += s_cnt_src[r * L + el];
      }
      s_cnt[el] = acc;
      local_sum += static_cast<int>(round_up(acc, v.pad));
    }
  }
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
  if (blockIdx.x == 0) {
    for (int el = threadIdx.x; el < L; el += kThreads) {
      expert_counts[el] = s_cnt[el];
      v.kept[el] = s_cnt[el];
    }
    if (dropped != 0) atomicAdd(reinterpret_cast<unsigned long long*>(v.state + kDropped), static_cast<unsigned long long>(dropped));
    if (threadIdx.x == 0) v.state[kTotalRows] = static_cast<uint32_t>(s_seg[L]);
  }
  const int w = blockIdx.x * kWarps + warp;
  if (s.ok && w < R * L) {
    const int src = w / L, el = w % L;
    const int e = v.rank * L + el;
    const int n = v.msg_tokens[src];
    const int64_t TK = static_cast<int64_t>(v.T) * v.K;
    const int32_t* ind =
        reinterpret_cast<const int32_t*>(v.recv + slot_offset(v, src) + kHeader + msg_layout(v, n).indices);
    const int so = s_srcoff[el * R + src], kept = s_cnt[el], start = s_seg[el];
    int j = 0;
    for (int i0 = 0; i0 < n * v.K; i0 += 32) {
      const int entry = i0 + lane;
      const int val = entry < n * v.K ? __ldcg(ind + entry) : -1;
      const unsigned m = __ballot_sync(kFull, val == e);
      if (val == e) {
        const int pos = so + j + __popc(m & lanemask_lt());
        if (pos < kept) {
          const int row = start + pos;
          v.row_of_entry[static_cast<int64_t>(src) * TK + entry] = row;
          v.row_src[row] = src * v.T + entry / v.K;
        }
      }
      j += __popc(m);
    }
    if (lane == 0) v.kept_from[static_cast<int64_t>(src) * L + el] = max(0, min(kept - so, s_cnt_src[src * L + el]));
  } else if (w < R * L && lane == 0) {
    v.kept_from[static_cast<int64_t>(w / L) * L + w % L] = 0;
  }
  if (blockIdx.x == 0) note_progress(v, s, kKDispatchRoute, 1);
}

// One warp per row of expert_x: a kept row from its source's message (and its scales), zeros for
// padding and the tail. The last block frees every source's slot.
__global__ void __launch_bounds__(kThreads) dispatch_copy_kernel(ProxyView v, char* expert_x, float* expert_scale) {
  __shared__ Shared s;
  prologue(v, s, kGenDRecv, kKDispatchCopy, -1, nullptr, nullptr);
  const int lane = threadIdx.x & 31;
  const int total = s.ok ? static_cast<int>(vload(v.state + kTotalRows)) : 0;
  const bool vec = (v.xbytes & 15) == 0;
  const int64_t nw = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); r < v.M; r += nw) {
    const char* src = nullptr;
    const float* ssrc = nullptr;
    if (r < total) {
      const int rs = v.row_src[r];
      if (rs >= 0) {
        const int sr = rs / v.T, i = rs % v.T;
        const internode::DispatchLayout lay = msg_layout(v, v.msg_tokens[sr]);
        const char* msg = v.recv + slot_offset(v, sr) + kHeader;
        src = msg + lay.x + static_cast<int64_t>(i) * v.xbytes;
        ssrc = reinterpret_cast<const float*>(msg + lay.scales) + static_cast<int64_t>(i) * v.S;
      }
    }
    warp_copy(expert_x + r * v.xbytes, src, 0, v.xbytes, vec, true);
    for (int j = lane; j < v.S; j += 32) expert_scale[r * v.S + j] = ssrc != nullptr ? __ldcg(ssrc + j) : 0.0f;
  }
  if (grid_last_block(v.state + kCtrDRecv, &s.last)) {
    const uint32_t next = s.gen + 1;
    if (s.ok && vload(v.state + kDead) == 0) {
      for (int src = threadIdx.x; src < v.R; src += kThreads) {
        publish(v, s, src, kSyncDispatchFree, Kind::kDispatchFree, next, 0, 0, 0);
      }
    }
    if (threadIdx.x == 0) {
      v.state[kGenDRecv] = next;
      stamp(v, kPDispatchRecv, s.gen, 1);
      note_progress(v, s, kKDispatchCopy, 1);
    }
  }
}

// =============================================================================================
// combine_send

// Block s: check the call order and the counts; wait until source s consumed our previous combine;
// list the rows kept for s in its (token, k) order (its message entries are in that order).
__global__ void __launch_bounds__(kThreads) combine_plan_kernel(ProxyView v, const int32_t* counts_in,
                                                                const int32_t* rank_p) {
  __shared__ Shared s;
  __shared__ int s_warp[kWarps];
  prologue(v, s, kGenCSend, kKCombinePlan, kPCombineSend, rank_p, nullptr);
  const int src = blockIdx.x;
  if (src == 0 && !s.closed) {
    if (threadIdx.x == 0) {
      const uint32_t recvd = vload(v.state + kGenCRecv), dispatched = vload(v.state + kGenDRecv);
      if (dispatched == 0) record_error(v, kErrPhaseOrder, kCallCombineBeforeDispatch, s.gen, false, 0);
      if (recvd != s.gen) record_error(v, kErrPhaseOrder, kCallCombineSend, s.gen, false, recvd);
    }
    for (int el = threadIdx.x; el < v.L; el += kThreads) {
      const int32_t given = counts_in[el];
      if (given != -1 && given != v.kept[el]) record_error(v, kErrCountsMismatch, el, given, false, v.kept[el]);
    }
  }
  wait_peer(v, s, src, kSyncCombineFree, Kind::kCombineFree, s.gen, kErrTimeoutCombineFree);
  const int64_t TK = static_cast<int64_t>(v.T) * v.K;
  int base = 0;
  if (s.ok) {
    const int64_t entries = static_cast<int64_t>(v.msg_tokens[src]) * v.K;
    for (int64_t start = 0; start < entries; start += kThreads) {
      const int64_t j = start + threadIdx.x;
      const int row = j < entries ? v.row_of_entry[static_cast<int64_t>(src) * TK + j] : -1;
      int total;
      const int pos = block_scan(row >= 0, s_warp, &total);
      if (row >= 0) v.pack_list[static_cast<int64_t>(src) * TK + base + pos] = row;
      base += total;
    }
  }
  if (threadIdx.x == 0) {
    v.pack_rows[src] = s.ok ? base : 0;
    // Cannot happen with well-formed headers; never write past what the source reserved.
    if (s.ok && base > v.combine_rows_at[src]) {
      record_error(v, kErrMalformedMessage, src, kFieldCombineRows, true, v.combine_rows_at[src]);
    }
  }
  if (blockIdx.x == 0) note_progress(v, s, kKCombinePlan, 1);
}

// Grid-stride over (source, packed row, chunk): the header, the kept counts and the rows of every
// source's combine message; the last block publishes them.
__global__ void __launch_bounds__(kThreads) combine_pack_kernel(ProxyView v, const char* __restrict__ expert_y,
                                                                uint32_t* send_done) {
  __shared__ Shared s;
  extern __shared__ int64_t smem64[];
  int64_t* s_uoff = smem64;            // [R+1] first unit of each source
  int64_t* s_poff = s_uoff + v.R + 1;  // [R] its message in our send combine area
  int64_t* s_dst = s_poff + v.R;       // [R] where it goes in the source's combine area
  int32_t* s_rows = reinterpret_cast<int32_t*>(s_dst + v.R);  // [R]
  prologue(v, s, kGenCSend, kKCombinePack, -1, nullptr, nullptr);
  if (vload(v.state + kDead) != 0) s.ok = 0;  // a plan block failed (its s.ok was its own)
  __syncthreads();
  const int nchunk = (v.cbytes + kChunk - 1) / kChunk;
  for (int r = threadIdx.x; r < v.R; r += kThreads) {
    s_rows[r] = s.ok ? v.pack_rows[r] : 0;
    s_dst[r] = s.ok ? v.combine_offset_at[r] : 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t units = 0, off = 0;
    for (int r = 0; r < v.R; ++r) {
      s_uoff[r] = units;
      units += static_cast<int64_t>(s_rows[r]) * nchunk;
      s_poff[r] = off;
      off += v.chb + static_cast<int64_t>(s_rows[r]) * v.cbytes;
    }
    s_uoff[v.R] = units;
  }
  __syncthreads();
  const uint32_t next = s.gen + 1;
  auto message = [&](int src) -> char* {
    return same_node(v, src) ? s.node[src - v.node_first] + v.recv_combine + s_dst[src]
                             : v.send + v.send_combine + s_poff[src];
  };
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (s.ok && blockIdx.x == 0) {
    const uint32_t dispatch_gen = vload(v.state + kGenDRecv);
    for (int src = warp; src < v.R; src += kWarps) {
      char* msg = message(src);
      if (lane == 0) {
        internode::CombineHeader h{};
        h.magic = internode::kCombineMagic;
        h.generation = next;
        h.dispatch_generation = dispatch_gen;
        h.source = v.rank;
        h.rows = s_rows[src];
        *reinterpret_cast<internode::CombineHeader*>(msg) = h;
      }
      for (int el = lane; el < v.L; el += 32) {
        reinterpret_cast<int32_t*>(msg + kCombineHeader)[el] = v.kept_from[static_cast<int64_t>(src) * v.L + el];
      }
    }
  }
  if (s.ok) {
    const bool vec = (v.cbytes & 15) == 0;
    const int64_t TK = static_cast<int64_t>(v.T) * v.K;
    const int64_t units = s_uoff[v.R];
    const int64_t nw = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * kWarps + warp; u < units; u += nw) {
      int lo = 0, hi = v.R - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (s_uoff[mid] <= u) lo = mid; else hi = mid - 1;
      }
      const int src = lo;
      const int64_t rem = u - s_uoff[src];
      const int p = static_cast<int>(rem / nchunk), c = static_cast<int>(rem % nchunk);
      const int row = v.pack_list[static_cast<int64_t>(src) * TK + p];
      const int o0 = c * kChunk, o1 = min(v.cbytes, o0 + kChunk);
      warp_copy(message(src) + v.chb + static_cast<int64_t>(p) * v.cbytes,
                expert_y + static_cast<int64_t>(row) * v.cbytes, o0, o1, vec, false);
    }
  }
  if (grid_last_block(v.state + kCtrCSend, &s.last)) {
    if (s.ok) {
      for (int src = threadIdx.x; src < v.R; src += kThreads) {
        publish(v, s, src, kSyncCombineData, Kind::kCombine, next, v.chb + static_cast<int64_t>(s_rows[src]) * v.cbytes,
                v.send_combine + s_poff[src], v.recv_combine + s_dst[src]);
      }
    }
    if (threadIdx.x == 0) {
      send_done[0] = next;
      v.state[kGenCSend] = next;
      stamp(v, kPCombineSend, s.gen, 1);
      note_progress(v, s, kKCombinePack, 1);
    }
  }
}

// =============================================================================================
// combine_recv

// Block d: check the call order and our routing; wait for expert rank d's combine message; check
// its header and the rows it kept of ours per local expert (never more than we routed there).
__global__ void __launch_bounds__(kThreads) combine_wait_kernel(ProxyView v, const uint32_t* send_done,
                                                                const int32_t* __restrict__ idx,
                                                                const int32_t* bound_m_p, const int32_t* rank_p) {
  __shared__ Shared s;
  __shared__ int s_valid, s_sum;
  extern __shared__ int32_t smem32[];
  int32_t* s_ent = smem32;  // [L] our entries routed to each local expert of d
  prologue(v, s, kGenCRecv, kKCombineWait, kPCombineRecv, rank_p, bound_m_p);
  const int d = blockIdx.x;
  const uint32_t next = s.gen + 1;
  const int routed_bm = static_cast<int>(vload(v.state + kRoutedBm));
  if (!s.closed) {
    if (d == 0 && threadIdx.x == 0) {
      const uint32_t sent = vload(v.state + kGenCSend);
      if (sent != next || *send_done != next) record_error(v, kErrPhaseOrder, kCallCombineRecv, s.gen, false, sent);
      if (s.bm != routed_bm) record_error(v, kErrRoutingMismatch, -1, s.bm, false, routed_bm);
    }
    // combine undoes the last dispatch: its routing must be the one given here
    const int64_t n = static_cast<int64_t>(min(s.bm, routed_bm)) * v.K;
    for (int64_t j = static_cast<int64_t>(d) * kThreads + threadIdx.x; j < n; j += static_cast<int64_t>(gridDim.x) * kThreads) {
      const int32_t given = __ldg(idx + j), routed = v.routed_idx[j];
      if (given != routed) record_error(v, kErrRoutingMismatch, static_cast<int32_t>(j), given, false, routed);
    }
  }
  for (int el = threadIdx.x; el < v.L; el += kThreads) s_ent[el] = 0;
  if (threadIdx.x == 0) s_sum = 0;
  wait_peer(v, s, d, kSyncCombineData, Kind::kCombine, next, kErrTimeoutCombineData);
  const char* msg = v.recv + v.recv_combine + v.routed_offset[d];
  if (s.ok) {
    for (int64_t j = threadIdx.x; j < static_cast<int64_t>(routed_bm) * v.K; j += kThreads) {
      const int e = v.routed_idx[j];
      if (valid_expert(e, v.E) && owner_rank(e, v.L) == d) atomicAdd(&s_ent[e - d * v.L], 1);
    }
  }
  int rows = 0;
  if (threadIdx.x == 0) {
    int bad = -1, value = 0;
    if (s.ok) {
      const int32_t* w = reinterpret_cast<const int32_t*>(msg);
      const uint32_t magic = static_cast<uint32_t>(__ldcg(w + 0)), gen = static_cast<uint32_t>(__ldcg(w + 1));
      const uint32_t dgen = static_cast<uint32_t>(__ldcg(w + 2));
      const int source = __ldcg(w + 3);
      rows = __ldcg(w + 4);
      if (magic != internode::kCombineMagic) bad = kFieldMagic, value = static_cast<int>(magic);
      else if (gen != next) bad = kFieldGeneration, value = static_cast<int>(gen);
      else if (source != d) bad = kFieldSource, value = source;
      else if (dgen != vload(v.state + kGenDRecv)) bad = kFieldDispatchGeneration, value = static_cast<int>(dgen);
      else if (rows < 0 || rows > v.routed_entries[d]) bad = kFieldRows, value = rows;
      if (bad >= 0) record_error(v, kErrMalformedMessage, d, bad, true, value);
    }
    s_valid = s.ok && bad < 0;
  }
  __syncthreads();
  for (int el = threadIdx.x; el < v.L; el += kThreads) {
    int k = 0;
    if (s_valid) {
      k = __ldcg(reinterpret_cast<const int32_t*>(msg + kCombineHeader) + el);
      if (k < 0 || k > s_ent[el]) {
        record_error(v, kErrMalformedMessage, d, kFieldKept, true, k);
        s_valid = 0;
      }
      atomicAdd(&s_sum, k);
    }
    v.kept_by[static_cast<int64_t>(d) * v.L + el] = k;
  }
  __syncthreads();
  if (threadIdx.x == 0 && s_valid) {
    rows = __ldcg(reinterpret_cast<const int32_t*>(msg) + 4);
    if (s_sum != rows) record_error(v, kErrMalformedMessage, d, kFieldRows, true, rows);
  }
  if (blockIdx.x == 0) note_progress(v, s, kKCombineWait, 1);
}

// Block d: which of our entries routed to d it kept (per local expert, a prefix in (t, k) order)
// and, for each, its row in d's packed message (kept entries routed to d in (t, k) order).
__global__ void __launch_bounds__(kThreads) combine_route_kernel(ProxyView v) {
  __shared__ Shared s;
  __shared__ int s_warp[kWarps];
  prologue(v, s, kGenCRecv, kKCombineRoute, -1, nullptr, nullptr);
  if (vload(v.state + kDead) != 0) s.ok = 0;
  __syncthreads();
  const int d = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n = static_cast<int>(vload(v.state + kRoutedBm)) * v.K;
  if (s.ok) {
    for (int el = warp; el < v.L; el += kWarps) {
      const int e = d * v.L + el;
      const int kb = v.kept_by[static_cast<int64_t>(d) * v.L + el];
      int j = 0;
      for (int i0 = 0; i0 < n; i0 += 32) {
        const int entry = i0 + lane;
        const int val = entry < n ? v.routed_idx[entry] : -1;
        const unsigned m = __ballot_sync(kFull, val == e);
        if (val == e) v.keptflag[entry] = (j + __popc(m & lanemask_lt())) < kb ? 1 : 0;
        j += __popc(m);
      }
    }
  }
  __syncthreads();
  int base = 0;
  for (int start = 0; start < n; start += kThreads) {
    const int entry = start + threadIdx.x;
    bool mine = false, kept = false;
    if (entry < n) {
      const int e = v.routed_idx[entry];
      mine = valid_expert(e, v.E) && owner_rank(e, v.L) == d;
      kept = s.ok && mine && v.keptflag[entry] != 0;
    }
    int total;
    const int pos = block_scan(kept, s_warp, &total);
    if (mine) v.rowpos[entry] = kept ? base + pos : -1;
    base += total;
  }
  if (blockIdx.x == 0) note_progress(v, s, kKCombineRoute, 1);
}

__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// y[t] = sum_k w[t, k] * row(t, k) for t < bound_m, f32 in k order, product and sum rounded
// separately (the reference's bits); zeros after. The last block frees every expert rank's area.
__global__ void __launch_bounds__(kThreads) combine_sum_kernel(ProxyView v, const float* __restrict__ w,
                                                               const int32_t* bound_m_p, __nv_bfloat16* y) {
  __shared__ Shared s;
  prologue(v, s, kGenCRecv, kKCombineSum, -1, nullptr, bound_m_p);
  if (vload(v.state + kDead) != 0) s.ok = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int H = v.H, K = v.K;
  const int bm = min(s.bm, static_cast<int>(vload(v.state + kRoutedBm)));
  const bool vec = (H & 7) == 0;
  const int nchunk = (H + kSumChunk - 1) / kSumChunk;
  const int64_t units = static_cast<int64_t>(v.T) * nchunk;
  const int64_t nw = static_cast<int64_t>(gridDim.x) * kWarps;
  const char* area = v.recv + v.recv_combine;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); u < units; u += nw) {
    const int t = static_cast<int>(u / nchunk), c = static_cast<int>(u % nchunk);
    __nv_bfloat16* yrow = y + static_cast<int64_t>(t) * H;
    const bool live = s.ok && t < bm;
    float wk = 0.0f;
    long long roff = -1;  // byte offset of entry (t, lane)'s row in our combine area
    if (live && lane < K) {
      const int64_t n = static_cast<int64_t>(t) * K + lane;
      const int e = v.routed_idx[n];
      if (valid_expert(e, v.E)) {
        const int p = v.rowpos[n];
        if (p >= 0) roff = v.routed_offset[owner_rank(e, v.L)] + v.chb + static_cast<int64_t>(p) * v.cbytes;
      }
      wk = __ldg(w + n);
    }
    if (vec) {
      const int ch = c * kSumChunk + lane * 8;
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      for (int k = 0; k < K; ++k) {
        const long long o = __shfl_sync(kFull, roff, k);
        const float wv = __shfl_sync(kFull, wk, k);
        if (o >= 0 && ch < H) {
          const int4 q = ldcg4(area + o + static_cast<int64_t>(ch) * 2);
          const uint32_t words[4] = {static_cast<uint32_t>(q.x), static_cast<uint32_t>(q.y), static_cast<uint32_t>(q.z),
                                     static_cast<uint32_t>(q.w)};
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            acc[2 * h] = __fadd_rn(acc[2 * h], __fmul_rn(wv, bf16_bits_to_f32(words[h] & 0xffffu)));
            acc[2 * h + 1] = __fadd_rn(acc[2 * h + 1], __fmul_rn(wv, bf16_bits_to_f32(words[h] >> 16)));
          }
        }
      }
      if (ch < H) {
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
        const int ch = c * kSumChunk + lane + 32 * i;
        float acc = 0.0f;
        for (int k = 0; k < K; ++k) {
          const long long o = __shfl_sync(kFull, roff, k);
          const float wv = __shfl_sync(kFull, wk, k);
          if (o >= 0 && ch < H) {
            const uint16_t bits = __ldcg(reinterpret_cast<const unsigned short*>(area + o) + ch);
            acc = __fadd_rn(acc, __fmul_rn(wv, bf16_bits_to_f32(bits)));
          }
        }
        if (ch < H) yrow[ch] = __float2bfloat16_rn(acc);
      }
    }
  }
  if (grid_last_block(v.state + kCtrCRecv, &s.last)) {
    const uint32_t next = s.gen + 1;
    if (s.ok) {
      for (int d = threadIdx.x; d < v.R; d += kThreads) {
        publish(v, s, d, kSyncCombineFree, Kind::kCombineFree, next, 0, 0, 0);
      }
    }
    if (threadIdx.x == 0) {
      v.state[kGenCRecv] = next;
      stamp(v, kPCombineRecv, s.gen, 1);
      note_progress(v, s, kKCombineSum, 1);
    }
  }
}

size_t pack_shared_bytes(const ProxyView& v) { return (3 * static_cast<size_t>(v.R) + 1) * 8 + v.R * 4; }
size_t route_shared_bytes(const ProxyView& v) {
  return sizeof(int32_t) * (2 * static_cast<size_t>(v.R) * v.L + 2 * static_cast<size_t>(v.L) + 1);
}
int route_blocks(const ProxyView& v) { return (v.R * v.L + kWarps - 1) / kWarps; }

}  // namespace

int launch_dispatch_send(const ProxyView& v, void* stream, const void* x, const float* x_scale,
                         const int32_t* indices, const int32_t* bound_m, const int32_t* rank, uint32_t* send_done) {
  auto st = static_cast<cudaStream_t>(stream);
  dispatch_plan_kernel<<<v.R, kThreads, 0, st>>>(v, indices, bound_m, rank);
  dispatch_pack_kernel<<<v.grid, kThreads, pack_shared_bytes(v), st>>>(v, static_cast<const char*>(x), x_scale,
                                                                       indices, send_done);
  return static_cast<int>(cudaGetLastError());
}

int launch_dispatch_recv(const ProxyView& v, void* stream, const uint32_t* send_done, const int32_t* rank,
                         void* expert_x, float* expert_scale, int32_t* expert_counts) {
  auto st = static_cast<cudaStream_t>(stream);
  dispatch_wait_kernel<<<v.R, kThreads, v.L * sizeof(int32_t), st>>>(v, send_done, rank);
  dispatch_route_kernel<<<route_blocks(v), kThreads, route_shared_bytes(v), st>>>(v, expert_counts);
  dispatch_copy_kernel<<<v.grid, kThreads, 0, st>>>(v, static_cast<char*>(expert_x), expert_scale);
  return static_cast<int>(cudaGetLastError());
}

int launch_combine_send(const ProxyView& v, void* stream, const void* expert_y, const int32_t* expert_counts,
                        const int32_t* rank, uint32_t* send_done) {
  auto st = static_cast<cudaStream_t>(stream);
  combine_plan_kernel<<<v.R, kThreads, 0, st>>>(v, expert_counts, rank);
  combine_pack_kernel<<<v.grid, kThreads, pack_shared_bytes(v), st>>>(v, static_cast<const char*>(expert_y),
                                                                      send_done);
  return static_cast<int>(cudaGetLastError());
}

int launch_combine_recv(const ProxyView& v, void* stream, const uint32_t* send_done, const int32_t* indices,
                        const float* weights, const int32_t* bound_m, const int32_t* rank, void* y) {
  auto st = static_cast<cudaStream_t>(stream);
  combine_wait_kernel<<<v.R, kThreads, v.L * sizeof(int32_t), st>>>(v, send_done, indices, bound_m, rank);
  combine_route_kernel<<<v.R, kThreads, 0, st>>>(v);
  combine_sum_kernel<<<v.grid, kThreads, 0, st>>>(v, weights, bound_m, static_cast<__nv_bfloat16*>(y));
  return static_cast<int>(cudaGetLastError());
}

int preload_kernels(std::string* report) {
  struct Entry {
    const char* name;
    const void* fn;
  };
  const Entry entries[] = {
      {"proxy dispatch_plan", reinterpret_cast<const void*>(&dispatch_plan_kernel)},
      {"proxy dispatch_pack", reinterpret_cast<const void*>(&dispatch_pack_kernel)},
      {"proxy dispatch_wait", reinterpret_cast<const void*>(&dispatch_wait_kernel)},
      {"proxy dispatch_route", reinterpret_cast<const void*>(&dispatch_route_kernel)},
      {"proxy dispatch_copy", reinterpret_cast<const void*>(&dispatch_copy_kernel)},
      {"proxy combine_plan", reinterpret_cast<const void*>(&combine_plan_kernel)},
      {"proxy combine_pack", reinterpret_cast<const void*>(&combine_pack_kernel)},
      {"proxy combine_wait", reinterpret_cast<const void*>(&combine_wait_kernel)},
      {"proxy combine_route", reinterpret_cast<const void*>(&combine_route_kernel)},
      {"proxy combine_sum", reinterpret_cast<const void*>(&combine_sum_kernel)},
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

}  // namespace jax_garden::moe::proxy
