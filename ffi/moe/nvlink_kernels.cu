// CUDA kernels of the NVLink MoE dispatch/combine (protocol: nvlink_protocol.h; routing and
// layout math: layout.h, the same functions the CPU reference runs).
//
// Every kernel: a prologue (read the generation, wait with a deadline for the peers' flags),
// a grid-stride body where one warp moves one chunk of one row with 16-byte accesses, and a
// last-block epilogue that publishes a release flag in the peers (one fence.sys per block after a
// barrier, then a block counter; the last block writes the flags and advances the generation).
// Each kernel launches the blocks its static work can use (DeviceView::grid_*), so the fixed cost
// of a small step (launch, scheduling, the last-block count) stays small.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "moe/layout.h"
#include "moe/nvlink_kernels.h"

namespace jax_garden::moe {
namespace {

constexpr int kWarps = kThreads / 32;
constexpr int kRouteTile = 2048;  // routing entries staged in shared memory at a time
constexpr int kRowBatch = 16;     // 16-byte vectors per lane in flight when a warp copies a row
constexpr unsigned kFull = 0xffffffffu;

enum Kernel : int { kKDSend = 0, kKDRecv = 1, kKCSend = 2, kKCRecv = 3 };

__device__ __forceinline__ uint64_t globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t vload(const uint32_t* p) { return *reinterpret_cast<const volatile uint32_t*>(p); }
__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}
__device__ __forceinline__ uint32_t* flag_ptr(char* sym, int which, int idx) {
  return reinterpret_cast<uint32_t*>(sym + which * 128) + idx;
}
__device__ __forceinline__ int64_t round16(int64_t n) { return (n + 15) & ~int64_t{15}; }

__device__ void record_error(const DeviceView& v, int32_t code, int32_t a, int32_t b, bool fatal, int32_t c = 0) {
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

// 0: (int32)(flag - target) >= 0 reached; 1: deadline passed; 2: the context died meanwhile.
__device__ int wait_flag(const DeviceView& v, const uint32_t* flag, uint32_t target) {
  const uint64_t deadline = globaltimer() + v.timeout_ns;
  uint32_t spins = 0, pause = 32;
  while (static_cast<int32_t>(ld_acquire_sys(flag) - target) < 0) {
    if ((++spins & 127u) == 0) {
      if (globaltimer() > deadline) return 1;
      if (vload(v.state + kDead) != 0) return 2;
      // A peer that is not there yet (a slower GPU, or another process's time slice on a shared
      // GPU): back off instead of hammering its memory.
      if (spins >= 4096) {
        __nanosleep(pause);
        if (pause < 1024) pause <<= 1;
      }
    }
  }
  return 0;
}

__device__ __forceinline__ void stamp(const DeviceView& v, int kernel, uint32_t gen, int which) {
  v.timing[(static_cast<int64_t>(kernel) * kTimingRing + gen % kTimingRing) * 2 + which] = globaltimer();
}

// Common prologue. Returns in shared memory: generation, ok (no peer failure), peers' bases.
struct Shared {
  uint32_t gen;
  int ok;
  int bm;
  int last;
  char* sym[kMaxRanks];
};

__device__ void prologue(const DeviceView& v, Shared& s, int kernel, int gen_word, const int32_t* rank_p,
                         const int32_t* bound_m_p) {
  if (threadIdx.x == 0) {
    s.gen = vload(v.state + gen_word);
    // Closed: the symmetric buffers are gone (a CUDA graph may still replay this launch).
    s.ok = vload(v.state + kDead) == 0 && vload(v.state + kClosed) == 0;
    int bm = v.T;
    if (bound_m_p != nullptr) bm = clamp_bound(*bound_m_p, v.T);
    s.bm = bm;
    if (blockIdx.x == 0) {
      stamp(v, kernel, s.gen, 0);
      const int r = *rank_p;
      if (r != v.rank) record_error(v, kErrRankMismatch, r, v.rank, false);
    }
  }
  if (threadIdx.x < kMaxRanks) s.sym[threadIdx.x] = v.sym[threadIdx.x];  // dynamic index: keep it off the param space
  __syncthreads();
}

// Thread i < R waits for flag `which`[i] in our own buffer to reach `target`.
__device__ void wait_peers(const DeviceView& v, Shared& s, int which, uint32_t target, int32_t err_code) {
  if (s.ok && threadIdx.x < v.R) {
    const int w = wait_flag(v, flag_ptr(s.sym[v.rank], which, threadIdx.x), target);
    if (w != 0) {
      if (w == 1) record_error(v, err_code, threadIdx.x, static_cast<int32_t>(target), true);
      s.ok = 0;  // several threads may store 0: benign
    }
  }
  __syncthreads();
}

// Last-block epilogue: true in the one block that finishes last (all blocks' global and peer
// accesses are ordered before what that block does next, at system scope).
__device__ bool finish_block(const DeviceView& v, Shared& s, int ctr_word) {
  // One system-scope fence per block, by the thread that counts the block in, after a barrier that
  // makes the block's writes observed by it (fences are cumulative); the legacy mode fences in
  // every thread (tens of thousands of fence.sc.sys per kernel).
  if (v.fence_all) __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    if (!v.fence_all) __threadfence_system();
    const uint32_t prev = atomicAdd(v.state + ctr_word, 1u);
    s.last = prev == static_cast<uint32_t>(gridDim.x - 1);
    if (s.last) {
      v.state[ctr_word] = 0;
      __threadfence_system();
    }
  }
  __syncthreads();
  return s.last != 0;
}

__device__ void publish(const DeviceView& v, Shared& s, int kernel, int gen_word, int flag, uint32_t* send_done) {
  const uint32_t next = s.gen + 1;
  if (s.ok && threadIdx.x < v.R) st_release_sys(flag_ptr(s.sym[threadIdx.x], flag, v.rank), next);
  if (threadIdx.x == 0) {
    if (send_done != nullptr) send_done[0] = next;
    v.state[gen_word] = next;
    stamp(v, kernel, s.gen, 1);
  }
}

__device__ __forceinline__ int4 ldcg4(const char* p) { return __ldcg(reinterpret_cast<const int4*>(p)); }
__device__ __forceinline__ int4 ldg4(const char* p) { return __ldg(reinterpret_cast<const int4*>(p)); }
__device__ __forceinline__ void st4(char* p, int4 v) { *reinterpret_cast<int4*>(p) = v; }

// ---------------------------------------------------------------------------------------------
// dispatch_send: route lists (warp e < E: stable list of the (t*K+k) routed to expert e, built
// with ballots over the token-major order, so the receiver's row order is deterministic) and
// token data (each token once per destination rank, 16-byte NVLink stores).
__global__ void __launch_bounds__(kThreads, 2) dispatch_send_kernel(DeviceView v, const char* __restrict__ x,
                                                                 const float* __restrict__ xs,
                                                                 const int32_t* __restrict__ idx,
                                                                 const int32_t* bound_m_p, const int32_t* rank_p,
                                                                 uint32_t* send_done) {
  __shared__ Shared s;
  __shared__ int32_t s_idx[kRouteTile];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  prologue(v, s, kKDSend, kGenDSend, rank_p, bound_m_p);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint32_t recvd = vload(v.state + kGenDRecv);
    if (recvd != s.gen) record_error(v, kErrPhaseOrder, kCallDispatchSend, s.gen, recvd, false);
    v.state[kRoutedBm] = static_cast<uint32_t>(s.bm);  // combine_recv checks its bound_m
  }
  // Every destination must have consumed our previous dispatch before we overwrite its slots.
  wait_peers(v, s, kFlagDFree, s.gen, kErrTimeoutDispatchFree);

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
  if (finish_block(v, s, kCtrDSend)) publish(v, s, kKDSend, kGenDSend, kFlagDData, send_done);
}

// ---------------------------------------------------------------------------------------------
// dispatch_recv: per-expert segments (padded), rows by source rank then (t, k); gathers the
// deduplicated slots into expert_x, zeroes padding and unused rows, records row -> (src, t, k).
__global__ void __launch_bounds__(kThreads, 2) dispatch_recv_kernel(DeviceView v, const uint32_t* send_done,
                                                                    const int32_t* rank_p, char* expert_x,
                                                                    float* expert_scale, int32_t* expert_counts) {
  __shared__ Shared s;
  __shared__ int32_t s_scan[kWarps];
  extern __shared__ int32_t smem[];
  const int R = v.R, L = v.L;
  int32_t* s_cnt_src = smem;           // [R][L] rows from each source per local expert
  int32_t* s_cnt = s_cnt_src + R * L;  // [L] rows per local expert: received, then kept
  int32_t* s_srcoff = s_cnt + L;       // [L][R] first row of each source inside the segment
  int32_t* s_seg = s_srcoff + L * R;   // [L+1] segment starts, s_seg[L] = rows used
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  prologue(v, s, kKDRecv, kGenDRecv, rank_p, nullptr);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint32_t sent = vload(v.state + kGenDSend);
    if (sent != s.gen + 1 || *send_done != s.gen + 1) record_error(v, kErrPhaseOrder, kCallDispatchRecv, s.gen, sent, false);
  }
  wait_peers(v, s, kFlagDData, s.gen + 1, kErrTimeoutDispatchData);

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
      if (lane == 0) v.row_map[r] = packed;
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
  // Our reads of every source's slots are complete: the sources may overwrite them.
  if (finish_block(v, s, kCtrDRecv)) publish(v, s, kKDRecv, kGenDRecv, kFlagDFree, nullptr);
}

// ---------------------------------------------------------------------------------------------
// combine_send: expert_y[row] -> slot [t*K+k] of the source rank of that row.
__global__ void __launch_bounds__(kThreads, 2) combine_send_kernel(DeviceView v, const char* __restrict__ expert_y,
                                                                const int32_t* counts_in, const int32_t* rank_p,
                                                                uint32_t* send_done) {
  __shared__ Shared s;
  __shared__ int s_total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  prologue(v, s, kKCSend, kGenCSend, rank_p, nullptr);
  if (threadIdx.x == 0) s_total = static_cast<int>(vload(v.state + kTotalRows));
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint32_t recvd = vload(v.state + kGenCRecv), dispatched = vload(v.state + kGenDRecv);
    if (dispatched == 0) record_error(v, kErrPhaseOrder, kCallCombineBeforeDispatch, s.gen, 0, false);
    if (recvd != s.gen) record_error(v, kErrPhaseOrder, kCallCombineSend, s.gen, recvd, false);
  }
  // expert_counts must be those of the last dispatch (-1: not given).
  if (blockIdx.x == 0) {
    for (int el = threadIdx.x; el < v.L; el += kThreads) {
      const int32_t given = counts_in[el];
      if (given != -1 && given != v.kept[el]) record_error(v, kErrCountsMismatch, el, given, false, v.kept[el]);
    }
  }
  // Every source must have summed our previous combine before we overwrite its slots.
  wait_peers(v, s, kFlagCFree, s.gen, kErrTimeoutCombineFree);
  if (s.ok) {
    const int64_t TK = static_cast<int64_t>(v.T) * v.K;
    const bool vec = (v.cbytes & 15) == 0;
    const int chunk = v.chunk_bytes;
    const int nchunk = (v.cbytes + chunk - 1) / chunk;
    const int64_t units = static_cast<int64_t>(s_total) * nchunk;
    const int nw = gridDim.x * kWarps;
    for (int64_t u = blockIdx.x * kWarps + warp; u < units; u += nw) {
      const int r = static_cast<int>(u / nchunk), c = static_cast<int>(u % nchunk);
      const int32_t p = __ldcg(v.row_map + r);
      if (p < 0) continue;
      const int sr = static_cast<int>(p / TK);
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
  if (finish_block(v, s, kCtrCSend)) publish(v, s, kKCSend, kGenCSend, kFlagCData, send_done);
}

// ---------------------------------------------------------------------------------------------
// combine_recv: y[t] = sum_k w[t,k] * slot[t*K+k], f32, k ascending, product then sum rounded
// separately (no FMA contraction), so the result is the reference's bit for bit.
__device__ __forceinline__ float bf16_bits_to_f32(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

__global__ void __launch_bounds__(kThreads, 2) combine_recv_kernel(DeviceView v, const uint32_t* send_done,
                                                                   const int32_t* __restrict__ idx,
                                                                const float* __restrict__ w,
                                                                const int32_t* bound_m_p, const int32_t* rank_p,
                                                                __nv_bfloat16* y) {
  __shared__ Shared s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  prologue(v, s, kKCRecv, kGenCRecv, rank_p, bound_m_p);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const uint32_t sent = vload(v.state + kGenCSend);
    if (sent != s.gen + 1 || *send_done != s.gen + 1) record_error(v, kErrPhaseOrder, kCallCombineRecv, s.gen, sent, false);
    const int32_t routed_bm = static_cast<int32_t>(vload(v.state + kRoutedBm));
    if (s.bm != routed_bm) record_error(v, kErrRoutingMismatch, -1, s.bm, false, routed_bm);
  }
  wait_peers(v, s, kFlagCData, s.gen + 1, kErrTimeoutCombineData);
  const char* slots = s.sym[v.rank] + v.off_cdata;
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
    // Entry k adds to y[t] iff its expert id is valid and its slot was written by this combine
    // (entries ignored or dropped at dispatch were not).
    float wk = 0.0f;
    bool valid = false;
    if (lane < K) {
      const int64_t n = static_cast<int64_t>(t) * K + lane;
      const int32_t e = __ldg(idx + n);
      wk = __ldg(w + n);
      valid = valid_expert(e, v.E) &&
              __ldcg(reinterpret_cast<const uint32_t*>(s.sym[v.rank] + v.off_cgen) + n) == s.gen + 1;
      if (c == 0) {  // combine undoes the last dispatch: its routing must be the one given here
        const int32_t routed = v.routed_idx[n];
        if (routed != e) record_error(v, kErrRoutingMismatch, static_cast<int32_t>(n), e, false, routed);
      }
    }
    const unsigned vmask = __ballot_sync(kFull, valid);
    const char* base = slots + static_cast<int64_t>(t) * K * v.crec_stride;
    if (vec) {
      const int ch = c * kCombineChunk + lane * 8;
      const bool active = ch < H;
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
      for (int kb = 0; kb < K; kb += 8) {
        float wv[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) wv[i] = __shfl_sync(kFull, wk, (kb + i) & 31);
        int4 q[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const int k = kb + i;
          if (active && k < K && ((vmask >> k) & 1u)) q[i] = ldcg4(base + k * v.crec_stride + ch * 2);
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
          if (ch < H && ((vmask >> k) & 1u)) {
            const uint16_t bits = __ldcg(reinterpret_cast<const unsigned short*>(base + k * v.crec_stride) + ch);
            acc = __fadd_rn(acc, __fmul_rn(wkk, bf16_bits_to_f32(bits)));
          }
        }
        if (ch < H) yrow[ch] = __float2bfloat16_rn(acc);
      }
    }
  }
  // Our reads of the combine slots are complete: every rank may overwrite them.
  if (finish_block(v, s, kCtrCRecv)) publish(v, s, kKCRecv, kGenCRecv, kFlagCFree, nullptr);
}

__global__ void timestamp_kernel(uint64_t* out) { out[0] = globaltimer(); }
__global__ void write_ints_kernel(int32_t* out, int32_t a, int32_t b) {
  out[0] = a;
  out[1] = b;
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
