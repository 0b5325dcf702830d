// HostProxy: the host thread between the CUDA MoE kernels of node groups and the TransferEngine
// (docs/moe-ffi.md, "Host proxy for GPUs"; shared layouts: proxy_protocol.h). Plain C++ over the
// engine's public API (register_memory, scatter, write_imm, imm_counter totals), so it is
// indifferent to how the engine delivers imms, and runs (and is tested) without CUDA: the control
// blocks it serves are host memory either way.
//
// One thread per process serves every local rank. Each pass, for every rank of another node group:
//   * a ready record whose generation moved on -> the message is posted exactly as the CPU path
//     posts it (a one-target scatter cut by bytes, imm (kind, generation, me, peer)), a free ack as a
//     zero-byte imm write;
//   * the imm counters of (kind, next generation mod 8, peer) -> once every imm of that message
//     arrived (internode::message_imms / signal_imms of the sender), its arrival word in the control
//     block advances, which is what the receive kernels wait on;
//   * the peer's abort mailbox counter -> the failure becomes this proxy's error and the abort word
//     of every local control block is set (the kernels stop waiting).
// A message write the engine failed, or a ready record out of sequence, is an error here too; an
// error the kernels recorded (a timeout) is sent to every rank this process does not hold (abort
// mailboxes), so that they stop waiting at once. Acks that fail are not errors (the peer closed or
// died; its data wait reports the latter).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "common/thread_annotations.h"

#include "common/deadline.h"
#include "fabric/engine/engine.h"
#include "moe/internode_protocol.h"
#include "moe/proxy_protocol.h"

namespace jax_garden::moe::proxy {

// A rank this process holds.
struct ProxyRank {
  int32_t rank = -1;
  char* control = nullptr;                        // host address of its control block (control_layout)
  std::shared_ptr<fabric::MemoryRegion> send;     // its send area, registered with the engine
  // Text of the abort message `peer` left in this rank's receive area (it may be GPU memory).
  std::function<std::string(int32_t peer)> read_abort;
};

// A rank this process does not hold, as it is reached.
struct ProxyPeer {
  fabric::MemoryDescriptor receive;  // its receive area (the registered part)
  internode::SenderSettings sender;  // how many imms its messages deliver
};

struct ProxyOptions {
  double timeout_s = 30.0;      // bound of the abort broadcast and of drain()
  int32_t num_ranks = 0;        // R
  int32_t node_size = 1;        // ranks [g*node_size, (g+1)*node_size) share a node group
  double idle_spin_s = 0.005;   // spin this long after the last activity, then poll every ~50 us
};

class HostProxy {
 public:
  // peers: by rank; required for every rank this process does not hold, and for a local rank in
  // another node group than some other local rank (rows between them go through the engine too).
  HostProxy(std::shared_ptr<fabric::Engine> engine, const ProxyOptions& options, std::vector<ProxyRank> ranks,
            std::vector<std::optional<ProxyPeer>> peers);
  ~HostProxy();
  HostProxy(const HostProxy&) = delete;
  HostProxy& operator=(const HostProxy&) = delete;

  void start();  // the thread; poll_once() may be driven by hand instead (tests)
  void stop();   // joins the thread; idempotent
  // One pass over every rank and peer; true when anything moved.
  bool poll_once();

  struct Failure {
    int32_t code = kErrNone;  // DeviceError
    int32_t peer = -1;
    std::string message;
  };
  // The first failure this proxy saw or was told (code kErrNone if none).
  Failure failure() const;
  // Waits (at most timeout_s) until every published ready record was posted and every message write
  // finished, so that closing cuts no write a peer counts on. True if everything finished.
  bool drain(double timeout_s);
  // Posts (messages and acks) and bytes per kind so far, for local rank index `i` (benchmarks).
  std::vector<uint64_t> posts(size_t i) const;
  std::vector<uint64_t> bytes(size_t i) const;
  // Where every local rank stands: ready, posted and arrived generations per peer and kind, counter
  // totals, pending writes, failure (debugging a stall).
  std::string describe() const;

 private:
  struct Pending {
    int32_t peer;
    internode::Kind kind;
    uint32_t generation;
    std::shared_ptr<fabric::TransferState> state;
  };
  struct RankState;

  bool same_node(int32_t a, int32_t b) const { return a / options_.node_size == b / options_.node_size; }
  bool poll_rank(RankState& st) JG_EXCLUDES(mu_);
  void fail(int32_t code, int32_t peer, const std::string& message, bool broadcast, bool timed_out);
  void broadcast_abort(const std::string& reason, bool timed_out);
  void run();
  // JAX_GARDEN_MOE_PROXY_TRACE=1: one stderr line per post, finished write and arrival, what each
  // peer's receive area is and which engine path reaches it, and describe() every 2 s while the
  // proxy runs (debugging a stall on a GPU machine; off by default, one branch per event).
  void trace(const std::string& line) const;
  std::string peer_summary(const RankState& st, int32_t peer) const;

  const std::shared_ptr<fabric::Engine> engine_;
  const bool trace_;
  const std::chrono::steady_clock::time_point born_ = std::chrono::steady_clock::now();  // trace times count from here
  const ProxyOptions options_;
  std::vector<std::unique_ptr<RankState>> ranks_;
  std::vector<std::optional<ProxyPeer>> peers_;
  std::vector<bool> local_;  // by rank: held by this process
  // Abort messages leave from here (host memory, registered): one kAbortBytes slot per local rank.
  std::shared_ptr<std::byte> abort_mem_;
  std::shared_ptr<fabric::MemoryRegion> abort_region_;

  // Writes in flight of one local rank: messages (a failure is an error) and free acks.
  struct InFlight {
    std::vector<Pending> messages, acks;
  };
  mutable Mutex mu_;
  std::vector<InFlight> in_flight_ JG_GUARDED_BY(mu_);  // by position in ranks_ (RankState::index)
  Failure failure_ JG_GUARDED_BY(mu_);
  bool abort_sent_ JG_GUARDED_BY(mu_) = false;
  std::atomic<bool> failed_{false};
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace jax_garden::moe::proxy
