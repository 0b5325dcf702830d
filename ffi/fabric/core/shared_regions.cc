#include "fabric/core/shared_regions.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <thread>

#include "common/deadline.h"
#include "common/error.h"
#include "fabric/core/gpu_runtime.h"
#include "fabric/core/shm_segment.h"

namespace jax_garden::fabric {

struct SharedRegionTable::Header {
  uint64_t magic;
  uint32_t version;
  uint32_t slots;
  uint64_t pid;
  uint64_t nonce;
  uint8_t pad[32];
};

struct SharedRegionTable::Slot {
  std::atomic<uint64_t> key;  // the region key while live; 0 when free or retired
  std::atomic<uint64_t> base;
  std::atomic<uint64_t> length;
  std::atomic<uint32_t> writers;  // copies admitted and not yet finished
  uint32_t pad;
};

namespace {

constexpr uint64_t kMagic = 0x5347524e524f474aull;  // "JGORNRGS"
constexpr uint32_t kVersion = 1;
constexpr const char* kPrefix = "jax_garden.regions.";

std::string table_name(uint64_t nonce) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "/%s%016llx", kPrefix, static_cast<unsigned long long>(nonce));
  return buf;
}

size_t table_bytes() {
  return sizeof(SharedRegionTable::Header) + size_t(SharedRegionTable::kSlots) * 32;
}

// Tables of processes that died without unlinking theirs (header words: magic, version|slots, pid).
void remove_dead_tables() { remove_dead_segments(kPrefix, kMagic, 2); }

Mutex g_tables_mu;
std::map<uint64_t, std::weak_ptr<SharedRegionTable>> g_tables JG_GUARDED_BY(g_tables_mu);

}  // namespace

SharedRegionTable::SharedRegionTable(void* mapping, size_t bytes, std::string name, bool owner)
    : mapping_(mapping), bytes_(bytes), name_(std::move(name)), owner_(owner) {
  static_assert(sizeof(Slot) == 32 && sizeof(Header) == 64, "shared layout");
  if (owner_) {
    MutexLock lk(free_mu_);
    for (uint32_t i = kSlots; i-- > 0;) free_.push_back(i);
  }
}

SharedRegionTable::~SharedRegionTable() {
  munmap(mapping_, bytes_);
  if (owner_) shm_unlink(name_.c_str());
}

SharedRegionTable::Slot* SharedRegionTable::slot(uint32_t i) const {
  return reinterpret_cast<Slot*>(static_cast<uint8_t*>(mapping_) + sizeof(Header)) + i;
}

std::shared_ptr<SharedRegionTable> SharedRegionTable::local() {
  // Created once and kept for the life of the process (peers may map it at any time).
  static std::shared_ptr<SharedRegionTable> table = [] {
    remove_dead_tables();
    std::string name = table_name(process_nonce());
    size_t bytes = table_bytes();
    void* m = create_shared_segment(name, bytes);
    auto* h = static_cast<Header*>(m);
    h->version = kVersion;
    h->slots = kSlots;
    h->pid = static_cast<uint64_t>(getpid());
    h->nonce = process_nonce();
    __atomic_store_n(&h->magic, kMagic, __ATOMIC_RELEASE);
    auto t = std::shared_ptr<SharedRegionTable>(new SharedRegionTable(m, bytes, name, true));
    MutexLock lk(g_tables_mu);
    g_tables[process_nonce()] = t;
    return t;
  }();
  return table;
}

std::shared_ptr<SharedRegionTable> SharedRegionTable::of_process(uint64_t nonce) {
  if (nonce == process_nonce()) return local();
  {
    MutexLock lk(g_tables_mu);
    auto it = g_tables.find(nonce);
    if (it != g_tables.end())
      if (auto t = it->second.lock()) return t;
  }
  std::string name = table_name(nonce);
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    throw TransferFailed(str_cat("the owner process's region table ", name, " does not exist (",
                                 std::strerror(errno), "): the owner is gone or shares no /dev/shm with us"));
  }
  size_t bytes = table_bytes();
  void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) throw TransferFailed(str_cat("mmap(", name, "): ", std::strerror(errno)));
  auto* h = static_cast<Header*>(m);
  if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != kMagic || h->version != kVersion || h->slots != kSlots) {
    munmap(m, bytes);
    throw TransferFailed(str_cat("the region table ", name, " has an unknown layout (another jax_garden version?)"));
  }
  auto t = std::shared_ptr<SharedRegionTable>(new SharedRegionTable(m, bytes, name, false));
  MutexLock lk(g_tables_mu);
  g_tables[nonce] = t;  // cached while someone holds it (the engine's IPC mappings do)
  return t;
}

uint32_t SharedRegionTable::claim(uint64_t key, uint64_t base, uint64_t length) {
  uint32_t i;
  {
    MutexLock lk(free_mu_);
    if (free_.empty()) return kNoRegionSlot;
    i = free_.back();
    free_.pop_back();
  }
  Slot* s = slot(i);
  s->base.store(base);
  s->length.store(length);
  s->key.store(key);  // published last: a writer that sees the key sees the bounds
  return i;
}

bool SharedRegionTable::retire(uint32_t i, uint64_t key, double timeout_s) {
  if (i >= kSlots) return true;
  Slot* s = slot(i);
  uint64_t expected = key;
  s->key.compare_exchange_strong(expected, 0);
  bool drained = true;
  auto deadline = deadline_after(timeout_s);
  while (s->writers.load() != 0) {
    if (Clock::now() >= deadline) {
      drained = false;  // a writer died mid-copy (its context, and so its copy, died with it)
      std::fprintf(stderr,
                   "jax_garden.fabric: %u copies into a region being deregistered did not finish within %.1f s; "
                   "its slot is not reused\n",
                   s->writers.load(), timeout_s);
      break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  if (drained) {
    MutexLock lk(free_mu_);
    free_.push_back(i);
  }
  return drained;
}

bool SharedRegionTable::check(uint32_t i, uint64_t key, uint64_t base, uint64_t offset, uint64_t length,
                              std::string* why, bool* gone) const {
  if (i >= kSlots) {
    *gone = false;
    *why = str_cat("the descriptor names region slot ", i, " (the owner's table has ", kSlots, ")");
    return false;
  }
  Slot* s = slot(i);
  if (key == 0 || s->key.load() != key || s->base.load() != base) {
    *gone = true;
    *why = "the owner no longer has this region (it was deregistered: a stale descriptor)";
    return false;
  }
  uint64_t size = s->length.load();
  if (offset > size || length > size - offset) {
    *gone = false;
    *why = str_cat("bytes [", offset, ", ", offset + length, ") run past the end of the region (", size, " bytes)");
    return false;
  }
  return true;
}

bool SharedRegionTable::acquire(uint32_t i, uint64_t key, uint64_t base, uint64_t offset, uint64_t length,
                                std::string* why, bool* gone) {
  if (i >= kSlots) return check(i, key, base, offset, length, why, gone);
  Slot* s = slot(i);
  s->writers.fetch_add(1);
  if (check(i, key, base, offset, length, why, gone)) return true;
  s->writers.fetch_sub(1);
  return false;
}

void SharedRegionTable::release(uint32_t i) {
  if (i < kSlots) slot(i)->writers.fetch_sub(1);
}

}  // namespace jax_garden::fabric
