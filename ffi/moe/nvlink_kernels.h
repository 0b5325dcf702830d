// Launchers of the NVLink MoE kernels (nvlink_kernels.cu). Plain C++ (no CUDA headers); each
// returns a cudaError_t value (0 = success). Streams are cudaStream_t passed as void*.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "moe/nvlink_protocol.h"

namespace jax_garden::moe {

int launch_dispatch_send(const DeviceView& v, void* stream, const void* x, const float* x_scale,
                         const int32_t* indices, const int32_t* bound_m, const int32_t* rank,
                         uint32_t* send_done);
int launch_dispatch_recv(const DeviceView& v, void* stream, const uint32_t* send_done,
                         const int32_t* rank, void* expert_x, float* expert_scale,
                         int32_t* expert_counts);
int launch_combine_send(const DeviceView& v, void* stream, const void* expert_y,
                        const int32_t* expert_counts, const int32_t* rank, uint32_t* send_done);
int launch_combine_recv(const DeviceView& v, void* stream, const uint32_t* send_done,
                        const int32_t* indices, const float* weights, const int32_t* bound_m,
                        const int32_t* rank, void* y);
// The fused kernels (SyncMode::kArrive): dispatch_send + dispatch_recv, combine_send + combine_recv
// in one launch each, with v.grid_dfused / v.grid_cfused blocks, all resident when `cooperative`.
// send_done gets the token the split send kernel would have returned.
int launch_dispatch_fused(const DeviceView& v, void* stream, bool cooperative, const void* x, const float* x_scale,
                          const int32_t* indices, const int32_t* bound_m, const int32_t* rank, void* expert_x,
                          float* expert_scale, int32_t* expert_counts, uint32_t* send_done);
int launch_combine_fused(const DeviceView& v, void* stream, bool cooperative, const void* expert_y,
                         const int32_t* expert_counts, const int32_t* indices, const float* weights,
                         const int32_t* bound_m, const int32_t* rank, void* y, uint32_t* send_done);
// Blocks of a fused kernel (dispatch or combine) one multiprocessor of the current device holds at
// once, into *blocks_per_sm; returns a cudaError_t value.
int fused_resident_blocks(const DeviceView& v, bool dispatch, int* blocks_per_sm);
// Benchmark helper: the device's globaltimer (ns) written to *out when the stream reaches it.
int launch_timestamp(void* stream, uint64_t* out);
// Setup helper: out[0] = a, out[1] = b in stream order.
int launch_write_ints(void* stream, int32_t* out, int32_t a, int32_t b);
// Loads every kernel on the current device (lazy module loading must not happen during graph
// capture) and appends registers / local memory (spills) per kernel to *report.
int preload_kernels(std::string* report);
// Dynamic shared memory of the dispatch_recv kernel.
size_t recv_shared_bytes(const DeviceView& v);

}  // namespace jax_garden::moe
