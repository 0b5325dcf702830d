// The CUDA MoE context: buffers allocated once outside XLA, peers mapped (peer access inside
// one process, CUDA IPC across processes), and the process-wide registry the FFI handlers
// read. Only the CUDA runtime API is used (linked statically), so no libcuda link dependency.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

#include "common/error.h"
#include "moe/moe_cuda.h"

namespace jax_garden::moe_cuda {
namespace {

void Check(cudaError_t err, const char* what) {
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
    Check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }

 private:
  int prev_ = -1;
};

int64_t RoundUp(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

constexpr int64_t kTimingBytes = 4 * int64_t{kTimingRing} * 2 * sizeof(uint64_t);

std::mutex g_registry_mu;
std::map<uint64_t, std::shared_ptr<Context>>& Registry() {
  static std::map<uint64_t, std::shared_ptr<Context>> registry;
  return registry;
}
uint64_t g_next_id = 1;

}  // namespace

Context::Context(const Config& c) : cfg_(c) {
  const int64_t R = c.num_ranks, E = c.num_experts, K = c.experts_per_token, H = c.hidden, T = c.max_tokens,
                M = c.max_recv_tokens;
  JG_CHECK_ARG(R >= 1 && R <= kMaxRanks, "moe (CUDA): num_ranks must be in [1, ", kMaxRanks, "] (one NVLink node), got ", R);
  JG_CHECK_ARG(E >= 1 && E <= 2048, "moe (CUDA): num_experts must be in [1, 2048], got ", E);
  JG_CHECK_ARG(E % R == 0, "moe (CUDA): num_experts=", E, " is not divisible by num_ranks=", R);
  JG_CHECK_ARG(K >= 1 && K <= 32, "moe (CUDA): experts_per_token must be in [1, 32], got ", K);
  JG_CHECK_ARG(H >= 1, "moe (CUDA): hidden must be positive, got ", H);
  JG_CHECK_ARG(T >= 1, "moe (CUDA): max_tokens must be positive, got ", T);
  JG_CHECK_ARG(M >= 1, "moe (CUDA): max_recv_tokens must be positive, got ", M);
  JG_CHECK_ARG(c.dispatch_elem_bytes == 1 || c.dispatch_elem_bytes == 2,
               "moe (CUDA): dispatch element size must be 1 (float8_e4m3fn) or 2 (bfloat16) bytes, got ",
               c.dispatch_elem_bytes);
  JG_CHECK_ARG(c.scale_cols >= 0, "moe (CUDA): scale_cols must be >= 0, got ", c.scale_cols);
  JG_CHECK_ARG(c.expert_padding >= 1, "moe (CUDA): expert_padding must be >= 1, got ", c.expert_padding);
  JG_CHECK_ARG(R * T * K < (int64_t{1} << 31), "moe (CUDA): num_ranks * max_tokens * experts_per_token = ",
               R * T * K, " must stay below 2^31");
  JG_CHECK_ARG(M * H * c.dispatch_elem_bytes < (int64_t{1} << 40), "moe (CUDA): max_recv_tokens * hidden too large");
  JG_CHECK_ARG(c.timeout_s > 0, "moe (CUDA): timeout_s must be positive, got ", c.timeout_s);
  JG_CHECK_ARG(c.chunk_bytes == 512 || c.chunk_bytes == 1024 || c.chunk_bytes == 2048,
               "moe (CUDA): chunk_bytes must be 512, 1024 or 2048, got ", c.chunk_bytes);
  JG_CHECK_ARG(c.blocks_per_sm >= 1 && c.blocks_per_sm <= 2, "moe (CUDA): blocks_per_sm must be 1 or 2, got ",
               c.blocks_per_sm);

  DeviceView& v = base_;
  v.E = static_cast<int32_t>(E);
  v.K = static_cast<int32_t>(K);
  v.H = static_cast<int32_t>(H);
  v.T = static_cast<int32_t>(T);
  v.M = static_cast<int32_t>(M);
  v.R = static_cast<int32_t>(R);
  v.L = static_cast<int32_t>(E / R);
  v.S = static_cast<int32_t>(c.scale_cols);
  v.pad = static_cast<int32_t>(c.expert_padding);
  v.xbytes = static_cast<int32_t>(H * c.dispatch_elem_bytes);
  v.sbytes = static_cast<int32_t>(c.scale_cols * 4);
  v.cbytes = static_cast<int32_t>(H * 2);
  v.rec_stride = RoundUp(v.xbytes, 16) + RoundUp(v.sbytes, 16);
  v.crec_stride = RoundUp(v.cbytes, 16);
  v.off_counts = kFlagsBytes;
  v.off_routes = v.off_counts + RoundUp(R * v.L * 4, 256);
  v.off_data = v.off_routes + RoundUp(R * v.L * T * K * 4, 256);
  v.off_cdata = v.off_data + RoundUp(R * T * v.rec_stride, 256);
  v.off_cgen = v.off_cdata + RoundUp(T * K * v.crec_stride, 256);
  sym_bytes_ = v.off_cgen + RoundUp(T * K * 4, 256);
  v.timeout_ns = static_cast<uint64_t>(c.timeout_s * 1e9);
  v.chunk_bytes = static_cast<int32_t>(c.chunk_bytes);
  // local: row_map [M] | kept [L] | routed_idx [T*K] | state | err_dev | timing
  local_bytes_ = RoundUp(M * 4, 256) + RoundUp(v.L * 4, 256) + RoundUp(T * K * 4, 256) + 256 + 256 + kTimingBytes;
}

Context::~Context() {
  try {
    Close();
  } catch (...) {
  }
}

RankState* Context::FindMutable(int ordinal) {
  for (auto& r : ranks_)
    if (r->ordinal == ordinal) return r.get();
  return nullptr;
}

const RankState* Context::Find(int ordinal) const {
  for (const auto& r : ranks_)
    if (r->ordinal == ordinal && r->ready) return r.get();
  return nullptr;
}

std::vector<int> Context::Ordinals() const {
  std::vector<int> out;
  for (const auto& r : ranks_) out.push_back(r->ordinal);
  return out;
}

void Context::AddRank(int ordinal, int rank) {
  JG_CHECK_ARG(!closed_, "moe (CUDA): context is closed");
  JG_CHECK_ARG(rank >= 0 && rank < cfg_.num_ranks, "moe (CUDA): rank ", rank, " outside [0, ", cfg_.num_ranks, ")");
  for (const auto& r : ranks_) {
    JG_CHECK_ARG(r->ordinal != ordinal, "moe (CUDA): device ordinal ", ordinal, " already holds rank ", r->rank);
  }
  int count = 0;
  Check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  JG_CHECK_ARG(ordinal >= 0 && ordinal < count, "moe (CUDA): device ordinal ", ordinal, " outside [0, ", count, ")");
  DeviceGuard guard(ordinal);
  auto rs = std::make_unique<RankState>();
  rs->ordinal = ordinal;
  rs->rank = rank;
  // Push first so that Close() frees whatever was allocated if a later step throws.
  RankState* r = rs.get();
  ranks_.push_back(std::move(rs));
  Check(cudaMalloc(&r->sym, sym_bytes_), "cudaMalloc (symmetric buffer)");
  Check(cudaMemset(r->sym, 0, sym_bytes_), "cudaMemset");
  Check(cudaMalloc(&r->local, local_bytes_), "cudaMalloc (local state)");
  Check(cudaMemset(r->local, 0, local_bytes_), "cudaMemset");
  Check(cudaHostAlloc(reinterpret_cast<void**>(&r->err_host), 64, cudaHostAllocMapped | cudaHostAllocPortable),
        "cudaHostAlloc (error word)");
  std::memset(r->err_host, 0, 64);
  void* err_dev_host = nullptr;
  Check(cudaHostGetDevicePointer(&err_dev_host, r->err_host, 0), "cudaHostGetDevicePointer");
  // Peers write into sym only after they got its handle/pointer, i.e. after this returns.
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");

  int sms = 0;
  Check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ordinal), "cudaDeviceGetAttribute");
  DeviceView& v = r->view;
  v = base_;
  v.rank = rank;
  const int min_grid = (v.E + kThreads / 32 - 1) / (kThreads / 32);  // one routing warp per expert
  v.grid = std::max(static_cast<int>(cfg_.blocks_per_sm) * sms, min_grid);
  char* local = static_cast<char*>(r->local);
  v.row_map = reinterpret_cast<int32_t*>(local);
  local += RoundUp(int64_t{v.M} * 4, 256);
  v.kept = reinterpret_cast<int32_t*>(local);
  local += RoundUp(int64_t{v.L} * 4, 256);
  v.routed_idx = reinterpret_cast<int32_t*>(local);
  local += RoundUp(int64_t{v.T} * v.K * 4, 256);
  v.state = reinterpret_cast<uint32_t*>(local);
  v.err_dev = reinterpret_cast<int32_t*>(local + 256);
  v.timing = reinterpret_cast<uint64_t*>(local + 512);
  v.err_host = static_cast<int32_t*>(err_dev_host);
  r->peers[rank] = static_cast<char*>(r->sym);
}

std::string Context::IpcHandle(int ordinal) const {
  const RankState* r = nullptr;
  for (const auto& x : ranks_)
    if (x->ordinal == ordinal) r = x.get();
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  DeviceGuard guard(ordinal);
  cudaIpcMemHandle_t h;
  Check(cudaIpcGetMemHandle(&h, r->sym), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

void Context::ConnectLocal(int ordinal, int peer_rank, int peer_ordinal) {
  RankState* r = FindMutable(ordinal);
  RankState* p = FindMutable(peer_ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  JG_CHECK_ARG(p != nullptr, "moe (CUDA): no rank on peer device ordinal ", peer_ordinal);
  JG_CHECK_ARG(p->rank == peer_rank, "moe (CUDA): device ordinal ", peer_ordinal, " holds rank ", p->rank,
               ", not rank ", peer_rank);
  if (ordinal != peer_ordinal) {
    DeviceGuard guard(ordinal);
    int can = 0;
    Check(cudaDeviceCanAccessPeer(&can, ordinal, peer_ordinal), "cudaDeviceCanAccessPeer");
    JG_CHECK_ARG(can, "moe (CUDA): device ", ordinal, " cannot access device ", peer_ordinal,
                 " (no NVLink/P2P path); the CUDA MoE kernels need peer access inside the node");
    const cudaError_t err = cudaDeviceEnablePeerAccess(peer_ordinal, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();  // XLA may have enabled it already
    } else {
      Check(err, "cudaDeviceEnablePeerAccess");
    }
  }
  r->peers[peer_rank] = static_cast<char*>(p->sym);
}

void Context::ConnectIpc(int ordinal, int peer_rank, const std::string& handle) {
  RankState* r = FindMutable(ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  JG_CHECK_ARG(peer_rank >= 0 && peer_rank < cfg_.num_ranks, "moe (CUDA): peer rank ", peer_rank, " outside [0, ",
               cfg_.num_ranks, ")");
  JG_CHECK_ARG(handle.size() == sizeof(cudaIpcMemHandle_t), "moe (CUDA): IPC handle of ", handle.size(),
               " bytes, expected ", sizeof(cudaIpcMemHandle_t));
  JG_CHECK_ARG(r->peers[peer_rank] == nullptr, "moe (CUDA): peer rank ", peer_rank, " already mapped on ordinal ",
               ordinal);
  DeviceGuard guard(ordinal);
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  void* ptr = nullptr;
  Check(cudaIpcOpenMemHandle(&ptr, h, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
  r->peers[peer_rank] = static_cast<char*>(ptr);
  r->opened_ipc[peer_rank] = true;
}

std::string Context::Finalize() {
  JG_CHECK_ARG(!closed_, "moe (CUDA): context is closed");
  JG_CHECK_ARG(!ranks_.empty(), "moe (CUDA): no rank added");
  std::string report;
  for (auto& r : ranks_) {
    for (int p = 0; p < cfg_.num_ranks; ++p) {
      JG_CHECK_ARG(r->peers[p] != nullptr, "moe (CUDA): rank ", r->rank, " on device ordinal ", r->ordinal,
                   " has no mapping of peer rank ", p);
      r->view.sym[p] = r->peers[p];
    }
    DeviceGuard guard(r->ordinal);
    std::string rep;
    Check(static_cast<cudaError_t>(PreloadKernels(&rep)), "loading the MoE kernels");
    if (report.empty()) report = rep;
    r->ready = true;
  }
  return report;
}

void Context::Synchronize() {
  if (closed_) return;
  for (auto& r : ranks_) {
    DeviceGuard guard(r->ordinal);
    Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
}

void Context::Close() {
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

std::string ErrorMessage(int32_t code, int32_t a, int32_t b, int32_t rank, int32_t c) {
  const char* sync_hint =
      " (every rank must call dispatch_send, dispatch_recv, combine_send, combine_recv the same number of "
      "times and in this order; a peer that died or was never started also ends here)";
  switch (code) {
    case kErrTimeoutDispatchData:
      return str_cat("moe (CUDA): rank ", rank, " timed out waiting for dispatch data from rank ", a,
                     " (generation ", b, ")", sync_hint);
    case kErrTimeoutDispatchFree:
      return str_cat("moe (CUDA): rank ", rank, " timed out waiting for rank ", a,
                     " to consume the previous dispatch (generation ", b, ")", sync_hint);
    case kErrTimeoutCombineData:
      return str_cat("moe (CUDA): rank ", rank, " timed out waiting for combine data from rank ", a,
                     " (generation ", b, ")", sync_hint);
    case kErrTimeoutCombineFree:
      return str_cat("moe (CUDA): rank ", rank, " timed out waiting for rank ", a,
                     " to consume the previous combine (generation ", b, ")", sync_hint);
    case kErrRankMismatch:
      return str_cat("moe (CUDA): the rank operand is ", a, " but this device holds rank ", b,
                     " of the context: the mesh order differs from the one the context was created with");
    case kErrCountsMismatch:
      return str_cat("moe (CUDA): combine_send on rank ", rank, ": expert_counts[", a, "] = ", b,
                     " but the last dispatch received ", c,
                     " rows for that expert; pass the expert_counts dispatch returned");
    case kErrPhaseOrder: {
      static const char* const what[] = {
          "dispatch_send called again before dispatch_recv (one dispatch in flight per AllToAll; "
          "use one AllToAll per micro-batch)",
          "dispatch_recv without a pending dispatch_send (or with a send_done token of another call)",
          "combine_send called again before combine_recv (one combine in flight per AllToAll)",
          "combine_recv without a pending combine_send (or with a send_done token of another call)",
          "combine_send before any dispatch"};
      return str_cat("moe (CUDA): rank ", rank, ": ", (a >= 0 && a <= 4) ? what[a] : "phase order broken",
                     " (calls so far: ", b, " and ", c, ")");
    }
    case kErrRoutingMismatch:
      if (a < 0) {
        return str_cat("moe (CUDA): combine_recv on rank ", rank, ": bound_m = ", b,
                       " but the matching dispatch used bound_m = ", c);
      }
      return str_cat("moe (CUDA): combine_recv on rank ", rank, ": indices entry ", a,
                     " (flat t*K+k) = ", b, " but the matching dispatch routed it to expert ", c,
                     "; combine needs the indices given to dispatch");
    default:
      return str_cat("moe (CUDA): rank ", rank, " error code ", code, " (", a, ", ", b, ", ", c, ")");
  }
}

int32_t Context::ErrorCode(std::string* message) const {
  for (const auto& r : ranks_) {
    if (r->err_host == nullptr) continue;
    const volatile int32_t* h = r->err_host;
    const int32_t code = h[0];
    if (code != 0) {
      if (message != nullptr) *message = ErrorMessage(code, h[1], h[2], h[3], h[4]);
      return code;
    }
  }
  return 0;
}

std::vector<uint64_t> Context::Timings(int ordinal, int n) const {
  const RankState* r = Find(ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  JG_CHECK_ARG(n >= 0 && n <= kTimingRing, "moe (CUDA): timings: n must be in [0, ", kTimingRing, "], got ", n);
  DeviceGuard guard(ordinal);
  std::vector<uint64_t> ring(4 * static_cast<size_t>(kTimingRing) * 2);
  uint32_t state[kStateWords];
  Check(cudaMemcpy(ring.data(), r->view.timing, kTimingBytes, cudaMemcpyDeviceToHost), "cudaMemcpy (timings)");
  Check(cudaMemcpy(state, r->view.state, sizeof(state), cudaMemcpyDeviceToHost), "cudaMemcpy (state)");
  std::vector<uint64_t> out(static_cast<size_t>(n) * 8, 0);
  for (int k = 0; k < 4; ++k) {
    const uint32_t gen = state[kGenDSend + k];
    for (int i = 0; i < n; ++i) {
      const int64_t g = static_cast<int64_t>(gen) - n + i;
      if (g < 0) continue;
      const size_t slot = (static_cast<size_t>(k) * kTimingRing + static_cast<size_t>(g % kTimingRing)) * 2;
      out[(static_cast<size_t>(i) * 4 + k) * 2 + 0] = ring[slot];
      out[(static_cast<size_t>(i) * 4 + k) * 2 + 1] = ring[slot + 1];
    }
  }
  return out;
}

std::vector<uint32_t> Context::Generations(int ordinal) const {
  const RankState* r = Find(ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  DeviceGuard guard(ordinal);
  uint32_t state[kStateWords];
  Check(cudaMemcpy(state, r->view.state, sizeof(state), cudaMemcpyDeviceToHost), "cudaMemcpy (state)");
  return {state[kGenDSend], state[kGenDRecv], state[kGenCSend], state[kGenCRecv]};
}

uint64_t Context::DroppedRows(int ordinal) const {
  const RankState* r = Find(ordinal);
  JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
  DeviceGuard guard(ordinal);
  uint64_t dropped = 0;
  Check(cudaMemcpy(&dropped, r->view.state + kDropped, sizeof(dropped), cudaMemcpyDeviceToHost), "cudaMemcpy (state)");
  return dropped;
}

uint64_t RegisterContext(std::shared_ptr<Context> ctx) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  const uint64_t id = g_next_id++;
  Registry()[id] = std::move(ctx);
  return id;
}

std::shared_ptr<Context> LookupContext(uint64_t id) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto it = Registry().find(id);
  return it == Registry().end() ? nullptr : it->second;
}

void UnregisterContext(uint64_t id) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  Registry().erase(id);
}

}  // namespace jax_garden::moe_cuda
