#include "fabric/transport_ipc.h"

#include <algorithm>
#include <map>
#include <mutex>

#include <unistd.h>

#include "common/error.h"
#include "fabric/fd_broker.h"

namespace jax_garden::fabric {
namespace {

// Process-wide CUDA IPC mappings: a handle may be opened only once per process.
Mutex g_ipc_mu;
std::map<std::pair<uint64_t, std::array<uint8_t, kIpcHandleBytes>>, uint64_t> g_ipc_maps JG_GUARDED_BY(g_ipc_mu);
// Imported VMM ranges, by (owner process nonce, region key): the mapped base and the local devices
// given access. The mapping holds the owner's physical memory; the owner's region table still
// admits every copy (liveness and bounds), as for legacy handles.
struct VmmMapping {
  uint64_t base = 0;
  std::vector<int> devices;
};
std::map<std::pair<uint64_t, uint64_t>, VmmMapping> g_vmm_maps JG_GUARDED_BY(g_ipc_mu);

bool same_process(const MemoryDescriptor& d) { return d.host_id == host_id() && d.process_nonce == process_nonce(); }

// The range of dst's region that a copy covers, [lo, hi).
std::pair<uint64_t, uint64_t> extent(const std::vector<CopySegment>& segments) {
  uint64_t lo = UINT64_MAX, hi = 0;
  for (const auto& s : segments) {
    if (!s.bytes) continue;
    lo = std::min(lo, s.dst);
    hi = std::max(hi, s.dst + s.bytes);
  }
  return lo > hi ? std::make_pair(uint64_t{0}, uint64_t{0}) : std::make_pair(lo, hi);
}

std::pair<uint64_t, uint64_t> extent(const PagedCopy& p) {
  if (p.dst_pages.empty()) return {0, 0};
  uint64_t lo = UINT64_MAX, hi = 0;
  for (uint32_t page : p.dst_pages) {
    lo = std::min(lo, p.dst + uint64_t(page) * p.dst_stride);
    hi = std::max(hi, p.dst + uint64_t(page) * p.dst_stride + p.page_bytes);
  }
  return {lo, hi};
}

}  // namespace

std::string IpcTransport::check_destination(const MemoryDescriptor& dst, uint64_t offset, uint64_t length,
                                            bool* gone) const {
  std::string why;
  *gone = false;
  try {
    if (SharedRegionTable::of_process(dst.process_nonce)->check(dst.region_slot, dst.region_key, dst.base, offset,
                                                                 length, &why, gone))
      return {};
  } catch (const TransferFailed& e) {
    *gone = true;
    return e.what();
  }
  return why;
}

bool IpcTransport::gpu_can_map(const MemoryRegion& src, const MemoryDescriptor& dst) const {
  if (!src.cuda() || dst.kind != MemoryKind::kCuda) return false;
  GpuRuntime& rt = gpu_runtime();
  if (!rt.available()) return false;
  int owner = same_process(dst) ? dst.device : rt.device_of_pci_bus_id(dst.pci_bus_id);
  return owner >= 0 && rt.can_access(src.device(), owner);
}

uint64_t IpcTransport::map(const MemoryDescriptor& dst, int device) {
  if (same_process(dst)) return dst.base;
  JG_CHECK_ARG(dst.has_ipc, "ipc: the destination descriptor carries no CUDA IPC handle");
  if (dst.ipc_kind == IpcKind::kVmm) return map_vmm(dst, device);
  auto key = std::make_pair(dst.process_nonce, dst.ipc_handle);
  MutexLock lk(g_ipc_mu);
  auto it = g_ipc_maps.find(key);
  if (it == g_ipc_maps.end()) it = g_ipc_maps.emplace(key, gpu_runtime().ipc_open(dst.ipc_handle, device)).first;
  return it->second + dst.ipc_offset;
}

uint64_t IpcTransport::map_vmm(const MemoryDescriptor& dst, int device) {
  auto key = std::make_pair(dst.process_nonce, dst.region_key);
  MutexLock lk(g_ipc_mu);
  auto it = g_vmm_maps.find(key);
  if (it == g_vmm_maps.end()) {
    std::string why;
    int fd = FdBroker::fetch(dst.process_nonce, dst.region_key, std::min(ctx_.options.timeout_s, 5.0), &why);
    if (fd < 0) throw TransferFailed(str_cat("ipc: mapping the destination's VMM range: ", why));
    VmmMapping m;
    try {
      m.base = gpu_runtime().vmm_map(fd, dst.ipc_range_bytes, device);
    } catch (...) {
      ::close(fd);
      throw;
    }
    ::close(fd);
    m.devices.push_back(device);
    it = g_vmm_maps.emplace(key, std::move(m)).first;
  } else if (std::find(it->second.devices.begin(), it->second.devices.end(), device) == it->second.devices.end()) {
    gpu_runtime().vmm_grant(it->second.base, dst.ipc_range_bytes, device);
    it->second.devices.push_back(device);
  }
  return it->second.base + dst.ipc_offset;
}

uint64_t IpcTransport::mappings() {
  MutexLock lk(g_ipc_mu);
  return g_ipc_maps.size() + g_vmm_maps.size();
}

void IpcTransport::block(int device) {
  if (device < 0) return;
  if (size_t(device) >= copy_blocked_.size()) copy_blocked_.resize(device + 1, 0);
  copy_blocked_[device] = 1;
}

void IpcTransport::add_to_batch(IpcPart* part, int device, std::vector<CopySegment> segments) {
  batch_.push_back({part, device, std::move(segments)});
}

bool IpcTransport::end_pass() {
  if (batch_.empty()) return false;
  std::vector<BatchEntry> batch;
  batch.swap(batch_);
  std::map<int, std::vector<BatchEntry*>> by_device;
  for (auto& e : batch) by_device[e.device].push_back(&e);
  for (auto& [device, entries] : by_device) {
    std::vector<CopySegment> all;
    for (auto* e : entries) all.insert(all.end(), e->segments.begin(), e->segments.end());
    std::shared_ptr<CopyJob> job = gpu_runtime().copy(device, 0, all);
    for (auto* e : entries) e->part->set_copy(job);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// IpcPart

IpcPart::~IpcPart() { release_admission(); }

void IpcPart::release_admission() {
  if (!table_) return;
  table_->release(spec_.dst->region_slot);
  table_.reset();
}

bool IpcPart::advance() {
  if (finished_) return false;
  IpcTransport& ipc = *ctx_.ipc;
  if (copy_) {
    int dev = job_->src->cuda() ? job_->src->device() : -1;
    if (ipc.blocked(dev)) return false;
    std::string err;
    int r = copy_->poll(&err);
    if (r == 0) {
      ipc.block(dev);
      return false;
    }
    copy_.reset();
    release_admission();  // the copy is over: the owner may deregister now
    if (r < 0) {
      job_->fail(TransferState::Status::kFailed, err);
    } else if (!cancelled_) {
      if (!spec_.has_imm || spec_.imm_count == 0) {
        finish(true, {});
      } else {
        // The copy completed (its event fired): only now may the receiver count the imms.
        imm_in_flight_ = true;
        ctx_.control->queue_imms(spec_.dst, spec_.imm, spec_.imm_count, [this](bool ok, const std::string& error) {
          progress_role.assert_held();  // run by the worker under its lock
          imm_in_flight_ = false;
          if (ok)
            finish(true, {});
          else
            job_->fail(TransferState::Status::kFailed,
                       str_cat("delivering the imms after the IPC copy failed: ", error));
        });
      }
    }
    return true;
  }
  if (cancelled_) {
    if (!idle()) return false;
    finish(false, "cancelled");
    return true;
  }
  if (started_) return false;
  if (start_held()) return false;  // adversarial mode: this copy starts late
  started_ = true;
  const MemoryRegion& src = *job_->src;
  const MemoryDescriptor& dst = *spec_.dst;
  try {
    // Admission by the owner's table: the region is live and the copy stays inside it, and the
    // owner's deregistration waits for this copy.
    auto [lo, hi] = spec_.paged ? extent(spec_.pages) : extent(spec_.segments);
    auto table = SharedRegionTable::of_process(dst.process_nonce);
    std::string why;
    bool gone = false;
    if (!table->acquire(dst.region_slot, dst.region_key, dst.base, lo, hi - lo, &why, &gone)) {
      job_->fail(TransferState::Status::kFailed, str_cat("ipc: ", why));
      return true;
    }
    table_ = std::move(table);
    uint64_t dst_base = ipc.map(dst, src.device());
    if (spec_.paged) {
      PagedCopy pc = spec_.pages;
      pc.src += src.base();
      pc.dst += dst_base;
      copy_ = src.cuda() ? gpu_runtime().paged_copy(src.device(), pc) : host_paged_copy(pc);
    } else {
      std::vector<CopySegment> segs = spec_.segments;
      for (auto& s : segs) {
        s.src += src.base();
        s.dst += dst_base;
      }
      if (src.cuda()) {
        batched_ = true;  // started at the end of this pass with the others
        ipc.add_to_batch(this, src.device(), std::move(segs));
      } else {
        copy_ = host_copy(segs);
      }
    }
  } catch (const std::exception& e) {
    release_admission();
    job_->fail(TransferState::Status::kFailed, str_cat("ipc: ", e.what()));
  }
  return true;
}

}  // namespace jax_garden::fabric
