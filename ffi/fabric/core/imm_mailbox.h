// Imm delivery between engines on one host without a network round trip (the ipc path).
//
// Every engine owns a mailbox in shared memory (/dev/shm/jax_garden.mailbox.<process nonce>.<serial>;
// descriptors name it by the owner's process nonce and the serial). A mailbox holds kRings rings of
// kRingRecords 64-bit records; a sending engine claims one ring per destination engine and is its
// only producer, the owner's worker its only consumer. A record is one aligned 64-bit store
//
//     [lap tag:8][count:24][imm:32]      lap tag of position p = (p / kRingRecords) % 255 + 1
//
// written either by the sender's host (host copies, or once a GPU copy's event fired) or by the
// sender's GPU stream right after the copy it reports (cuStreamWriteValue64, which fences the copy's
// writes first): a record is visible only once its bytes landed, so counting it proves its piece is
// there, exactly as an RMA imm does. The lap tag makes a stale record (a previous lap, or a zeroed
// slot) invalid without the consumer ever clearing slots. count 0 is a record that only reports
// progress (an op without imm still needs its delivery acknowledged).
//
// Flow control and liveness: the consumer publishes how far it took records (tail); a sender never
// reserves a position a full ring ahead of it, and its ops complete when their records were taken
// (delivery completion) or landed (transmit completion). A dead or stuck owner never takes them, so
// the sender's ops fail at their deadline; a mailbox its owner closed fails them at once. A sender
// releases its ring when it closes and everything it wrote was taken; the owner resets rings whose
// sending process died. Like the shared region table, the mailbox trusts same-host peers (same uid):
// it is not a security boundary against a hostile local process.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/deadline.h"
#include "common/thread_annotations.h"

namespace jax_garden::fabric {

inline constexpr uint32_t kNoMailbox = 0;

namespace imm_record {
inline constexpr uint32_t kRings = 64;
inline constexpr uint32_t kRingRecords = 2048;
inline constexpr uint64_t kMaxCount = (1u << 24) - 1;

inline uint64_t lap_tag(uint64_t pos) { return (pos / kRingRecords) % 255 + 1; }
inline uint64_t encode(uint64_t pos, uint32_t imm, uint64_t count) {
  return (lap_tag(pos) << 56) | ((count & kMaxCount) << 32) | imm;
}
inline bool valid(uint64_t word, uint64_t pos) { return (word >> 56) == lap_tag(pos); }
inline uint32_t imm_of(uint64_t word) { return static_cast<uint32_t>(word); }
inline uint64_t count_in(uint64_t word) { return (word >> 32) & kMaxCount; }
// Records needed for `count` arrivals (at least one: an op without imm reports with a count-0 one).
inline uint64_t records_for(uint64_t count) { return count == 0 ? 1 : (count + kMaxCount - 1) / kMaxCount; }
}  // namespace imm_record

class MailboxSegment;  // one mapping of a mailbox, shared by the owner and senders in one process

// Owner side: an engine's mailbox. poll() is called by the engine's worker (progress lock held).
class ImmMailbox {
 public:
  using Sink = void (*)(void* ctx, uint32_t imm, uint64_t count);

  // A fresh mailbox of this process (throws FabricError when /dev/shm is unusable).
  static std::shared_ptr<ImmMailbox> create();
  ~ImmMailbox();
  ImmMailbox(const ImmMailbox&) = delete;
  ImmMailbox& operator=(const ImmMailbox&) = delete;
  uint32_t serial() const { return serial_; }

  // Takes every record that landed, in ring order, calling sink(ctx, imm, count) for each with
  // count > 0; returns the records taken. Also resets rings whose sending process died (checked
  // about once a second).
  size_t poll(Sink sink, void* ctx);
  // From now on senders' ops fail at once (their pending ones too); unlinks the segment's name.
  void close();
  // Rings with a sender in the mailbox (process_nonce, serial) of this host (tests).
  static uint32_t senders(uint64_t process_nonce, uint32_t serial);

 private:
  ImmMailbox(std::shared_ptr<MailboxSegment> segment, uint32_t serial);
  size_t poll_ring(uint32_t ring, Sink sink, void* ctx);
  void reclaim_dead_rings();

  std::shared_ptr<MailboxSegment> segment_;
  const uint32_t serial_;
  std::vector<uint64_t> tails_;   // per ring: records taken (mirrored into the ring header)
  std::vector<uint64_t> owners_;  // per ring: the sender token seen last
  Clock::time_point next_reclaim_;
};

// Sender side: the ring this engine claimed in one peer engine's mailbox. One producer: the caller
// serializes reserve() with enqueuing the records it reserved (so they are written in order).
class MailboxLink {
 public:
  // Maps the mailbox (once per process) and claims a free ring. Throws TransferFailed when the
  // mailbox does not exist (owner gone), is closed, or has no free ring.
  static std::shared_ptr<MailboxLink> open(uint64_t process_nonce, uint32_t serial);
  ~MailboxLink();  // releases the ring if everything written was taken (else leaves it to the owner)
  MailboxLink(const MailboxLink&) = delete;
  MailboxLink& operator=(const MailboxLink&) = delete;

  // Positions [*first, *first + n) when the ring has room for n more records, else false.
  bool reserve(uint64_t n, uint64_t* first);
  uint64_t reserved() const { return head_.load(std::memory_order_acquire); }

  // The record of position pos, stored by this host now.
  void store(uint64_t pos, uint32_t imm, uint64_t count);
  // Where a GPU stream stores the record of position pos (0: the segment cannot be mapped for the
  // GPUs); the first call registers the segment with `device` current.
  uint64_t device_address(uint64_t pos, int device) const;
  uint64_t host_address(uint64_t pos) const;
  // The record of pos landed (or was already taken).
  bool landed(uint64_t pos) const;
  uint64_t taken() const;  // the owner's tail: records taken so far
  bool closed() const;     // the owner closed its mailbox
  uint32_t ring() const { return ring_; }

 private:
  MailboxLink(std::shared_ptr<MailboxSegment> segment, uint32_t ring, uint64_t token, uint64_t start);
  std::shared_ptr<MailboxSegment> segment_;
  const uint32_t ring_;
  const uint64_t token_;
  std::atomic<uint64_t> head_;  // next position to reserve
  mutable std::atomic<uint64_t> device_base_{kUnknown};  // this ring's records as the GPU sees them
  static constexpr uint64_t kUnknown = ~uint64_t{0};
};

}  // namespace jax_garden::fabric
