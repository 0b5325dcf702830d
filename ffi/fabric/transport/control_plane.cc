#include "fabric/transport/control_plane.h"

#include <algorithm>
#include <cstdio>
#include <stdexcept>

#include "common/error.h"
#include "fabric/core/adversary.h"

namespace jax_garden::fabric {
namespace {

std::string describe_region(const OpTarget& t) {
  return str_cat("region [0x", std::hex, t.base, ", +", std::dec, t.length, ")");
}

}  // namespace

ControlPlane::ControlPlane(Worker& worker, const Bytes& address_bytes, const ImmTarget& imm_target,
                           RegionTable& regions, PeerKnowledge& peers, double timeout_s)
    : worker_(worker),
      address_bytes_(address_bytes),
      imm_target_(imm_target),
      regions_(regions),
      peers_(peers),
      timeout_s_(timeout_s) {
  // Handlers run in advance(), by the worker under its lock.
  subscribe({MsgKind::kImmBatch}, [this](Frame& f) {
    progress_role.assert_held();
    auto m = decode_imm_batch(f.payload);
    worker_.deliver_imm(m.imm, static_cast<int64_t>(m.count));
  });
  subscribe({MsgKind::kRegionQuery}, [this](Frame& f) {
    progress_role.assert_held();
    answer_query(f);
  });
  subscribe({MsgKind::kRegionReply}, [this](Frame& f) {
    progress_role.assert_held();
    on_reply(decode_region_reply(f.payload));
  });
}

void ControlPlane::subscribe(std::initializer_list<MsgKind> kinds, FrameHandler handler) {
  for (MsgKind kind : kinds) {
    auto k = static_cast<size_t>(kind);
    if (kind == MsgKind::kUser || k >= handlers_.size() || handlers_[k])
      throw std::logic_error(str_cat("control plane: message kind ", k, " cannot be subscribed to (user "
                                     "messages, out of range or taken)"));
    handlers_[k] = handler;
  }
}

std::unique_ptr<Op> ControlPlane::make_send_op(const Bytes& endpoint, MsgKind kind, const Bytes& payload) const {
  auto op = std::make_unique<Op>();
  op->kind = OpKind::kSend;
  op->owned = encode_frame(kind, address_bytes_, payload.data(), payload.size());
  op->wrs.resize(1);
  auto& wr = op->wrs[0];
  wr.hdr.kind = ContextKind::kSend;
  wr.domain = 0;
  wr.local = op->owned.data();
  wr.length = op->owned.size();
  wr.peer_endpoint = endpoint;
  op->targets.push_back({endpoint, 0, 0, 0, 0});
  return op;
}

void ControlPlane::send(const Bytes& endpoint, MsgKind kind, const Bytes& payload, DoneCallback on_done) {
  auto op = make_send_op(endpoint, kind, payload);
  op->on_done = std::move(on_done);
  worker_.post_internal(std::move(op));
}

void ControlPlane::deliver_imms(const MemoryDescriptor& dst, uint32_t imm, uint64_t count, DoneCallback on_done) {
  if (count == 0) {
    worker_.defer([cb = std::move(on_done)]() { cb(true, {}); });
    return;
  }
  if (count > 1) {
    send(dst.domains[0].endpoint, MsgKind::kImmBatch, encode(ImmBatchMsg{imm, count}), std::move(on_done));
    return;
  }
  auto op = std::make_unique<Op>();
  op->kind = OpKind::kImm;
  op->wrs.resize(1);
  imm_target_.fill(op->wrs[0], dst, 0, imm);
  op->targets.push_back({dst.domains[0].endpoint, 0, 0, 0, 0});
  op->on_done = std::move(on_done);
  worker_.post_internal(std::move(op));
}

void ControlPlane::queue_imms(std::shared_ptr<const MemoryDescriptor> dst, uint32_t imm, uint64_t count,
                              DoneCallback on_done) {
  auto& p = pending_imms_[{dst->domains[0].endpoint, imm}];
  if (p.callbacks.empty()) p.dst = std::move(dst);
  p.count += count;
  p.callbacks.push_back(std::move(on_done));
}

bool ControlPlane::flush_imms() {
  if (pending_imms_.empty()) return false;
  std::map<std::pair<Bytes, uint32_t>, PendingImms> batch;
  batch.swap(pending_imms_);
  for (auto& [key, p] : batch) {
    auto cbs = std::make_shared<std::vector<DoneCallback>>(std::move(p.callbacks));
    if (Adversary* adv = worker_.adversary()) [[unlikely]] {
      deliver_split(*p.dst, key.second, adv->split_imms(p.count), std::move(cbs));
      continue;
    }
    deliver_imms(*p.dst, key.second, p.count, [cbs](bool ok, const std::string& error) {
      progress_role.assert_held();  // run by the worker under its lock
      for (auto& cb : *cbs) cb(ok, error);
    });
  }
  return true;
}

void ControlPlane::deliver_split(const MemoryDescriptor& dst, uint32_t imm, const std::vector<uint64_t>& parts,
                                 std::shared_ptr<std::vector<DoneCallback>> cbs) {
  // The callbacks run once every part was delivered (or the first failure is known to all).
  struct Outcome {
    size_t left;
    bool ok = true;
    std::string error;
  };
  auto outcome = std::make_shared<Outcome>(Outcome{parts.size()});
  for (uint64_t n : parts) {
    deliver_imms(dst, imm, n, [cbs, outcome](bool ok, const std::string& error) {
      progress_role.assert_held();  // run by the worker under its lock
      if (!ok && outcome->ok) {
        outcome->ok = false;
        outcome->error = error;
      }
      if (--outcome->left == 0)
        for (auto& cb : *cbs) cb(outcome->ok, outcome->error);
    });
  }
}

void ControlPlane::on_frame(Frame&& frame) { frames_.push_back(std::move(frame)); }

bool ControlPlane::busy() const {
  return !frames_.empty() || !pending_imms_.empty() || !unasked_.empty() || !cases_.empty() || !retry_.empty();
}

bool ControlPlane::advance(Clock::time_point now) {
  bool progress = false;
  if (!frames_.empty()) {
    std::deque<Frame> frames;
    frames.swap(frames_);
    for (auto& f : frames) {
      try {
        handle(f);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "jax_garden.fabric: dropped an internal message (kind %d) from %s: %s\n", int(f.kind),
                     f.sender.to_string().c_str(), e.what());
      }
    }
    progress = true;
  }
  progress |= flush_imms();
  for (size_t i = 0; i < retry_.size();) {
    if (now < retry_[i].first) {
      ++i;
      continue;
    }
    auto& unasked = unasked_[retry_[i].second.owner];
    for (auto& e : retry_[i].second.entries)
      if (!e.first->state->finished()) unasked.push_back(std::move(e));
    retry_.erase(retry_.begin() + static_cast<std::ptrdiff_t>(i));
  }
  progress |= send_queries();
  for (auto& c : cases_)
    if (!c->state->finished() && now >= c->deadline) conclude(*c);
  size_t before = cases_.size();
  cases_.erase(std::remove_if(cases_.begin(), cases_.end(), [](const auto& c) { return c->state->finished(); }),
               cases_.end());
  return progress || cases_.size() != before;
}

void ControlPlane::handle(Frame& f) {
  auto k = static_cast<size_t>(f.kind);
  // No subscriber (a kind no transport of this engine speaks): nothing to do with it.
  if (k < handlers_.size() && handlers_[k]) handlers_[k](f);
}

void ControlPlane::answer_query(const Frame& f) {
  auto q = decode_region_query(f.payload);
  RegionReplyMsg reply;
  reply.query = q.query;
  for (const auto& e : q.entries)
    reply.live.push_back(regions_.is_live(e.region_key, e.key, e.base, e.length) ? 1 : 0);
  send(f.sender.domains[0], MsgKind::kRegionReply, encode(reply), [](bool, const std::string&) {});
}

bool ControlPlane::triage(Op& op, const std::string& error) {
  auto c = std::make_shared<Case>();
  for (const auto& t : op.targets)
    if (t.region_key != 0) c->targets.push_back(t);
  if (c->targets.empty()) return false;  // imm-only writes and messages: nothing to ask about
  c->state = op.state;
  c->error = error;
  c->verdict.assign(c->targets.size(), -1);
  c->deadline = deadline_after(std::min(1.0, timeout_s_ / 2));
  for (size_t i = 0; i < c->targets.size(); ++i) unasked_[c->targets[i].owner].emplace_back(c, i);
  cases_.push_back(std::move(c));
  return true;
}

bool ControlPlane::send_queries() {
  if (unasked_.empty()) return false;
  std::map<Bytes, std::vector<std::pair<std::shared_ptr<Case>, size_t>>> unasked;
  unasked.swap(unasked_);
  for (auto& [owner, entries] : unasked) {
    if (std::string why = peers_.unreachable(owner); !why.empty()) {
      for (auto& [c, i] : entries) c->verdict[i] = -2;  // no point asking
      continue;
    }
    for (size_t begin = 0; begin < entries.size(); begin += kMaxRegionQueries) {
      size_t end = std::min(entries.size(), begin + kMaxRegionQueries);
      RegionQueryMsg m;
      m.query = next_query_++;
      Query q;
      q.owner = owner;
      for (size_t k = begin; k < end; ++k) {
        const OpTarget& t = entries[k].first->targets[entries[k].second];
        m.entries.push_back({t.region_key, t.key, t.base, t.length});
        q.entries.push_back(entries[k]);
      }
      uint64_t id = m.query;
      queries_.emplace(id, std::move(q));
      send(owner, MsgKind::kRegionQuery, encode(m), [this, id](bool ok, const std::string& error) {
        progress_role.assert_held();  // run by the worker under its lock
        if (!ok) on_query_failed(id, error);
      });
    }
  }
  return true;
}

void ControlPlane::on_reply(const RegionReplyMsg& m) {
  auto it = queries_.find(m.query);
  if (it == queries_.end()) return;
  Query q = std::move(it->second);
  queries_.erase(it);
  for (size_t k = 0; k < q.entries.size() && k < m.live.size(); ++k) {
    auto& [c, i] = q.entries[k];
    c->verdict[i] = m.live[k];
    if (!m.live[k]) {
      const OpTarget& t = c->targets[i];
      peers_.mark_gone(t.owner, t.region_key, t.key, t.base, t.length);
    }
  }
  for (auto& [c, i] : q.entries)
    if (!c->state->finished() && std::none_of(c->verdict.begin(), c->verdict.end(), [](int v) { return v == -1; }))
      conclude(*c);
}

void ControlPlane::on_query_failed(uint64_t query, const std::string& error) {
  auto it = queries_.find(query);
  if (it == queries_.end()) return;
  // Right after a reset the connection is still being re-established: ask again shortly (the cases
  // conclude at their deadline whatever happens). A peer that refuses connections was marked
  // unreachable by the worker already.
  retry_.emplace_back(Clock::now() + std::chrono::milliseconds(20), std::move(it->second));
  queries_.erase(it);
}

void ControlPlane::conclude(Case& c) {
  std::string why;
  for (size_t i = 0; i < c.targets.size() && why.empty(); ++i) {
    if (c.verdict[i] == 0) {
      why = str_cat("; the peer no longer has ", describe_region(c.targets[i]),
                    " (it was deregistered: a stale descriptor; or the descriptor was forged or garbled): "
                    "nothing was written there");
    }
  }
  for (size_t i = 0; i < c.targets.size() && why.empty(); ++i) {
    if (c.verdict[i] < 0) {
      why = str_cat("; the peer did not answer whether it still has ", describe_region(c.targets[i]),
                    " (it may be dead or unreachable)");
    }
  }
  if (why.empty()) {
    why = str_cat("; the peer still has ", describe_region(c.targets[0]),
                  ": the connection was reset while this write was in flight (the peer refused another write on it, "
                  "e.g. one with a stale descriptor, or restarted) and it may not have landed");
  }
  c.state->finish(TransferState::Status::kFailed, c.error + why);
}

}  // namespace jax_garden::fabric
