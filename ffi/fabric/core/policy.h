// Pure decisions of the engine, kept free of libfabric and CUDA calls so that they are unit-tested
// on any machine (tests/test_fabric_staging.py, through small bindings):
//   * choose_path: which transport an op toward one destination takes (libfabric RMA, CUDA IPC on
//     one host, or host staging through bounce buffers), given both ends' memory and an override;
//   * plan_registration: how a region is registered with the provider (system memory, FI_HMEM with
//     an iovec, FI_HMEM with a DMA-BUF fd) or whether it must be staged;
//   * plan_stage_chunks: how a staged op's bytes are cut into bounce-buffer chunks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fabric/wire/wire_format.h"

namespace jax_garden::fabric {

// ---- transport path ---------------------------------------------------------------------------

enum class TransferPath : uint8_t { kAuto = 0, kFabric = 1, kIpc = 2, kStaged = 3 };

const char* path_name(TransferPath path);

struct PathQuery {
  TransferPath requested = TransferPath::kAuto;  // kAuto: choose; otherwise forced
  // local source region
  bool src_cuda = false;
  bool src_staged = false;  // not registered with the provider (GPU memory without FI_HMEM, or staged=True)
  // destination descriptor
  bool dst_cuda = false;
  bool dst_staged = false;
  bool dst_has_ipc = false;
  bool dst_mailbox = true;  // the owner engine has an imm mailbox (where same-host copies deliver imms)
  // relation between the two ends
  bool same_host = false;     // equal boot ids
  bool same_process = false;  // equal process nonces (then pointers are valid as they are)
  bool gpu_can_map = false;   // a GPU runtime exists here, the destination GPU is visible and the
                              // source GPU can access it (same device or peer access)
};

struct PathChoice {
  TransferPath path = TransferPath::kFabric;
  bool stage_src = false;  // staged path: the source goes through local pinned bounce buffers
  bool stage_dst = false;  // staged path: the destination is reached through the owner's bounce slots
};

// Auto: CUDA IPC when both regions are CUDA memory on one host and the GPUs can map each other;
// else libfabric RMA when both regions are registered with the provider; else staging, on the side(s)
// that need it. Forced paths that cannot work raise InvalidArgument naming the missing condition.
// path="staged" stages both sides (so host memory exercises the whole protocol); path="ipc" also
// works between host regions of one process (plain memcpy), which the CPU tests use.
PathChoice choose_path(const PathQuery& q);
// Why choose_path(q) gave c, in words (what made the faster paths impossible).
std::string explain_path(const PathQuery& q, const PathChoice& c);

// ---- registration -------------------------------------------------------------------------------

enum class RegistrationMode : uint8_t { kSystem = 0, kHmemIov = 1, kHmemDmabuf = 2, kStaged = 3 };
const char* registration_mode_name(RegistrationMode mode);

struct RegistrationCaps {
  bool provider_hmem = false;   // FI_HMEM in the provider's caps (efa, verbs with GPUDirect)
  bool headers_dmabuf = false;  // built against libfabric headers that define FI_MR_DMABUF (>= 1.20)
  bool runtime_dmabuf = false;  // the loaded libfabric is >= 1.20
  bool kernel_dmabuf = false;   // Linux >= 5.12 (DMA-BUF for device memory)
  bool device_dmabuf = false;   // CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED on the region's GPU
};

inline constexpr uint64_t kFiMrDmabufFlag = 1ULL << 40;  // FI_MR_DMABUF (libfabric >= 1.20)
inline constexpr int kFiHmemSystem = 0;                  // FI_HMEM_SYSTEM
inline constexpr int kFiHmemCuda = 1;                    // FI_HMEM_CUDA

struct RegistrationArgs {
  RegistrationMode mode = RegistrationMode::kSystem;
  int iface = kFiHmemSystem;  // fi_mr_attr.iface
  int device = 0;             // fi_mr_attr.device.cuda
  uint64_t access = 0;        // fi_mr_attr.access
  uint64_t flags = 0;         // fi_mr_regattr flags
  std::string reason;         // why this mode (for errors and tests)
};

// host memory: system registration unless staging was asked for; CUDA memory: FI_HMEM (with a
// DMA-BUF fd when every layer supports it, else an iovec that the provider pins through
// nvidia-peermem), or staged when the provider has no FI_HMEM.
RegistrationArgs plan_registration(MemoryKind kind, int device, bool staged_requested, const RegistrationCaps& caps);

// True when `release` (uname -r, e.g. "5.15.0-91-generic") is at least major.minor.
bool kernel_release_at_least(const std::string& release, int major, int minor);

// ---- staging chunks -----------------------------------------------------------------------------

struct StageSegment {
  uint64_t src_offset = 0, dst_offset = 0, length = 0;
};
struct StageChunk {
  std::vector<StageSegment> segments;  // packed back to back in a bounce buffer
  uint64_t bytes = 0;
};

// Packs segments in order into chunks of at most chunk_bytes and at most max_segments pieces,
// splitting segments that cross a chunk boundary; empty segments are dropped.
std::vector<StageChunk> plan_stage_chunks(const std::vector<StageSegment>& segments, uint64_t chunk_bytes,
                                          size_t max_segments);

}  // namespace jax_garden::fabric
