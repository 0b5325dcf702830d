#include "fabric/core/region.h"

#include "common/error.h"
#include "fabric/core/fd_broker.h"
#include "fabric/core/gpu_runtime.h"
#include "fabric/core/shared_regions.h"
#include "fabric/core/worker.h"

namespace jax_garden::fabric {

MemoryRegion::MemoryRegion(std::weak_ptr<RegionOwner> owner, const RegionOwner* owner_id, Init init)
    : owner_(std::move(owner)), owner_id_(owner_id), init_(std::move(init)) {}

MemoryRegion::~MemoryRegion() {
  if (auto owner = owner_.lock()) owner->release_region(init_.id, std::move(keepalive_));
}

std::shared_ptr<MemoryRegion> RegionTable::add(MemoryRegion::Init init, RegistrationArgs args, int dmabuf_fd,
                                               uint64_t dmabuf_offset, const std::vector<uint64_t>& imm_keys) {
  Entry entry;
  entry.region_key = keys_->next();
  entry.base = init.base;
  entry.length = init.length;
  const uint32_t domains = worker_->num_domains();
  if (args.mode != RegistrationMode::kStaged) {
    ProgressLock pl(*worker_);
    if (worker_->stopped()) throw TransferFailed("register: the engine is closed");
    try {
      for (uint32_t d = 0; d < domains; ++d) {
        entry.regs.push_back(worker_->domain(d).register_memory(reinterpret_cast<void*>(init.base), init.length, args,
                                                                worker_->new_key(), dmabuf_fd, dmabuf_offset));
      }
    } catch (const std::exception& e) {
      for (uint32_t d = 0; d < entry.regs.size(); ++d) worker_->domain(d).unregister(entry.regs[d]);
      entry.regs.clear();
      if (args.mode == RegistrationMode::kSystem) throw;
      // The provider advertised FI_HMEM but cannot pin this GPU memory (no peermem / DMA-BUF):
      // staging always works.
      init.note = str_cat("FI_HMEM registration failed (", e.what(), "); staged instead");
      args.mode = RegistrationMode::kStaged;
    }
  }
  init.mode = args.mode;
  if (init.note.empty()) init.note = args.reason;
  entry.slot = SharedRegionTable::local()->claim(entry.region_key, init.base, init.length);
  MemoryDescriptor& desc = init.descriptor;
  if (desc.has_ipc && desc.ipc_kind == IpcKind::kVmm) {
    // Same-host peers get the range's fd from this process's broker, by region key.
    try {
      FdBroker::add(entry.region_key, gpu_runtime().vmm_export_fd(init.base));
      entry.brokered = true;
    } catch (const std::exception& e) {
      desc.has_ipc = false;
      desc.ipc_kind = IpcKind::kLegacy;
      init.note += str_cat("; no fd export of its VMM range (", e.what(), ")");
    }
  }
  desc.staged = args.mode == RegistrationMode::kStaged;
  desc.region_key = entry.region_key;
  desc.region_slot = entry.slot;
  desc.domains.clear();
  for (uint32_t d = 0; d < domains; ++d) {
    uint64_t key = desc.staged ? 0 : entry.regs[d].key;
    if (!desc.staged) {
      entry.keys.push_back(key);
      init.descs.push_back(entry.regs[d].desc);
    }
    desc.domains.push_back({worker_->endpoint(d), key, imm_keys[d]});
  }
  auto region = std::make_shared<MemoryRegion>(weak_from_this(), this, std::move(init));
  entry.region = region;
  MutexLock lk(mu_);
  if (closed_) {
    if (entry.brokered) FdBroker::remove(entry.region_key);
    throw TransferFailed("register: the engine is closed");
  }
  by_region_key_[entry.region_key] = region->id();
  entries_.emplace(region->id(), std::move(entry));
  return region;
}

void RegionTable::release_region(uint64_t id, std::shared_ptr<void> keepalive) {
  Entry entry;
  {
    MutexLock lk(mu_);
    auto it = entries_.find(id);
    if (it == entries_.end()) {
      // Closed with the engine: nothing is registered any more and nobody can write into it.
      keepalive.reset();
      return;
    }
    entry = std::move(it->second);
    by_region_key_.erase(entry.region_key);
    entries_.erase(it);
  }
  // Same-host writers first (they copy without the provider), then the provider's registrations;
  // the memory itself (keepalive) is released only after both.
  SharedRegionTable::local()->retire(entry.slot, entry.region_key, timeout_s_);
  if (entry.brokered) FdBroker::remove(entry.region_key);
  worker_->unregister(std::move(entry.regs), std::move(keepalive));
}

std::shared_ptr<MemoryRegion> RegionTable::find(uint64_t region_key, uint64_t base, uint64_t length) {
  MutexLock lk(mu_);
  auto k = by_region_key_.find(region_key);
  if (k == by_region_key_.end()) return nullptr;
  const Entry& e = entries_.at(k->second);
  if (e.base != base || e.length != length) return nullptr;
  return e.region.lock();
}

bool RegionTable::is_live(uint64_t region_key, uint64_t key, uint64_t base, uint64_t length) {
  MutexLock lk(mu_);
  auto k = by_region_key_.find(region_key);
  if (k == by_region_key_.end()) return false;
  const Entry& e = entries_.at(k->second);
  if (e.base != base || e.length != length) return false;
  if (key == 0 || e.keys.empty()) return true;
  for (uint64_t ek : e.keys)
    if (ek == key) return true;
  return false;
}

void RegionTable::close_all() {
  std::unordered_map<uint64_t, Entry> entries;
  {
    MutexLock lk(mu_);
    closed_ = true;
    entries.swap(entries_);
    by_region_key_.clear();
  }
  for (auto& [id, e] : entries) {
    SharedRegionTable::local()->retire(e.slot, e.region_key, timeout_s_);
    if (e.brokered) FdBroker::remove(e.region_key);
  }
  ProgressLock pl(*worker_);
  for (auto& [id, e] : entries)
    for (uint32_t d = 0; d < e.regs.size(); ++d) worker_->domain(d).unregister(e.regs[d]);
}

}  // namespace jax_garden::fabric
