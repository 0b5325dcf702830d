// NvlinkAllToAll: the CUDA MoE dispatch/combine context of one AllToAll in this process, i.e. the
// buffers allocated once outside XLA, the peer mappings (peer access inside one process, CUDA IPC
// across processes) and the per-device kernel parameters (protocol: nvlink_protocol.h). Plain C++
// (no CUDA headers), so the bindings compile in CPU-only builds; it is defined only in CUDA builds
// (nvlink_all_to_all_cuda.cc).
//
// Lifecycle, driven by jax_garden/_moe_cuda.py outside jit: construct, add_rank for every local
// device, connect_local / connect_ipc every (rank, peer) pair, finalize (then register it in
// cuda_contexts() so the XLA handlers find it by id), run programs, close.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "moe/cuda_all_to_all.h"
#include "moe/dtype.h"
#include "moe/layout.h"
#include "moe/nvlink_protocol.h"

namespace jax_garden::moe {

// Tuning and bounds of the CUDA implementation (the shape itself is the MoeShape).
struct NvlinkOptions {
  double timeout_s = 30.0;                // bound of every in-kernel wait
  int32_t chunk_bytes = kDefaultChunkBytes;  // bytes of a row one warp sends: 512, 1024 or 2048
  int32_t blocks_per_sm = 2;              // blocks per multiprocessor of every kernel: 1 or 2
  // How the kernels synchronise (nvlink_protocol.h); the earlier modes stay selectable so that a
  // benchmark compares them with the default in one run (bench moe --profile). Every rank of a
  // context must use the same mode.
  SyncMode sync = SyncMode::kArrive;
  // dispatch() / combine() as one kernel each (needs kArrive and a grid that fits on the device at
  // once; otherwise, or when false, the two split kernels back to back).
  bool fused = true;
  // Launch the fused kernels cooperatively (all blocks resident: their in-kernel wait for the
  // other blocks cannot starve). false: a plain launch of a grid sized to fit (benchmarks).
  bool cooperative = true;
};

// One rank held by this process.
struct NvlinkRank {
  int ordinal = -1;  // CUDA device ordinal in this process's runtime
  int rank = -1;
  void* sym = nullptr;          // own symmetric buffer (cudaMalloc)
  void* local = nullptr;        // row_map + kept + routed_idx + state + err_dev + timing (cudaMalloc)
  int32_t* err_host = nullptr;  // cudaHostAlloc(mapped)
  char* peers[kMaxRanks] = {};  // symmetric buffers as mapped here; peers[rank] = sym
  bool opened_ipc[kMaxRanks] = {};
  DeviceView view{};
  bool ready = false;
};

class NvlinkAllToAll final : public CudaAllToAll {
 public:
  // dispatch_dtype: kBF16 or kF8E4M3FN (combine is bf16). Throws InvalidArgument naming the value.
  NvlinkAllToAll(const MoeShape& shape, DType dispatch_dtype, const NvlinkOptions& options);
  ~NvlinkAllToAll() override;
  NvlinkAllToAll(const NvlinkAllToAll&) = delete;
  NvlinkAllToAll& operator=(const NvlinkAllToAll&) = delete;

  const MoeShape& shape() const override { return shape_; }
  DType dispatch_dtype() const override { return dispatch_dtype_; }
  int64_t sym_bytes() const { return sym_bytes_; }

  // Allocates the buffers of `rank` on device `ordinal` (zeroed, synchronised).
  void add_rank(int ordinal, int rank);
  // 64-byte cudaIpcMemHandle_t of the symmetric buffer of the rank on `ordinal`.
  std::string ipc_handle(int ordinal) const;
  // Maps peer `peer_rank`: held by this process on `peer_ordinal` (peer access) ...
  void connect_local(int ordinal, int peer_rank, int peer_ordinal);
  // ... or by another process (CUDA IPC handle).
  void connect_ipc(int ordinal, int peer_rank, const std::string& handle);
  // Checks that every peer is mapped, loads the kernels; returns a resource report.
  std::string finalize();
  // Waits for every local device (outside jit; before a cross-process close barrier).
  void synchronize();
  // Waits for the devices, unmaps peers, frees everything. Idempotent.
  void close();

  // The rank state of a device, or nullptr.
  const NvlinkRank* find_rank(int ordinal) const;

  // ---- CudaAllToAll (the FFI handlers) ----
  bool holds(int ordinal) const override { return find_rank(ordinal) != nullptr; }
  std::vector<int> ordinals() const override;
  int32_t error_code(std::string* message) const override;
  int dispatch(int ordinal, void* stream, const void* x, const float* x_scale, const int32_t* indices,
               const int32_t* bound_m, const int32_t* rank, void* expert_x, float* expert_scale,
               int32_t* expert_counts, uint32_t* send_done) override;
  int combine(int ordinal, void* stream, const void* expert_y, const int32_t* expert_counts, const int32_t* indices,
              const float* weights, const int32_t* bound_m, const int32_t* rank, void* y,
              uint32_t* send_done) override;
  int dispatch_send(int ordinal, void* stream, const void* x, const float* x_scale, const int32_t* indices,
                    const int32_t* bound_m, const int32_t* rank, uint32_t* send_done) override;
  int dispatch_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* rank, void* expert_x,
                    float* expert_scale, int32_t* expert_counts) override;
  int combine_send(int ordinal, void* stream, const void* expert_y, const int32_t* expert_counts,
                   const int32_t* rank, uint32_t* send_done) override;
  int combine_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* indices,
                   const float* weights, const int32_t* bound_m, const int32_t* rank, void* y) override;

  // Timestamps of the last `n` calls of each kernel on `ordinal`: [n][4][2] (start, end; ns).
  std::vector<uint64_t> timings(int ordinal, int n) const;
  // Every stamp of the last `n` calls of each kernel on `ordinal`: [n][4][kStamps] (Stamp; ns).
  std::vector<uint64_t> stamps(int ordinal, int n) const;
  const NvlinkOptions& options() const { return options_; }
  // Generations (calls completed) of the four kernels on `ordinal`.
  std::vector<uint32_t> generations(int ordinal) const;
  // Rows dropped for lack of max_recv_tokens space by the rank on `ordinal`, since creation.
  uint64_t dropped_rows(int ordinal) const;

 private:
  NvlinkRank* find_rank_mutable(int ordinal);

  MoeShape shape_;
  DType dispatch_dtype_;
  NvlinkOptions options_;
  int64_t sym_bytes_ = 0;
  int64_t local_bytes_ = 0;
  DeviceView base_{};
  std::vector<std::unique_ptr<NvlinkRank>> ranks_;
  bool closed_ = false;
};

}  // namespace jax_garden::moe
