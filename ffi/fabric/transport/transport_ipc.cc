#include "fabric/transport/transport_ipc.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <thread>

#include <unistd.h>

#include "common/error.h"
#include "fabric/core/adversary.h"
#include "fabric/core/fd_broker.h"

namespace jax_garden::fabric {
namespace {

// Process-wide CUDA IPC mappings: a handle may be opened only once per process. Each remembers the
// owner's regions it served, so that a mapping whose regions are all gone can be closed before the
// owner's next handle is opened (see close_dead_mappings).
struct LegacyMapping {
  uint64_t base = 0;
  struct Region {
    uint32_t slot;
    uint64_t key, base;
  };
  std::vector<Region> regions;
};
Mutex g_ipc_mu;
std::map<std::pair<uint64_t, std::array<uint8_t, kIpcHandleBytes>>, LegacyMapping> g_ipc_maps JG_GUARDED_BY(g_ipc_mu);

// Whether any region that `m` served is still registered by its owner (false once the owner is gone).
bool any_region_live(uint64_t owner, const LegacyMapping& m) {
  std::shared_ptr<SharedRegionTable> table;
  try {
    table = SharedRegionTable::of_process(owner);
  } catch (const TransferFailed&) {
    return false;  // the owner is gone: none of its regions is live
  }
  for (const auto& r : m.regions) {
    std::string why;
    bool gone = false;
    if (table->check(r.slot, r.key, r.base, 0, 0, &why, &gone)) return true;
  }
  return false;
}

// Closes the mappings of `owner`'s allocations none of whose regions is live any more: the owner
// retired those regions (which waited for admitted copies), so nothing of ours still copies into
// them. Called before a new handle of that owner is opened: once the owner freed an allocation and
// made a new one at the same address, the driver may refuse the new handle as already mapped while
// our mapping of the freed memory stays open (and that mapping would pin the freed memory). No
// owner: every owner's (for a handle whose owner the caller does not know).
void close_dead_mappings(std::optional<uint64_t> owner) JG_REQUIRES(g_ipc_mu) {
  for (auto it = g_ipc_maps.begin(); it != g_ipc_maps.end();) {
    const uint64_t its_owner = it->first.first;
    if ((!owner || its_owner == *owner) && !any_region_live(its_owner, it->second)) {
      gpu_runtime().ipc_close(it->second.base);
      it = g_ipc_maps.erase(it);
    } else {
      ++it;
    }
  }
}

// Opens `handle`; when the driver refuses it as already mapped, closes every dead mapping (of any
// owner: the caller may not know whose handle it is) and opens it once more.
uint64_t open_reclaiming(const std::array<uint8_t, kIpcHandleBytes>& handle, int device) JG_REQUIRES(g_ipc_mu) {
  try {
    return gpu_runtime().ipc_open(handle, device);
  } catch (const IpcAlreadyMapped&) {
  }
  close_dead_mappings(std::nullopt);
  try {
    return gpu_runtime().ipc_open(handle, device);
  } catch (const IpcAlreadyMapped& e) {
    throw FabricError(str_cat(e.what(), " (", g_ipc_maps.size(),
                              " mappings the transfer engine holds for live regions of other processes stay open)"));
  }
}

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
std::pair<uint64_t, uint64_t> extent(const CopySegment* segments, size_t n) {
  uint64_t lo = UINT64_MAX, hi = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!segments[i].bytes) continue;
    lo = std::min(lo, segments[i].dst);
    hi = std::max(hi, segments[i].dst + segments[i].bytes);
  }
  return lo > hi ? std::make_pair(uint64_t{0}, uint64_t{0}) : std::make_pair(lo, hi);
}

std::pair<uint64_t, uint64_t> extent(const PagedCopy& p) {
  if (p.pages == 0) return {0, 0};
  uint32_t top = *std::max_element(p.dst_pages, p.dst_pages + p.pages);
  return {p.dst, p.dst + uint64_t(top) * p.dst_stride + p.page_bytes};
}

uint64_t target_key(uint64_t region_key, int device) { return region_key ^ (uint64_t(device + 1) * 0x9E3779B97F4A7C15ull); }

// Sources whose copies are over, released only once no link lock is held: dropping the last
// reference deregisters the region, which may wait for copies that this lock's holder completes.
thread_local std::vector<std::shared_ptr<MemoryRegion>> t_released_sources;

void drop_released_sources() { t_released_sources.clear(); }

// The arrival count of record k of a destination whose `count` arrivals go in records [first, last]:
// kMaxCount each and the rest in the last, or (cut in the adversarial mode) count / records each.
uint64_t record_count(uint64_t count, uint64_t records, uint64_t k) {
  const uint64_t per = records > 1 && count <= imm_record::kMaxCount ? count / records : imm_record::kMaxCount;
  return k + 1 < records ? per : count - per * (records - 1);
}

}  // namespace

void IpcOp::part_done(bool ok, const std::string& error, Status failure) {
  if (!ok) {
    finish(failure, error);  // the first final status wins
    remaining_.fetch_sub(1, std::memory_order_acq_rel);
    return;
  }
  if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) finish(Status::kDone);
}

// ---------------------------------------------------------------------------------------------
// Destinations: mappings, region tables, mailbox rings

std::string IpcTransport::check_destination(const MemoryDescriptor& dst, uint64_t offset, uint64_t length,
                                            bool* gone) {
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

bool IpcTransport::gpu_can_map(const MemoryRegion& src, const MemoryDescriptor& dst, std::string* why) const {
  auto no = [&](std::string w) {
    if (why) *why = std::move(w);
    return false;
  };
  if (!src.cuda() || dst.kind != MemoryKind::kCuda) return no("one region is not GPU memory");
  GpuRuntime& rt = gpu_runtime();
  if (!rt.available()) return no(str_cat("no GPU runtime here: ", rt.status()));
  int owner = same_process(dst) ? dst.device : rt.device_of_pci_bus_id(dst.pci_bus_id);
  if (owner < 0) {
    return no(str_cat("the destination's GPU (PCI ", dst.pci_bus_id,
                      ") is not visible to this process (CUDA_VISIBLE_DEVICES hides it? choose JAX's GPU with "
                      "jax_cuda_visible_devices instead)"));
  }
  if (!rt.can_access(src.device(), owner))
    return no(str_cat("GPU ", src.device(), " has no peer access to GPU ", owner));
  return true;
}

uint64_t IpcTransport::map(const MemoryDescriptor& dst, int device) {
  if (same_process(dst)) return dst.base;
  JG_CHECK_ARG(dst.has_ipc, "ipc: the destination descriptor carries no CUDA IPC handle");
  if (dst.ipc_kind == IpcKind::kVmm) return map_vmm(dst, device);
  auto key = std::make_pair(dst.process_nonce, dst.ipc_handle);
  MutexLock lk(g_ipc_mu);
  auto it = g_ipc_maps.find(key);
  auto serves = [&](const LegacyMapping& m) {
    return std::any_of(m.regions.begin(), m.regions.end(), [&](const LegacyMapping::Region& r) {
      return r.slot == dst.region_slot && r.key == dst.region_key;
    });
  };
  // A new region behind a handle we mapped for regions that are all gone: the owner may have freed
  // that allocation and made a new one at the same address, which can carry the same handle bytes.
  // That mapping, like every dead one of this owner, is closed before the handle is opened anew.
  const bool stale = it != g_ipc_maps.end() && !serves(it->second) && !any_region_live(dst.process_nonce, it->second);
  if (it == g_ipc_maps.end() || stale) {
    close_dead_mappings(dst.process_nonce);
    uint64_t base = open_reclaiming(dst.ipc_handle, device);
    for (const auto& [k, m] : g_ipc_maps) {
      // Every mapping left is still open and holds its address: a fresh one cannot share it.
      if (m.base == base) {
        throw TransferFailed(str_cat("ipc: the driver mapped a new CUDA IPC handle of process ", dst.pid, " at 0x",
                                     std::hex, base, ", where another of our mappings already is"));
      }
    }
    it = g_ipc_maps.emplace(key, LegacyMapping{base, {}}).first;
  }
  if (!serves(it->second)) it->second.regions.push_back({dst.region_slot, dst.region_key, dst.base});
  return it->second.base + dst.ipc_offset;
}

uint64_t IpcTransport::map_vmm(const MemoryDescriptor& dst, int device) {
  auto key = std::make_pair(dst.process_nonce, dst.region_key);
  MutexLock lk(g_ipc_mu);
  auto it = g_vmm_maps.find(key);
  if (it == g_vmm_maps.end()) {
    std::string why;
    int fd = FdBroker::fetch(dst.process_nonce, dst.region_key, std::min(options_.timeout_s, 5.0), &why);
    if (fd < 0) throw TransferFailed(str_cat("mapping the destination's VMM range: ", why));
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

std::shared_ptr<IpcTransport::Link> IpcTransport::link(const MemoryDescriptor& dst) {
  auto key = std::make_pair(dst.process_nonce, dst.mailbox);
  auto it = links_.find(key);
  if (it != links_.end()) return it->second;
  auto l = std::make_shared<Link>();
  l->ring = MailboxLink::open(dst.process_nonce, dst.mailbox);
  l->nonce = dst.process_nonce;
  l->serial = dst.mailbox;
  l->owner = dst.domains[0].endpoint;
  links_.emplace(key, l);
  links_version_.fetch_add(1, std::memory_order_acq_rel);
  return l;
}

std::shared_ptr<IpcTransport::Target> IpcTransport::target(const MemoryDescriptor& dst, int device) {
  uint64_t key = target_key(dst.region_key, device);
  {
    MutexLock lk(targets_mu_);
    auto it = targets_.find(key);
    if (it != targets_.end() && it->second->region_key == dst.region_key && it->second->device == device &&
        it->second->link->nonce == dst.process_nonce)
      return it->second;
  }
  // First op toward this region from this device: map it (may ask the owner's fd broker), find its
  // owner's region table and claim a ring in its owner's mailbox.
  auto t = std::make_shared<Target>();
  t->region_key = dst.region_key;
  t->device = device;
  t->dst_base = device >= 0 ? map(dst, device) : dst.base;
  t->table = SharedRegionTable::of_process(dst.process_nonce);
  MutexLock lk(targets_mu_);
  t->link = link(dst);
  if (targets_.size() >= 4096) targets_.clear();  // keys of old regions (mappings stay process-wide)
  targets_[key] = t;
  return t;
}

void IpcTransport::prepare(const MemoryDescriptor& dst, int device) {
  bool gone = false;
  std::string why = check_destination(dst, 0, 0, &gone);
  if (!why.empty()) throw TransferFailed(str_cat("ipc: ", why));
  (void)target(dst, device);
}

std::vector<std::shared_ptr<IpcTransport::Link>> IpcTransport::links_snapshot() {
  std::vector<std::shared_ptr<Link>> out;
  MutexLock lk(targets_mu_);
  out.reserve(links_.size());
  for (auto& [k, l] : links_) out.push_back(l);
  return out;
}

IpcTransport::~IpcTransport() = default;

// ---------------------------------------------------------------------------------------------
// Starting an op

void IpcTransport::start(const std::shared_ptr<IpcOp>& op, const std::shared_ptr<MemoryRegion>& src,
                         const MemoryDescriptor& dst, const IpcCopySpec& spec, Clock::time_point deadline) {
  const int device = src->cuda() ? src->device() : -1;
  std::shared_ptr<Target> t;
  try {
    t = target(dst, device);
  } catch (const std::exception& e) {
    op->part_done(false, str_cat("ipc: ", e.what()));
    return;
  }
  Pending p;
  // Admission by the owner's table: the region is live and the copy stays inside it, and the
  // owner's deregistration waits for this copy.
  auto [lo, hi] = spec.pages ? extent(*spec.pages) : extent(spec.segments, spec.num_segments);
  std::string why;
  bool gone = false;
  if (!t->table->acquire(dst.region_slot, dst.region_key, dst.base, lo, hi - lo, &why, &gone)) {
    op->part_done(false, str_cat("ipc: ", why));
    return;
  }
  p.op = op;
  p.src = src;
  p.table = t->table;
  p.slot = dst.region_slot;
  p.imm = spec.has_imm ? spec.imm : 0;
  p.count = spec.has_imm ? spec.imm_count : 0;
  p.records = imm_record::records_for(p.count);
  p.deadline = deadline;
  // Addresses in this process (no heap use: per-thread scratch).
  thread_local std::vector<CopySegment> segs;
  PagedCopy pages;
  if (spec.pages) {
    pages = *spec.pages;
    pages.src += src->base();
    pages.dst += t->dst_base;
  } else {
    segs.assign(spec.segments, spec.segments + spec.num_segments);
    for (auto& s : segs) {
      s.src += src->base();
      s.dst += t->dst_base;
    }
  }
  Link& l = *t->link;
  struct Drop {
    ~Drop() { drop_released_sources(); }  // after the link's lock (declared before it)
  } drop;
  MutexLock lk(l.mu);
  if (l.ring->closed()) {
    release(p);
    op->part_done(false, "ipc: the destination engine was closed");
    return;
  }
  outstanding_.fetch_add(1, std::memory_order_acq_rel);
  if (Adversary* adv = worker_.adversary()) [[unlikely]] {
    // Adversarial mode: the imm record cut into several; the start perhaps held back.
    if (p.count > 1 && p.count <= imm_record::kMaxCount) p.records = adv->split_imms(p.count).size();
    Adversary::CopyStart c = adv->copy_start(Clock::now());
    if (c.at != Clock::time_point{}) {
      hold(l, make_queued(std::move(p), device, segs, spec.pages ? &pages : nullptr), c.seq, c.at);
      worker_.wake();
      return;
    }
  }
  if (l.queued.empty() && l.ring->reserve(p.records, &p.first)) {
    p.last = p.first + p.records - 1;
    issue(l, std::move(p), segs.data(), segs.size(), spec.pages ? &pages : nullptr, device);
    worker_.wake();  // completions are reaped by the worker unless the caller waits inline
    return;
  }
  // The ring is full (the owner has not taken a ring's worth of records yet): the worker starts
  // this destination, in order, once there is room.
  l.queued.push_back(make_queued(std::move(p), device, segs, spec.pages ? &pages : nullptr));
  worker_.wake();
}

IpcTransport::Queued IpcTransport::make_queued(Pending p, int device, const std::vector<CopySegment>& segments,
                                               const PagedCopy* pages) {
  Queued q;
  q.pending = std::move(p);
  q.device = device;
  if (pages) {
    q.paged = true;
    q.src_pages.assign(pages->src_pages, pages->src_pages + pages->pages);
    q.dst_pages.assign(pages->dst_pages, pages->dst_pages + pages->pages);
    q.pages = *pages;
    q.pages.src_pages = q.src_pages.data();
    q.pages.dst_pages = q.dst_pages.data();
  } else {
    q.segments = segments;
  }
  return q;
}

// ---------------------------------------------------------------------------------------------
// Adversarial mode

bool IpcTransport::copy_source(Queued& q) {
  constexpr uint64_t kMostCopied = 64ull << 20;  // bounded memory: larger ops complete as usual
  if (q.paged) {
    if (q.pages.pages == 0) return true;
    uint32_t top = *std::max_element(q.src_pages.begin(), q.src_pages.end());
    uint64_t len = uint64_t(top) * q.pages.src_stride + q.pages.page_bytes;
    if (len > kMostCopied) return false;
    auto* from = reinterpret_cast<const uint8_t*>(q.pages.src);
    q.source_copy.assign(from, from + len);
    q.pages.src = reinterpret_cast<uint64_t>(q.source_copy.data());
    return true;
  }
  uint64_t lo = UINT64_MAX, hi = 0;
  for (const auto& s : q.segments) {
    if (!s.bytes) continue;
    lo = std::min(lo, s.src);
    hi = std::max(hi, s.src + s.bytes);
  }
  if (lo >= hi) return true;
  if (hi - lo > kMostCopied) return false;
  auto* from = reinterpret_cast<const uint8_t*>(lo);
  q.source_copy.assign(from, from + (hi - lo));
  for (auto& s : q.segments)
    if (s.bytes) s.src = reinterpret_cast<uint64_t>(q.source_copy.data()) + (s.src - lo);
  return true;
}

void IpcTransport::hold(Link& l, Queued q, uint64_t seq, Clock::time_point at) {
  Adversary& adv = *worker_.adversary();
  // Transmit completion long before delivery: legal once the source bytes are copied (the caller may
  // reuse its source). GPU sources are not copied here: they complete as usual.
  if (options_.completion == CompletionMode::kTransmit && adv.options().early && q.device < 0 &&
      q.pending.op && copy_source(q)) {
    q.pending.op->part_done(true);
    q.pending.op.reset();
    if (q.pending.src) t_released_sources.push_back(std::move(q.pending.src));  // the copy reads source_copy
    adv.early_completed();
  }
  l.held.push_back(Held{at, seq, std::move(q)});
}

bool IpcTransport::release_held(Link& l, Clock::time_point now, bool closed, bool full) {
  Adversary& adv = *worker_.adversary();
  bool progress = false;
  for (size_t i = 0; i < l.held.size();) {
    Held& h = l.held[i];
    Pending& p = h.queued.pending;
    const bool expired = full && now >= p.deadline;
    if (closed || expired) {
      if (p.op)
        p.op->part_done(false,
                        closed ? "ipc: the destination engine was closed"
                               : "ipc: no completion within the engine timeout (the copy was still held back by the "
                                 "adversarial delivery mode)",
                        closed ? TransferState::Status::kFailed : TransferState::Status::kTimedOut);
      release(p);
      adv.copy_released(h.seq, false);
      outstanding_.fetch_sub(1, std::memory_order_acq_rel);
    } else if (now >= h.at) {
      adv.copy_released(h.seq, true);
      l.queued.push_back(std::move(h.queued));  // starts behind those already waiting for ring space
    } else {
      ++i;
      continue;
    }
    l.held.erase(l.held.begin() + static_cast<std::ptrdiff_t>(i));
    progress = true;
  }
  return progress;
}

void IpcTransport::issue(Link& l, Pending p, const CopySegment* segments, size_t n, const PagedCopy* pages,
                         int device) {
  MailboxLink& ring = *l.ring;
  // One record per kMaxCount arrivals (almost always one).
  constexpr size_t kInline = 4;
  StreamStore inline_stores[kInline];
  std::vector<StreamStore> more;
  const size_t m = p.last - p.first + 1;
  StreamStore* stores = m <= kInline ? inline_stores : (more.resize(m), more.data());
  for (size_t k = 0; k < m; ++k) stores[k] = {0, imm_record::encode(p.first + k, p.imm, record_count(p.count, m, k))};
  try {
    if (device < 0) {
      // Host memory (one process): copy now, then the records.
      if (pages)
        host_paged_copy(*pages);
      else
        for (size_t i = 0; i < n; ++i)
          if (segments[i].bytes)
            std::memmove(reinterpret_cast<void*>(segments[i].dst), reinterpret_cast<const void*>(segments[i].src),
                         segments[i].bytes);
      for (size_t k = 0; k < m; ++k) ring.store(p.first + k, p.imm, imm_record::count_in(stores[k].value));
      by_host_.fetch_add(1, std::memory_order_relaxed);
    } else if (GpuRuntime& rt = gpu_runtime(); rt.stream_stores() && ring.device_address(p.first, device) != 0) {
      for (size_t k = 0; k < m; ++k) stores[k].address = ring.device_address(p.first + k, device);
      if (pages) {
        p.page_lists = rt.paged_copy_then_store(device, *pages, stores, m);
      } else if (rt.copy_then_store(device, segments, n, stores, m, options_.ipc_copy_kernel_bytes)) {
        by_kernel_.fetch_add(1, std::memory_order_relaxed);
      }
      by_stream_.fetch_add(1, std::memory_order_relaxed);
    } else {
      // No stream stores here: the worker polls the copy's event, then stores the records.
      p.copy = pages ? rt.paged_copy(device, *pages) : rt.copy(device, 0, std::vector<CopySegment>(segments, segments + n));
      by_event_.fetch_add(1, std::memory_order_relaxed);
    }
  } catch (const std::exception& e) {
    // Nothing of it will land: empty records keep the ring moving; the op fails.
    for (uint64_t pos = p.first; pos <= p.last; ++pos) ring.store(pos, 0, 0);
    if (p.op) p.op->part_done(false, str_cat("ipc: ", e.what()));  // (null: reported done early)
    p.op.reset();
    release(p);
    p.landed = true;
  }
  l.pending.push_back(std::move(p));
}

void IpcTransport::release(Pending& p) {
  if (p.table) {
    p.table->release(p.slot);  // the copy is over: the owner may deregister now
    p.table.reset();
  }
  if (p.page_lists != ~size_t{0}) {
    gpu_runtime().release_page_lists(p.page_lists);
    p.page_lists = ~size_t{0};
  }
  if (p.src) t_released_sources.push_back(std::move(p.src));
}

// ---------------------------------------------------------------------------------------------
// Completion

bool IpcTransport::poll() {
  bool progress = false;
  if (mailbox_) {
    // Imms that same-host engines delivered to us (records their copies stored).
    if (worker_.adversary()) [[unlikely]] {
      // Adversarial mode: held back before they are counted, like any imm arrival.
      auto held = [](void* w, uint32_t imm, uint64_t count) {
        progress_role.assert_held();  // poll() runs under the progress lock
        static_cast<Worker*>(w)->deliver_imm(imm, static_cast<int64_t>(count));
      };
      progress = mailbox_->poll(held, &worker_) > 0;
    } else {
      auto sink = [](void* c, uint32_t imm, uint64_t count) {
        static_cast<ImmCounterTable*>(c)->on_imm(imm, static_cast<int64_t>(count));
      };
      progress = mailbox_->poll(sink, &counters_) > 0;
    }
  }
  if (!busy()) return progress;
  uint64_t v = links_version_.load(std::memory_order_acquire);
  if (v != polled_version_) {
    polled_ = links_snapshot();
    polled_version_ = v;
  }
  for (auto& l : polled_) progress |= poll_link(*l, Clock::time_point{}, false);
  drop_released_sources();
  return progress;
}

bool IpcTransport::advance(Clock::time_point now) {
  // The worker polled just before (poll()); here, once a millisecond, the full scan: deadlines, and
  // records landed out of order (copies of several GPUs).
  if (now - last_deadline_check_ < std::chrono::milliseconds(1)) return false;
  last_deadline_check_ = now;
  bool progress = false;
  for (auto& l : polled_) progress |= poll_link(*l, now, true);
  drop_released_sources();
  return progress;
}

bool IpcTransport::poll_link(Link& l, Clock::time_point now, bool full) {
  MutexLock lk(l.mu);
  if (l.pending.empty() && l.queued.empty() && l.held.empty()) return false;
  MailboxLink& ring = *l.ring;
  const bool transmit = options_.completion == CompletionMode::kTransmit;
  const uint64_t taken = ring.taken();
  const bool closed = ring.closed();
  bool progress = false;
  for (auto& p : l.pending) {
    if (!p.landed) {
      if (p.copy) {
        std::string err;
        int r = p.copy->poll(&err);
        if (r != 0) {
          p.copy.reset();
          // A failed copy: empty records keep the ring moving.
          for (uint64_t pos = p.first; pos <= p.last; ++pos)
            ring.store(pos, p.imm, r > 0 ? record_count(p.count, p.last - p.first + 1, pos - p.first) : 0);
          if (r < 0 && p.op) {
            p.op->part_done(false, str_cat("ipc: ", err));
            p.op.reset();
          }
          progress = true;
        }
      }
      if (!p.copy && ring.landed(p.last)) {
        p.landed = true;
        release(p);
        progress = true;
      } else if (!full) {
        break;  // one stream lands its records in order: the ones behind are not there yet
      }
    }
    if (!p.op) continue;
    if (p.landed && !transmit && taken <= p.last && !full && !closed) break;  // nor the ones behind it
    if (p.landed && (transmit || taken > p.last)) {
      p.op->part_done(true);
      p.op.reset();
      progress = true;
    } else if (closed) {
      p.op->part_done(false, "ipc: the destination engine was closed before it took this op's imms");
      p.op.reset();
      progress = true;
    } else if (full && now >= p.deadline) {
      std::string msg = str_cat("no completion within the engine timeout (", options_.timeout_s,
                                " s + size allowance): ",
                                p.landed ? "the copy landed but the destination engine did not take its imms (its "
                                           "process may be dead or stalled)"
                                         : "the copy did not complete on this GPU");
      if (p.landed) peers_.mark_unreachable(l.owner, msg);
      p.op->part_done(false, msg, TransferState::Status::kTimedOut);
      p.op.reset();
      progress = true;
    }
  }
  while (!l.pending.empty() && l.pending.front().landed && !l.pending.front().op) {
    l.pending.pop_front();
    outstanding_.fetch_sub(1, std::memory_order_acq_rel);
  }
  if (!l.held.empty()) [[unlikely]]  // adversarial mode
    progress |= release_held(l, full ? now : Clock::now(), closed, full);
  // Destinations that waited for ring space, in order.
  while (!l.queued.empty()) {
    Queued& q = l.queued.front();
    if (closed || (full && now >= q.pending.deadline)) {
      if (q.pending.op)  // (null: reported done early in the adversarial mode)
        q.pending.op->part_done(false, closed ? "ipc: the destination engine was closed"
                                              : "ipc: no room in the destination's imm ring within the engine "
                                                "timeout (the destination engine is not taking imms)",
                                closed ? TransferState::Status::kFailed : TransferState::Status::kTimedOut);
      release(q.pending);
      l.queued.pop_front();
      outstanding_.fetch_sub(1, std::memory_order_acq_rel);
      progress = true;
      continue;
    }
    if (!ring.reserve(q.pending.records, &q.pending.first)) break;
    q.pending.last = q.pending.first + q.pending.records - 1;
    issue(l, std::move(q.pending), q.segments.data(), q.segments.size(), q.paged ? &q.pages : nullptr, q.device);
    l.queued.pop_front();
    progress = true;
  }
  return progress;
}

void IpcTransport::close() {
  auto links = links_snapshot();
  auto deadline = deadline_after(options_.timeout_s);
  for (auto& lp : links) {
    Link& l = *lp;
    MutexLock lk(l.mu);
    for (auto& q : l.queued) {
      if (q.pending.op) q.pending.op->part_done(false, "the engine was closed");
      release(q.pending);
      outstanding_.fetch_sub(1, std::memory_order_acq_rel);
    }
    l.queued.clear();
    for (auto& h : l.held) {  // adversarial mode
      if (h.queued.pending.op) h.queued.pending.op->part_done(false, "the engine was closed");
      release(h.queued.pending);
      worker_.adversary()->copy_released(h.seq, false);
      outstanding_.fetch_sub(1, std::memory_order_acq_rel);
    }
    l.held.clear();
    for (auto& p : l.pending) {
      if (p.op) p.op->part_done(false, "the engine was closed");
      p.op.reset();
      // A copy still running keeps its admission until it is over (bounded by the timeout).
      while (!p.landed) {
        if (p.copy) {
          std::string err;
          if (p.copy->poll(&err) != 0) {
            p.copy.reset();
            for (uint64_t pos = p.first; pos <= p.last; ++pos) l.ring->store(pos, 0, 0);  // the ring moves on
            p.landed = true;
          }
        } else if (l.ring->landed(p.last)) {
          p.landed = true;
        }
        if (p.landed) break;
        if (Clock::now() >= deadline) {
          std::fprintf(stderr, "jax_garden.fabric: an IPC copy did not complete before its engine closed\n");
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      release(p);
    }
    outstanding_.fetch_sub(static_cast<int64_t>(l.pending.size()), std::memory_order_acq_rel);
    l.pending.clear();
  }
  drop_released_sources();
  MutexLock lk(targets_mu_);
  targets_.clear();
  links_.clear();
  links_version_.fetch_add(1, std::memory_order_acq_rel);
}

// ---------------------------------------------------------------------------------------------
// IpcPart

bool IpcPart::advance() {
  if (finished_) return false;
  if (!op_) {
    if (cancelled_) {
      finish(false, "cancelled");
      return true;
    }
    op_ = std::make_shared<IpcOp>(0, OpName("ipc part"), static_cast<uint32_t>(targets_.size()));
    for (auto& t : targets_) {
      IpcCopySpec spec;
      spec.segments = t.segments.data();
      spec.num_segments = t.segments.size();
      spec.has_imm = imm_.has_value();
      spec.imm = imm_.value_or(0);
      spec.imm_count = t.imm_count;
      ipc_.start(op_, job_->src, *t.dst, spec, job_->deadline);
    }
    return true;
  }
  if (!op_->finished()) return false;
  auto status = op_->status();
  finish(status == TransferState::Status::kDone, op_->error());
  return true;
}

uint64_t ipc_open_outside_engine(const std::array<uint8_t, kIpcHandleBytes>& handle, int device) {
  MutexLock lk(g_ipc_mu);
  return open_reclaiming(handle, device);
}

}  // namespace jax_garden::fabric
