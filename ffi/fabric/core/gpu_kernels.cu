// CUDA kernels of the TransferEngine: the paged copy of the IPC path (a copy kernel, because one
// cudaMemcpyAsync per 16 KiB page cannot keep NVLink busy), its single writes with their imm records
// in one launch, and the device-side store of fabric.signal when the value is only known on the
// device.
#include "fabric/core/gpu_kernels.h"

namespace jax_garden::fabric {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// Words [0, words) from s to d, this thread taking first, first + stride, ...: kUnroll loads in
// flight before their stores.
template <typename Word>
__device__ __forceinline__ void copy_words(const Word* __restrict__ s, Word* __restrict__ d, uint64_t words,
                                           uint64_t first, uint64_t stride) {
  for (uint64_t base = first; base < words; base += stride * kUnroll) {
    Word v[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      uint64_t i = base + uint64_t(k) * stride;
      if (i < words) v[k] = s[i];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      uint64_t i = base + uint64_t(k) * stride;
      if (i < words) d[i] = v[k];
    }
  }
}

// Each block copies whole pages (grid-stride over pages).
template <typename Word>
__global__ void __launch_bounds__(kThreads) paged_copy_kernel(PagedCopyArgs a) {
  const uint64_t words = a.page_bytes / sizeof(Word);
  for (uint32_t p = blockIdx.x; p < a.pages; p += gridDim.x) {
    const uint32_t sp = a.src_pages[p];
    const uint32_t dp = a.dst_pages[p];
    copy_words(reinterpret_cast<const Word*>(a.src + uint64_t(sp) * a.src_stride),
               reinterpret_cast<Word*>(a.dst + uint64_t(dp) * a.dst_stride), words, threadIdx.x, kThreads);
  }
}

// Grid-stride over each segment's 16-byte words, then the last block stores the records.
__global__ void __launch_bounds__(kThreads) fused_copy_kernel(FusedCopyArgs a) {
  const uint64_t stride = uint64_t(gridDim.x) * kThreads;
  const uint64_t first = uint64_t(blockIdx.x) * kThreads + threadIdx.x;
  for (uint32_t g = 0; g < a.segments; ++g)
    copy_words(reinterpret_cast<const uint4*>(a.src[g]), reinterpret_cast<uint4*>(a.dst[g]), a.bytes[g] / sizeof(uint4),
               first, stride);
  // Each thread's bytes visible system-wide before its block counts itself done; the block that
  // counts last has seen every block's fence, so the records it stores follow every byte.
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (atomicAdd(a.blocks_done, 1u) != gridDim.x - 1) return;
  *a.blocks_done = 0;  // for the next launch on this stream (it starts after this kernel ends)
  __threadfence_system();
  for (uint32_t k = 0; k < a.stores; ++k)
    *reinterpret_cast<volatile uint64_t*>(a.store_address[k]) = a.store_value[k];
  __threadfence_system();
}

__global__ void store_u32_kernel(uint64_t* dst, const uint32_t* src) {
  uint64_t v = *src;
  *reinterpret_cast<volatile uint64_t*>(dst) = v;
  __threadfence_system();
}

}  // namespace

cudaError_t launch_paged_copy(const PagedCopyArgs& a, int num_sms, cudaStream_t stream) {
  if (a.pages == 0 || a.page_bytes == 0) return cudaSuccess;
  uint32_t blocks = static_cast<uint32_t>(num_sms > 0 ? num_sms : 132) * 8;
  if (blocks > a.pages) blocks = a.pages;
  uint64_t align = a.dst | a.src | a.page_bytes | a.src_stride | a.dst_stride;
  if ((align & 15) == 0) {
    paged_copy_kernel<uint4><<<blocks, kThreads, 0, stream>>>(a);
  } else if ((align & 3) == 0) {
    paged_copy_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(a);
  } else {
    paged_copy_kernel<uint8_t><<<blocks, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t launch_fused_copy(const FusedCopyArgs& a, int num_sms, cudaStream_t stream) {
  uint64_t total = 0;
  for (uint32_t g = 0; g < a.segments; ++g) total += a.bytes[g];
  // About 16 KiB per block (one pass of kUnroll words per thread), at most 8 blocks per SM.
  constexpr uint64_t kBlockBytes = uint64_t(kThreads) * kUnroll * 16;
  uint64_t blocks = (total + kBlockBytes - 1) / kBlockBytes;
  const uint64_t most = uint64_t(num_sms > 0 ? num_sms : 132) * 8;
  blocks = blocks < 1 ? 1 : blocks > most ? most : blocks;
  fused_copy_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_store_u32(uint64_t* dst, const uint32_t* src, cudaStream_t stream) {
  store_u32_kernel<<<1, 1, 0, stream>>>(dst, src);
  return cudaGetLastError();
}

}  // namespace jax_garden::fabric
