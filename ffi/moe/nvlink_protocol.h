// The NVLink MoE dispatch/combine protocol: the symmetric-buffer layout, the flags and state words
// the kernels synchronise on, the sticky error codes they record, and DeviceView (everything a
// kernel reads, passed by value). Plain C++ (no CUDA headers): the host context
// (nvlink_all_to_all_cuda.cc), the kernels (nvlink_kernels.cu) and the bindings (which export the
// error codes to Python) all include it, in CPU-only builds too.
//
// Protocol (one rank = one GPU of the expert-parallel group, R <= 8, all on one NVLink node):
//  * every rank owns one "symmetric" buffer with the same layout everywhere, mapped into every
//    peer (peer access in one process, CUDA IPC across processes):
//      flags and arrival counters | route counts [src][L] | route lists [src][L][T*K] |
//      dispatch slots [src][T] | combine slots [T*K] | combine slot generations [T*K]
//  * dispatch_send writes each token once per destination rank (deduplicated) into slot
//    [me][t] of that rank, plus, per destination expert, the stable-sorted list of (t*K+k)
//    routed to it and its count; then a release flag DDATA[me] = generation (SyncMode kFlags,
//    kLegacy: the kernel's last block), or, kArrive, each block adds its share of kArrivalUnit to
//    the arrival counter DDATA[me] with a release reduction. Below, "DDATA" etc. is whichever word
//    the mode uses.
//  * dispatch_recv waits for DDATA from every source, computes segment offsets (layout.h; the
//    tail of a segment that does not fit in M is dropped and counted), gathers slots into
//    expert_x rows (source rank, then token, then k), remembers row -> (src, t, k), and acks
//    DFREE[me] in every source (the source may reuse our buffer from then on).
//  * combine_send writes expert_y[row] into slot [t*K+k] of the source rank and stamps that
//    slot with the combine generation, then CDATA[me].
//  * combine_recv waits for CDATA from every rank, sums the slots [t*K+0..K) stamped by this
//    combine (ignored or dropped entries are not) in f32 in k order, and acks CFREE[me].
//  * kArrive only: dispatch() and combine() may run as one kernel each (send work, arrivals,
//    wait, receive work; every block resident). The fused combine sends no row to itself: it
//    reads the rows it kept for itself from expert_y in place (local_row, written by every
//    dispatch_recv) and waits for the other ranks only; it still adds its arrivals to its own
//    counters, so fused and split calls mix freely on one context.
//  Generations live in device memory (advanced by the kernels), so the launches are identical
//  every call and capturable in CUDA graphs. Every wait is bounded by a globaltimer deadline
//  and sets a sticky error (read by the host later) instead of hanging.
#pragma once

#include <cstdint>
#include <string>

namespace jax_garden::moe {

inline constexpr int kMaxRanks = 8;
inline constexpr int kThreads = 256;         // threads per block of every kernel
inline constexpr int kDefaultChunkBytes = 2048;  // bytes of a row one warp sends (32 lanes x 4 x 16 B)
inline constexpr int kCombineChunk = 256;    // channels of one token handled by one warp in combine_recv
inline constexpr int kTimingRing = 4096;     // per-kernel device timestamps kept (benchmarks)
// Device timestamps (globaltimer ns) per kernel and call, by block 0 unless said otherwise.
enum Stamp : int {
  kStampStart = 0,   // after the prologue's loads
  kStampEnd = 1,     // the last block, after its block count
  kStampEntry = 2,   // the kernel's first instruction (launch-to-launch = entry - previous entry)
  kStampWaited = 3,  // the peers' data/free words reached (block 0)
  kStampBody = 4,    // block 0's share of the work done, before its epilogue
  kStampLast = 5,    // the last block, just counted in
  kStamps = 8,
};

// Flag arrays at the start of the symmetric buffer, one 128-byte line each, indexed by rank.
enum Flag : int { kFlagDData = 0, kFlagDFree = 1, kFlagCData = 2, kFlagCFree = 3 };
// Arrival counters (SyncMode::kArrive), the lines after the flags: line kArrivalLine + Flag, indexed
// by the source rank. Every call of a kernel adds kArrivalUnit in total to each peer's counter (one
// release reduction per block, the first block adding the remainder), so a receiver waits for
// generation g with `counter >= g * kArrivalUnit` whatever grid, or fused or split kernel, the
// sender used.
inline constexpr int kArrivalLine = 4;
inline constexpr uint32_t kArrivalUnit = 1u << 16;
inline constexpr int64_t kFlagsBytes = 4096;

// How the kernels of one call synchronise with each other and with the peers (one per context,
// the same on every rank):
//  * kLegacy: the first version (every thread fences at system scope before a last-block count,
//    every kernel launches blocks_per_sm x SMs blocks; the last block publishes a flag);
//  * kFlags: one system fence per block before the last-block count, grids sized to the static
//    work, the last block publishes the flag (fence, count, fence, release store in a row);
//  * kArrive: every block releases its own arrival into each peer's counter (one release
//    reduction, no count on the peers' critical path); the last-block count only advances the
//    local generation. Needed by the fused kernels (one kernel per dispatch / combine).
enum class SyncMode : int32_t { kLegacy = 0, kFlags = 1, kArrive = 2 };

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

// Sticky error codes the kernels record (first one wins; exported to Python as
// `_jax_garden.moe.DeviceError`). a, b, c are the details device_error_message names.
enum DeviceError : int32_t {
  kErrNone = 0,
  kErrTimeoutDispatchData = 1,   // a = source rank whose dispatch data never arrived
  kErrTimeoutDispatchFree = 2,   // a = destination rank that never released its buffer
  kErrTimeoutCombineData = 3,    // a = expert rank whose combine data never arrived
  kErrTimeoutCombineFree = 4,    // a = source rank that never released its combine buffer
  kErrRankMismatch = 5,          // a = rank operand, b = rank of this device
  kErrCountsMismatch = 6,        // a = local expert, b = expert_counts[a] given, c = rows received
  kErrPhaseOrder = 7,            // a = call (PhaseCall), b = its calls so far, c = the other half's
  kErrRoutingMismatch = 8,       // a = t*K+k (-1: bound_m), b = value given to combine, c = dispatch's
  // Node groups through the host proxy (proxy_protocol.h):
  kErrMalformedMessage = 9,      // a = rank that sent it, b = MessageField that is wrong, c = its value
  kErrPeerFailed = 10,           // a = rank of another node that reported a failure (text: the proxy's)
  kErrPeerTimedOut = 11,         // a = rank of another node whose wait ran out of time (text: the proxy's)
  kErrTransferFailed = 12,       // a = rank the engine could not write to (text: the proxy's)
  kErrProxyProtocol = 13,        // a = peer, b = kind, c = generation: a ready record out of sequence
};

// Which field of a received message is wrong (kErrMalformedMessage, b).
enum MessageField : int32_t {
  kFieldMagic = 0, kFieldGeneration = 1, kFieldSource = 2, kFieldTokens = 3, kFieldCombineRows = 4,
  kFieldCombineOffset = 5, kFieldBoundM = 6, kFieldTokenIds = 7, kFieldRows = 8, kFieldKept = 9,
  kFieldDispatchGeneration = 10,
};

// Which call broke the phase order (kErrPhaseOrder).
enum PhaseCall : int32_t {
  kCallDispatchSend = 0, kCallDispatchRecv = 1, kCallCombineSend = 2, kCallCombineRecv = 3,
  kCallCombineBeforeDispatch = 4,
};

// True for the codes that are waits which ran out of time (a peer that never arrived), here or,
// reported through the host proxy, in another node.
bool is_timeout_error(int32_t code);
// The message of a recorded error, naming the rank, the peer and the values.
std::string device_error_message(int32_t code, int32_t a, int32_t b, int32_t rank, int32_t c);

// Everything a kernel needs, passed by value (fixed per device, so graph replays stay valid).
// The shape fields are MoeShape's (make_device_view in the context fills them), as int32 for the
// kernels' index arithmetic.
struct DeviceView {
  int32_t E, K, H, T, M, R, L, S, pad, rank;
  int32_t xbytes;       // bytes of one dispatch row (H * elem)
  int32_t sbytes;       // bytes of one scale row (S * 4)
  int32_t cbytes;       // bytes of one combine row (H * 2)
  int32_t grid;         // blocks of every kernel (legacy sync) or the most any kernel uses
  int32_t grid_dsend, grid_drecv, grid_csend, grid_crecv;  // blocks of each kernel (sized to its static work)
  int32_t grid_dfused, grid_cfused;  // blocks of the fused kernels (all resident at once); 0: not fused
  int32_t sync;         // SyncMode
  int32_t chunk_bytes;  // bytes of a row one warp sends at a time: 512, 1024 or 2048
  int64_t rec_stride;   // dispatch slot: round16(xbytes) + round16(sbytes)
  int64_t crec_stride;  // combine slot: round16(cbytes)
  int64_t off_counts, off_routes, off_data, off_cdata, off_cgen;  // offsets into the symmetric buffer
  uint64_t timeout_ns;
  char* sym[kMaxRanks];  // every rank's symmetric buffer as mapped on this device
  int32_t* row_map;      // [M]: src * T*K + t*K + k of each gathered row, -1 for padding
  int32_t* kept;         // [L]: rows of each local expert in the last dispatch
  int32_t* routed_idx;   // [T*K]: indices of the last dispatch (combine_recv checks its own)
  uint64_t* local_row;   // [T*K]: (dispatch generation << 32) | expert_x row of each entry this rank
                         // kept for itself: the fused combine reads those rows from expert_y in place
  uint32_t* state;       // [kStateWords]
  int32_t* err_dev;      // [1] device copy of the sticky error code
  int32_t* err_host;     // [8] mapped pinned host memory: code, a, b, rank, c
  uint64_t* timing;      // [4][kTimingRing][kStamps] (Stamp, globaltimer ns)
};

}  // namespace jax_garden::moe
