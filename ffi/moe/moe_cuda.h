// CUDA NVLink MoE dispatch/combine: the context (buffers allocated outside XLA, peer mappings,
// sync flags) and the kernel launchers. Plain C++ (no CUDA headers), so the nanobind bindings
// compile in CPU-only builds too; everything here is defined only when JAX_GARDEN_WITH_CUDA.
//
// Protocol (one rank = one GPU of the expert-parallel group, R <= 8, all on one NVLink node):
//  * every rank owns one "symmetric" buffer with the same layout everywhere, mapped into every
//    peer (peer access in one process, CUDA IPC across processes):
//      flags | route counts [src][L] | route lists [src][L][T*K] | dispatch slots [src][T] |
//      combine slots [T*K] | combine slot generations [T*K]
//  * dispatch_send writes each token once per destination rank (deduplicated) into slot
//    [me][t] of that rank, plus, per destination expert, the stable-sorted list of (t*K+k)
//    routed to it and its count; then a release flag DDATA[me] = generation.
//  * dispatch_recv waits for DDATA from every source, computes segment offsets (capacity M:
//    the tail of a segment that does not fit is dropped and counted), gathers slots into
//    expert_x rows (source rank, then token, then k), remembers row -> (src, t, k), and acks
//    DFREE[me] in every source (the source may reuse our buffer from then on).
//  * combine_send writes expert_y[row] into slot [t*K+k] of the source rank and stamps that
//    slot with the combine generation, then CDATA[me].
//  * combine_recv waits for CDATA from every rank, sums the slots [t*K+0..K) stamped by this
//    combine (ignored or dropped entries are not) in f32 in k order, and acks CFREE[me].
//  Generations live in device memory (advanced by the kernels), so the launches are identical
//  every call and capturable in CUDA graphs. Every wait is bounded by a globaltimer deadline
//  and sets a sticky error (read by the host later) instead of hanging.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace jax_garden::moe_cuda {

inline constexpr int kMaxRanks = 8;
inline constexpr int kThreads = 256;      // threads per block of every kernel
inline constexpr int kChunkBytes = 2048;  // default bytes of a row one warp sends (32 lanes x 4 x 16 B)
inline constexpr int kCombineChunk = 256; // channels of one token handled by one warp in combine_recv
inline constexpr int kTimingRing = 4096;  // per-kernel device timestamps kept (benchmarks)

// Flag arrays at the start of the symmetric buffer, one 128-byte line each, indexed by rank.
enum Flag : int { kFlagDData = 0, kFlagDFree = 1, kFlagCData = 2, kFlagCFree = 3 };
inline constexpr int64_t kFlagsBytes = 4096;

// Words of the per-rank local state (device memory).
enum StateWord : int {
  kGenDSend = 0, kGenDRecv = 1, kGenCSend = 2, kGenCRecv = 3,  // calls completed, per kernel
  kCtrDSend = 4, kCtrDRecv = 5, kCtrCSend = 6, kCtrCRecv = 7,  // blocks finished (last-block)
  kTotalRows = 8,                                              // padded rows of the last dispatch
  kDead = 9,                                                   // a wait timed out: skip peers
  kDropped = 10,                                               // u64 (words 10-11): rows dropped
  kRoutedBm = 12,                                              // bound_m of the last dispatch
  kClosed = 13,                                                // context closed: touch nothing
  kStateWords = 16,
};

// Error codes (sticky; first one wins). a/b are details named in the message.
enum ErrorCode : int32_t {
  kErrNone = 0,
  kErrTimeoutDispatchData = 1,   // a = source rank whose dispatch data never arrived
  kErrTimeoutDispatchFree = 2,   // a = destination rank that never released its buffer
  kErrTimeoutCombineData = 3,    // a = expert rank whose combine data never arrived
  kErrTimeoutCombineFree = 4,    // a = source rank that never released its combine buffer
  kErrRankMismatch = 5,          // a = rank operand, b = rank of this device
  kErrCountsMismatch = 6,        // a = local expert, b = expert_counts[a] given, c = rows received
  kErrPhaseOrder = 7,            // a = call (PhaseCall), b = its calls so far, c = the other half's
  kErrRoutingMismatch = 8,       // a = t*K+k (-1: bound_m), b = value given to combine, c = dispatch's
};

// Which call broke the phase order (kErrPhaseOrder).
enum PhaseCall : int32_t {
  kCallDispatchSend = 0, kCallDispatchRecv = 1, kCallCombineSend = 2, kCallCombineRecv = 3,
  kCallCombineBeforeDispatch = 4,
};

struct Config {
  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  int64_t hidden = 0;
  int64_t max_tokens = 0;
  int64_t max_recv_tokens = 0;
  int64_t num_ranks = 0;
  int64_t dispatch_elem_bytes = 2;  // 2: bf16, 1: float8_e4m3fn
  int64_t scale_cols = 0;           // H / scale_block for fp8, 0 for bf16
  int64_t expert_padding = 1;
  double timeout_s = 30.0;
  int64_t chunk_bytes = kChunkBytes;  // tuning: bytes of a row one warp sends (512, 1024, 2048)
  int64_t blocks_per_sm = 2;          // tuning: blocks per multiprocessor of every kernel (1..2)
};

// Everything a kernel needs, passed by value (fixed per device, so graph replays stay valid).
struct DeviceView {
  int32_t E, K, H, T, M, R, L, S, pad, rank;
  int32_t xbytes;       // bytes of one dispatch row (H * elem)
  int32_t sbytes;       // bytes of one scale row (S * 4)
  int32_t cbytes;       // bytes of one combine row (H * 2)
  int32_t grid;         // blocks of every kernel
  int32_t chunk_bytes;  // bytes of a row one warp sends at a time: 512, 1024 or 2048
  int64_t rec_stride;   // dispatch slot: round16(xbytes) + round16(sbytes)
  int64_t crec_stride;  // combine slot: round16(cbytes)
  int64_t off_counts, off_routes, off_data, off_cdata, off_cgen;  // offsets into the symmetric buffer
  uint64_t timeout_ns;
  char* sym[kMaxRanks];  // every rank's symmetric buffer as mapped on this device
  int32_t* row_map;      // [M]: src * T*K + t*K + k of each gathered row, -1 for padding
  int32_t* kept;         // [L]: rows of each local expert in the last dispatch
  int32_t* routed_idx;   // [T*K]: indices of the last dispatch (combine_recv checks its own)
  uint32_t* state;       // [kStateWords]
  int32_t* err_dev;      // [1] device copy of the sticky error code
  int32_t* err_host;     // [8] mapped pinned host memory: code, a, b, rank, c
  uint64_t* timing;      // [4][kTimingRing][2] kernel start/end (globaltimer ns)
};

// Kernel launchers (moe_kernels.cu). Return a cudaError_t value (0 = success).
int LaunchDispatchSend(const DeviceView& v, void* stream, const void* x, const float* x_scale,
                       const int32_t* indices, const int32_t* bound_m, const int32_t* rank,
                       uint32_t* send_done);
int LaunchDispatchRecv(const DeviceView& v, void* stream, const uint32_t* send_done, const int32_t* rank,
                       void* expert_x, float* expert_scale, int32_t* expert_counts);
int LaunchCombineSend(const DeviceView& v, void* stream, const void* expert_y,
                      const int32_t* expert_counts, const int32_t* rank, uint32_t* send_done);
int LaunchCombineRecv(const DeviceView& v, void* stream, const uint32_t* send_done, const int32_t* indices,
                      const float* weights, const int32_t* bound_m, const int32_t* rank, void* y);
int LaunchTimestamp(void* stream, uint64_t* out);
int LaunchWriteInts(void* stream, int32_t* out, int32_t a, int32_t b);
// Loads every kernel on the current device (lazy module loading must not happen during graph
// capture) and reports registers / local memory (spills) per kernel.
int PreloadKernels(std::string* report);
size_t RecvSharedBytes(const DeviceView& v);

// One rank held by this process.
struct RankState {
  int ordinal = -1;  // CUDA device ordinal (XLA's DeviceOrdinal)
  int rank = -1;
  void* sym = nullptr;          // own symmetric buffer (cudaMalloc)
  void* local = nullptr;        // row_map + state + err_dev + timing (cudaMalloc)
  int32_t* err_host = nullptr;  // cudaHostAlloc(mapped)
  char* peers[kMaxRanks] = {};  // symmetric buffers as mapped here; peers[rank] = sym
  bool opened_ipc[kMaxRanks] = {};
  DeviceView view{};
  bool ready = false;
};

class Context {
 public:
  explicit Context(const Config& cfg);
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  const Config& config() const { return cfg_; }
  int64_t sym_bytes() const { return sym_bytes_; }

  // Allocates the buffers of `rank` on device `ordinal` (zeroed, synchronised).
  void AddRank(int ordinal, int rank);
  // 64-byte cudaIpcMemHandle_t of the symmetric buffer of the rank on `ordinal`.
  std::string IpcHandle(int ordinal) const;
  // Maps peer `peer_rank`: held by this process on `peer_ordinal` (peer access) ...
  void ConnectLocal(int ordinal, int peer_rank, int peer_ordinal);
  // ... or by another process (CUDA IPC handle).
  void ConnectIpc(int ordinal, int peer_rank, const std::string& handle);
  // Checks that every peer is mapped, loads the kernels; returns a resource report.
  std::string Finalize();
  // Waits for every local device (outside jit; before a cross-process close barrier).
  void Synchronize();
  // Waits for the devices, unmaps peers, frees everything. Idempotent.
  void Close();

  // Handler side: the rank state of a device, or nullptr.
  const RankState* Find(int ordinal) const;
  std::vector<int> Ordinals() const;
  // Sticky error of any local rank: 0 if none; else a message naming the values.
  int32_t ErrorCode(std::string* message) const;
  // Timestamps of the last `n` calls of each kernel on `ordinal`: [n][4][2] (ns).
  std::vector<uint64_t> Timings(int ordinal, int n) const;
  // Generations (calls completed) of the four kernels on `ordinal`.
  std::vector<uint32_t> Generations(int ordinal) const;
  // Rows dropped for lack of max_recv_tokens space by the rank on `ordinal`, since creation.
  uint64_t DroppedRows(int ordinal) const;
  // FFI handler invocations so far (a CUDA-graph replay launches our kernels without one).
  uint64_t HandlerCalls() const { return handler_calls_.load(std::memory_order_relaxed); }
  void CountHandlerCall() { handler_calls_.fetch_add(1, std::memory_order_relaxed); }

 private:
  RankState* FindMutable(int ordinal);
  Config cfg_;
  int64_t sym_bytes_ = 0;
  int64_t local_bytes_ = 0;
  DeviceView base_{};
  std::vector<std::unique_ptr<RankState>> ranks_;
  bool closed_ = false;
  std::atomic<uint64_t> handler_calls_{0};
};

std::string ErrorMessage(int32_t code, int32_t a, int32_t b, int32_t rank, int32_t c);

// Process-wide registry: context_id -> context (FFI handlers look contexts up by id).
uint64_t RegisterContext(std::shared_ptr<Context> ctx);
std::shared_ptr<Context> LookupContext(uint64_t id);
void UnregisterContext(uint64_t id);

}  // namespace jax_garden::moe_cuda
