// The frame every NVLink MoE kernel runs its work in (nvlink_kernels.cu): the prologue (the
// generation, the closed/dead words, the entry stamp), the bounded waits for the peers' words, and
// the epilogue that tells the peers and advances the generation, in the three SyncModes of
// nvlink_protocol.h. CUDA only; included by nvlink_kernels.cu alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "moe/device_sync.cuh"
#include "moe/layout.h"
#include "moe/nvlink_protocol.h"

namespace jax_garden::moe::nvlink {

using dev::globaltimer;
using dev::ld_acquire_sys;
using dev::lanemask_lt;
using dev::red_release_sys_add;
using dev::st_release_sys;
using dev::vload;

constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr int32_t kArrive = static_cast<int32_t>(SyncMode::kArrive);
constexpr int32_t kLegacy = static_cast<int32_t>(SyncMode::kLegacy);

// Kernel slots of the state, the timing ring and the stamps (a fused kernel stamps both of its
// phase's slots).
enum Kernel : int { kKDSend = 0, kKDRecv = 1, kKCSend = 2, kKCRecv = 3 };

__device__ __forceinline__ uint32_t* flag_ptr(char* sym, int which, int idx) {
  return reinterpret_cast<uint32_t*>(sym + which * 128) + idx;
}
__device__ __forceinline__ uint32_t* arrival_ptr(char* sym, int flag, int idx) {
  return reinterpret_cast<uint32_t*>(sym + (kArrivalLine + flag) * 128) + idx;
}

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

// 0: (int32)(word - target) >= 0 reached; 1: deadline passed; 2: the context died meanwhile.
__device__ int wait_word(const DeviceView& v, const uint32_t* word, uint32_t target) {
  const uint64_t deadline = globaltimer() + v.timeout_ns;
  uint32_t spins = 0, pause = 32;
  while (static_cast<int32_t>(ld_acquire_sys(word) - target) < 0) {
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

__device__ __forceinline__ void stamp_at(const DeviceView& v, int kernel, uint32_t gen, int which, uint64_t t) {
  v.timing[(static_cast<int64_t>(kernel) * kTimingRing + gen % kTimingRing) * kStamps + which] = t;
}
__device__ __forceinline__ void stamp(const DeviceView& v, int kernel, uint32_t gen, int which) {
  stamp_at(v, kernel, gen, which, globaltimer());
}
// Block 0's thread 0 stamps `which` (the other threads and blocks do nothing).
__device__ __forceinline__ void stamp0(const DeviceView& v, int kernel, uint32_t gen, int which) {
  if (blockIdx.x == 0 && threadIdx.x == 0) stamp(v, kernel, gen, which);
}

// Per block: generation, ok (no peer failure), bound_m, last-block result, peers' bases.
struct Shared {
  uint32_t gen;
  int ok;
  int bm;
  int last;
  int total;      // combine: padded rows of the last dispatch
  uint32_t dgen;  // fused combine: the last dispatch's generation (tags of local_row)
  char* sym[kMaxRanks];
};

// Common prologue: what every block reads before its work.
__device__ void prologue(const DeviceView& v, Shared& s, int kernel, int gen_word, const int32_t* rank_p,
                         const int32_t* bound_m_p) {
  if (threadIdx.x == 0) {
    const uint64_t entry = globaltimer();  // before any memory access: the launch-to-launch point
    s.gen = vload(v.state + gen_word);
    // Closed: the symmetric buffers are gone (a CUDA graph may still replay this launch).
    s.ok = vload(v.state + kDead) == 0 && vload(v.state + kClosed) == 0;
    int bm = v.T;
    if (bound_m_p != nullptr) bm = clamp_bound(*bound_m_p, v.T);
    s.bm = bm;
    if (blockIdx.x == 0) {
      stamp_at(v, kernel, s.gen, kStampEntry, entry);
      stamp(v, kernel, s.gen, kStampStart);
      const int r = *rank_p;
      if (r != v.rank) record_error(v, kErrRankMismatch, r, v.rank, false);
    }
  }
  if (threadIdx.x < kMaxRanks) s.sym[threadIdx.x] = v.sym[threadIdx.x];  // dynamic index: keep it off the param space
  __syncthreads();
}

// Thread i < R waits until source i's word `flag` in our own buffer says generation `gen_target`
// (a flag equal to it, or gen_target arrival units). skip_self: our own word is not waited for
// (the fused combine reads nothing of ours through the buffer).
__device__ void wait_peers(const DeviceView& v, Shared& s, int flag, uint32_t gen_target, int32_t err_code,
                           bool skip_self = false) {
  const int i = threadIdx.x;
  if (s.ok && i < v.R && !(skip_self && i == v.rank)) {
    const bool arrive = v.sync == kArrive;
    const uint32_t* word = arrive ? arrival_ptr(s.sym[v.rank], flag, i) : flag_ptr(s.sym[v.rank], flag, i);
    const int w = wait_word(v, word, arrive ? gen_target * kArrivalUnit : gen_target);
    if (w != 0) {
      if (w == 1) record_error(v, err_code, i, static_cast<int32_t>(gen_target), true);
      s.ok = 0;  // several threads may store 0: benign
    }
  }
  __syncthreads();
}

// kArrive: this block's share of one call's arrival units in every peer's counter `flag` (the first
// block adds what makes the call's total kArrivalUnit whatever the grid). The caller has passed a
// block barrier since the block's last access the peers wait for.
__device__ __forceinline__ void arrive_peers(const DeviceView& v, const Shared& s, int flag) {
  if (s.ok && static_cast<int>(threadIdx.x) < v.R) {
    const uint32_t share = blockIdx.x == 0 ? kArrivalUnit - (gridDim.x - 1) : 1u;
    red_release_sys_add(arrival_ptr(s.sym[threadIdx.x], flag, v.rank), share);
  }
}

// Epilogue of a block: tells the peers (kArrive) and counts the block in; true in the block that
// finished last. kLegacy/kFlags: every block orders its accesses at system scope first (one fence
// by the counting thread after a barrier, fences being cumulative; kLegacy: a fence in every
// thread) and the last block then publishes the flag (publish()), so its accesses are ordered
// before what that block does next; kArrive: the peers learn from the arrivals, and the count only
// lets the last block advance the local generation (no fence: what it writes is read by the next
// kernels of this stream).
__device__ bool finish_block(const DeviceView& v, Shared& s, int kernel, int ctr_word, int flag) {
  if (v.sync == kLegacy) __threadfence_system();
  __syncthreads();
  stamp0(v, kernel, s.gen, kStampBody);
  if (v.sync == kArrive) arrive_peers(v, s, flag);
  // kArrive: warp 1 counts, so that the count does not wait behind warp 0's release.
  if (static_cast<int>(threadIdx.x) == (v.sync == kArrive ? 32 : 0)) {
    if (v.sync != kArrive && v.sync != kLegacy) __threadfence_system();
    const uint32_t prev = atomicAdd(v.state + ctr_word, 1u);
    s.last = prev == static_cast<uint32_t>(gridDim.x - 1);
    if (s.last) {
      v.state[ctr_word] = 0;
      if (v.sync != kArrive) __threadfence_system();
      stamp(v, kernel, s.gen, kStampLast);
    }
  }
  __syncthreads();
  return s.last != 0;
}

// The last block: flags for the peers (kLegacy/kFlags), the send token, the generation.
__device__ void publish(const DeviceView& v, Shared& s, int kernel, int gen_word, int flag, uint32_t* send_done) {
  const uint32_t next = s.gen + 1;
  if (v.sync != kArrive && s.ok && threadIdx.x < v.R) st_release_sys(flag_ptr(s.sym[threadIdx.x], flag, v.rank), next);
  if (threadIdx.x == 0) {
    if (send_done != nullptr) send_done[0] = next;
    v.state[gen_word] = next;
    stamp(v, kernel, s.gen, kStampEnd);
  }
}

}  // namespace jax_garden::moe::nvlink
