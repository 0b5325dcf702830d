#include "moe/host_proxy.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <cstring>

#include <unistd.h>

#include "common/error.h"
#include "fabric/core/region.h"
#include "fabric/core/transfer.h"
#include "moe/internode_post.h"

namespace jax_garden::moe::proxy {

using internode::Kind;

namespace {

constexpr double kAbortDeliveryS = 1.0;  // how long a failing rank waits for its abort messages to land
constexpr int kDataKinds[] = {static_cast<int>(Kind::kDispatch), static_cast<int>(Kind::kCombine)};
constexpr int kAckKinds[] = {static_cast<int>(Kind::kDispatchFree), static_cast<int>(Kind::kCombineFree)};

uint32_t load_acquire(const char* p) { return __atomic_load_n(reinterpret_cast<const uint32_t*>(p), __ATOMIC_ACQUIRE); }
void store_release(char* p, uint32_t v) { __atomic_store_n(reinterpret_cast<uint32_t*>(p), v, __ATOMIC_RELEASE); }
int64_t load_i64(const void* p) { return __atomic_load_n(static_cast<const int64_t*>(p), __ATOMIC_RELAXED); }
int32_t load_i32(const void* p) { return __atomic_load_n(static_cast<const int32_t*>(p), __ATOMIC_ACQUIRE); }

bool is_data(int kind) { return kind == static_cast<int>(Kind::kDispatch) || kind == static_cast<int>(Kind::kCombine); }

bool trace_requested() {
  const char* v = std::getenv("JAX_GARDEN_MOE_PROXY_TRACE");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

// Everything the proxy keeps for one local rank. posted/arrived are atomics so that describe()
// (another thread) may read them while the proxy runs.
struct HostProxy::RankState {
  size_t index = 0;  // position in ranks_ and in_flight_
  ProxyRank rank;
  ControlLayout layout;
  int32_t R = 0;
  std::unique_ptr<std::atomic<uint32_t>[]> posted;   // [kKinds][R] generations posted
  std::unique_ptr<std::atomic<uint32_t>[]> arrived;  // [kKinds][R] generations fully arrived
  std::vector<std::shared_ptr<fabric::ImmCounter>> counters;  // [kKinds][8][R], for ranks of other nodes
  std::vector<std::shared_ptr<fabric::ImmCounter>> aborts;    // [R], for every rank this process does not hold
  std::array<std::atomic<uint64_t>, kKinds> posts{}, bytes{};
  bool kernel_error_seen = false;

  ReadyRecord* ready(int kind, int32_t peer) const {
    return reinterpret_cast<ReadyRecord*>(rank.control + layout.ready) + size_t(kind) * R + peer;
  }
  char* arrived_word(int kind, int32_t peer) const {
    return rank.control + layout.arrived + (int64_t{kind} * R + peer) * 4;
  }
  fabric::ImmCounter* counter(int kind, uint32_t generation, int32_t peer) const {
    return counters[(size_t(kind) * internode::kGenerations + generation % internode::kGenerations) * R + peer].get();
  }
};

HostProxy::HostProxy(std::shared_ptr<fabric::Engine> engine, const ProxyOptions& options, std::vector<ProxyRank> ranks,
                     std::vector<std::optional<ProxyPeer>> peers)
    : engine_(std::move(engine)), trace_(trace_requested()), options_(options), peers_(std::move(peers)) {
  const int32_t R = options_.num_ranks;
  JG_CHECK_ARG(engine_ != nullptr, "HostProxy: no engine");
  JG_CHECK_ARG(R >= 1 && R <= kMaxProxyRanks, "HostProxy: num_ranks must be in [1, ", kMaxProxyRanks, "], got ", R);
  JG_CHECK_ARG(options_.node_size >= 1 && R % options_.node_size == 0, "HostProxy: node_size ", options_.node_size,
               " must divide R=", R);
  JG_CHECK_ARG(static_cast<int32_t>(peers_.size()) == R, "HostProxy: ", peers_.size(), " peer entries, expected ", R);
  JG_CHECK_ARG(!ranks.empty(), "HostProxy: no local rank");
  local_.assign(R, false);
  for (const ProxyRank& r : ranks) {
    JG_CHECK_ARG(r.rank >= 0 && r.rank < R, "HostProxy: local rank ", r.rank, " outside [0, ", R, ")");
    JG_CHECK_ARG(!local_[r.rank], "HostProxy: local rank ", r.rank, " listed twice");
    JG_CHECK_ARG(r.control != nullptr && r.send != nullptr, "HostProxy: rank ", r.rank, " has no control block or send area");
    local_[r.rank] = true;
  }
  for (int32_t p = 0; p < R; ++p) {
    JG_CHECK_ARG(local_[p] || peers_[p].has_value(), "HostProxy: rank ", p, " is held elsewhere but has no peer entry");
    for (const ProxyRank& r : ranks) {
      JG_CHECK_ARG(!local_[p] || same_node(p, r.rank) || peers_[p].has_value(), "HostProxy: local rank ", p,
                   " is in another node group than local rank ", r.rank, " but has no peer entry");
    }
  }
  // Abort messages leave from host memory of their own: the send areas may be GPU memory.
  const size_t n = ranks.size() * internode::kAbortBytes;
  void* mem = std::aligned_alloc(internode::kAlign, n);
  if (!mem) throw std::bad_alloc();
  std::memset(mem, 0, n);
  abort_mem_ = std::shared_ptr<std::byte>(static_cast<std::byte*>(mem), [](std::byte* q) { std::free(q); });
  abort_region_ = engine_->register_memory(reinterpret_cast<uint64_t>(mem), n, /*cuda=*/false);
  abort_region_->set_keepalive(abort_mem_);

  for (ProxyRank& r : ranks) {
    auto st = std::make_unique<RankState>();
    st->index = ranks_.size();
    st->rank = std::move(r);
    st->layout = control_layout(R);
    st->R = R;
    st->posted.reset(new std::atomic<uint32_t>[size_t(kKinds) * R]);
    st->arrived.reset(new std::atomic<uint32_t>[size_t(kKinds) * R]);
    for (size_t i = 0; i < size_t(kKinds) * R; ++i) {
      st->posted[i].store(0);
      st->arrived[i].store(0);
    }
    st->counters.resize(size_t(kKinds) * internode::kGenerations * R);
    st->aborts.resize(R);
    const int32_t me = st->rank.rank;
    for (int32_t p = 0; p < R; ++p) {
      if (!local_[p]) st->aborts[p] = engine_->imm_counter(internode::make_imm(Kind::kAbort, 0, p, me));
      if (same_node(p, me)) continue;  // rows between ranks of one node move over NVLink
      for (int k = 0; k < kKinds; ++k) {
        for (uint32_t g = 0; g < internode::kGenerations; ++g) {
          st->counters[(size_t(k) * internode::kGenerations + g) * R + p] =
              engine_->imm_counter(internode::make_imm(static_cast<Kind>(k), g, p, me));
        }
      }
    }
    // The peers' receive areas are mapped now, before any kernel of ours runs: mapping one later, on
    // the proxy thread, makes driver calls (cudaIpcOpenMemHandle, closing a dead mapping) that may
    // wait for this process's GPU work, i.e. for a receive kernel that waits for that very message.
    for (int32_t p = 0; p < R; ++p) {
      if (same_node(p, me) || !peers_[p]) continue;
      try {
        engine_->prepare(*st->rank.send, peers_[p]->receive);
      } catch (const std::exception& e) {
        throw TransferFailed(str_cat("moe (CUDA, node groups): rank ", me,
                                    " cannot reach the receive area of rank ", p, ": ", e.what()));
      }
    }
    ranks_.push_back(std::move(st));
  }
  in_flight_.resize(ranks_.size());  // (constructors are not analysed: no thread runs yet)
  if (trace_) {
    for (auto& st : ranks_) {
      for (int32_t p = 0; p < R; ++p) {
        if (!same_node(p, st->rank.rank)) trace(peer_summary(*st, p));
      }
    }
  }
}

HostProxy::~HostProxy() { stop(); }

void HostProxy::start() {
  JG_CHECK_ARG(!thread_.joinable(), "HostProxy: started twice");
  stop_.store(false);
  thread_ = std::thread([this] { run(); });
}

void HostProxy::stop() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

void HostProxy::run() {
  auto idle_since = Clock::now();
  auto dumped = Clock::now();
  const auto spin = seconds_to_duration(options_.idle_spin_s);
  while (!stop_.load(std::memory_order_acquire)) {
    if (trace_ && Clock::now() - dumped > std::chrono::seconds(2)) {
      dumped = Clock::now();
      trace(str_cat("state:\n", describe()));
    }
    bool moved = false;
    try {
      moved = poll_once();
    } catch (const std::exception& e) {
      fail(kErrProxyProtocol, -1, str_cat("moe (CUDA): the host proxy failed: ", e.what()), true, false);
    }
    if (moved) {
      idle_since = Clock::now();
    } else if (Clock::now() - idle_since > spin) {
      // Idle: a step of the model runs elsewhere. Poll slower rather than spin a core forever.
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
}

bool HostProxy::poll_once() {
  bool moved = false;
  for (auto& st : ranks_) moved |= poll_rank(*st);
  return moved;
}

bool HostProxy::poll_rank(RankState& st) {
  const int32_t R = st.R, me = st.rank.rank;
  bool moved = false;
  // The kernels' sticky error: tell every other process once (its kernels stop waiting for us).
  if (!st.kernel_error_seen) {
    const char* err = st.rank.control + st.layout.kernel_error;
    const int32_t code = load_i32(err);
    if (code != kErrNone) {
      st.kernel_error_seen = true;
      const int32_t a = load_i32(err + 4), b = load_i32(err + 8), rank = load_i32(err + 12), c = load_i32(err + 16);
      // Every local rank stops waiting (as the CPU context fails all its ranks at once) ...
      for (auto& other : ranks_) store_release(other->rank.control + other->layout.abort, 1);
      // ... and so do the other processes' (unless the error came from one of them).
      if (code != kErrPeerFailed && code != kErrPeerTimedOut) {
        broadcast_abort(device_error_message(code, a, b, rank, c), is_timeout_error(code));
      }
      moved = true;
    }
  }
  for (int32_t p = 0; p < R; ++p) {
    // A peer's abort: its reason becomes ours (it told every rank; nothing to pass on).
    if (!local_[p] && !failed_.load(std::memory_order_acquire) && st.aborts[p]->total() > 0) {
      std::string text = st.rank.read_abort ? st.rank.read_abort(p) : std::string("(no reason given)");
      const bool timed_out = text.find("timed out") != std::string::npos;
      fail(timed_out ? kErrPeerTimedOut : kErrPeerFailed, p, str_cat("rank ", p, " failed: ", text), false, timed_out);
      moved = true;
    }
    if (same_node(p, me)) continue;  // rows between ranks of one node move over NVLink
    const ProxyPeer& peer = *peers_[p];
    // Messages and acks the kernels published.
    for (int kind : {kDataKinds[0], kDataKinds[1], kAckKinds[0], kAckKinds[1]}) {
      const ReadyRecord* rec = st.ready(kind, p);
      const uint32_t gen = load_acquire(reinterpret_cast<const char*>(&rec->generation));
      std::atomic<uint32_t>& posted = st.posted[size_t(kind) * R + p];
      const uint32_t done = posted.load(std::memory_order_relaxed);
      if (gen == done) continue;
      if (gen != done + 1) {
        fail(kErrProxyProtocol, p,
             str_cat("moe (CUDA): rank ", me, ": the kernels published ", internode::kind_name(static_cast<Kind>(kind)),
                     " #", gen, " for rank ", p, " while #", done, " was the last one posted"),
             true, false);
        return true;
      }
      const uint32_t imm = internode::make_imm(static_cast<Kind>(kind), gen, me, p);
      if (is_data(kind)) {
        const int64_t bytes = load_i64(&rec->bytes), src = load_i64(&rec->src_offset), dst = load_i64(&rec->dst_offset);
        if (bytes <= 0 || src < 0 || dst < 0 || uint64_t(src + bytes) > st.rank.send->length() ||
            uint64_t(dst + bytes) > peer.receive.length) {
          fail(kErrProxyProtocol, p,
               str_cat("moe (CUDA): rank ", me, ": ", internode::kind_name(static_cast<Kind>(kind)), " #", gen,
                       " for rank ", p, " has ", bytes, " bytes from offset ", src, " to offset ", dst,
                       ", outside the send area (", st.rank.send->length(), " bytes) or the peer's receive area (",
                       peer.receive.length, " bytes)"),
               true, false);
          return true;
        }
        std::shared_ptr<fabric::TransferState> state;
        try {
          state = internode::post_message(*engine_, st.rank.send, peer.receive, src, dst, bytes, imm);
        } catch (const std::exception& e) {
          fail(kErrTransferFailed, p,
               str_cat("moe (CUDA): rank ", me, ": could not post the ", internode::kind_name(static_cast<Kind>(kind)),
                       " #", gen, " to rank ", p, ": ", e.what()),
               true, false);
          return true;
        }
        if (trace_) {
          trace(str_cat("rank ", me, ": posted ", internode::kind_name(static_cast<Kind>(kind)), " #", gen, " to rank ",
                        p, ": ", bytes, " bytes, send area +", src, " -> receive area +", dst, ", imm ", hex(imm),
                        ", sender domains ", engine_->num_domains()));
        }
        MutexLock lk(mu_);
        in_flight_[st.index].messages.push_back({p, static_cast<Kind>(kind), gen, std::move(state)});
        st.bytes[kind].fetch_add(uint64_t(bytes), std::memory_order_relaxed);
      } else {
        std::shared_ptr<fabric::TransferState> state;
        try {
          state = internode::post_signal(*engine_, peer.receive, imm);
        } catch (const std::exception&) {
          // As on the CPU path: an ack that cannot go out is no error here (the peer closed or died).
        }
        if (trace_) {
          trace(str_cat("rank ", me, ": posted ", internode::kind_name(static_cast<Kind>(kind)), " #", gen, " to rank ",
                        p, ", imm ", hex(imm), state ? "" : " (could not be posted)"));
        }
        if (state) {
          MutexLock lk(mu_);
          in_flight_[st.index].acks.push_back({p, static_cast<Kind>(kind), gen, std::move(state)});
        }
      }
      st.posts[kind].fetch_add(1, std::memory_order_relaxed);
      posted.store(gen, std::memory_order_release);
      moved = true;
    }
    // Arrivals: a message (or ack) of generation g is there once every imm it delivers arrived. The
    // counter of (kind, g mod 8) counts generations g, g+8, ... cumulatively; the free acks keep a
    // peer within one generation of us, so its total says how many of them arrived.
    for (int kind = 0; kind < kKinds; ++kind) {
      std::atomic<uint32_t>& arrived = st.arrived[size_t(kind) * R + p];
      const uint64_t per = is_data(kind) ? internode::message_imms(peer.sender) : internode::signal_imms(peer.sender);
      uint32_t next = arrived.load(std::memory_order_relaxed) + 1;
      while (st.counter(kind, next, p)->total() >= (uint64_t(next - 1) / internode::kGenerations + 1) * per) {
        if (trace_) {
          trace(str_cat("rank ", me, ": ", internode::kind_name(static_cast<Kind>(kind)), " #", next, " from rank ", p,
                        " arrived (counter of generation mod ", internode::kGenerations, " = ",
                        next % internode::kGenerations, ": total ", st.counter(kind, next, p)->total(), ", ", per,
                        " imms per message)"));
        }
        arrived.store(next, std::memory_order_relaxed);
        store_release(st.arrived_word(kind, p), next);
        ++next;
        moved = true;
      }
    }
  }
  // A message write the engine failed is an error (acks are not: see above).
  std::string failed_write;
  int32_t failed_peer = -1;
  {
    MutexLock lk(mu_);
    InFlight& mine = in_flight_[st.index];
    for (const Pending& op : mine.messages) {
      if (op.state->finished() && op.state->status() != fabric::TransferState::Status::kDone) {
        failed_write = str_cat("moe (CUDA): rank ", me, ": the ", internode::kind_name(op.kind), " #", op.generation,
                               " to rank ", op.peer, " failed: ", op.state->error());
        failed_peer = op.peer;
        break;
      }
    }
    auto done = [](const Pending& op) {
      return op.state->finished() && op.state->status() == fabric::TransferState::Status::kDone;
    };
    if (trace_) {
      for (const Pending& op : mine.messages) {
        if (done(op)) {
          trace(str_cat("rank ", me, ": the ", internode::kind_name(op.kind), " #", op.generation, " to rank ", op.peer,
                        " finished (engine op done)"));
        }
      }
    }
    mine.messages.erase(std::remove_if(mine.messages.begin(), mine.messages.end(), done), mine.messages.end());
    mine.acks.erase(
        std::remove_if(mine.acks.begin(), mine.acks.end(), [](const Pending& op) { return op.state->finished(); }),
        mine.acks.end());
  }
  if (!failed_write.empty()) {
    fail(kErrTransferFailed, failed_peer, failed_write, true, false);
    moved = true;
  }
  return moved;
}

void HostProxy::fail(int32_t code, int32_t peer, const std::string& message, bool broadcast, bool timed_out) {
  {
    MutexLock lk(mu_);
    if (failure_.code != kErrNone) return;
    failure_ = {code, peer, message};
  }
  failed_.store(true, std::memory_order_release);
  // The kernels of every local rank stop waiting.
  for (auto& st : ranks_) store_release(st->rank.control + st->layout.abort, 1);
  if (broadcast) broadcast_abort(message, timed_out);
}

void HostProxy::broadcast_abort(const std::string& reason, bool timed_out) {
  {
    MutexLock lk(mu_);
    if (abort_sent_) return;
    abort_sent_ = true;
  }
  const int32_t R = options_.num_ranks;
  std::vector<std::shared_ptr<fabric::TransferState>> sent;
  for (size_t i = 0; i < ranks_.size(); ++i) {
    RankState& st = *ranks_[i];
    auto* m = reinterpret_cast<internode::AbortMessage*>(abort_mem_.get() + i * internode::kAbortBytes);
    m->magic = internode::kAbortMagic;
    m->source = st.rank.rank;
    m->timed_out = timed_out ? 1 : 0;
    m->length = static_cast<uint32_t>(std::min(reason.size(), sizeof(m->text)));
    std::memcpy(m->text, reason.data(), m->length);
    for (int32_t p = 0; p < R; ++p) {
      if (local_[p]) continue;  // ranks of this process see the abort words at once
      try {
        fabric::WriteRequest req;
        req.src = abort_region_;
        req.dst = &peers_[p]->receive;
        req.length = internode::kAbortBytes;
        req.src_offset = i * internode::kAbortBytes;
        // The receive area starts with the abort mailboxes [R] (internode::RegionLayout::recv_abort = 0).
        req.dst_offset = uint64_t(st.rank.rank) * internode::kAbortBytes;
        req.imm = internode::make_imm(Kind::kAbort, 0, st.rank.rank, p);
        sent.push_back(engine_->write(req));
      } catch (const std::exception&) {
        // Best effort: a peer that cannot be told times out on its own.
      }
    }
  }
  const auto deadline = deadline_after(std::min(kAbortDeliveryS, options_.timeout_s));
  for (auto& s : sent) {
    try {
      s->wait(std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count()));
    } catch (const std::exception&) {
    }
  }
}

HostProxy::Failure HostProxy::failure() const {
  MutexLock lk(mu_);
  return failure_;
}

bool HostProxy::drain(double timeout_s) {
  const auto deadline = deadline_after(timeout_s);
  while (true) {
    bool busy = false;
    for (auto& st : ranks_) {
      for (int32_t p = 0; p < st->R && !busy; ++p) {
        if (same_node(p, st->rank.rank)) continue;
        for (int kind = 0; kind < kKinds && !busy; ++kind) {
          const uint32_t gen = load_acquire(reinterpret_cast<const char*>(&st->ready(kind, p)->generation));
          busy = gen != st->posted[size_t(kind) * st->R + p].load(std::memory_order_acquire);
        }
      }
      MutexLock lk(mu_);
      for (const Pending& op : in_flight_[st->index].messages) busy |= !op.state->finished();
      for (const Pending& op : in_flight_[st->index].acks) busy |= !op.state->finished();
    }
    if (!busy || failed_.load()) return !busy;
    if (Clock::now() >= deadline) return false;
    if (!thread_.joinable()) poll_once();  // driven by hand (tests)
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

std::vector<uint64_t> HostProxy::posts(size_t i) const {
  JG_CHECK_ARG(i < ranks_.size(), "HostProxy: no local rank index ", i);
  std::vector<uint64_t> out;
  for (auto& v : ranks_[i]->posts) out.push_back(v.load());
  return out;
}

std::vector<uint64_t> HostProxy::bytes(size_t i) const {
  JG_CHECK_ARG(i < ranks_.size(), "HostProxy: no local rank index ", i);
  std::vector<uint64_t> out;
  for (auto& v : ranks_[i]->bytes) out.push_back(v.load());
  return out;
}

void HostProxy::trace(const std::string& line) const {
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - born_).count();
  std::fprintf(stderr, "[moe proxy pid %d +%.3f ms] %s\n", static_cast<int>(::getpid()), ms, line.c_str());
  std::fflush(stderr);
}

std::string HostProxy::peer_summary(const RankState& st, int32_t p) const {
  const ProxyPeer& peer = *peers_[p];
  const fabric::MemoryDescriptor& d = peer.receive;
  std::string s = str_cat("rank ", st.rank.rank, " -> rank ", p, ": receive area ", hex(d.base), " +", d.length,
                          " bytes (", d.kind == fabric::MemoryKind::kCuda ? str_cat("GPU ", d.device) : "host",
                          ", owner pid ", d.pid, " nonce ", hex(d.process_nonce), ", region slot ", d.region_slot,
                          " key ", hex(d.region_key), ", imm mailbox ", d.mailbox, ", ipc ",
                          !d.has_ipc ? std::string("none")
                          : d.ipc_kind == fabric::IpcKind::kVmm
                              ? str_cat("vmm, offset ", d.ipc_offset)
                              : str_cat("legacy handle fnv ", hex(fabric::checksum32(d.ipc_handle.data(), d.ipc_handle.size())),
                                        ", offset ", d.ipc_offset),
                          "); its messages deliver ", internode::message_imms(peer.sender), " imms, acks ",
                          internode::signal_imms(peer.sender), "; our send area ", hex(st.rank.send->base()));
  try {
    const fabric::PathChoice c = engine_->path_for(*st.rank.send, d, fabric::TransferPath::kAuto);
    s += str_cat("; path ", fabric::path_name(c.path), " (", engine_->path_reason(*st.rank.send, d, fabric::TransferPath::kAuto), ")");
  } catch (const std::exception& e) {
    s += str_cat("; path: ", e.what());
  }
  return s;
}

std::string HostProxy::describe() const {
  std::string s;
  for (auto& stp : ranks_) {
    const RankState& st = *stp;
    const int32_t me = st.rank.rank;
    const char* ctl = st.rank.control;
    s += str_cat("rank ", me, ": abort word ", load_acquire(ctl + st.layout.abort), ", kernel error ",
                 load_i32(ctl + st.layout.kernel_error), "\n  kernels (generation entered/left):");
    for (int k = 0; k < kProxyKernels; ++k) {
      s += str_cat(" ", proxy_kernel_name(k), " ", load_acquire(ctl + st.layout.progress + 8 * k), "/",
                   load_acquire(ctl + st.layout.progress + 8 * k + 4), ";");
    }
    s += "\n";
    for (int32_t p = 0; p < st.R; ++p) {
      if (p == me) continue;
      s += str_cat("  peer ", p, local_[p] ? " (this process)" : "", same_node(p, me) ? " (same node: rows over NVLink)" : "",
                   ": abort imms ", local_[p] ? 0 : st.aborts[p]->total());
      if (!same_node(p, me)) {
        for (int kind = 0; kind < kKinds; ++kind) {
          const uint32_t arrived = st.arrived[size_t(kind) * st.R + p].load();
          s += str_cat("; ", internode::kind_name(static_cast<Kind>(kind)), ": ready ",
                       load_acquire(reinterpret_cast<const char*>(&st.ready(kind, p)->generation)), " posted ",
                       st.posted[size_t(kind) * st.R + p].load(), " arrived ", arrived, " (next counter total ",
                       st.counter(kind, arrived + 1, p)->total(), ")");
        }
      }
      s += "\n";
    }
    MutexLock lk(mu_);
    s += str_cat("  writes in flight: ", in_flight_[st.index].messages.size(), " messages, ",
                 in_flight_[st.index].acks.size(), " acks\n");
  }
  Failure f = failure();
  s += f.code == kErrNone ? "proxy: no failure\n" : str_cat("proxy failure (code ", f.code, "): ", f.message, "\n");
  return s;
}

}  // namespace jax_garden::moe::proxy
