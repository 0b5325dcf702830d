// What the worker posts: an Op (one user operation, or an internal one of a transport) is a fixed
// list of work requests, each one libfabric call toward one peer link. Only the thread holding the
// progress lock touches an Op after submission (see worker.h).
#pragma once

#include <rdma/fabric.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/deadline.h"
#include "fabric/core/domain.h"
#include "fabric/core/requests.h"
#include "fabric/core/transfer.h"

namespace jax_garden::fabric {

class MemoryRegion;
struct Op;

// Every context handed to libfabric starts with a fi_context2 (some providers require
// FI_CONTEXT/FI_CONTEXT2 space) followed by a tag saying what it is.
enum class ContextKind : uint8_t { kWrite, kSend, kRecv };

struct ContextHeader {
  fi_context2 ctx;  // must stay first: libfabric hands back &ctx
  ContextKind kind;
};

struct BytesHash {
  size_t operator()(const Bytes& b) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (uint8_t c : b) h = (h ^ c) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

// One (local domain, remote endpoint) pair: its own queue and in-flight budget, so that a peer that
// stops answering (its requests pending or -FI_EAGAIN) never holds up requests to other peers.
struct PeerLink {
  uint32_t domain = 0;
  Bytes endpoint;
  fi_addr_t addr = FI_ADDR_UNSPEC;
  std::deque<struct WorkRequest*> pending;
  uint32_t outstanding = 0;  // posted, not completed
  bool queued = false;       // in its domain's ready list
};

struct WorkRequest {
  ContextHeader hdr;
  Op* op = nullptr;
  uint32_t domain = 0;
  uint32_t target = 0;  // index into op->targets
  void* local = nullptr;
  uint64_t length = 0;
  void* desc = nullptr;
  Bytes peer_endpoint;
  PeerLink* link = nullptr;  // set when installed
  uint64_t remote_addr = 0;
  uint64_t remote_key = 0;
  bool has_imm = false;
  uint32_t imm = 0;
  uint64_t flags = 0;  // extra fi_writemsg / fi_sendmsg flags
  bool posted = false;
  bool completed = false;  // its completion (or error) was seen
  bool reset = false;      // adversarial mode: its connection is reset before it is posted (it fails)
};

// Where one destination of an op lives: what failure triage asks the owner about, and which owner a
// failure is charged to.
struct OpTarget {
  Bytes owner;              // the owner engine's domain-0 endpoint (its identity)
  uint64_t region_key = 0;  // 0: the owner's imm target (imm-only writes)
  uint64_t key = 0;         // the provider key the write used
  uint64_t base = 0, length = 0;
};

struct Op {
  OpKind kind = OpKind::kWrite;
  bool user = false;  // a user operation (its failures are triaged); else internal
  std::shared_ptr<TransferState> state;
  std::vector<WorkRequest> wrs;  // never resized once submitted (contexts point into it)
  std::vector<OpTarget> targets;
  size_t done = 0;       // completed or dropped
  size_t in_flight = 0;  // posted, not yet completed
  bool failed = false;
  std::string error;
  Clock::time_point deadline;
  std::shared_ptr<MemoryRegion> keep_region;  // the source stays registered while posted
  Bytes owned;                                 // send payload
  std::vector<MemoryRegistration> owned_regs;  // registration of `owned` where FI_MR_LOCAL needs it
  // Adversarial mode, transmit completion: the pieces' source bytes, copied when the op was reported
  // complete early (the caller may reuse its source), and their registrations (domain, registration).
  std::vector<uint8_t> early_copy;
  std::vector<std::pair<uint32_t, MemoryRegistration>> early_regs;
  // Internal ops (parts of IPC / staged transfers, control messages): runs on the worker once the op
  // finished (ok = every work request completed).
  std::function<void(bool ok, const std::string& error)> on_done;
};

}  // namespace jax_garden::fabric
