// Launchers of the CUDA kernels of MoE across node groups (proxy_kernels.cu; protocol:
// proxy_protocol.h). Plain C++ (no CUDA headers); each launches the kernels of one FFI call in
// `stream` (a cudaStream_t passed as void*) and returns a cudaError_t value (0 = success). The
// launches are the same every call (generations live in device memory): capturable in CUDA graphs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "moe/proxy_protocol.h"

namespace jax_garden::moe::proxy {

int launch_dispatch_send(const ProxyView& v, void* stream, const void* x, const float* x_scale,
                         const int32_t* indices, const int32_t* bound_m, const int32_t* rank, uint32_t* send_done);
int launch_dispatch_recv(const ProxyView& v, void* stream, const uint32_t* send_done, const int32_t* rank,
                         void* expert_x, float* expert_scale, int32_t* expert_counts);
int launch_combine_send(const ProxyView& v, void* stream, const void* expert_y, const int32_t* expert_counts,
                        const int32_t* rank, uint32_t* send_done);
int launch_combine_recv(const ProxyView& v, void* stream, const uint32_t* send_done, const int32_t* indices,
                        const float* weights, const int32_t* bound_m, const int32_t* rank, void* y);
// Loads every kernel on the current device (no lazy loading during graph capture) and appends
// registers / spills per kernel to *report.
int preload_kernels(std::string* report);

}  // namespace jax_garden::moe::proxy
