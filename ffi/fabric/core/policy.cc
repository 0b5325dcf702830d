#include "fabric/core/policy.h"

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>

#include <cstdio>

#include "common/error.h"

namespace jax_garden::fabric {

static_assert(kFiHmemSystem == FI_HMEM_SYSTEM && kFiHmemCuda == FI_HMEM_CUDA, "libfabric hmem iface values");
#ifdef FI_MR_DMABUF
static_assert(kFiMrDmabufFlag == FI_MR_DMABUF, "FI_MR_DMABUF value");
#endif


const char* path_name(TransferPath path) {
  switch (path) {
    case TransferPath::kAuto: return "auto";
    case TransferPath::kFabric: return "fabric";
    case TransferPath::kIpc: return "ipc";
    case TransferPath::kStaged: return "staged";
  }
  return "?";
}

namespace {

// Empty when the IPC path can serve the query, else why not.
std::string ipc_blocker(const PathQuery& q) {
  if (!q.same_host) return "the destination is on another host";
  if (q.src_cuda != q.dst_cuda) return "one region is GPU memory and the other host memory";
  if (!q.src_cuda && !q.same_process) return "host regions can be mapped only inside one process";
  if (q.src_cuda && !q.same_process && !q.dst_has_ipc)
    return "the destination descriptor carries no CUDA IPC handle (its memory is not exportable, e.g. a cuda_async "
           "pool, or its owner turned VMM IPC off with JAX_GARDEN_VMM_IPC=0; the owner's "
           "MemoryRegion.registration_note says which)";
  if (q.src_cuda && !q.gpu_can_map)
    return "this process cannot map the destination GPU (not visible here, or no peer access)";
  if (!q.dst_mailbox) return "the destination engine has no imm mailbox (no shared memory there)";
  return "";
}

std::string fabric_blocker(const PathQuery& q) {
  if (q.src_staged) return "the source region is not registered with the provider (staged)";
  if (q.dst_staged) return "the destination region is not registered with its provider (staged)";
  return "";
}

}  // namespace

PathChoice choose_path(const PathQuery& q) {
  PathChoice c;
  switch (q.requested) {
    case TransferPath::kIpc: {
      std::string why = ipc_blocker(q);
      JG_CHECK_ARG(why.empty(), "path='ipc' is not possible: ", why);
      c.path = TransferPath::kIpc;
      return c;
    }
    case TransferPath::kFabric: {
      std::string why = fabric_blocker(q);
      JG_CHECK_ARG(why.empty(), "path='fabric' is not possible: ", why);
      c.path = TransferPath::kFabric;
      return c;
    }
    case TransferPath::kStaged:
      c.path = TransferPath::kStaged;
      c.stage_src = c.stage_dst = true;
      return c;
    case TransferPath::kAuto:
      break;
  }
  if (q.src_cuda && q.dst_cuda && ipc_blocker(q).empty()) {
    c.path = TransferPath::kIpc;
  } else if (fabric_blocker(q).empty()) {
    c.path = TransferPath::kFabric;
  } else {
    c.path = TransferPath::kStaged;
    c.stage_src = q.src_staged;
    c.stage_dst = q.dst_staged;
  }
  return c;
}

std::string explain_path(const PathQuery& q, const PathChoice& c) {
  if (q.requested != TransferPath::kAuto) return str_cat(path_name(c.path), ": requested");
  switch (c.path) {
    case TransferPath::kIpc:
      return q.src_cuda ? "ipc: GPU memory on both sides, on one host, and this process maps the destination's GPU"
                        : "ipc: host memory of one process";
    case TransferPath::kFabric:
      return q.src_cuda && q.dst_cuda ? str_cat("fabric: both regions registered with the provider; no ipc (",
                                                ipc_blocker(q), ")")
                                      : "fabric: both regions registered with the provider";
    case TransferPath::kStaged:
      break;
    case TransferPath::kAuto:
      return "?";
  }
  std::string ipc = q.src_cuda && q.dst_cuda ? ipc_blocker(q) : "one region is host memory";
  return str_cat("staged: no ipc (", ipc, "); no fabric (", fabric_blocker(q), ")");
}

const char* registration_mode_name(RegistrationMode mode) {
  switch (mode) {
    case RegistrationMode::kSystem: return "system";
    case RegistrationMode::kHmemIov: return "hmem_iov";
    case RegistrationMode::kHmemDmabuf: return "hmem_dmabuf";
    case RegistrationMode::kStaged: return "staged";
  }
  return "?";
}

RegistrationArgs plan_registration(MemoryKind kind, int device, bool staged_requested, const RegistrationCaps& caps) {
  RegistrationArgs a;
  // Same access set for every mode: local source, remote target, control messages.
  a.access = FI_WRITE | FI_REMOTE_WRITE | FI_READ | FI_REMOTE_READ | FI_SEND | FI_RECV;
  if (staged_requested) {
    a.mode = RegistrationMode::kStaged;
    a.reason = "staging was requested";
    return a;
  }
  if (kind == MemoryKind::kHost) {
    a.mode = RegistrationMode::kSystem;
    a.reason = "host memory";
    return a;
  }
  JG_CHECK_ARG(device >= 0, "plan_registration: CUDA memory needs a device ordinal >= 0, got ", device);
  if (!caps.provider_hmem) {
    a.mode = RegistrationMode::kStaged;
    a.reason = "the provider has no FI_HMEM: GPU memory is staged through pinned host buffers";
    return a;
  }
  a.iface = kFiHmemCuda;
  a.device = device;
  if (caps.headers_dmabuf && caps.runtime_dmabuf && caps.kernel_dmabuf && caps.device_dmabuf) {
    a.mode = RegistrationMode::kHmemDmabuf;
    a.flags = kFiMrDmabufFlag;
    a.reason = "FI_HMEM_CUDA with a DMA-BUF fd";
    return a;
  }
  a.mode = RegistrationMode::kHmemIov;
  a.reason = !caps.headers_dmabuf ? "FI_HMEM_CUDA iovec (built against libfabric < 1.20: no FI_MR_DMABUF)"
             : !caps.runtime_dmabuf ? "FI_HMEM_CUDA iovec (libfabric runtime < 1.20)"
             : !caps.kernel_dmabuf  ? "FI_HMEM_CUDA iovec (kernel < 5.12 has no DMA-BUF for device memory)"
                                    : "FI_HMEM_CUDA iovec (the GPU does not export DMA-BUF)";
  return a;
}

bool kernel_release_at_least(const std::string& release, int major, int minor) {
  int ma = 0, mi = 0;
  if (std::sscanf(release.c_str(), "%d.%d", &ma, &mi) != 2) return false;
  return ma > major || (ma == major && mi >= minor);
}

std::vector<StageChunk> plan_stage_chunks(const std::vector<StageSegment>& segments, uint64_t chunk_bytes,
                                          size_t max_segments) {
  JG_CHECK_ARG(chunk_bytes > 0, "plan_stage_chunks: chunk_bytes must be > 0");
  JG_CHECK_ARG(max_segments > 0, "plan_stage_chunks: max_segments must be > 0");
  std::vector<StageChunk> chunks;
  StageChunk cur;
  auto flush = [&]() {
    if (!cur.segments.empty()) chunks.push_back(std::move(cur));
    cur = StageChunk{};
  };
  for (const auto& s : segments) {
    uint64_t done = 0;
    while (done < s.length) {
      if (cur.bytes == chunk_bytes || cur.segments.size() == max_segments) flush();
      uint64_t take = std::min(s.length - done, chunk_bytes - cur.bytes);
      cur.segments.push_back({s.src_offset + done, s.dst_offset + done, take});
      cur.bytes += take;
      done += take;
    }
  }
  flush();
  return chunks;
}

}  // namespace jax_garden::fabric
