#include "fabric/core/engine_parts.h"

#include "common/error.h"
#include "fabric/core/worker.h"

namespace jax_garden::fabric {

ImmTarget::ImmTarget(Worker& worker) : buffer_(64, 0) {
  ProgressLock pl(worker);
  for (uint32_t d = 0; d < worker.num_domains(); ++d) {
    regs_.push_back(worker.register_host(d, buffer_.data(), buffer_.size()));
    keys_.push_back(regs_.back().key);
  }
}

void ImmTarget::fill(WorkRequest& wr, const MemoryDescriptor& peer, uint32_t domain, uint32_t imm) const {
  const auto& rk = peer.domains[domain % peer.domains.size()];
  wr.domain = domain;
  wr.local = const_cast<uint8_t*>(buffer_.data());
  wr.length = 0;
  wr.desc = regs_[domain].desc;
  wr.peer_endpoint = rk.endpoint;
  wr.remote_addr = peer.imm_address();
  wr.remote_key = rk.imm_key;
  wr.has_imm = true;
  wr.imm = imm;
}

void ImmTarget::close(Worker& worker) {
  ProgressLock pl(worker);
  for (size_t d = 0; d < regs_.size(); ++d) worker.domain(static_cast<uint32_t>(d)).unregister(regs_[d]);
}

void PeerKnowledge::mark_unreachable(const Bytes& owner, const std::string& reason) {
  MutexLock lk(mu_);
  // Every new failure restarts the quarantine: ops keep failing at once while the peer stays down.
  auto& d = down_[owner];
  d.since = Clock::now();
  d.reason = reason;
  any_.store(true, std::memory_order_release);
}

std::string PeerKnowledge::unreachable(const Bytes& owner) {
  if (!any_.load(std::memory_order_acquire)) return {};
  MutexLock lk(mu_);
  auto it = down_.find(owner);
  if (it == down_.end()) return {};
  double age = seconds_since(it->second.since);
  if (age > quarantine_s_) {  // let the next op through: it finds out whether the peer is back
    down_.erase(it);
    return {};
  }
  return str_cat(it->second.reason, " (", static_cast<int>(age * 1000), " ms ago)");
}

uint64_t PeerKnowledge::region_id(const Bytes& owner, uint64_t region_key, uint64_t key, uint64_t base,
                                  uint64_t length) {
  uint64_t h = BytesHash{}(owner);
  for (uint64_t v : {region_key, key, base, length}) h = (h ^ v) * 1099511628211ull + (h >> 29);
  return h;
}

void PeerKnowledge::mark_gone(const Bytes& owner, uint64_t region_key, uint64_t key, uint64_t base,
                              uint64_t length) {
  MutexLock lk(mu_);
  gone_.insert(region_id(owner, region_key, key, base, length));
  any_.store(true, std::memory_order_release);
}

bool PeerKnowledge::gone(const MemoryDescriptor& dst) {
  if (!any_.load(std::memory_order_acquire) || dst.domains.empty()) return false;
  MutexLock lk(mu_);
  if (gone_.empty()) return false;
  const Bytes& owner = dst.domains[0].endpoint;
  for (const auto& d : dst.domains)
    if (gone_.count(region_id(owner, dst.region_key, d.key, dst.base, dst.length))) return true;
  return false;
}

void MessageQueue::push(Message m) {
  {
    MutexLock lk(mu_);
    messages_.push_back(std::move(m));
  }
  cv_.notify_all();
}

Message MessageQueue::pop(double timeout_s, ProgressDriver* driver) {
  std::unique_ptr<SleeperScope> sleeper;
  if (driver) sleeper = std::make_unique<SleeperScope>(*driver);
  auto deadline = deadline_after(timeout_s);
  MutexLock lk(mu_);
  while (messages_.empty()) {
    if (closed_) throw TransferFailed("recv: the engine is closed");
    if (cv_.wait_until(mu_, deadline) == std::cv_status::timeout && messages_.empty()) {
      throw Timeout(str_cat("recv: no message within ", timeout_s, " s"));
    }
  }
  Message m = std::move(messages_.front());
  messages_.pop_front();
  return m;
}

void MessageQueue::close() {
  {
    MutexLock lk(mu_);
    closed_ = true;
  }
  cv_.notify_all();
}

}  // namespace jax_garden::fabric
