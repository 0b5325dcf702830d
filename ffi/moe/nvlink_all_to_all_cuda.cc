// NvlinkAllToAll (nvlink_all_to_all.h): buffers allocated once outside XLA, peers mapped (peer
// access inside one process, CUDA IPC across processes), and the process-wide registry the FFI
// handlers read. Only the CUDA runtime API is used (linked statically), so no libcuda link
// dependency.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "common/error.h"
#include "moe/nvlink_all_to_all.h"
#include "moe/nvlink_kernels.h"
#include "moe/peer_ipc.h"

namespace jax_garden::moe {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(str_cat("jax_garden.moe (CUDA): ", what, " failed: ", cudaGetErrorName(err), ": ",
                                     cudaGetErrorString(err)));
  }
}

// Makes `device` current for the scope and restores the previous one (XLA's threads rely on it).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }

 private:
  int prev_ = -1;
};

constexpr int64_t kTimingBytes = 4 * int64_t{kTimingRing} * kStamps * sizeof(uint64_t);

}  // namespace

NvlinkAllToAll::NvlinkAllToAll(const MoeShape& shape, DType dispatch_dtype, const NvlinkOptions& options)
    : shape_(shape), dispatch_dtype_(dispatch_dtype), options_(options) {
  validate_shape(shape_);
  validate_dispatch_dtype(shape_, dispatch_dtype_);
  const int64_t R = shape_.num_ranks, E = shape_.num_experts, K = shape_.experts_per_token, H = shape_.hidden,
                T = shape_.max_tokens, M = shape_.max_recv_tokens;
  const int64_t elem = static_cast<int64_t>(dtype_size(dispatch_dtype_));
  // Limits of this implementation (the shape itself is valid).
  JG_CHECK_ARG(R <= kMaxRanks, "moe (CUDA): num_ranks must be in [1, ", kMaxRanks, "] (one NVLink node), got ", R);
  JG_CHECK_ARG(E <= 2048, "moe (CUDA): num_experts must be in [1, 2048], got ", E);
  JG_CHECK_ARG(K <= 32, "moe (CUDA): experts_per_token must be in [1, 32], got ", K);
  JG_CHECK_ARG(M * H * elem < (int64_t{1} << 40), "moe (CUDA): max_recv_tokens * hidden too large");
  JG_CHECK_ARG(options_.timeout_s > 0, "moe (CUDA): timeout_s must be positive, got ", options_.timeout_s);
  JG_CHECK_ARG(options_.chunk_bytes == 512 || options_.chunk_bytes == 1024 || options_.chunk_bytes == 2048,
               "moe (CUDA): chunk_bytes must be 512, 1024 or 2048, got ", options_.chunk_bytes);
  JG_CHECK_ARG(options_.blocks_per_sm >= 1 && options_.blocks_per_sm <= 2,
               "moe (CUDA): blocks_per_sm must be 1 or 2, got ", options_.blocks_per_sm);
  JG_CHECK_ARG(options_.sync == SyncMode::kLegacy || options_.sync == SyncMode::kFlags ||
                   options_.sync == SyncMode::kArrive,
               "moe (CUDA): unknown sync mode ", static_cast<int>(options_.sync));

  // The kernels' view of the shape (int32 index arithmetic; validate_shape bounds M and R*T*K).
  DeviceView& v = base_;
  v.E = shape_.num_experts;
  v.K = shape_.experts_per_token;
  v.H = shape_.hidden;
  v.T = shape_.max_tokens;
  v.M = static_cast<int32_t>(M);
  v.R = shape_.num_ranks;
  v.L = shape_.local_experts();
  v.S = shape_.scale_cols;
  v.pad = shape_.expert_padding;
  v.xbytes = static_cast<int32_t>(H * elem);
  v.sbytes = shape_.scale_cols * 4;
  v.cbytes = static_cast<int32_t>(H * 2);
  v.rec_stride = round_up(v.xbytes, 16) + round_up(v.sbytes, 16);
  v.crec_stride = round_up(v.cbytes, 16);
  v.off_counts = kFlagsBytes;
  v.off_routes = v.off_counts + round_up(R * v.L * 4, 256);
  v.off_data = v.off_routes + round_up(R * v.L * T * K * 4, 256);
  v.off_cdata = v.off_data + round_up(R * T * v.rec_stride, 256);
  v.off_cgen = v.off_cdata + round_up(T * K * v.crec_stride, 256);
  sym_bytes_ = v.off_cgen + round_up(T * K * 4, 256);
  v.timeout_ns = static_cast<uint64_t>(options_.timeout_s * 1e9);
  v.chunk_bytes = options_.chunk_bytes;
  v.sync = static_cast<int32_t>(options_.sync);
  // local: row_map [M] | kept [L] | routed_idx [T*K] | local_row [T*K] | state | err_dev | timing
  local_bytes_ = round_up(M * 4, 256) + round_up(v.L * 4, 256) + round_up(T * K * 4, 256) + round_up(T * K * 8, 256) +
                 256 + 256 + kTimingBytes;
}

NvlinkAllToAll::~NvlinkAllToAll() {
  try {
    close();
  } catch (...) {
  }
}

NvlinkRank* NvlinkAllToAll::find_rank_mutable(int ordinal) {
  for (auto& r : ranks_)
    if (r->ordinal == ordinal) return r.get();
  return nullptr;
}

const NvlinkRank* NvlinkAllToAll::find_rank(int ordinal) const {
  for (const auto& r : ranks_)
    if (r->ordinal == ordinal && r->ready) return r.get();
  return nullptr;
}

std::vector<int> NvlinkAllToAll::ordinals() const {
  std::vector<int> out;
  for (const auto& r : ranks_) out.push_back(r->ordinal);
  return out;
}

void NvlinkAllToAll::add_rank(int ordinal, int rank) {
  JG_CHECK_ARG(!closed_, "moe (CUDA): context is closed");
  JG_CHECK_ARG(rank >= 0 && rank < shape_.num_ranks, "moe (CUDA): rank ", rank, " outside [0, ", shape_.num_ranks,
               ")");
  for (const auto& r : ranks_) {
    JG_CHECK_ARG(r->ordinal != ordinal, "moe (CUDA): device ordinal ", ordinal, " already holds rank ", r->rank);
  }
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  JG_CHECK_ARG(ordinal >= 0 && ordinal < count, "moe (CUDA): device ordinal ", ordinal, " outside [0, ", count, ")");
  DeviceGuard guard(ordinal);
  auto owned = std::make_unique<NvlinkRank>();
  owned->ordinal = ordinal;
  owned->rank = rank;
  // Push first so that close() frees whatever was allocated if a later step throws.
  NvlinkRank* r = owned.get();
  ranks_.push_back(std::move(owned));
  check_cuda(cudaMalloc(&r->sym, sym_bytes_), "cudaMalloc (symmetric buffer)");
  check_cuda(cudaMemset(r->sym, 0, sym_bytes_), "cudaMemset");
  check_cuda(cudaMalloc(&r->local, local_bytes_), "cudaMalloc (local state)");
  check_cuda(cudaMemset(r->local, 0, local_bytes_), "cudaMemset");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&r->err_host), 64, cudaHostAllocMapped | cudaHostAllocPortable),
             "cudaHostAlloc (error word)");
  std::memset(r->err_host, 0, 64);
  void* err_dev_host = nullptr;
  check_cuda(cudaHostGetDevicePointer(&err_dev_host, r->err_host, 0), "cudaHostGetDevicePointer");
  // Peers write into sym only after they got its handle/pointer, i.e. after this returns.
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");

  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ordinal), "cudaDeviceGetAttribute");
  DeviceView& v = r->view;
  v = base_;
  v.rank = rank;
  const int warps = kThreads / 32;
  const int min_grid = (v.E + warps - 1) / warps;  // one routing warp per expert
  const int cap = options_.blocks_per_sm * sms;
  v.grid = std::max(cap, min_grid);
  if (options_.sync == SyncMode::kLegacy) {
    v.grid_dsend = v.grid_drecv = v.grid_csend = v.grid_crecv = v.grid;
  } else {
    // Each kernel gets the blocks its static work can use (one warp per unit), at most `cap`: a
    // 1-token decode step does not launch, schedule and count in 264 idle blocks.
    auto blocks_for = [&](int64_t units) {
      return static_cast<int32_t>(std::clamp<int64_t>((units + warps - 1) / warps, 1, cap));
    };
    const int64_t xchunks = (v.xbytes + v.chunk_bytes - 1) / v.chunk_bytes;
    const int64_t cchunks = (v.cbytes + v.chunk_bytes - 1) / v.chunk_bytes;
    v.grid_dsend = std::max(blocks_for(int64_t{v.T} * xchunks), min_grid);
    v.grid_drecv = blocks_for(v.M);
    // combine_send walks the rows in use: at most M, and at most every (token, k) of every rank
    // plus the padding of each segment.
    const int64_t rows = std::min<int64_t>(v.M, int64_t{v.R} * v.T * v.K + int64_t{v.L} * (v.pad - 1));
    v.grid_csend = blocks_for(rows * cchunks);
    v.grid_crecv = blocks_for(int64_t{v.T} * ((v.H + kCombineChunk - 1) / kCombineChunk));
  }
  // Fused kernels: the larger grid of their two halves, every block resident at once (the
  // routing warps of dispatch need min_grid blocks; a device that cannot hold them runs the split
  // kernels, which the protocol does not tell apart).
  v.grid_dfused = v.grid_cfused = 0;
  if (options_.fused && options_.sync == SyncMode::kArrive) {
    int per_sm = 0;
    check_cuda(static_cast<cudaError_t>(fused_resident_blocks(v, true, &per_sm)), "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    const int dgrid = std::max(v.grid_dsend, v.grid_drecv);
    if (dgrid <= per_sm * sms) v.grid_dfused = dgrid;
    check_cuda(static_cast<cudaError_t>(fused_resident_blocks(v, false, &per_sm)), "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    // One rank reads all its rows in place: the fused combine's send half has nothing to do.
    const int32_t csend = v.R == 1 ? 0 : v.grid_csend;
    v.grid_cfused = std::min(std::max(csend, v.grid_crecv), per_sm * sms);
  }
  char* local = static_cast<char*>(r->local);
  v.row_map = reinterpret_cast<int32_t*>(local);
  local += round_up(int64_t{v.M} * 4, 256);
  v.kept = reinterpret_cast<int32_t*>(local);
  local += round_up(int64_t{v.L} * 4, 256);
  v.routed_idx = reinterpret_cast<int32_t*>(local);
  local += round_up(int64_t{v.T} * v.K * 4, 256);
  v.local_row = reinterpret_cast<uint64_t*>(local);
  local += round_up(int64_t{v.T} * v.K * 8, 256);
  v.state = reinterpret_cast<uint32_t*>(local);
  v.err_dev = reinterpret_cast<int32_t*>(local + 256);
  v.timing = reinterpret_cast<uint64_t*>(local + 512);
  v.err_host = static_cast<int32_t*>(err_dev_host);
  r->peers[rank] = static_cast<char*>(r->sym);
}

std::string NvlinkAllToAll::ipc_handle(int ordinal) const {
  const NvlinkRank* r = nullptr;
  for (const auto& x : ranks_)
    if (x->ordinal == ordinal) r = x.get();
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  DeviceGuard guard(ordinal);
  cudaIpcMemHandle_t h;
  check_cuda(cudaIpcGetMemHandle(&h, r->sym), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

void NvlinkAllToAll::connect_local(int ordinal, int peer_rank, int peer_ordinal) {
  NvlinkRank* r = find_rank_mutable(ordinal);
  NvlinkRank* p = find_rank_mutable(peer_ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  JG_CHECK_ARG(p != nullptr, "moe (CUDA): no rank on peer device ordinal ", peer_ordinal);
  JG_CHECK_ARG(p->rank == peer_rank, "moe (CUDA): device ordinal ", peer_ordinal, " holds rank ", p->rank,
               ", not rank ", peer_rank);
  if (ordinal != peer_ordinal) {
    DeviceGuard guard(ordinal);
    int can = 0;
    check_cuda(cudaDeviceCanAccessPeer(&can, ordinal, peer_ordinal), "cudaDeviceCanAccessPeer");
    JG_CHECK_ARG(can, "moe (CUDA): device ", ordinal, " cannot access device ", peer_ordinal,
                 " (no NVLink/P2P path); the CUDA MoE kernels need peer access inside the node");
    if (options_.sync == SyncMode::kArrive) {  // arrivals are atomic adds into the peer's memory
      int atomics = 0;
      check_cuda(cudaDeviceGetP2PAttribute(&atomics, cudaDevP2PAttrNativeAtomicSupported, ordinal, peer_ordinal),
                 "cudaDeviceGetP2PAttribute");
      JG_CHECK_ARG(atomics, "moe (CUDA): device ", ordinal, " has no native atomics on device ", peer_ordinal,
                   "'s memory (no NVLink?); the default synchronisation needs them: set JAX_GARDEN_MOE_SYNC=flags");
    }
    const cudaError_t err = cudaDeviceEnablePeerAccess(peer_ordinal, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();  // XLA may have enabled it already
    } else {
      check_cuda(err, "cudaDeviceEnablePeerAccess");
    }
  }
  r->peers[peer_rank] = static_cast<char*>(p->sym);
}

void NvlinkAllToAll::connect_ipc(int ordinal, int peer_rank, const std::string& handle) {
  NvlinkRank* r = find_rank_mutable(ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  JG_CHECK_ARG(peer_rank >= 0 && peer_rank < shape_.num_ranks, "moe (CUDA): peer rank ", peer_rank,
               " outside [0, ", shape_.num_ranks, ")");
  JG_CHECK_ARG(handle.size() == sizeof(cudaIpcMemHandle_t), "moe (CUDA): IPC handle of ", handle.size(),
               " bytes, expected ", sizeof(cudaIpcMemHandle_t));
  JG_CHECK_ARG(r->peers[peer_rank] == nullptr, "moe (CUDA): peer rank ", peer_rank, " already mapped on ordinal ",
               ordinal);
  r->peers[peer_rank] = open_peer_ipc(handle, ordinal, peer_rank, "jax_garden.moe (CUDA)");
  r->opened_ipc[peer_rank] = true;
}

std::string NvlinkAllToAll::finalize() {
  JG_CHECK_ARG(!closed_, "moe (CUDA): context is closed");
  JG_CHECK_ARG(!ranks_.empty(), "moe (CUDA): no rank added");
  std::string report;
  for (auto& r : ranks_) {
    for (int p = 0; p < shape_.num_ranks; ++p) {
      JG_CHECK_ARG(r->peers[p] != nullptr, "moe (CUDA): rank ", r->rank, " on device ordinal ", r->ordinal,
                   " has no mapping of peer rank ", p);
      r->view.sym[p] = r->peers[p];
    }
    DeviceGuard guard(r->ordinal);
    std::string rep;
    check_cuda(static_cast<cudaError_t>(preload_kernels(&rep)), "loading the MoE kernels");
    if (report.empty()) report = rep;
    r->ready = true;
  }
  return report;
}

void NvlinkAllToAll::synchronize() {
  if (closed_) return;
  for (auto& r : ranks_) {
    DeviceGuard guard(r->ordinal);
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
}

void NvlinkAllToAll::close() {
  if (closed_) return;
  closed_ = true;
  int prev = -1;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  for (auto& r : ranks_) {
    if (cudaSetDevice(r->ordinal) != cudaSuccess) continue;
    cudaDeviceSynchronize();  // no kernel of ours may still touch these buffers
    // An executable captured in a CUDA graph may replay our launches without calling the FFI
    // handler (which would refuse the closed id): the kernels find kClosed set and touch only
    // the small local state, which therefore stays allocated (leaked, a few hundred KiB).
    if (r->local != nullptr) {
      const uint32_t one = 1;
      cudaMemcpy(static_cast<uint32_t*>(r->view.state) + kClosed, &one, sizeof(one), cudaMemcpyHostToDevice);
    }
    for (int p = 0; p < kMaxRanks; ++p) {
      if (r->opened_ipc[p]) cudaIpcCloseMemHandle(r->peers[p]);
      r->peers[p] = nullptr;
      r->opened_ipc[p] = false;
    }
    if (r->sym != nullptr) cudaFree(r->sym);
    r->sym = nullptr;
    r->ready = false;
  }
  if (prev >= 0) cudaSetDevice(prev);
  (void)cudaGetLastError();
}

int32_t NvlinkAllToAll::error_code(std::string* message) const {
  for (const auto& r : ranks_) {
    if (r->err_host == nullptr) continue;
    const volatile int32_t* h = r->err_host;
    const int32_t code = h[0];
    if (code != kErrNone) {
      if (message != nullptr) *message = device_error_message(code, h[1], h[2], h[3], h[4]);
      return code;
    }
  }
  return kErrNone;
}

std::vector<uint64_t> NvlinkAllToAll::stamps(int ordinal, int n) const {
  const NvlinkRank* r = find_rank(ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  JG_CHECK_ARG(n >= 0 && n <= kTimingRing, "moe (CUDA): timings: n must be in [0, ", kTimingRing, "], got ", n);
  DeviceGuard guard(ordinal);
  std::vector<uint64_t> ring(4 * static_cast<size_t>(kTimingRing) * kStamps);
  uint32_t state[kStateWords];
  check_cuda(cudaMemcpy(ring.data(), r->view.timing, kTimingBytes, cudaMemcpyDeviceToHost), "cudaMemcpy (timings)");
  check_cuda(cudaMemcpy(state, r->view.state, sizeof(state), cudaMemcpyDeviceToHost), "cudaMemcpy (state)");
  std::vector<uint64_t> out(static_cast<size_t>(n) * 4 * kStamps, 0);
  for (int k = 0; k < 4; ++k) {
    const uint32_t gen = state[kGenDSend + k];
    for (int i = 0; i < n; ++i) {
      const int64_t g = static_cast<int64_t>(gen) - n + i;
      if (g < 0) continue;
      const size_t slot = (static_cast<size_t>(k) * kTimingRing + static_cast<size_t>(g % kTimingRing)) * kStamps;
      for (int j = 0; j < kStamps; ++j) out[(static_cast<size_t>(i) * 4 + k) * kStamps + j] = ring[slot + j];
    }
  }
  return out;
}

std::vector<uint64_t> NvlinkAllToAll::timings(int ordinal, int n) const {
  const std::vector<uint64_t> all = stamps(ordinal, n);
  std::vector<uint64_t> out(static_cast<size_t>(n) * 8, 0);
  for (size_t i = 0; i < static_cast<size_t>(n) * 4; ++i) {
    out[i * 2 + 0] = all[i * kStamps + kStampStart];
    out[i * 2 + 1] = all[i * kStamps + kStampEnd];
  }
  return out;
}

std::vector<uint32_t> NvlinkAllToAll::generations(int ordinal) const {
  const NvlinkRank* r = find_rank(ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  DeviceGuard guard(ordinal);
  uint32_t state[kStateWords];
  check_cuda(cudaMemcpy(state, r->view.state, sizeof(state), cudaMemcpyDeviceToHost), "cudaMemcpy (state)");
  return {state[kGenDSend], state[kGenDRecv], state[kGenCSend], state[kGenCRecv]};
}

uint64_t NvlinkAllToAll::dropped_rows(int ordinal) const {
  const NvlinkRank* r = find_rank(ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  DeviceGuard guard(ordinal);
  uint64_t dropped = 0;
  check_cuda(cudaMemcpy(&dropped, r->view.state + kDropped, sizeof(dropped), cudaMemcpyDeviceToHost),
             "cudaMemcpy (state)");
  return dropped;
}

int NvlinkAllToAll::dispatch(int ordinal, void* stream, const void* x, const float* x_scale, const int32_t* indices,
                             const int32_t* bound_m, const int32_t* rank, void* expert_x, float* expert_scale,
                             int32_t* expert_counts, uint32_t* send_done) {
  const NvlinkRank* r = find_rank(ordinal);
  if (r == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  if (r->view.grid_dfused > 0) {
    return launch_dispatch_fused(r->view, stream, options_.cooperative, x, x_scale, indices, bound_m, rank, expert_x,
                                 expert_scale, expert_counts, send_done);
  }
  return CudaAllToAll::dispatch(ordinal, stream, x, x_scale, indices, bound_m, rank, expert_x, expert_scale,
                                expert_counts, send_done);
}

int NvlinkAllToAll::combine(int ordinal, void* stream, const void* expert_y, const int32_t* expert_counts,
                            const int32_t* indices, const float* weights, const int32_t* bound_m, const int32_t* rank,
                            void* y, uint32_t* send_done) {
  const NvlinkRank* r = find_rank(ordinal);
  if (r == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  if (r->view.grid_cfused > 0) {
    return launch_combine_fused(r->view, stream, options_.cooperative, expert_y, expert_counts, indices, weights,
                                bound_m, rank, y, send_done);
  }
  return CudaAllToAll::combine(ordinal, stream, expert_y, expert_counts, indices, weights, bound_m, rank, y,
                               send_done);
}

int NvlinkAllToAll::dispatch_send(int ordinal, void* stream, const void* x, const float* x_scale,
                                  const int32_t* indices, const int32_t* bound_m, const int32_t* rank,
                                  uint32_t* send_done) {
  const NvlinkRank* r = find_rank(ordinal);
  if (r == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  return launch_dispatch_send(r->view, stream, x, x_scale, indices, bound_m, rank, send_done);
}

int NvlinkAllToAll::dispatch_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* rank,
                                  void* expert_x, float* expert_scale, int32_t* expert_counts) {
  const NvlinkRank* r = find_rank(ordinal);
  if (r == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  return launch_dispatch_recv(r->view, stream, send_done, rank, expert_x, expert_scale, expert_counts);
}

int NvlinkAllToAll::combine_send(int ordinal, void* stream, const void* expert_y, const int32_t* expert_counts,
                                 const int32_t* rank, uint32_t* send_done) {
  const NvlinkRank* r = find_rank(ordinal);
  if (r == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  return launch_combine_send(r->view, stream, expert_y, expert_counts, rank, send_done);
}

int NvlinkAllToAll::combine_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* indices,
                                 const float* weights, const int32_t* bound_m, const int32_t* rank, void* y) {
  const NvlinkRank* r = find_rank(ordinal);
  if (r == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  return launch_combine_recv(r->view, stream, send_done, indices, weights, bound_m, rank, y);
}

}  // namespace jax_garden::moe
