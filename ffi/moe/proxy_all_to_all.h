// ProxyAllToAll: the CUDA MoE context of an AllToAll whose ranks form several node groups
// (docs/moe-ffi.md, "Host proxy for GPUs"; protocol: proxy_protocol.h, messages: the CPU
// inter-node protocol's). Inside a node group ranks write messages into each other's receive areas
// (peer access in one process, CUDA IPC across processes, which also covers processes sharing one
// GPU); between groups the kernels hand messages to a HostProxy thread that posts them through this
// process's TransferEngine. Plain C++ (no CUDA headers), so the bindings compile in CPU-only builds;
// defined only in CUDA builds (proxy_all_to_all_cuda.cc).
//
// Lifecycle, driven by jax_garden/_moe_cuda.py outside jit: construct (creates the engine), add_rank
// for every local device, then per rank peer_info + ipc_handle -> bootstrap exchange ->
// connect_peer(info) for every rank held elsewhere, connect_local / connect_ipc for every rank of a
// local rank's node group, finalize (starts the proxy; then register it in cuda_contexts()), run
// programs, synchronize + drain, (cross-process barrier), close.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fabric/engine/engine.h"
#include "moe/cuda_all_to_all.h"
#include "moe/host_proxy.h"
#include "moe/internode_protocol.h"
#include "moe/proxy_protocol.h"

namespace jax_garden::moe {

struct ProxyContextOptions {
  double timeout_s = 30.0;       // bound of every in-kernel wait (and of the proxy's abort broadcast)
  int32_t node_size = 1;         // ranks [g*node_size, (g+1)*node_size) form node group g
  int32_t blocks_per_sm = 2;     // blocks per multiprocessor of the row-parallel kernels: 1 or 2
  fabric::EngineOptions engine;  // provider, node, domains, completion, split threshold, path
};

class ProxyAllToAll final : public CudaAllToAll {
 public:
  ProxyAllToAll(const MoeShape& shape, DType dispatch_dtype, const ProxyContextOptions& options);
  ~ProxyAllToAll() override;
  ProxyAllToAll(const ProxyAllToAll&) = delete;
  ProxyAllToAll& operator=(const ProxyAllToAll&) = delete;

  // ---- bootstrap (outside jit) ----
  // Allocates the areas, control block and state of `rank` on device `ordinal` (zeroed), and
  // registers its receive and send areas with the engine.
  void add_rank(int ordinal, int32_t rank);
  // 64-byte cudaIpcMemHandle_t of local `rank`'s receive area (ranks of its node group map it).
  std::string ipc_handle(int32_t rank) const;
  // What other ranks need to reach local `rank` through the engine (internode::PeerInfo bytes).
  fabric::Bytes peer_info(int32_t rank) const;
  // A rank held by another process, from its peer_info (checked: same shape, dtypes, node size).
  void connect_peer(const fabric::Bytes& info);
  // A rank of local `rank`'s node group held by this process (peer access) ...
  void connect_local(int32_t rank, int32_t peer_rank);
  // ... or by another process (its ipc_handle).
  void connect_ipc(int32_t rank, int32_t peer_rank, const std::string& handle);
  // Checks that every peer is reachable, loads the kernels, starts the proxy; returns a report.
  std::string finalize();
  // Ranks this process does not hold (connect_peer needs each one's peer_info).
  std::vector<int32_t> remote_ranks() const;
  int32_t node_size() const { return options_.node_size; }

  // ---- outside jit ----
  void synchronize();         // waits for every local device
  bool drain(double timeout_s);  // every published message posted and its write finished
  void close();               // stops the proxy, closes the engine, unmaps and frees; idempotent
  // Per device `ordinal` (as the NVLink context): timestamps of the last `n` calls of each phase,
  // [n][4][2] (globaltimer ns, start of its first kernel, end of its last); calls completed per
  // phase; rows dropped since creation; messages/acks the proxy posted and their bytes per kind
  // (internode::Kind 0..3).
  std::vector<uint64_t> timings(int ordinal, int n) const;
  std::vector<uint32_t> generations(int ordinal) const;
  uint64_t dropped_rows(int ordinal) const;
  std::vector<uint64_t> proxy_posts(int ordinal) const;
  std::vector<uint64_t> proxy_bytes(int ordinal) const;
  int32_t rank_of(int ordinal) const;  // -1 if no local rank there
  // Where everything stands (debugging a stall): device state, control blocks, the proxy's view.
  std::string describe() const;
  std::string provider() const { return engine_ ? engine_->provider() : std::string(); }

  // ---- CudaAllToAll ----
  const MoeShape& shape() const override { return shape_; }
  DType dispatch_dtype() const override { return dispatch_dtype_; }
  bool holds(int ordinal) const override;
  std::vector<int> ordinals() const override;
  int32_t error_code(std::string* message) const override;
  int dispatch_send(int ordinal, void* stream, const void* x, const float* x_scale, const int32_t* indices,
                    const int32_t* bound_m, const int32_t* rank, uint32_t* send_done) override;
  int dispatch_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* rank, void* expert_x,
                    float* expert_scale, int32_t* expert_counts) override;
  int combine_send(int ordinal, void* stream, const void* expert_y, const int32_t* expert_counts,
                   const int32_t* rank, uint32_t* send_done) override;
  int combine_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* indices,
                   const float* weights, const int32_t* bound_m, const int32_t* rank, void* y) override;

 private:
  struct Local;
  Local* find_local(int32_t rank) const;
  const Local* ready_local(int ordinal) const;  // finalized rank on that device, or nullptr
  const Local& local_on(int ordinal, const char* what) const;  // throws naming the device
  bool same_node(int32_t a, int32_t b) const { return a / options_.node_size == b / options_.node_size; }

  const MoeShape shape_;
  const DType dispatch_dtype_;
  const ProxyContextOptions options_;
  const proxy::AreaLayout area_;
  const proxy::ControlLayout control_;
  const proxy::LocalLayout local_layout_;
  std::shared_ptr<fabric::Engine> engine_;
  internode::SenderSettings my_sender_;
  std::vector<std::unique_ptr<Local>> locals_;
  std::vector<std::optional<proxy::ProxyPeer>> peers_;  // by rank
  std::unique_ptr<proxy::HostProxy> proxy_;
  bool finalized_ = false;
  bool closed_ = false;
};

}  // namespace jax_garden::moe
