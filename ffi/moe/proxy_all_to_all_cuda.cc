// ProxyAllToAll (proxy_all_to_all.h): buffers and control blocks allocated once outside XLA, the
// node group's receive areas mapped, the engine regions registered, the host proxy started. Only
// the CUDA runtime API is used (linked statically).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>

#include "common/error.h"
#include "fabric/core/region.h"
#include "moe/nvlink_protocol.h"
#include "moe/peer_ipc.h"
#include "moe/proxy_all_to_all.h"
#include "moe/proxy_kernels.h"

namespace jax_garden::moe {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(str_cat("jax_garden.moe (CUDA, node groups): ", what, " failed: ", cudaGetErrorName(err),
                                     ": ", cudaGetErrorString(err)));
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

std::string rank_list(const std::vector<int32_t>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

// Copies device bytes on the rank's private non-blocking stream, waiting at most `timeout_s` (a
// stalled kernel of ours must not block a debugging read). False when the copy did not finish.
bool bounded_copy(void* dst, const void* src, size_t bytes, cudaStream_t stream, double timeout_s) {
  if (cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream) != cudaSuccess) return false;
  const auto deadline = deadline_after(timeout_s);
  while (true) {
    const cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return true;
    if (e != cudaErrorNotReady || Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

}  // namespace

struct ProxyAllToAll::Local {
  int ordinal = -1;
  int32_t rank = -1;
  char* recv = nullptr;         // receive area (cudaMalloc; mapped by the node group, registered)
  char* send = nullptr;         // send area (cudaMalloc, registered)
  char* local = nullptr;        // proxy::LocalLayout (cudaMalloc); kept after close (graph replays)
  char* control = nullptr;      // proxy::ControlLayout (cudaHostAlloc mapped); kept after close
  char* control_dev = nullptr;  // its device address
  cudaStream_t aux = nullptr;   // private non-blocking stream: the proxy's and debugging reads
  std::shared_ptr<fabric::MemoryRegion> recv_region, send_region;
  char* node[proxy::kMaxNodeSize] = {};  // receive areas of the node group, as mapped here
  bool opened_ipc[proxy::kMaxNodeSize] = {};
  proxy::ProxyView view{};
  bool ready = false;
};

ProxyAllToAll::ProxyAllToAll(const MoeShape& shape, DType dispatch_dtype, const ProxyContextOptions& options)
    : shape_(shape),
      dispatch_dtype_(dispatch_dtype),
      options_(options),
      area_((validate_shape(shape), validate_dispatch_dtype(shape, dispatch_dtype),
             proxy::area_layout(shape, dispatch_dtype))),
      control_(proxy::control_layout(shape.num_ranks)),
      local_layout_(proxy::local_layout(shape)) {
  const int32_t R = shape_.num_ranks, E = shape_.num_experts, K = shape_.experts_per_token;
  const int32_t ns = options_.node_size;
  JG_CHECK_ARG(R <= proxy::kMaxProxyRanks, "moe (CUDA, node groups): num_ranks must be <= ", proxy::kMaxProxyRanks,
               ", got ", R);
  JG_CHECK_ARG(ns >= 1 && ns <= proxy::kMaxNodeSize && R % ns == 0 && ns < R, "moe (CUDA, node groups): node_size=",
               ns, " must be in [1, ", proxy::kMaxNodeSize, "], below R=", R,
               " and divide it (node_size = R is one NVLink domain: the NVLink context)");
  JG_CHECK_ARG(E <= 2048, "moe (CUDA): num_experts must be in [1, 2048], got ", E);
  JG_CHECK_ARG(K <= 32, "moe (CUDA): experts_per_token must be in [1, 32], got ", K);
  JG_CHECK_ARG(int64_t{R} * shape_.max_tokens * K < (int64_t{1} << 31) && shape_.max_recv_tokens < (int64_t{1} << 31),
               "moe (CUDA, node groups): R * max_tokens * experts_per_token and max_recv_tokens must fit int32");
  JG_CHECK_ARG(options_.timeout_s > 0, "moe (CUDA): timeout_s must be positive, got ", options_.timeout_s);
  JG_CHECK_ARG(options_.blocks_per_sm >= 1 && options_.blocks_per_sm <= 2, "moe (CUDA): blocks_per_sm must be 1 or 2, got ",
               options_.blocks_per_sm);
  fabric::EngineOptions eo = options_.engine;
  eo.timeout_s = options_.timeout_s;
  engine_ = fabric::Engine::create(eo);
  my_sender_.domains = engine_->num_domains();
  my_sender_.sharding = eo.sharding;
  peers_.resize(R);
}

ProxyAllToAll::~ProxyAllToAll() {
  try {
    close();
  } catch (...) {
  }
}

ProxyAllToAll::Local* ProxyAllToAll::find_local(int32_t rank) const {
  for (const auto& l : locals_)
    if (l->rank == rank) return l.get();
  return nullptr;
}

const ProxyAllToAll::Local* ProxyAllToAll::ready_local(int ordinal) const {
  for (const auto& l : locals_)
    if (l->ordinal == ordinal && l->ready) return l.get();
  return nullptr;
}

const ProxyAllToAll::Local& ProxyAllToAll::local_on(int ordinal, const char* what) const {
  for (const auto& l : locals_)
    if (l->ordinal == ordinal) return *l;
  throw InvalidArgument(str_cat("moe (CUDA, node groups): ", what, ": no rank on device ordinal ", ordinal));
}

bool ProxyAllToAll::holds(int ordinal) const { return ready_local(ordinal) != nullptr; }

std::vector<int> ProxyAllToAll::ordinals() const {
  std::vector<int> out;
  for (const auto& l : locals_) out.push_back(l->ordinal);
  return out;
}

int32_t ProxyAllToAll::rank_of(int ordinal) const {
  for (const auto& l : locals_)
    if (l->ordinal == ordinal) return l->rank;
  return -1;
}

std::vector<int32_t> ProxyAllToAll::remote_ranks() const {
  std::vector<int32_t> out;
  for (int32_t r = 0; r < shape_.num_ranks; ++r)
    if (find_local(r) == nullptr) out.push_back(r);
  return out;
}

void ProxyAllToAll::add_rank(int ordinal, int32_t rank) {
  JG_CHECK_ARG(!closed_ && !finalized_, "moe (CUDA, node groups): add_rank after finalize or close");
  JG_CHECK_ARG(rank >= 0 && rank < shape_.num_ranks, "moe (CUDA): rank ", rank, " outside [0, ", shape_.num_ranks, ")");
  for (const auto& l : locals_) {
    JG_CHECK_ARG(l->ordinal != ordinal, "moe (CUDA): device ordinal ", ordinal, " already holds rank ", l->rank);
    JG_CHECK_ARG(l->rank != rank, "moe (CUDA): rank ", rank, " added twice");
  }
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  JG_CHECK_ARG(ordinal >= 0 && ordinal < count, "moe (CUDA): device ordinal ", ordinal, " outside [0, ", count, ")");
  DeviceGuard guard(ordinal);
  auto owned = std::make_unique<Local>();
  Local* l = owned.get();
  l->ordinal = ordinal;
  l->rank = rank;
  locals_.push_back(std::move(owned));  // close() frees whatever was allocated if a later step throws
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&l->recv), area_.recv_alloc), "cudaMalloc (receive area)");
  check_cuda(cudaMemset(l->recv, 0, area_.recv_alloc), "cudaMemset");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&l->send), area_.send_alloc), "cudaMalloc (send area)");
  check_cuda(cudaMemset(l->send, 0, area_.send_alloc), "cudaMemset");
  check_cuda(cudaMalloc(reinterpret_cast<void**>(&l->local), local_layout_.bytes), "cudaMalloc (local state)");
  check_cuda(cudaMemset(l->local, 0, local_layout_.bytes), "cudaMemset");
  check_cuda(cudaHostAlloc(reinterpret_cast<void**>(&l->control), control_.bytes,
                           cudaHostAllocMapped | cudaHostAllocPortable),
             "cudaHostAlloc (control block)");
  std::memset(l->control, 0, control_.bytes);
  check_cuda(cudaHostGetDevicePointer(reinterpret_cast<void**>(&l->control_dev), l->control, 0),
             "cudaHostGetDevicePointer");
  check_cuda(cudaStreamCreateWithFlags(&l->aux, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  // Peers write into the areas only after they got their handles/descriptors, i.e. after this returns.
  check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  l->recv_region = engine_->register_memory(reinterpret_cast<uint64_t>(l->recv), area_.regions.recv_bytes, /*cuda=*/true);
  l->send_region = engine_->register_memory(reinterpret_cast<uint64_t>(l->send), area_.regions.send_bytes, /*cuda=*/true);
  l->node[rank - rank / options_.node_size * options_.node_size] = l->recv;
}

std::string ProxyAllToAll::ipc_handle(int32_t rank) const {
  const Local* l = find_local(rank);
  JG_CHECK_ARG(l != nullptr, "moe (CUDA, node groups): ipc_handle: rank ", rank, " is not held by this process");
  DeviceGuard guard(l->ordinal);
  cudaIpcMemHandle_t h;
  check_cuda(cudaIpcGetMemHandle(&h, l->recv), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

fabric::Bytes ProxyAllToAll::peer_info(int32_t rank) const {
  const Local* l = find_local(rank);
  JG_CHECK_ARG(l != nullptr, "moe (CUDA, node groups): peer_info: rank ", rank, " is not held by this process");
  internode::PeerInfo info;
  info.rank = rank;
  info.node_size = options_.node_size;
  info.shape = shape_;
  info.dispatch_dtype = dispatch_dtype_;
  info.combine_dtype = DType::kBF16;
  info.sender = my_sender_;
  info.receive = l->recv_region->descriptor();
  return internode::encode_peer_info(info);
}

void ProxyAllToAll::connect_peer(const fabric::Bytes& bytes) {
  JG_CHECK_ARG(!finalized_, "moe (CUDA, node groups): connect after finalize");
  internode::PeerInfo info = internode::decode_peer_info(bytes.data(), bytes.size());
  const MoeShape& s = info.shape;
  const MoeShape& m = shape_;
  JG_CHECK_ARG(s.num_ranks == m.num_ranks && s.num_experts == m.num_experts &&
                   s.experts_per_token == m.experts_per_token && s.hidden == m.hidden &&
                   s.max_tokens == m.max_tokens && s.max_recv_tokens == m.max_recv_tokens &&
                   s.expert_padding == m.expert_padding && s.scale_cols == m.scale_cols,
               "moe (CUDA, node groups): rank ", info.rank, " was created with shape (", moe::describe(s),
               ") but this process uses (", moe::describe(m), "); every process must build the same AllToAll");
  JG_CHECK_ARG(info.dispatch_dtype == dispatch_dtype_ && info.combine_dtype == DType::kBF16,
               "moe (CUDA, node groups): rank ", info.rank, " uses dispatch dtype ", dtype_name(info.dispatch_dtype),
               " but this process ", dtype_name(dispatch_dtype_));
  JG_CHECK_ARG(info.node_size == options_.node_size, "moe (CUDA, node groups): rank ", info.rank, " uses node_size=",
               info.node_size, " but this process node_size=", options_.node_size);
  JG_CHECK_ARG(info.rank >= 0 && info.rank < m.num_ranks, "moe (CUDA, node groups): peer rank ", info.rank,
               " is outside [0, ", m.num_ranks, ")");
  JG_CHECK_ARG(find_local(info.rank) == nullptr, "moe (CUDA, node groups): rank ", info.rank, " is held by this process");
  JG_CHECK_ARG(info.receive.provider == engine_->provider(), "moe (CUDA, node groups): rank ", info.rank,
               " uses provider '", info.receive.provider, "' but this process '", engine_->provider(), "'");
  JG_CHECK_ARG(info.receive.length >= static_cast<uint64_t>(area_.regions.recv_bytes), "moe (CUDA, node groups): rank ",
               info.rank, "'s receive area has ", info.receive.length, " bytes, expected ", area_.regions.recv_bytes);
  peers_[info.rank] = proxy::ProxyPeer{std::move(info.receive), info.sender};
}

void ProxyAllToAll::connect_local(int32_t rank, int32_t peer_rank) {
  Local* l = find_local(rank);
  Local* p = find_local(peer_rank);
  JG_CHECK_ARG(l != nullptr && p != nullptr, "moe (CUDA, node groups): connect_local: ranks ", rank, " and ", peer_rank,
               " must both be held by this process");
  JG_CHECK_ARG(same_node(rank, peer_rank), "moe (CUDA, node groups): ranks ", rank, " and ", peer_rank,
               " are in different node groups (node_size ", options_.node_size, ")");
  if (l->ordinal != p->ordinal) {
    DeviceGuard guard(l->ordinal);
    int can = 0;
    check_cuda(cudaDeviceCanAccessPeer(&can, l->ordinal, p->ordinal), "cudaDeviceCanAccessPeer");
    JG_CHECK_ARG(can, "moe (CUDA): device ", l->ordinal, " cannot access device ", p->ordinal,
                 " (no NVLink/P2P path); ranks of one node group need peer access");
    const cudaError_t err = cudaDeviceEnablePeerAccess(p->ordinal, 0);
    if (err == cudaErrorPeerAccessAlreadyEnabled) {
      (void)cudaGetLastError();
    } else {
      check_cuda(err, "cudaDeviceEnablePeerAccess");
    }
  }
  l->node[peer_rank % options_.node_size] = p->recv;
}

void ProxyAllToAll::connect_ipc(int32_t rank, int32_t peer_rank, const std::string& handle) {
  Local* l = find_local(rank);
  JG_CHECK_ARG(l != nullptr, "moe (CUDA, node groups): connect_ipc: rank ", rank, " is not held by this process");
  JG_CHECK_ARG(peer_rank >= 0 && peer_rank < shape_.num_ranks && same_node(rank, peer_rank),
               "moe (CUDA, node groups): connect_ipc: rank ", peer_rank, " is not in the node group of rank ", rank);
  JG_CHECK_ARG(handle.size() == sizeof(cudaIpcMemHandle_t), "moe (CUDA): IPC handle of ", handle.size(),
               " bytes, expected ", sizeof(cudaIpcMemHandle_t));
  const int slot = peer_rank % options_.node_size;
  JG_CHECK_ARG(l->node[slot] == nullptr, "moe (CUDA, node groups): rank ", peer_rank, " already mapped for rank ", rank);
  l->node[slot] = open_peer_ipc(handle, l->ordinal, peer_rank, "jax_garden.moe (CUDA, node groups)");
  l->opened_ipc[slot] = true;
}

std::string ProxyAllToAll::finalize() {
  JG_CHECK_ARG(!closed_ && !finalized_, "moe (CUDA, node groups): finalize after finalize or close");
  JG_CHECK_ARG(!locals_.empty(), "moe (CUDA, node groups): no rank added");
  const int32_t R = shape_.num_ranks, ns = options_.node_size;
  // Local ranks in other node groups than another local rank are reached through the engine too.
  for (auto& l : locals_) {
    for (auto& o : locals_) {
      if (!same_node(l->rank, o->rank) && !peers_[o->rank]) {
        peers_[o->rank] = proxy::ProxyPeer{o->recv_region->descriptor(), my_sender_};
      }
    }
  }
  std::vector<int32_t> missing;
  for (int32_t r = 0; r < R; ++r)
    if (find_local(r) == nullptr && !peers_[r]) missing.push_back(r);
  JG_CHECK_ARG(missing.empty(), "moe (CUDA, node groups): finalize: no peer info for ranks [", rank_list(missing),
               "] (connect_peer every rank held by another process)");
  std::string report;
  for (auto& l : locals_) {
    const int32_t first = l->rank / ns * ns;
    for (int i = 0; i < ns; ++i) {
      JG_CHECK_ARG(l->node[i] != nullptr, "moe (CUDA, node groups): rank ", l->rank, " has no mapping of rank ",
                   first + i, " of its node group (connect_local or connect_ipc)");
    }
    DeviceGuard guard(l->ordinal);
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, l->ordinal), "cudaDeviceGetAttribute");
    proxy::ProxyView& v = l->view;
    const internode::RegionLayout& g = area_.regions;
    v.E = shape_.num_experts;
    v.K = shape_.experts_per_token;
    v.H = shape_.hidden;
    v.T = shape_.max_tokens;
    v.M = static_cast<int32_t>(shape_.max_recv_tokens);
    v.R = R;
    v.L = shape_.local_experts();
    v.S = shape_.scale_cols;
    v.pad = shape_.expert_padding;
    v.rank = l->rank;
    v.node_first = first;
    v.node_size = ns;
    v.xbytes = static_cast<int32_t>(g.row_bytes);
    v.sbytes = shape_.scale_cols * 4;
    v.cbytes = static_cast<int32_t>(g.combine_row_bytes);
    v.grid = options_.blocks_per_sm * sms;
    v.slot_bytes = g.dispatch_slot_bytes;
    v.chb = g.combine_header_bytes;
    v.recv_combine = g.recv_combine;
    v.recv_combine_bytes = g.recv_combine_bytes;
    v.recv_dispatch = g.recv_dispatch_slots;
    v.sync = area_.sync;
    v.sync_stride = area_.sync_stride;
    v.send_combine = g.send_combine;
    v.send_dispatch = g.send_dispatch_slots;
    v.timeout_ns = static_cast<uint64_t>(options_.timeout_s * 1e9);
    for (int i = 0; i < ns; ++i) v.node_recv[i] = l->node[i];
    v.recv = l->recv;
    v.send = l->send;
    const proxy::LocalLayout& o = local_layout_;
    char* b = l->local;
    v.state = reinterpret_cast<uint32_t*>(b + o.state);
    v.err_dev = reinterpret_cast<int32_t*>(b + o.err_dev);
    v.timing = reinterpret_cast<uint64_t*>(b + o.timing);
    v.sent_idx = reinterpret_cast<int32_t*>(b + o.sent_idx);
    v.routed_idx = reinterpret_cast<int32_t*>(b + o.routed_idx);
    v.tok_count = reinterpret_cast<int32_t*>(b + o.tok_count);
    v.tok_list = reinterpret_cast<int32_t*>(b + o.tok_list);
    v.sent_entries = reinterpret_cast<int32_t*>(b + o.sent_entries);
    v.sent_offset = reinterpret_cast<int64_t*>(b + o.sent_offset);
    v.routed_entries = reinterpret_cast<int32_t*>(b + o.routed_entries);
    v.routed_offset = reinterpret_cast<int64_t*>(b + o.routed_offset);
    v.msg_tokens = reinterpret_cast<int32_t*>(b + o.msg_tokens);
    v.combine_offset_at = reinterpret_cast<int64_t*>(b + o.combine_offset_at);
    v.combine_rows_at = reinterpret_cast<int32_t*>(b + o.combine_rows_at);
    v.counts = reinterpret_cast<int32_t*>(b + o.counts);
    v.kept_from = reinterpret_cast<int32_t*>(b + o.kept_from);
    v.kept = reinterpret_cast<int32_t*>(b + o.kept);
    v.row_of_entry = reinterpret_cast<int32_t*>(b + o.row_of_entry);
    v.row_src = reinterpret_cast<int32_t*>(b + o.row_src);
    v.pack_list = reinterpret_cast<int32_t*>(b + o.pack_list);
    v.pack_rows = reinterpret_cast<int32_t*>(b + o.pack_rows);
    v.kept_by = reinterpret_cast<int32_t*>(b + o.kept_by);
    v.rowpos = reinterpret_cast<int32_t*>(b + o.rowpos);
    v.keptflag = reinterpret_cast<uint8_t*>(b + o.keptflag);
    char* c = l->control_dev;
    v.abort = reinterpret_cast<uint32_t*>(c + control_.abort);
    v.err_host = reinterpret_cast<int32_t*>(c + control_.kernel_error);
    v.progress = reinterpret_cast<uint32_t*>(c + control_.progress);
    v.ready = reinterpret_cast<proxy::ReadyRecord*>(c + control_.ready);
    v.arrived = reinterpret_cast<uint32_t*>(c + control_.arrived);
    std::string rep;
    check_cuda(static_cast<cudaError_t>(proxy::preload_kernels(&rep)), "loading the MoE proxy kernels");
    if (report.empty()) report = rep;
  }
  std::vector<proxy::ProxyRank> ranks;
  for (auto& l : locals_) {
    Local* lp = l.get();
    const int64_t mailbox = area_.regions.recv_abort;
    proxy::ProxyRank pr;
    pr.rank = l->rank;
    pr.control = l->control;
    pr.send = l->send_region;
    pr.read_abort = [lp, mailbox](int32_t peer) -> std::string {
      internode::AbortMessage m{};
      try {
        DeviceGuard guard(lp->ordinal);
        if (!bounded_copy(&m, lp->recv + mailbox + int64_t{peer} * internode::kAbortBytes, sizeof(m), lp->aux, 5.0)) {
          return "(its abort message could not be read from GPU memory)";
        }
      } catch (const std::exception& e) {
        return str_cat("(its abort message could not be read: ", e.what(), ")");
      }
      if (m.magic != internode::kAbortMagic || m.length > sizeof(m.text)) return "(no reason given)";
      return std::string(m.text, m.length);
    };
    ranks.push_back(std::move(pr));
  }
  proxy::ProxyOptions po;
  po.timeout_s = options_.timeout_s;
  po.num_ranks = R;
  po.node_size = ns;
  proxy_ = std::make_unique<proxy::HostProxy>(engine_, po, std::move(ranks), peers_);
  proxy_->start();
  for (auto& l : locals_) l->ready = true;
  finalized_ = true;
  return report;
}

void ProxyAllToAll::synchronize() {
  if (closed_) return;
  for (auto& l : locals_) {
    DeviceGuard guard(l->ordinal);
    check_cuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  }
}

bool ProxyAllToAll::drain(double timeout_s) { return proxy_ == nullptr || proxy_->drain(timeout_s); }

void ProxyAllToAll::close() {
  if (closed_) return;
  closed_ = true;
  if (proxy_) proxy_->stop();
  int prev = -1;
  if (cudaGetDevice(&prev) != cudaSuccess) prev = -1;
  for (auto& l : locals_) {
    l->ready = false;
    if (cudaSetDevice(l->ordinal) != cudaSuccess) continue;
    cudaDeviceSynchronize();  // no kernel of ours may still touch the areas
    // A CUDA graph may replay our launches without the handler: the kernels find kClosed and touch
    // only the local state and the control block, which therefore stay allocated (leaked, small).
    if (l->local != nullptr) {
      const uint32_t one = 1;
      cudaMemcpy(reinterpret_cast<uint32_t*>(l->local + local_layout_.state) + kClosed, &one, sizeof(one),
                 cudaMemcpyHostToDevice);
    }
  }
  if (engine_) engine_->close();  // nothing in flight writes into or reads from the areas any more
  proxy_.reset();
  for (auto& l : locals_) {
    l->recv_region.reset();
    l->send_region.reset();
    if (cudaSetDevice(l->ordinal) != cudaSuccess) continue;
    for (int i = 0; i < proxy::kMaxNodeSize; ++i) {
      if (l->opened_ipc[i]) cudaIpcCloseMemHandle(l->node[i]);
      l->node[i] = nullptr;
      l->opened_ipc[i] = false;
    }
    if (l->recv != nullptr) cudaFree(l->recv);
    if (l->send != nullptr) cudaFree(l->send);
    if (l->aux != nullptr) cudaStreamDestroy(l->aux);
    l->recv = l->send = nullptr;
    l->aux = nullptr;
  }
  if (prev >= 0) cudaSetDevice(prev);
  (void)cudaGetLastError();
}

int32_t ProxyAllToAll::error_code(std::string* message) const {
  for (const auto& l : locals_) {
    if (l->control == nullptr) continue;
    const volatile int32_t* h = reinterpret_cast<const volatile int32_t*>(l->control + control_.kernel_error);
    const int32_t code = h[0];
    if (code != kErrNone) {
      if (message != nullptr) *message = device_error_message(code, h[1], h[2], h[3], h[4]);
      return code;
    }
  }
  if (proxy_) {
    proxy::HostProxy::Failure f = proxy_->failure();
    if (f.code != kErrNone) {
      if (message != nullptr) *message = f.message;
      return f.code;
    }
  }
  return kErrNone;
}

std::vector<uint64_t> ProxyAllToAll::timings(int ordinal, int n) const {
  const Local& l = local_on(ordinal, "timings");
  JG_CHECK_ARG(n >= 0 && n <= kTimingRing, "moe (CUDA): timings: n must be in [0, ", kTimingRing, "], got ", n);
  DeviceGuard guard(ordinal);
  std::vector<uint64_t> ring(4 * static_cast<size_t>(kTimingRing) * 2);
  uint32_t state[kStateWords];
  check_cuda(cudaMemcpy(ring.data(), l.local + local_layout_.timing, ring.size() * 8, cudaMemcpyDeviceToHost),
             "cudaMemcpy (timings)");
  check_cuda(cudaMemcpy(state, l.local + local_layout_.state, sizeof(state), cudaMemcpyDeviceToHost),
             "cudaMemcpy (state)");
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

std::vector<uint32_t> ProxyAllToAll::generations(int ordinal) const {
  const Local& l = local_on(ordinal, "generations");
  DeviceGuard guard(ordinal);
  uint32_t state[kStateWords];
  check_cuda(cudaMemcpy(state, l.local + local_layout_.state, sizeof(state), cudaMemcpyDeviceToHost),
             "cudaMemcpy (state)");
  return {state[kGenDSend], state[kGenDRecv], state[kGenCSend], state[kGenCRecv]};
}

uint64_t ProxyAllToAll::dropped_rows(int ordinal) const {
  const Local& l = local_on(ordinal, "dropped_rows");
  DeviceGuard guard(ordinal);
  uint64_t dropped = 0;
  check_cuda(cudaMemcpy(&dropped, reinterpret_cast<uint32_t*>(l.local + local_layout_.state) + kDropped, sizeof(dropped),
                        cudaMemcpyDeviceToHost),
             "cudaMemcpy (state)");
  return dropped;
}

std::vector<uint64_t> ProxyAllToAll::proxy_posts(int ordinal) const {
  const Local& l = local_on(ordinal, "proxy_posts");
  JG_CHECK_ARG(proxy_ != nullptr, "moe (CUDA, node groups): not finalized, or closed");
  for (size_t i = 0; i < locals_.size(); ++i)
    if (locals_[i].get() == &l) return proxy_->posts(i);
  return {};
}

std::vector<uint64_t> ProxyAllToAll::proxy_bytes(int ordinal) const {
  const Local& l = local_on(ordinal, "proxy_bytes");
  JG_CHECK_ARG(proxy_ != nullptr, "moe (CUDA, node groups): not finalized, or closed");
  for (size_t i = 0; i < locals_.size(); ++i)
    if (locals_[i].get() == &l) return proxy_->bytes(i);
  return {};
}

std::string ProxyAllToAll::describe() const {
  std::string s = str_cat("ProxyAllToAll(", moe::describe(shape_), ", node_size=", options_.node_size, ", engine ",
                          provider(), closed_ ? ", closed" : "", ")\n");
  for (const auto& l : locals_) {
    s += str_cat("rank ", l->rank, " on device ", l->ordinal, ": ");
    if (l->local == nullptr || l->aux == nullptr) {
      s += "not allocated\n";
      continue;
    }
    uint32_t state[kStateWords] = {};
    bool read = false;
    try {
      DeviceGuard guard(l->ordinal);
      read = bounded_copy(state, l->local + local_layout_.state, sizeof(state), l->aux, 1.0);
    } catch (const std::exception&) {
    }
    if (read) {
      s += str_cat("calls completed: dispatch_send ", state[kGenDSend], ", dispatch_recv ", state[kGenDRecv],
                   ", combine_send ", state[kGenCSend], ", combine_recv ", state[kGenCRecv], "; dead ", state[kDead],
                   ", closed ", state[kClosed], "\n");
    } else {
      s += "device state unreadable within 1 s (a kernel of ours still runs?)\n";
    }
  }
  if (proxy_) s += proxy_->describe();
  std::string msg;
  const int32_t code = error_code(&msg);
  s += code == kErrNone ? "no recorded error\n" : str_cat("recorded error ", code, ": ", msg, "\n");
  return s;
}

int ProxyAllToAll::dispatch_send(int ordinal, void* stream, const void* x, const float* x_scale,
                                 const int32_t* indices, const int32_t* bound_m, const int32_t* rank,
                                 uint32_t* send_done) {
  const Local* l = ready_local(ordinal);
  if (l == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  return proxy::launch_dispatch_send(l->view, stream, x, x_scale, indices, bound_m, rank, send_done);
}

int ProxyAllToAll::dispatch_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* rank,
                                 void* expert_x, float* expert_scale, int32_t* expert_counts) {
  const Local* l = ready_local(ordinal);
  if (l == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  return proxy::launch_dispatch_recv(l->view, stream, send_done, rank, expert_x, expert_scale, expert_counts);
}

int ProxyAllToAll::combine_send(int ordinal, void* stream, const void* expert_y, const int32_t* expert_counts,
                                const int32_t* rank, uint32_t* send_done) {
  const Local* l = ready_local(ordinal);
  if (l == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  return proxy::launch_combine_send(l->view, stream, expert_y, expert_counts, rank, send_done);
}

int ProxyAllToAll::combine_recv(int ordinal, void* stream, const uint32_t* send_done, const int32_t* indices,
                                const float* weights, const int32_t* bound_m, const int32_t* rank, void* y) {
  const Local* l = ready_local(ordinal);
  if (l == nullptr) return static_cast<int>(cudaErrorInvalidDevice);
  return proxy::launch_combine_recv(l->view, stream, send_done, indices, weights, bound_m, rank, y);
}

}  // namespace jax_garden::moe
