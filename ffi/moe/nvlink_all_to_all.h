// NvlinkAllToAll: the CUDA MoE dispatch/combine context of one AllToAll in this process, i.e. the
// buffers allocated once outside XLA, the peer mappings (peer access inside one process, CUDA IPC
// across processes) and the per-device kernel parameters (protocol: nvlink_protocol.h). Plain C++
// (no CUDA headers), so the bindings compile in CPU-only builds; it is defined only in CUDA builds
// (nvlink_all_to_all_cuda.cc).
//
// Lifecycle, driven by jax_garden/_moe_cuda.py outside jit: construct, add_rank for every local
// device, connect_local / connect_ipc every (rank, peer) pair, finalize (then register it in
// nvlink_contexts() so the XLA handlers find it by id), run programs, close.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/object_registry.h"
#include "moe/dtype.h"
#include "moe/layout.h"
#include "moe/nvlink_protocol.h"

namespace jax_garden::moe {

// Tuning and bounds of the CUDA implementation (the shape itself is the MoeShape).
struct NvlinkOptions {
  double timeout_s = 30.0;                // bound of every in-kernel wait
  int32_t chunk_bytes = kDefaultChunkBytes;  // bytes of a row one warp sends: 512, 1024 or 2048
  int32_t blocks_per_sm = 2;              // blocks per multiprocessor of every kernel: 1 or 2
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

class NvlinkAllToAll {
 public:
  // dispatch_dtype: kBF16 or kF8E4M3FN (combine is bf16). Throws InvalidArgument naming the value.
  NvlinkAllToAll(const MoeShape& shape, DType dispatch_dtype, const NvlinkOptions& options);
  ~NvlinkAllToAll();
  NvlinkAllToAll(const NvlinkAllToAll&) = delete;
  NvlinkAllToAll& operator=(const NvlinkAllToAll&) = delete;

  const MoeShape& shape() const { return shape_; }
  DType dispatch_dtype() const { return dispatch_dtype_; }
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

  // Handler side: the rank state of a device, or nullptr.
  const NvlinkRank* find_rank(int ordinal) const;
  std::vector<int> ordinals() const;
  // Sticky error of any local rank: kErrNone if none; else the code, and *message names the values.
  int32_t error_code(std::string* message) const;
  // Timestamps of the last `n` calls of each kernel on `ordinal`: [n][4][2] (ns).
  std::vector<uint64_t> timings(int ordinal, int n) const;
  // Generations (calls completed) of the four kernels on `ordinal`.
  std::vector<uint32_t> generations(int ordinal) const;
  // Rows dropped for lack of max_recv_tokens space by the rank on `ordinal`, since creation.
  uint64_t dropped_rows(int ordinal) const;
  // FFI handler invocations so far (a CUDA-graph replay launches our kernels without one).
  uint64_t handler_calls() const { return handler_calls_.load(std::memory_order_relaxed); }
  void count_handler_call() { handler_calls_.fetch_add(1, std::memory_order_relaxed); }

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
  std::atomic<uint64_t> handler_calls_{0};
};

// Process-wide registry: the XLA handlers find a finalized context by the id baked into the HLO.
ObjectRegistry<NvlinkAllToAll>& nvlink_contexts();

}  // namespace jax_garden::moe
