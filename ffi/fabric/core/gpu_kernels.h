// Launchers of the engine's CUDA kernels (gpu_kernels.cu), used by gpu_runtime_cuda.cc only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace jax_garden::fabric {

struct PagedCopyArgs {
  uint64_t dst, src;  // bases (offsets folded in); dst may be a peer GPU's memory mapped here
  uint64_t page_bytes, src_stride, dst_stride;
  const uint32_t* src_pages;  // device memory
  const uint32_t* dst_pages;
  uint32_t pages;
};

// Page i: page_bytes from src + src_pages[i]*src_stride to dst + dst_pages[i]*dst_stride.
cudaError_t launch_paged_copy(const PagedCopyArgs& args, int num_sms, cudaStream_t stream);

// The ipc path's single writes in one launch: the copies, then (once every block's bytes are
// visible system-wide) the imm records, stored by the last block to finish. One kernel launch costs
// the host less than cudaMemcpyAsync followed by cuStreamWriteValue64.
constexpr int kFusedMaxSegments = 8;
constexpr int kFusedMaxStores = 4;
struct FusedCopyArgs {
  uint64_t dst[kFusedMaxSegments], src[kFusedMaxSegments], bytes[kFusedMaxSegments];  // 16-byte aligned
  uint64_t store_address[kFusedMaxStores], store_value[kFusedMaxStores];             // device-visible words
  uint32_t segments, stores;
  // Blocks finished so far: device memory, zero between launches (the last block resets it). One
  // per stream: launches on one stream never overlap.
  uint32_t* blocks_done;
};
cudaError_t launch_fused_copy(const FusedCopyArgs& args, int num_sms, cudaStream_t stream);

// *dst (a 64-bit word, e.g. host-mapped) = zero-extended *src, then a system-wide fence.
cudaError_t launch_store_u32(uint64_t* dst, const uint32_t* src, cudaStream_t stream);

}  // namespace jax_garden::fabric
