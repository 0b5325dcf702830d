// The GPU side of MoE across node groups (docs/moe-ffi.md, "Host proxy for GPUs"): what the CUDA
// kernels (proxy_kernels.cu), the host proxy thread (host_proxy.h) and the context
// (proxy_all_to_all.h) share. Plain C++ (no CUDA headers), so the proxy and its CPU tests build
// without CUDA.
//
// The messages are the CPU inter-node protocol's, unchanged (internode_protocol.h: headers,
// layouts, imm values, counting); only who packs and places them differs:
//  * every rank owns one GPU "receive area" = internode::RegionLayout's receive region (abort
//    mailboxes | combine area | dispatch slots [R]) followed by the sync flags below. Ranks of
//    other node groups write into it through the TransferEngine (it is registered with cuda=true:
//    ipc, FI_HMEM or staged, whichever path the engine picks); ranks of the same node group (which
//    map it with CUDA IPC or peer access) write the same messages into it with plain stores and
//    then raise a sync flag. Receive kernels therefore read every message from their own area.
//  * every rank owns one GPU "send area" = the send region's layout: messages to ranks of other
//    node groups are packed there, and the host proxy posts them (a one-target scatter cut by
//    bytes, as the CPU path posts them) once the kernel published a ready record.
//  * a host-mapped "control block" per rank (cudaHostAlloc mapped; the proxy reads it without a
//    PCIe read, kernels write it with system-scope stores): ready records (kernel -> proxy),
//    arrival generations (proxy -> kernels: every imm of a message counted), the kernels' sticky
//    error word, an abort word (proxy -> kernels: stop waiting), and progress words (debugging).
//
// Waits: a kernel waits for a peer of its node on a sync flag in its own receive area, and for a
// peer of another node on an arrival word in the control block; both hold the number of
// generations completed, so the launches are identical every call (CUDA-graph safe). Every wait
// has a globaltimer deadline, backs off with __nanosleep (kernels of processes sharing one GPU are
// time-sliced) and gives up when the abort word is set.
#pragma once

#include <cstdint>

#include "moe/internode_protocol.h"
#include "moe/layout.h"
#include "moe/nvlink_protocol.h"

namespace jax_garden::moe::proxy {

inline constexpr int kThreads = 256;         // threads per block of every proxy kernel
inline constexpr int kMaxNodeSize = moe::kMaxRanks;  // ranks of one node group (one NVLink domain)
inline constexpr int kMaxProxyRanks = 1024;         // ranks of one AllToAll through the proxy
inline constexpr int kKinds = 4;             // internode::Kind kDispatch .. kCombineFree

// Sync flags at the end of a receive area: flag array [which][writer rank], one uint32 each,
// holding the generations that writer completed toward this rank.
enum SyncFlag : int {
  kSyncDispatchData = 0,  // the writer placed its dispatch message in our slot [writer]
  kSyncDispatchFree = 1,  // the writer consumed our dispatch message: we may write its slot again
  kSyncCombineData = 2,   // the writer placed its combine message in our combine area
  kSyncCombineFree = 3,   // the writer consumed our combine message
};

// ---- the host-mapped control block ----------------------------------------------------------

// Kernel -> proxy: "message `generation` of this kind to this peer is packed in the send area".
// Fields first, then the generation (after a system-scope fence): the proxy reads the generation
// with acquire semantics, then the rest.
struct ReadyRecord {
  uint32_t generation;
  uint32_t reserved;
  int64_t bytes;       // message length (0 for a free ack)
  int64_t src_offset;  // in the sender's send area
  int64_t dst_offset;  // in the receiver's receive area
};
static_assert(sizeof(ReadyRecord) == 32);

// The kernels of one phase, for the progress words (debugging a stall).
enum ProxyKernel : int {
  kKDispatchPlan = 0, kKDispatchPack = 1, kKDispatchWait = 2, kKDispatchRoute = 3, kKDispatchCopy = 4,
  kKCombinePlan = 5, kKCombinePack = 6, kKCombineWait = 7, kKCombineRoute = 8, kKCombineSum = 9,
  kProxyKernels = 10,
};
const char* proxy_kernel_name(int kernel);

struct ControlLayout {
  int64_t abort = 0;          // uint32: non-zero = the proxy saw a failure; kernels stop waiting
  int64_t kernel_error = 64;  // int32[8]: code, a, b, rank, c (code written last), as nvlink's err_host
  int64_t progress = 128;     // uint32[kProxyKernels][2]: generation entered, generation left
  int64_t ready = 256;        // ReadyRecord[kKinds][R]
  int64_t arrived = 0;        // uint32[kKinds][R]: generations of that kind fully arrived from each peer
  int64_t bytes = 0;
};
ControlLayout control_layout(int32_t num_ranks);

// ---- the receive and send areas --------------------------------------------------------------

struct AreaLayout {
  internode::RegionLayout regions;  // offsets of the CPU protocol's regions
  int64_t sync = 0;                 // receive area: flags [4][R] uint32
  int64_t sync_stride = 0;          // bytes between two flag arrays
  int64_t recv_alloc = 0;           // receive area bytes (regions + flags); regions.recv_bytes registered
  int64_t send_alloc = 0;           // send area bytes
};
AreaLayout area_layout(const MoeShape& shape, DType dispatch_dtype);

// ---- what the kernels read (passed by value; fixed per device so graph replays stay valid) ----

struct ProxyView {
  int32_t E, K, H, T, M, R, L, S, pad, rank;
  int32_t node_first, node_size;  // this rank's node group: ranks [node_first, node_first + node_size)
  int32_t xbytes, sbytes, cbytes; // one dispatch row, its scales, one combine row
  int32_t grid;                   // blocks of the row-parallel kernels
  int64_t slot_bytes;             // a dispatch slot (header + T tokens)
  int64_t chb;                    // a combine header (CombineHeader + kept[L], aligned)
  int64_t recv_combine, recv_combine_bytes, recv_dispatch, sync, sync_stride;  // receive area
  int64_t send_combine, send_dispatch;                                          // send area
  uint64_t timeout_ns;
  char* node_recv[kMaxNodeSize];  // receive areas of the node group's ranks, as mapped on this device
  char* recv;                     // ours (= node_recv[rank - node_first])
  char* send;                     // our send area

  // device memory of this rank (zeroed at creation)
  uint32_t* state;        // StateWord (nvlink_protocol.h) + kSentBound
  int32_t* err_dev;       // device copy of the sticky error code
  uint64_t* timing;       // [4][kTimingRing][2] start/end of each phase (globaltimer ns)
  int32_t* sent_idx;      // [T*K] indices of the last dispatch_send
  int32_t* routed_idx;    // [T*K] indices of the dispatch combine undoes
  int32_t* tok_count;     // [R] tokens of the last dispatch_send to each rank
  int32_t* tok_list;      // [R][T] those tokens, ascending
  int32_t* sent_entries;  // [R] (t, k) entries of the last dispatch_send routed to each rank
  int64_t* sent_offset;   // [R] where each rank's combine message goes in our combine area
  int32_t* routed_entries;  // [R] the same two, of the dispatch combine undoes
  int64_t* routed_offset;   // [R]
  int32_t* msg_tokens;      // [R] tokens in each source's last dispatch message
  int64_t* combine_offset_at;  // [R] where our combine message goes in each source's combine area
  int32_t* combine_rows_at;    // [R] rows each source reserved for us there
  int32_t* counts;        // [R][L] rows from each source per local expert
  int32_t* kept_from;     // [R][L] of which were kept
  int32_t* kept;          // [L] rows kept per local expert (expert_counts)
  int32_t* row_of_entry;  // [R][T*K] expert_x row of entry (message index i, k) of each source, or -1
  int32_t* row_src;       // [M] source * T + message index of each row, or -1 (padding)
  int32_t* pack_list;     // [R][T*K] rows to send back to each source, in its (t, k) order
  int32_t* pack_rows;     // [R]
  int32_t* kept_by;       // [R][L] rows of ours each expert rank kept per local expert (combine)
  int32_t* rowpos;        // [T*K] packed row of each of our entries in its expert rank's message, or -1
  uint8_t* keptflag;      // [T*K] our entry was kept by its expert rank

  // host-mapped control block (device addresses of it)
  uint32_t* abort;
  int32_t* err_host;
  uint32_t* progress;
  ReadyRecord* ready;
  uint32_t* arrived;
};

inline constexpr int kSentBound = 14;  // state word: clamped bound_m of the last dispatch_send

// Device scratch of one rank (the ProxyView arrays), offsets from the start of one allocation.
struct LocalLayout {
  int64_t state, err_dev, timing, sent_idx, routed_idx, tok_count, tok_list, sent_entries, sent_offset,
      routed_entries, routed_offset, msg_tokens, combine_offset_at, combine_rows_at, counts, kept_from, kept,
      row_of_entry, row_src, pack_list, pack_rows, kept_by, rowpos, keptflag, bytes;
};
LocalLayout local_layout(const MoeShape& shape);

}  // namespace jax_garden::moe::proxy
