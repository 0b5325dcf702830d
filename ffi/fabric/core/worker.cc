#include "fabric/core/worker.h"

#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <sched.h>
#include <sys/prctl.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/error.h"
#include "fabric/core/adversary.h"
#include "fabric/core/region.h"

namespace jax_garden::fabric {

ProgressRole progress_role;

// These bridge the real mutex and the role the analysis tracks.
ProgressLock::ProgressLock(Worker& worker) JG_NO_THREAD_SAFETY_ANALYSIS : worker_(worker) {
  worker_.progress_mu_.lock();
}
ProgressLock::~ProgressLock() JG_NO_THREAD_SAFETY_ANALYSIS { worker_.progress_mu_.unlock(); }
bool Worker::try_lock_progress() JG_NO_THREAD_SAFETY_ANALYSIS { return progress_mu_.try_lock(); }

namespace {

// Errors that mean nobody answers at that address (as opposed to a connection that was reset,
// which also happens when the peer refused one write).
bool unreachable_error(int err) {
  err = err < 0 ? -err : err;
  return err == FI_ECONNREFUSED || err == FI_EHOSTUNREACH || err == FI_ENETUNREACH || err == EHOSTDOWN;
}

}  // namespace

Worker::Worker(const ProviderInfo& provider, uint32_t domains, const WorkerOptions& options, CompletionSink* sink,
               std::weak_ptr<CallbackRunner> callbacks, KeyAllocator* keys, std::unique_ptr<Adversary> adversary)
    : provider_(provider),
      options_(options),
      sink_(sink),
      keys_(keys),
      callbacks_(std::move(callbacks)),
      adversary_(std::move(adversary)) {
  ProgressLock pl(*this);
  for (uint32_t d = 0; d < domains; ++d) {
    domains_.push_back(std::make_unique<Domain>(provider_, static_cast<int>(d)));
    names_.push_back(domains_.back()->name());
  }
  links_.resize(domains);
}

Worker::~Worker() { stop(); }

void Worker::start(std::vector<WorkerTask*> tasks) {
  {
    ProgressLock pl(*this);
    tasks_ = std::move(tasks);
    // Control-message receives on domain 0, one registration for all of them.
    size_t slot = options_.max_message_bytes;
    recv_buffer_.assign(slot * options_.recv_slots, 0);
    recv_reg_ = register_host(0, recv_buffer_.data(), recv_buffer_.size());
    recv_slots_.resize(options_.recv_slots);
    for (uint32_t i = 0; i < options_.recv_slots; ++i) {
      recv_slots_[i].hdr.kind = ContextKind::kRecv;
      recv_slots_[i].buffer = recv_buffer_.data() + i * slot;
      recv_slots_[i].size = slot;
      post_recv(&recv_slots_[i]);
    }
    last_activity_ = last_timeout_check_ = Clock::now();
  }
  thread_ = std::thread([this] { main(); });
}

void Worker::stop() {
  if (stop_.exchange(true, std::memory_order_acq_rel)) {
    if (thread_.joinable() && !on_thread()) thread_.join();
    return;
  }
  wake();
  if (thread_.joinable()) {
    if (on_thread()) {
      // stop() from work the worker runs (it holds the progress lock): main() shuts down once the
      // current pass returns.
      thread_.detach();
      return;
    }
    thread_.join();  // main() shut down on its way out
    return;
  }
  ProgressLock pl(*this);  // never started
  shutdown();
}

void Worker::wake() {
  MutexLock lk(cmd_mu_);
  cmd_cv_.notify_one();
}

void Worker::enqueue(Command c) {
  {
    MutexLock lk(cmd_mu_);
    commands_.push_back(std::move(c));
    has_commands_.store(true, std::memory_order_release);
  }
  cmd_cv_.notify_one();
}

void Worker::submit(std::unique_ptr<Op> op) {
  op->state->set_driver(weak_from_this());
  // Fast path: post on the caller's thread when nothing is queued ahead of us and no one else is
  // progressing; saves the handoff to the worker (a few microseconds on a small write).
  if (!has_commands_.load(std::memory_order_acquire) && try_lock_progress()) {
    ProgressLock pl(*this, std::adopt_lock);
    if (!stop_.load(std::memory_order_acquire)) {
      uint32_t touched = 0;
      for (auto& wr : op->wrs) touched |= 1u << wr.domain;
      install(std::move(op));
      for (uint32_t d = 0; d < domains_.size(); ++d)
        if (touched & (1u << d)) post_pending(d);
      last_activity_ = Clock::now();
      wake();  // the worker reaps the completions if nobody polls inline
      return;
    }
  }
  enqueue(InstallOp{std::move(op)});
}

void Worker::unregister(std::vector<MemoryRegistration> regs, std::shared_ptr<void> keepalive) {
  if (stop_.load(std::memory_order_acquire)) {
    // shutdown() closed (or closes) every registration before the domains; nothing can write now.
    release(std::move(keepalive));
    return;
  }
  enqueue(UnregisterMemory{std::move(regs), std::move(keepalive)});
}

void Worker::release(std::shared_ptr<void> keepalive) {
  if (!keepalive) return;
  // A keepalive may hold a Python object: dropped on the callback thread, which may take the GIL.
  if (auto cbs = callbacks_.lock())
    cbs->post([k = std::move(keepalive)]() mutable { k.reset(); });
}

void Worker::post_internal(std::unique_ptr<Op> op) {
  for (auto& wr : op->wrs) wr.flags |= options_.delivery_complete ? FI_DELIVERY_COMPLETE : 0;
  if (!op->state) op->state = std::make_shared<TransferState>(next_internal_id_++, OpName("internal"));
  if (op->deadline == Clock::time_point{}) op->deadline = deadline_after(options_.timeout_s);
  install(std::move(op));
}

MemoryRegistration Worker::register_host(uint32_t d, void* addr, size_t length) {
  return domains_[d]->register_host(addr, length, new_key());
}

void Worker::defer(std::function<void()> fn) {
  deferred_.push_back(std::move(fn));
  worker_work_.store(true, std::memory_order_release);
}

void Worker::install(std::unique_ptr<Op> owned) {
  Op* op = owned.get();
  if (stop_.load(std::memory_order_acquire)) {
    op->state->finish(TransferState::Status::kFailed, "the engine is closed");
    return;  // internal ops' callbacks do not run any more: their transports are shutting down
  }
  if (op->owned.size() && provider_.mr_local) {
    op->owned_regs.push_back(register_host(0, op->owned.data(), op->owned.size()));
    op->wrs[0].desc = op->owned_regs[0].desc;
  }
  if (op->wrs.empty()) {
    op->state->finish(TransferState::Status::kDone);
    if (op->on_done) defer([cb = std::move(op->on_done)]() { cb(true, {}); });
    return;
  }
  uint64_t flags = options_.delivery_complete ? FI_DELIVERY_COMPLETE : 0;
  active_.emplace(op->state->id(), std::move(owned));
  Adversary::OpDecision fate;
  Clock::time_point now{};
  if (adversary_) [[unlikely]] {
    now = Clock::now();
    fate = adversary_->on_install(*op, options_.delivery_complete);
    // Transmit completion long before delivery: the source may be reused once its bytes are copied.
    if (fate.early && copy_for_early_completion(op) && op->state->finish(TransferState::Status::kDone))
      adversary_->early_completed();
  }
  for (size_t i = 0; i < op->wrs.size(); ++i) {
    WorkRequest& wr = op->wrs[i];
    wr.op = op;
    if (wr.hdr.kind != ContextKind::kSend) wr.hdr.kind = ContextKind::kWrite;
    wr.flags |= flags;
    auto& table = links_[wr.domain];
    auto it = table.by_endpoint.find(wr.peer_endpoint);
    if (it == table.by_endpoint.end()) {
      auto link = std::make_unique<PeerLink>();
      link->domain = wr.domain;
      link->endpoint = wr.peer_endpoint;
      try {
        link->addr = domains_[wr.domain]->resolve(wr.peer_endpoint);
      } catch (const std::exception& e) {
        complete_wr(&wr, -FI_EINVAL, e.what());
        continue;
      }
      it = table.by_endpoint.emplace(wr.peer_endpoint, std::move(link)).first;
    }
    wr.link = it->second.get();
    if (adversary_ && adversary_->hold(wr, fate.op_seq, i, op->wrs.size(), now)) [[unlikely]]
      continue;  // queued on its link by release_held() once its hold ends
    wr.link->pending.push_back(&wr);
    queue_link(wr.link);
  }
}

bool Worker::copy_for_early_completion(Op* op) {
  if (op->keep_region && op->keep_region->cuda()) return false;  // device memory: not copied here
  const uint8_t* owned_begin = op->owned.data();
  const uint8_t* owned_end = owned_begin + op->owned.size();
  auto owned = [&](const WorkRequest& wr) {  // a message's payload is the op's own copy already
    auto* p = static_cast<const uint8_t*>(wr.local);
    return p >= owned_begin && p < owned_end;
  };
  uint64_t total = 0;
  for (const auto& wr : op->wrs)
    if (!owned(wr)) total += wr.length;
  if (total > (64ull << 20)) return false;  // bounded memory: large ops complete as usual
  op->early_copy.resize(total);
  uint64_t off = 0;
  uint32_t domains = 0;
  for (auto& wr : op->wrs) {
    if (!wr.length || owned(wr)) continue;
    std::memcpy(op->early_copy.data() + off, wr.local, wr.length);
    wr.local = op->early_copy.data() + off;
    wr.desc = nullptr;
    domains |= 1u << wr.domain;
    off += wr.length;
  }
  if (provider_.mr_local && off) {
    for (uint32_t d = 0; d < domains_.size(); ++d)
      if (domains & (1u << d)) op->early_regs.emplace_back(d, register_host(d, op->early_copy.data(), off));
    for (auto& wr : op->wrs) {
      auto* p = static_cast<uint8_t*>(wr.local);
      if (!wr.length || p < op->early_copy.data() || p >= op->early_copy.data() + off) continue;
      for (auto& [d, reg] : op->early_regs)
        if (d == wr.domain) wr.desc = reg.desc;
    }
  }
  return true;
}

bool Worker::release_held(Clock::time_point now) {
  std::vector<WorkRequest*> pieces;
  std::vector<std::pair<uint32_t, int64_t>> imms;
  adversary_->release_due(now, &pieces, &imms);
  for (WorkRequest* wr : pieces) {  // an op that failed meanwhile drops them in post_pending
    wr->link->pending.push_back(wr);
    queue_link(wr->link);
  }
  for (auto& [imm, n] : imms) sink_->on_imm(imm, n);
  return !pieces.empty() || !imms.empty();
}

void Worker::deliver_imm(uint32_t imm, int64_t n) {
  if (adversary_ && adversary_->hold_imm(imm, n, Clock::now())) [[unlikely]] {
    worker_work_.store(true, std::memory_order_release);  // released by the worker's passes
    return;
  }
  sink_->on_imm(imm, n);
}

void Worker::queue_link(PeerLink* link) {
  if (link->queued || link->pending.empty() || link->outstanding >= options_.max_outstanding_per_peer) return;
  link->queued = true;
  links_[link->domain].ready.push_back(link);
}

bool Worker::poll_once() {
  if (!try_lock_progress()) return false;
  ProgressLock pl(*this, std::adopt_lock);
  if (stop_.load(std::memory_order_acquire)) return false;
  bool progress = false;
  for (uint32_t d = 0; d < domains_.size(); ++d) {
    progress |= post_pending(d);
    progress |= poll_cq(d);
  }
  for (WorkerTask* t : tasks_) progress |= t->poll();
  if (progress) last_activity_ = Clock::now();
  if (!deferred_.empty()) worker_work_.store(true, std::memory_order_release);
  return progress;
}

bool Worker::post_pending(uint32_t d) {
  auto& ready = links_[d].ready;
  bool progress = false;
  // Each link gets one turn per pass; a link that cannot post (-FI_EAGAIN) waits for the next
  // pass at the back of the line instead of blocking the links behind it.
  for (size_t turns = ready.size(); turns > 0 && !ready.empty(); --turns) {
    PeerLink* link = ready.front();
    ready.pop_front();
    link->queued = false;
    bool again = false;
    while (!link->pending.empty() && link->outstanding < options_.max_outstanding_per_peer) {
      WorkRequest* wr = link->pending.front();
      Op* op = wr->op;
      if (wr->reset) [[unlikely]] {  // adversarial mode: the connection drops before this piece
        link->pending.pop_front();
        progress = true;
        complete_wr(wr, -FI_ECONNRESET,
                    "connection reset by the peer mid-op (adversarial delivery mode): the rest of the op was not "
                    "sent");
        continue;
      }
      if (op->failed) {  // the op already failed or timed out: drop what was not posted
        link->pending.pop_front();
        op->done++;
        if (op->done == op->wrs.size()) finish_op(op);
        progress = true;
        continue;
      }
      int rc = post(wr);
      if (rc == -FI_EAGAIN) {  // provider queue full for this link: progress the CQ, retry next pass
        again = true;
        break;
      }
      link->pending.pop_front();
      progress = true;
      if (rc != 0) {
        complete_wr(wr, rc, str_cat("posting failed: ", fi_error_string(rc)));
        continue;
      }
      wr->posted = true;
      op->in_flight++;
      link->outstanding++;
    }
    if (again && !link->pending.empty()) {
      link->queued = true;
      ready.push_back(link);
    } else {
      queue_link(link);
    }
  }
  return progress;
}

int Worker::post(WorkRequest* wr) {
  Domain& dom = *domains_[wr->domain];
  iovec iov{wr->local, static_cast<size_t>(wr->length)};
  if (wr->hdr.kind == ContextKind::kSend) {
    fi_msg msg{};
    msg.msg_iov = &iov;
    msg.desc = &wr->desc;
    msg.iov_count = 1;
    msg.addr = wr->link->addr;
    msg.context = &wr->hdr.ctx;
    return static_cast<int>(fi_sendmsg(dom.ep(), &msg, FI_COMPLETION | wr->flags));
  }
  fi_rma_iov rma{wr->remote_addr, static_cast<size_t>(wr->length), wr->remote_key};
  fi_msg_rma msg{};
  msg.msg_iov = &iov;
  msg.desc = &wr->desc;
  msg.iov_count = 1;
  msg.addr = wr->link->addr;
  msg.rma_iov = &rma;
  msg.rma_iov_count = 1;
  msg.context = &wr->hdr.ctx;
  msg.data = wr->imm;
  return static_cast<int>(
      fi_writemsg(dom.ep(), &msg, FI_COMPLETION | wr->flags | (wr->has_imm ? FI_REMOTE_CQ_DATA : 0)));
}

bool Worker::poll_cq(uint32_t d) {
  fi_cq_data_entry entries[32];
  Domain& dom = *domains_[d];
  ssize_t n = fi_cq_read(dom.cq(), entries, 32);
  if (n == -FI_EAGAIN) return false;
  if (n == -FI_EAVAIL) {
    fi_cq_err_entry err{};
    if (fi_cq_readerr(dom.cq(), &err, 0) != 1) return false;
    std::string prov = err.prov_errno ? fi_cq_strerror(dom.cq(), err.prov_errno, err.err_data, nullptr, 0) : "";
    std::string msg = str_cat(fi_error_string(err.err), prov.empty() ? "" : str_cat(" (provider: ", prov, ")"));
    if (!err.op_context) return true;  // an error without a context (e.g. a peer's refused write)
    auto* hdr = reinterpret_cast<ContextHeader*>(err.op_context);
    if (hdr->kind == ContextKind::kRecv) {
      if (!stop_.load()) post_recv(reinterpret_cast<RecvSlot*>(hdr));
    } else {
      auto* wr = reinterpret_cast<WorkRequest*>(hdr);
      wr->link->outstanding--;
      wr->op->in_flight--;
      queue_link(wr->link);
      complete_wr(wr, -static_cast<int>(err.err), msg);
    }
    return true;
  }
  if (n < 0) {
    std::fprintf(stderr, "jax_garden.fabric: fi_cq_read on domain %u: %s\n", d,
                 fi_error_string(static_cast<int>(n)).c_str());
    return false;
  }
  for (ssize_t i = 0; i < n; ++i) {
    auto& e = entries[i];
    if (e.flags & FI_RECV) {
      auto* slot = reinterpret_cast<RecvSlot*>(e.op_context);
      try {
        sink_->on_message(decode_frame(slot->buffer, e.len));
      } catch (const std::exception& ex) {
        std::fprintf(stderr, "jax_garden.fabric: dropped a malformed %zu-byte control message: %s\n",
                     static_cast<size_t>(e.len), ex.what());
      }
      post_recv(slot);
    } else if ((e.flags & FI_REMOTE_CQ_DATA) && (e.flags & (FI_REMOTE_WRITE | FI_RMA))) {
      deliver_imm(static_cast<uint32_t>(e.data & 0xffffffffu), 1);
    } else if (e.op_context) {
      auto* wr = reinterpret_cast<WorkRequest*>(e.op_context);
      wr->link->outstanding--;
      wr->op->in_flight--;
      queue_link(wr->link);
      complete_wr(wr, 0, {});
    }
  }
  return true;
}

void Worker::complete_wr(WorkRequest* wr, int error, const std::string& message) {
  Op* op = wr->op;
  wr->completed = true;
  if (error != 0) {
    if (unreachable_error(error) && wr->target < op->targets.size())
      sink_->on_peer_unreachable(op->targets[wr->target].owner, message);
    fail_op(op, TransferState::Status::kFailed, message, error != -FI_EINVAL);
  }
  op->done++;
  if (op->done == op->wrs.size()) finish_op(op);
}

void Worker::fail_op(Op* op, TransferState::Status status, const std::string& message, bool provider_error) {
  if (op->failed) return;
  op->failed = true;
  op->error = message;
  if (op->user && provider_error && status == TransferState::Status::kFailed && sink_->on_op_failed(*op, message))
    return;  // the sink finishes op->state once it knows more
  op->state->finish(status, message);
}

void Worker::finish_op(Op* op) {
  if (!op->failed) op->state->finish(TransferState::Status::kDone);
  if (op->on_done) defer([cb = std::move(op->on_done), ok = !op->failed, err = op->error]() { cb(ok, err); });
  unregister_owned(op);
  active_.erase(op->state->id());  // frees op
}

void Worker::unregister_owned(Op* op) {
  for (auto& r : op->owned_regs) domains_[0]->unregister(r);
  for (auto& [d, r] : op->early_regs) domains_[d]->unregister(r);
}

void Worker::check_timeouts(Clock::time_point now) {
  std::vector<Op*> finished;
  for (auto& [id, op] : active_) {
    if (!op->failed && now >= op->deadline) {
      std::string msg = str_cat("no completion from the peer within the engine timeout (", options_.timeout_s,
                                " s + size allowance); the peer may be dead or unreachable");
      for (const auto& wr : op->wrs)  // charge the peers whose requests did not complete
        if (!wr.completed && wr.target < op->targets.size())
          sink_->on_peer_unreachable(op->targets[wr.target].owner, msg);
      fail_op(op.get(), TransferState::Status::kTimedOut, msg, false);
    }
    // Ops whose unposted requests were all dropped and with nothing in flight are done.
    if (op->failed && op->in_flight == 0 && op->done == op->wrs.size()) finished.push_back(op.get());
  }
  for (Op* op : finished) finish_op(op);
}

bool Worker::run_deferred() {
  if (deferred_.empty()) return false;
  std::deque<std::function<void()>> run;
  run.swap(deferred_);
  for (auto& fn : run) {
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "jax_garden.fabric: internal completion failed: %s\n", e.what());
    }
  }
  return true;
}

bool Worker::run_commands() {
  if (!has_commands_.load(std::memory_order_acquire)) return false;
  std::deque<Command> cmds;
  {
    MutexLock lk(cmd_mu_);
    cmds.swap(commands_);
    has_commands_.store(false, std::memory_order_release);
  }
  for (auto& c : cmds) run(c);
  return !cmds.empty();
}

void Worker::run(Command& c) {
  if (auto* install_op = std::get_if<InstallOp>(&c)) {
    install(std::move(install_op->op));
    return;
  }
  auto& u = std::get<UnregisterMemory>(c);
  for (size_t d = 0; d < u.regs.size() && d < domains_.size(); ++d) domains_[d]->unregister(u.regs[d]);
  release(std::move(u.keepalive));
}

bool Worker::pass() {
  bool progress = run_commands();
  if (adversary_) [[unlikely]]
    progress |= release_held(Clock::now());
  for (uint32_t d = 0; d < domains_.size(); ++d) {
    progress |= post_pending(d);
    progress |= poll_cq(d);
  }
  for (WorkerTask* t : tasks_) progress |= t->poll();
  progress |= run_deferred();
  auto now = Clock::now();
  bool busy = false;
  for (WorkerTask* t : tasks_) {
    if (t->busy()) progress |= t->advance(now);
    busy |= t->busy();
  }
  if (now - last_timeout_check_ > std::chrono::milliseconds(1)) {
    check_timeouts(now);
    last_timeout_check_ = now;
  }
  if (progress) last_activity_ = now;
  if (adversary_) [[unlikely]]
    busy |= adversary_->busy();
  worker_work_.store(busy || !deferred_.empty(), std::memory_order_release);
  return progress;
}

void Worker::main() {
  // Idle naps are 200 us; the default 50 us timer slack would add up to a quarter to each, and so to
  // the time an arriving message (a mailbox doorbell) waits to be noticed.
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
  uint32_t idle = 0;
  while (!stop_.load(std::memory_order_acquire)) {
    // A caller spinning in a wait polls the CQs itself; on small machines two spinning threads per
    // process only slow each other down, so nap while one does (it gives up within ~100 us).
    if (inline_pollers_.load(std::memory_order_acquire) > 0 && !has_commands_.load(std::memory_order_acquire) &&
        !worker_work_.load(std::memory_order_acquire)) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    bool progress, busy;
    {
      if (!try_lock_progress()) {
        sched_yield();
        continue;
      }
      ProgressLock pl(*this, std::adopt_lock);
      progress = pass();
      // Spin (yielding: these machines may have 2 cores) while anything is in flight or awaited;
      // otherwise sleep in short naps so that an incoming write is still noticed within ~200 us.
      busy = !active_.empty() || sleepers_.load(std::memory_order_acquire) > 0 ||
             worker_work_.load(std::memory_order_acquire) || Clock::now() - last_activity_ < std::chrono::milliseconds(2);
    }
    if (progress) {
      idle = 0;
      continue;
    }
    if (busy || ++idle < 16) {
      sched_yield();
      continue;
    }
    MutexLock lk(cmd_mu_);
    cmd_cv_.wait_for(cmd_mu_, std::chrono::microseconds(200));
  }
  ProgressLock pl(*this);
  shutdown();
}

void Worker::close_domains() {
  ProgressLock pl(*this);
  if (adversary_) adversary_->clear();  // it points into the ops freed below
  domains_.clear();
  active_.clear();
  links_.clear();
  deferred_.clear();
}

void Worker::post_recv(RecvSlot* slot) {
  iovec iov{slot->buffer, slot->size};
  void* desc = recv_reg_.desc;
  fi_msg msg{};
  msg.msg_iov = &iov;
  msg.desc = &desc;
  msg.iov_count = 1;
  msg.addr = FI_ADDR_UNSPEC;
  msg.context = &slot->hdr.ctx;
  for (int attempt = 0; attempt < 1000; ++attempt) {
    ssize_t rc = fi_recvmsg(domains_[0]->ep(), &msg, 0);
    if (rc == 0) return;
    if (rc != -FI_EAGAIN) {
      std::fprintf(stderr, "jax_garden.fabric: fi_recvmsg: %s\n", fi_error_string(static_cast<int>(rc)).c_str());
      return;
    }
  }
  std::fprintf(stderr, "jax_garden.fabric: could not re-post a control-message receive (queue full)\n");
}

void Worker::shutdown() {
  if (domains_.empty() || recv_reg_.mr == nullptr) return;  // already shut down
  // Everything still pending fails: the caller sees an error, never silence.
  for (auto& [id, op] : active_) op->state->finish(TransferState::Status::kFailed, "the engine was closed");
  std::deque<Command> cmds;
  {
    MutexLock lk(cmd_mu_);
    cmds.swap(commands_);
  }
  for (auto& c : cmds) run(c);  // installs fail (stopped); unregistrations close their MRs
  if (adversary_) adversary_->clear();
  for (auto& [id, op] : active_) unregister_owned(op.get());
  domains_[0]->unregister(recv_reg_);
}

}  // namespace jax_garden::fabric
