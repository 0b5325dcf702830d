// CUDA kernels of the TransferEngine: the paged copy of the IPC path (a copy kernel, because one
// cudaMemcpyAsync per 16 KiB page cannot keep NVLink busy) and the device-side store of fabric.signal
// when the value is only known on the device.
#include "fabric/core/gpu_kernels.h"

namespace jax_garden::fabric {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// Each block copies whole pages (grid-stride over pages); each thread keeps kUnroll 16-byte loads in
// flight before it stores them.
template <typename Word>
__global__ void __launch_bounds__(kThreads) paged_copy_kernel(PagedCopyArgs a) {
  const uint64_t words = a.page_bytes / sizeof(Word);
  for (uint32_t p = blockIdx.x; p < a.pages; p += gridDim.x) {
    const uint32_t sp = a.src_pages[p];
    const uint32_t dp = a.dst_pages[p];
    const Word* __restrict__ s = reinterpret_cast<const Word*>(a.src + uint64_t(sp) * a.src_stride);
    Word* __restrict__ d = reinterpret_cast<Word*>(a.dst + uint64_t(dp) * a.dst_stride);
    for (uint64_t base = threadIdx.x; base < words; base += uint64_t(kThreads) * kUnroll) {
      Word v[kUnroll];
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        uint64_t i = base + uint64_t(k) * kThreads;
        if (i < words) v[k] = s[i];
      }
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        uint64_t i = base + uint64_t(k) * kThreads;
        if (i < words) d[i] = v[k];
      }
    }
  }
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

cudaError_t launch_store_u32(uint64_t* dst, const uint32_t* src, cudaStream_t stream) {
  store_u32_kernel<<<1, 1, 0, stream>>>(dst, src);
  return cudaGetLastError();
}

}  // namespace jax_garden::fabric
