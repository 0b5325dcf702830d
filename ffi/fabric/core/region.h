// Registered memory: MemoryRegion (what a caller holds) and RegionTable (an engine's live regions:
// their provider registrations, random keys and shared-table slots, and the lookups that peers'
// staged transfers and failure queries need).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/thread_annotations.h"
#include "fabric/core/domain.h"
#include "fabric/core/keys.h"
#include "fabric/core/policy.h"
#include "fabric/wire/wire_format.h"

namespace jax_garden::fabric {

class Worker;

// Who deregisters a region when its last holder drops it (the engine's RegionTable).
class RegionOwner {
 public:
  virtual ~RegionOwner() = default;
  virtual void release_region(uint64_t id, std::shared_ptr<void> keepalive) = 0;
};

// A registered local region: per domain an MR handle (none for staged regions, which the provider
// cannot reach: writes from and to them go through bounce buffers). enable_shared_from_this: the
// bindings hand the engine this C++ reference (not one owning the Python object, whose release
// would need the GIL on whichever engine thread drops it last).
class MemoryRegion : public std::enable_shared_from_this<MemoryRegion> {
 public:
  struct Init {
    uint64_t id = 0, base = 0, length = 0;
    MemoryDescriptor descriptor;
    std::vector<void*> descs;  // per-domain local descriptors (empty: staged)
    RegistrationMode mode = RegistrationMode::kSystem;
    std::string note;
  };
  MemoryRegion(std::weak_ptr<RegionOwner> owner, const RegionOwner* owner_id, Init init);
  ~MemoryRegion();  // deregisters (asynchronously); the keepalive outlives the registration
  MemoryRegion(const MemoryRegion&) = delete;
  MemoryRegion& operator=(const MemoryRegion&) = delete;

  uint64_t id() const { return init_.id; }
  bool registered_with(const RegionOwner* owner) const { return owner_id_ == owner; }
  uint64_t base() const { return init_.base; }
  uint64_t length() const { return init_.length; }
  const MemoryDescriptor& descriptor() const { return init_.descriptor; }
  void* desc(uint32_t domain) const { return init_.descs.empty() ? nullptr : init_.descs[domain]; }
  bool cuda() const { return init_.descriptor.kind == MemoryKind::kCuda; }
  bool staged() const { return init_.descriptor.staged; }
  int device() const { return init_.descriptor.device; }
  RegistrationMode mode() const { return init_.mode; }
  const std::string& registration_note() const { return init_.note; }
  // What keeps the memory itself alive (e.g. the Python buffer): released only once the provider
  // and same-host writers can no longer write into it.
  void set_keepalive(std::shared_ptr<void> keepalive) { keepalive_ = std::move(keepalive); }

 private:
  std::weak_ptr<RegionOwner> owner_;
  const RegionOwner* owner_id_;  // identity only (never dereferenced)
  Init init_;
  std::shared_ptr<void> keepalive_;
};

class RegionTable final : public RegionOwner, public std::enable_shared_from_this<RegionTable> {
 public:
  RegionTable(std::shared_ptr<Worker> worker, KeyAllocator* keys, double timeout_s)
      : worker_(std::move(worker)), keys_(keys), timeout_s_(timeout_s) {}

  // Registers on every domain per `args` (no provider registration for kStaged), claims a slot of
  // the process's shared region table, fills the descriptor's keys and returns the region. Falls
  // back to staging when FI_HMEM registration fails (the reason lands in the region's note).
  std::shared_ptr<MemoryRegion> add(MemoryRegion::Init init, RegistrationArgs args, int dmabuf_fd,
                                    uint64_t dmabuf_offset, const std::vector<uint64_t>& imm_keys) JG_EXCLUDES(mu_);
  void release_region(uint64_t id, std::shared_ptr<void> keepalive) override JG_EXCLUDES(mu_);

  // A live region with this region key and exactly these bounds (the target of a staged transfer).
  std::shared_ptr<MemoryRegion> find(uint64_t region_key, uint64_t base, uint64_t length) JG_EXCLUDES(mu_);
  // Is there a live region with this region key, provider key (0: any) and bounds? (failure queries)
  bool is_live(uint64_t region_key, uint64_t key, uint64_t base, uint64_t length) JG_EXCLUDES(mu_);
  // Engine close: unregister everything (the domains are still open), retire the shared slots.
  void close_all() JG_EXCLUDES(mu_);

 private:
  struct Entry {
    std::weak_ptr<MemoryRegion> region;
    uint64_t region_key = 0;
    std::vector<uint64_t> keys;  // provider keys per domain (empty: staged)
    uint64_t base = 0, length = 0;
    std::vector<MemoryRegistration> regs;
    uint32_t slot = 0xFFFFFFFFu;
    bool brokered = false;  // its VMM range's fd is served by the FdBroker
  };
  std::shared_ptr<Worker> worker_;
  KeyAllocator* const keys_;
  const double timeout_s_;
  Mutex mu_;
  std::unordered_map<uint64_t, Entry> entries_ JG_GUARDED_BY(mu_);            // by region id
  std::unordered_map<uint64_t, uint64_t> by_region_key_ JG_GUARDED_BY(mu_);  // region key -> id
  bool closed_ JG_GUARDED_BY(mu_) = false;
};

}  // namespace jax_garden::fabric
