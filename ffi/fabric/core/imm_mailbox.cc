#include "fabric/core/imm_mailbox.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>

#include "common/error.h"
#include "fabric/core/gpu_runtime.h"
#include "fabric/core/shm_segment.h"

namespace jax_garden::fabric {

using imm_record::kRingRecords;
using imm_record::kRings;

namespace {

constexpr uint64_t kMagic = 0x584f424c49414d4aull;  // "JMAILBOX"
constexpr uint32_t kVersion = 1;
constexpr const char* kPrefix = "jax_garden.mailbox.";

struct Header {
  uint64_t magic;
  uint32_t version;
  uint32_t rings;
  uint32_t ring_records;
  uint32_t serial;
  uint64_t pid;
  uint64_t nonce;
  std::atomic<uint64_t> claimed;  // bit i: ring i has a sender
  std::atomic<uint32_t> closed;   // the owner engine closed: senders' ops fail
  uint32_t pad[3];
};

struct RingHeader {
  std::atomic<uint64_t> owner;       // the sender's token, 0 when free
  std::atomic<uint64_t> tail;        // records the owner took (written by the owner only)
  std::atomic<uint64_t> sender_pid;  // for resetting the ring of a sender that died
  uint64_t pad[5];
};

static_assert(sizeof(Header) == 64 && sizeof(RingHeader) == 64, "shared layout");
static_assert(kRings <= 64, "one claim bit per ring");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");

constexpr size_t kRingsOffset = sizeof(Header);
constexpr size_t kRecordsOffset = 8192;  // page aligned, after the ring headers
constexpr size_t kSegmentBytes = kRecordsOffset + size_t(kRings) * kRingRecords * sizeof(uint64_t);
static_assert(kRingsOffset + kRings * sizeof(RingHeader) <= kRecordsOffset, "layout");

std::string segment_name(uint64_t nonce, uint32_t serial) {
  char buf[96];
  std::snprintf(buf, sizeof(buf), "/%s%016llx.%u", kPrefix, static_cast<unsigned long long>(nonce), serial);
  return buf;
}

// Mailboxes of processes that died without unlinking theirs (best effort, as for region tables;
// the owner's pid is the header's fourth word).
void remove_dead_mailboxes() { remove_dead_segments(kPrefix, kMagic, 3); }

uint64_t random_token() {
  static std::mt19937_64 rng(std::random_device{}() ^ process_nonce());
  static Mutex mu;
  MutexLock lk(mu);
  uint64_t t = 0;
  while (t == 0) t = rng();
  return t;
}

}  // namespace

// One mapping of a mailbox in this process, shared by its owner engine and every sender here, and
// registered with the GPU runtime (once) when a GPU stream stores records into it.
class MailboxSegment {
 public:
  MailboxSegment(void* m, std::string name, bool owner) : mapping_(m), name_(std::move(name)), owner_(owner) {}
  ~MailboxSegment() {
    if (gpu_registered_) gpu_runtime().unregister_host(mapping_);
    munmap(mapping_, kSegmentBytes);
    if (owner_) unlink();
  }
  Header* header() const { return static_cast<Header*>(mapping_); }
  RingHeader* ring(uint32_t i) const {
    return reinterpret_cast<RingHeader*>(static_cast<uint8_t*>(mapping_) + kRingsOffset) + i;
  }
  uint64_t* records(uint32_t i) const {
    return reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(mapping_) + kRecordsOffset) + size_t(i) * kRingRecords;
  }
  uint64_t record_offset(uint32_t i) const { return kRecordsOffset + size_t(i) * kRingRecords * sizeof(uint64_t); }
  // The device address of the mapping (0 when no GPU can store into it); registered (once, for
  // every GPU) with `device` current.
  uint64_t gpu_base(int device) {
    MutexLock lk(mu_);
    if (!gpu_tried_) {
      gpu_tried_ = true;
      gpu_base_ = gpu_runtime().register_host(mapping_, kSegmentBytes, device);
      gpu_registered_ = gpu_base_ != 0;
    }
    return gpu_base_;
  }
  void unlink() {
    MutexLock lk(mu_);
    if (!unlinked_) shm_unlink(name_.c_str());
    unlinked_ = true;
  }

 private:
  void* mapping_;
  std::string name_;
  bool owner_;
  Mutex mu_;
  bool gpu_tried_ JG_GUARDED_BY(mu_) = false;
  bool gpu_registered_ = false;
  uint64_t gpu_base_ JG_GUARDED_BY(mu_) = 0;
  bool unlinked_ JG_GUARDED_BY(mu_) = false;
};

namespace {

Mutex g_segments_mu;
std::map<std::pair<uint64_t, uint32_t>, std::weak_ptr<MailboxSegment>> g_segments JG_GUARDED_BY(g_segments_mu);
std::atomic<uint32_t> g_next_serial{1};

// A peer's (or this process's) mailbox, mapped once per process.
std::shared_ptr<MailboxSegment> map_segment(uint64_t nonce, uint32_t serial) {
  auto key = std::make_pair(nonce, serial);
  {
    MutexLock lk(g_segments_mu);
    auto it = g_segments.find(key);
    if (it != g_segments.end())
      if (auto s = it->second.lock()) return s;
  }
  std::string name = segment_name(nonce, serial);
  int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    throw TransferFailed(str_cat("the destination engine's imm mailbox ", name, " does not exist (",
                                 std::strerror(errno), "): its engine was closed or its process is gone"));
  }
  void* m = mmap(nullptr, kSegmentBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) throw TransferFailed(str_cat("mmap(", name, "): ", std::strerror(errno)));
  auto* h = static_cast<Header*>(m);
  if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != kMagic || h->version != kVersion || h->rings != kRings ||
      h->ring_records != kRingRecords) {
    munmap(m, kSegmentBytes);
    throw TransferFailed(str_cat("the imm mailbox ", name, " has an unknown layout (another jax_garden version?)"));
  }
  auto s = std::make_shared<MailboxSegment>(m, name, false);
  MutexLock lk(g_segments_mu);
  auto& slot = g_segments[key];
  if (auto existing = slot.lock()) return existing;  // mapped meanwhile by another thread
  slot = s;
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ImmMailbox

std::shared_ptr<ImmMailbox> ImmMailbox::create() {
  static bool cleaned = [] {
    remove_dead_mailboxes();
    return true;
  }();
  (void)cleaned;
  uint32_t serial = g_next_serial.fetch_add(1);
  std::string name = segment_name(process_nonce(), serial);
  void* m = create_shared_segment(name, kSegmentBytes);
  auto* h = static_cast<Header*>(m);
  h->version = kVersion;
  h->rings = kRings;
  h->ring_records = kRingRecords;
  h->serial = serial;
  h->pid = static_cast<uint64_t>(getpid());
  h->nonce = process_nonce();
  __atomic_store_n(&h->magic, kMagic, __ATOMIC_RELEASE);
  auto segment = std::make_shared<MailboxSegment>(m, name, true);
  {
    MutexLock lk(g_segments_mu);
    g_segments[{process_nonce(), serial}] = segment;  // same-process senders share this mapping
  }
  return std::shared_ptr<ImmMailbox>(new ImmMailbox(std::move(segment), serial));
}

ImmMailbox::ImmMailbox(std::shared_ptr<MailboxSegment> segment, uint32_t serial)
    : segment_(std::move(segment)),
      serial_(serial),
      tails_(kRings, 0),
      next_reclaim_(Clock::now() + std::chrono::seconds(1)) {}

ImmMailbox::~ImmMailbox() { close(); }

void ImmMailbox::close() {
  segment_->header()->closed.store(1, std::memory_order_release);
  segment_->unlink();
}

size_t ImmMailbox::poll(Sink sink, void* ctx) {
  size_t taken = 0;
  uint64_t mask = segment_->header()->claimed.load(std::memory_order_acquire);
  while (mask) {
    uint32_t ring = static_cast<uint32_t>(__builtin_ctzll(mask));
    mask &= mask - 1;
    taken += poll_ring(ring, sink, ctx);
  }
  if (Clock::now() >= next_reclaim_) {
    next_reclaim_ = Clock::now() + std::chrono::seconds(1);
    reclaim_dead_rings();
  }
  return taken;
}

size_t ImmMailbox::poll_ring(uint32_t ring, Sink sink, void* ctx) {
  uint64_t* records = segment_->records(ring);
  uint64_t t = tails_[ring];
  size_t n = 0;
  while (n < kRingRecords) {
    uint64_t w = __atomic_load_n(&records[t % kRingRecords], __ATOMIC_ACQUIRE);
    if (!imm_record::valid(w, t)) break;
    if (uint64_t count = imm_record::count_in(w)) sink(ctx, imm_record::imm_of(w), count);
    ++t;
    ++n;
  }
  if (n) {
    tails_[ring] = t;
    segment_->ring(ring)->tail.store(t, std::memory_order_release);
  }
  return n;
}

void ImmMailbox::reclaim_dead_rings() {
  uint64_t mask = segment_->header()->claimed.load(std::memory_order_acquire);
  while (mask) {
    uint32_t i = static_cast<uint32_t>(__builtin_ctzll(mask));
    mask &= mask - 1;
    RingHeader* r = segment_->ring(i);
    uint64_t owner = r->owner.load(std::memory_order_acquire);
    uint64_t pid = r->sender_pid.load(std::memory_order_acquire);
    if (owner == 0 || !process_dead(pid)) continue;
    // The sender died (its GPU work died with its context): what landed was taken by the poll
    // before this; clear the slots it may have reserved, then free the ring for a new sender,
    // which starts at the current tail.
    uint64_t* records = segment_->records(i);
    for (uint32_t k = 0; k < kRingRecords; ++k) __atomic_store_n(&records[k], 0, __ATOMIC_RELAXED);
    r->sender_pid.store(0, std::memory_order_release);
    segment_->header()->claimed.fetch_and(~(uint64_t{1} << i), std::memory_order_acq_rel);
    r->owner.compare_exchange_strong(owner, 0, std::memory_order_acq_rel);
  }
}

uint32_t ImmMailbox::senders(uint64_t nonce, uint32_t serial) {
  return static_cast<uint32_t>(__builtin_popcountll(map_segment(nonce, serial)->header()->claimed.load()));
}

// ---------------------------------------------------------------------------------------------
// MailboxLink

std::shared_ptr<MailboxLink> MailboxLink::open(uint64_t nonce, uint32_t serial) {
  JG_CHECK_ARG(serial != kNoMailbox, "ipc: the destination descriptor names no imm mailbox");
  auto segment = map_segment(nonce, serial);
  if (segment->header()->closed.load(std::memory_order_acquire))
    throw TransferFailed("the destination engine was closed (its imm mailbox is closed)");
  uint64_t token = random_token();
  for (uint32_t i = 0; i < kRings; ++i) {
    RingHeader* r = segment->ring(i);
    uint64_t expected = 0;
    if (r->owner.load(std::memory_order_relaxed) != 0 ||
        !r->owner.compare_exchange_strong(expected, token, std::memory_order_acq_rel))
      continue;
    r->sender_pid.store(static_cast<uint64_t>(getpid()), std::memory_order_release);
    uint64_t start = r->tail.load(std::memory_order_acquire);
    segment->header()->claimed.fetch_or(uint64_t{1} << i, std::memory_order_acq_rel);
    return std::shared_ptr<MailboxLink>(new MailboxLink(std::move(segment), i, token, start));
  }
  throw TransferFailed(str_cat("the destination engine's imm mailbox has no free ring (", kRings,
                               " engines already send to it)"));
}

MailboxLink::MailboxLink(std::shared_ptr<MailboxSegment> segment, uint32_t ring, uint64_t token, uint64_t start)
    : segment_(std::move(segment)), ring_(ring), token_(token), head_(start) {}

MailboxLink::~MailboxLink() {
  RingHeader* r = segment_->ring(ring_);
  if (r->tail.load(std::memory_order_acquire) != head_.load(std::memory_order_acquire)) return;  // left claimed
  r->sender_pid.store(0, std::memory_order_release);
  segment_->header()->claimed.fetch_and(~(uint64_t{1} << ring_), std::memory_order_acq_rel);
  uint64_t expected = token_;
  r->owner.compare_exchange_strong(expected, 0, std::memory_order_acq_rel);
}

bool MailboxLink::reserve(uint64_t n, uint64_t* first) {
  uint64_t h = head_.load(std::memory_order_relaxed);
  if (h + n - taken() > kRingRecords) return false;
  *first = h;
  head_.store(h + n, std::memory_order_release);
  return true;
}

void MailboxLink::store(uint64_t pos, uint32_t imm, uint64_t count) {
  __atomic_store_n(&segment_->records(ring_)[pos % kRingRecords], imm_record::encode(pos, imm, count),
                   __ATOMIC_RELEASE);
}

uint64_t MailboxLink::device_address(uint64_t pos, int device) const {
  uint64_t base = device_base_.load(std::memory_order_acquire);
  if (base == kUnknown) {  // first use: register the segment with the GPU runtime (once per process)
    uint64_t seg = segment_->gpu_base(device);
    base = seg ? seg + segment_->record_offset(ring_) : 0;
    device_base_.store(base, std::memory_order_release);
  }
  return base ? base + (pos % kRingRecords) * sizeof(uint64_t) : 0;
}

uint64_t MailboxLink::host_address(uint64_t pos) const {
  return reinterpret_cast<uint64_t>(&segment_->records(ring_)[pos % kRingRecords]);
}

bool MailboxLink::landed(uint64_t pos) const {
  if (pos < taken()) return true;
  return imm_record::valid(__atomic_load_n(&segment_->records(ring_)[pos % kRingRecords], __ATOMIC_ACQUIRE), pos);
}

uint64_t MailboxLink::taken() const { return segment_->ring(ring_)->tail.load(std::memory_order_acquire); }

bool MailboxLink::closed() const { return segment_->header()->closed.load(std::memory_order_acquire) != 0; }

}  // namespace jax_garden::fabric
