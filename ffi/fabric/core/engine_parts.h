// Small pieces of engine state shared by the facade and the transports: the imm target, what is
// known about peers (unreachable ones, stale regions), and the user-message queue.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/deadline.h"
#include "common/thread_annotations.h"
#include "fabric/core/domain.h"
#include "fabric/core/progress.h"
#include "fabric/wire/wire_format.h"
#include "fabric/core/work_request.h"

namespace jax_garden::fabric {

class Worker;

// The engine's 64-byte scratch region, registered on every domain: the source of imm-only writes
// and their target at the receiver (descriptors carry its address and keys), so imm traffic never
// needs the destination region itself to be registered (staged regions are not).
class ImmTarget {
 public:
  explicit ImmTarget(Worker& worker);  // registers (takes the progress lock)
  uint64_t address() const { return reinterpret_cast<uint64_t>(buffer_.data()); }
  const std::vector<uint64_t>& keys() const { return keys_; }
  // The one builder of imm-only work requests: a zero-byte write carrying `imm` from local domain
  // `domain` to `peer`'s owner (its imm target on the matching domain).
  void fill(WorkRequest& wr, const MemoryDescriptor& peer, uint32_t domain, uint32_t imm) const;
  void close(Worker& worker);  // before the domains close

 private:
  std::vector<uint8_t> buffer_;
  std::vector<MemoryRegistration> regs_;
  std::vector<uint64_t> keys_;
};

// What the engine has learnt about peers from failures: owners that do not answer (ops toward them
// fail at once for `quarantine_s`, then one is let through again), and regions that owners said
// they no longer have (stale descriptors: ops toward them fail at once).
class PeerKnowledge {
 public:
  explicit PeerKnowledge(double quarantine_s) : quarantine_s_(quarantine_s) {}
  void mark_unreachable(const Bytes& owner, const std::string& reason);
  // Why `owner` is known unreachable ("" when it is not, or its quarantine expired).
  std::string unreachable(const Bytes& owner);
  void mark_gone(const Bytes& owner, uint64_t region_key, uint64_t key, uint64_t base, uint64_t length);
  bool gone(const MemoryDescriptor& dst);  // any of its (domain) keys was found gone

 private:
  static uint64_t region_id(const Bytes& owner, uint64_t region_key, uint64_t key, uint64_t base, uint64_t length);
  struct Down {
    std::string reason;
    Clock::time_point since;
  };
  const double quarantine_s_;
  Mutex mu_;
  std::unordered_map<Bytes, Down, BytesHash> down_ JG_GUARDED_BY(mu_);
  std::unordered_set<uint64_t> gone_ JG_GUARDED_BY(mu_);
  std::atomic<bool> any_{false};  // fast path: nothing known, nothing to look up
};

struct Message {
  NetAddress sender;
  Bytes payload;
};

// User control messages that arrived, for recv().
class MessageQueue {
 public:
  void push(Message m);
  Message pop(double timeout_s, ProgressDriver* driver);  // Timeout / TransferFailed (closed)
  void close();

 private:
  Mutex mu_;
  CondVar cv_;
  std::deque<Message> messages_ JG_GUARDED_BY(mu_);
  bool closed_ JG_GUARDED_BY(mu_) = false;
};

}  // namespace jax_garden::fabric
