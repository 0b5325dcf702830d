// Device-side synchronisation helpers shared by the MoE kernels (nvlink_kernels.cu,
// proxy_kernels.cu): the globaltimer, system-scope acquire loads and release stores, and bounded
// waits. CUDA only.
#pragma once

#include <cstdint>

namespace jax_garden::moe::dev {

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
// A release reduction at system scope: orders this thread's earlier accesses (and, cumulatively,
// those a block barrier made it observe) before the add, for any observer that acquires the word.
// Fire and forget: no round trip, unlike an atomic that returns the old value.
__device__ __forceinline__ void red_release_sys_add(uint32_t* p, uint32_t v) {
  asm volatile("red.release.sys.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ uint32_t vload(const uint32_t* p) { return *reinterpret_cast<const volatile uint32_t*>(p); }
__device__ __forceinline__ unsigned lanemask_lt() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

// Sleeps between polls of a word another agent (a peer GPU, another process sharing this GPU, the
// host proxy) will change: a kernel that spins without pause keeps the other process's kernels off
// a time-sliced GPU, and hammers PCIe when the word is host memory.
struct Backoff {
  uint32_t ns = 32;
  __device__ __forceinline__ void pause() {
    __nanosleep(ns);
    if (ns < 2048) ns <<= 1;
  }
};

// Last-block detection after a grid's writes: every block orders its writes (including those to
// peers' memory over NVLink and to host-mapped memory) at system scope with ONE fence by one thread
// after a block barrier (the barrier makes the other threads' writes observed by that thread, and
// fences are cumulative), then counts itself in. Returns true in the block that finished last.
__device__ __forceinline__ bool grid_last_block(uint32_t* counter, int* s_last) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    const uint32_t prev = atomicAdd(counter, 1u);
    *s_last = prev == gridDim.x - 1;
    if (*s_last) {
      *counter = 0;  // for the next launch (stream-ordered after this one)
      __threadfence_system();
    }
  }
  __syncthreads();
  return *s_last != 0;
}

}  // namespace jax_garden::moe::dev
