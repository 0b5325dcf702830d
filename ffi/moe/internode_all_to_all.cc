#include "moe/internode_all_to_all.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "fabric/region.h"
#include "fabric/transfer.h"
#include "moe/host_math.h"
#include "moe/internode_post.h"

namespace jax_garden::moe {

using internode::Kind;

namespace {

// Waits poll the peers' abort mailboxes at least this often.
constexpr double kSliceS = 0.02;
// How long a failing rank waits for its abort messages to land before it reports the error.
constexpr double kAbortDeliveryS = 1.0;

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count());
}

std::shared_ptr<std::byte> zeroed_buffer(int64_t bytes) {
  const size_t n = static_cast<size_t>(internode::align_up(std::max<int64_t>(bytes, 1)));
  void* p = std::aligned_alloc(internode::kAlign, n);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, n);
  return std::shared_ptr<std::byte>(static_cast<std::byte*>(p), [](std::byte* q) { std::free(q); });
}

std::string rank_list(const std::vector<int32_t>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

}  // namespace

// One rank this process holds.
struct InternodeAllToAll::Local {
  int32_t rank = -1;
  bool remote = false;  // has peers in other node groups (then it has a receive region)
  std::shared_ptr<std::byte> send_mem, recv_mem;
  std::byte* send = nullptr;
  std::byte* recv = nullptr;
  std::shared_ptr<fabric::MemoryRegion> send_region, recv_region;
  std::vector<std::shared_ptr<fabric::ImmCounter>> counters;  // [kind][generation mod 8][peer]

  // Calls completed per phase. Guarded by mu_ (the ranks of this node read them).
  uint64_t dispatch_sent = 0, dispatch_recvd = 0, combine_sent = 0, combine_recvd = 0;
  uint64_t combine_dispatch_gen = 0;  // the dispatch whose rows the last combine_send sent
  int64_t dropped = 0;

  // Private to this rank's own calls (one at a time, on its device's thread).
  std::vector<int32_t> sent_indices;     // [T*K] indices of the last dispatch_send
  int32_t sent_bound = 0;
  std::vector<int32_t> sent_entries_to;  // [R] (t, k) entries the last dispatch_send routed to each rank
  std::vector<int64_t> sent_offset_to;   // [R] where each rank's combine message goes in our combine area
  std::vector<int32_t> routed_indices;   // the same four, of the dispatch combine undoes
  int32_t routed_bound = 0;
  std::vector<int32_t> routed_entries_to;
  std::vector<int64_t> routed_offset_to;
  std::vector<int32_t> kept;             // [L] rows per local expert of the last dispatch_recv
  std::vector<int32_t> row_source;       // [M] s*T*K + t*K + k, or -1 for padding
  int64_t used_rows = 0;
  std::vector<int32_t> kept_from;        // [R*L] rows kept from each source per local expert
  std::vector<int64_t> combine_offset_at;  // [R] for each source: where our combine message goes there
  std::vector<int32_t> combine_rows_at;    // [R] rows it reserved for us there
  std::vector<int64_t> pack_offset;        // [R] our combine message for each source (send combine area)
  std::vector<int32_t> pack_rows;          // [R]
  std::vector<Pending> dispatch_ops, combine_ops, signal_ops;

  std::array<uint64_t, kPhases> bytes{}, ops{}, calls{};
  std::array<uint64_t, kPhases> post_ns{}, wait_ns{};  // time spent posting to the engine, waiting
  std::vector<std::array<uint64_t, 2>> timing;  // [kPhases][kTimingRing]
};

// ---------------------------------------------------------------------------------------------
// Construction and bootstrap

InternodeAllToAll::InternodeAllToAll(const MoeShape& shape, DType dispatch_dtype, DType combine_dtype,
                                     const InternodeOptions& options)
    : shape_(shape),
      dispatch_dtype_(dispatch_dtype),
      combine_dtype_(combine_dtype),
      timeout_s_(options.timeout_s),
      node_size_(options.node_size),
      layout_((validate_shape(shape), validate_dispatch_dtype(shape, dispatch_dtype),
               internode::region_layout(shape, dispatch_dtype))) {
  JG_CHECK_ARG(combine_dtype == DType::kBF16, "MoE: combine dtype must be bfloat16, got ", dtype_name(combine_dtype));
  JG_CHECK_ARG(timeout_s_ > 0, "MoE: timeout must be > 0 seconds, got ", timeout_s_);
  const int32_t R = shape_.num_ranks;
  JG_CHECK_ARG(R <= internode::kMaxRanks, "MoE internode: at most ", internode::kMaxRanks, " ranks, got ", R);
  JG_CHECK_ARG(node_size_ >= 1 && R % node_size_ == 0, "MoE internode: node_size=", node_size_,
               " must be >= 1 and divide the number of ranks R=", R);
  JG_CHECK_ARG(!options.local_ranks.empty(), "MoE internode: this process holds no rank");
  local_index_.assign(R, -1);
  for (size_t i = 0; i < options.local_ranks.size(); ++i) {
    const int32_t r = options.local_ranks[i];
    JG_CHECK_ARG(r >= 0 && r < R, "MoE internode: local rank ", r, " is outside [0, ", R, ")");
    JG_CHECK_ARG(local_index_[r] < 0, "MoE internode: local rank ", r, " is listed twice");
    local_index_[r] = static_cast<int32_t>(i);
  }
  // A node group shares memory: on the host it lives in one process.
  for (int32_t r : options.local_ranks) {
    const int32_t first = node_of(r) * node_size_;
    std::vector<int32_t> held;
    for (int32_t p = first; p < first + node_size_; ++p)
      if (local_index_[p] >= 0) held.push_back(p);
    JG_CHECK_ARG(static_cast<int32_t>(held.size()) == node_size_, "MoE internode: node group ", node_of(r),
                 " (ranks ", first, "..", first + node_size_ - 1, ") is split between processes: this process holds [",
                 rank_list(held), "]; on the host a node group must live in one process (choose node_size so that "
                 "each process holds whole groups)");
  }

  const bool multi_node = R > node_size_;
  if (multi_node) {
    fabric::EngineOptions eo = options.engine;
    eo.timeout_s = timeout_s_;
    engine_ = fabric::Engine::create(eo);
    my_sender_.domains = engine_->num_domains();
    my_sender_.sharding = eo.sharding;
  }
  const int32_t T = shape_.max_tokens, K = shape_.experts_per_token, L = shape_.local_experts();
  for (int32_t r : options.local_ranks) {
    auto lr = std::make_unique<Local>();
    lr->rank = r;
    lr->remote = multi_node;
    lr->send_mem = zeroed_buffer(layout_.send_bytes);
    lr->send = lr->send_mem.get();
    if (lr->remote) {
      lr->recv_mem = zeroed_buffer(layout_.recv_bytes);
      lr->recv = lr->recv_mem.get();
      lr->send_region = engine_->register_memory(reinterpret_cast<uint64_t>(lr->send), layout_.send_bytes, /*cuda=*/false);
      lr->send_region->set_keepalive(lr->send_mem);  // freed only once nothing can write into it
      lr->recv_region = engine_->register_memory(reinterpret_cast<uint64_t>(lr->recv), layout_.recv_bytes, /*cuda=*/false);
      lr->recv_region->set_keepalive(lr->recv_mem);
    }
    lr->sent_indices.assign(size_t(T) * K, 0);
    lr->sent_entries_to.assign(R, 0);
    lr->sent_offset_to.assign(R, 0);
    lr->routed_indices.assign(size_t(T) * K, 0);
    lr->routed_entries_to.assign(R, 0);
    lr->routed_offset_to.assign(R, 0);
    lr->kept.assign(L, 0);
    lr->row_source.assign(shape_.max_recv_tokens, -1);
    lr->kept_from.assign(size_t(R) * L, 0);
    lr->combine_offset_at.assign(R, 0);
    lr->combine_rows_at.assign(R, 0);
    lr->pack_offset.assign(R, 0);
    lr->pack_rows.assign(R, 0);
    lr->timing.assign(size_t(kPhases) * kTimingRing, {0, 0});
    locals_.push_back(std::move(lr));
  }
  peers_.resize(R);
}

InternodeAllToAll::~InternodeAllToAll() {
  if (engine_) engine_->close();
}

fabric::Bytes InternodeAllToAll::peer_info(int32_t rank) const {
  const Local* me = find_local(rank);
  JG_CHECK_ARG(me, "MoE internode: peer_info: rank ", rank, " is not held by this process");
  JG_CHECK_ARG(me->remote, "MoE internode: peer_info: rank ", rank,
               " has no peers in other node groups (node_size = R): nothing to exchange");
  internode::PeerInfo info;
  info.rank = rank;
  info.node_size = node_size_;
  info.shape = shape_;
  info.dispatch_dtype = dispatch_dtype_;
  info.combine_dtype = combine_dtype_;
  info.sender = my_sender_;
  info.receive = me->recv_region->descriptor();
  return internode::encode_peer_info(info);
}

void InternodeAllToAll::connect(const fabric::Bytes& bytes) {
  JG_CHECK_ARG(engine_, "MoE internode: connect: node_size = R, there are no other node groups");
  JG_CHECK_ARG(!finalized_, "MoE internode: connect after finalize");
  internode::PeerInfo info = internode::decode_peer_info(bytes.data(), bytes.size());
  const MoeShape& s = info.shape;
  const MoeShape& m = shape_;
  JG_CHECK_ARG(s.num_ranks == m.num_ranks && s.num_experts == m.num_experts &&
                   s.experts_per_token == m.experts_per_token && s.hidden == m.hidden &&
                   s.max_tokens == m.max_tokens && s.max_recv_tokens == m.max_recv_tokens &&
                   s.expert_padding == m.expert_padding && s.scale_cols == m.scale_cols,
               "MoE internode: rank ", info.rank, " was created with shape (", moe::describe(s),
               ") but this process uses (", moe::describe(m), "); every process must build the same AllToAll");
  JG_CHECK_ARG(info.dispatch_dtype == dispatch_dtype_ && info.combine_dtype == combine_dtype_,
               "MoE internode: rank ", info.rank, " uses dtypes ", dtype_name(info.dispatch_dtype), "/",
               dtype_name(info.combine_dtype), " but this process ", dtype_name(dispatch_dtype_), "/",
               dtype_name(combine_dtype_));
  JG_CHECK_ARG(info.node_size == node_size_, "MoE internode: rank ", info.rank, " uses node_size=", info.node_size,
               " but this process node_size=", node_size_);
  JG_CHECK_ARG(info.rank >= 0 && info.rank < m.num_ranks, "MoE internode: peer rank ", info.rank,
               " is outside [0, ", m.num_ranks, ")");
  JG_CHECK_ARG(local_index_[info.rank] < 0, "MoE internode: rank ", info.rank, " is held by this process");
  JG_CHECK_ARG(info.receive.provider == engine_->provider(), "MoE internode: rank ", info.rank, " uses provider '",
               info.receive.provider, "' but this process '", engine_->provider(), "'");
  JG_CHECK_ARG(info.receive.length >= static_cast<uint64_t>(layout_.recv_bytes), "MoE internode: rank ", info.rank,
               "'s receive region has ", info.receive.length, " bytes, expected ", layout_.recv_bytes, /*cuda=*/false);
  Peer& p = peers_[info.rank];
  p.connected = true;
  p.receive = std::move(info.receive);
  p.sender = info.sender;
}

std::vector<int32_t> InternodeAllToAll::remote_ranks() const {
  std::vector<int32_t> out;
  if (!engine_) return out;
  for (int32_t r = 0; r < shape_.num_ranks; ++r)
    if (local_index_[r] < 0) out.push_back(r);
  return out;
}

void InternodeAllToAll::finalize() {
  JG_CHECK_ARG(!finalized_, "MoE internode: finalize called twice");
  const int32_t R = shape_.num_ranks;
  if (engine_) {
    for (auto& lr : locals_) {  // ranks of this process in other node groups: reached the same way
      Peer& p = peers_[lr->rank];
      p.connected = true;
      p.receive = lr->recv_region->descriptor();
      p.sender = my_sender_;
    }
    std::vector<int32_t> missing;
    for (int32_t r = 0; r < R; ++r)
      if (!peers_[r].connected) missing.push_back(r);
    JG_CHECK_ARG(missing.empty(), "MoE internode: finalize: no peer info for ranks [", rank_list(missing),
                 "] (connect every rank held by another process)");
    for (auto& lr : locals_) {
      lr->counters.resize(size_t(internode::kKinds) * internode::kGenerations * R);
      for (int32_t p = 0; p < R; ++p) {
        if (same_node(p, lr->rank)) continue;
        for (int k = 0; k < internode::kKinds; ++k) {
          const uint32_t gens = static_cast<Kind>(k) == Kind::kAbort ? 1 : internode::kGenerations;
          for (uint32_t g = 0; g < gens; ++g) {
            lr->counters[(size_t(k) * internode::kGenerations + g) * R + p] =
                engine_->imm_counter(internode::make_imm(static_cast<Kind>(k), g, p, lr->rank));
          }
        }
      }
    }
  }
  finalized_ = true;
}

const InternodeAllToAll::Local* InternodeAllToAll::find_local(int32_t rank) const {
  if (rank < 0 || rank >= shape_.num_ranks || local_index_[rank] < 0) return nullptr;
  return locals_[local_index_[rank]].get();
}

InternodeAllToAll::Local& InternodeAllToAll::local(const char* phase, int32_t rank) {
  if (rank < 0 || rank >= shape_.num_ranks) {
    throw InvalidArgument(str_cat("jg_moe_", phase, ": rank operand ", rank, " is outside [0, ", shape_.num_ranks,
                                  "); pass jax.lax.axis_index of the AllToAll's axis"));
  }
  if (local_index_[rank] < 0) {
    throw InvalidArgument(str_cat("jg_moe_", phase, ": rank ", rank,
                                  " is not held by this process (its devices hold ranks of other processes?)"));
  }
  if (!finalized_) throw InvalidArgument(str_cat("jg_moe_", phase, ": the AllToAll was not finalized"));
  return *locals_[local_index_[rank]];
}

std::string InternodeAllToAll::describe() const {
  std::vector<int32_t> held;
  for (auto& lr : locals_) held.push_back(lr->rank);
  return str_cat("InternodeAllToAll(", moe::describe(shape_), ", node_size=", node_size_, ", local ranks [",
                 rank_list(held), "], ",
                 engine_ ? str_cat("engine ", engine_->provider(), " x", engine_->num_domains()) : "no engine", ")");
}

// ---------------------------------------------------------------------------------------------
// Errors

void InternodeAllToAll::fail(const char* phase, int32_t rank, const std::string& what, Failure kind) {
  const bool timeout = kind == Failure::kTimeout;
  const std::string msg = str_cat("jg_moe_", phase, " (rank ", rank, "): ", what);
  bool first = false;
  {
    std::lock_guard lk(mu_);
    if (broken_.empty()) {
      broken_ = msg;
      broken_by_timeout_ = timeout;
      first = true;
    }
    cv_.notify_all();
  }
  if (first) broadcast_abort(msg, timeout);
  if (kind == Failure::kTimeout) throw Timeout(msg);
  if (kind == Failure::kTransfer) throw TransferFailed(msg);
  throw InvalidArgument(msg);
}

void InternodeAllToAll::throw_broken(const char* phase, int32_t rank) {
  std::string why;
  {
    std::lock_guard lk(mu_);
    why = broken_;
  }
  throw std::runtime_error(
      str_cat("jg_moe_", phase, " (rank ", rank, "): this AllToAll is unusable after an earlier error: ", why));
}

void InternodeAllToAll::check_usable(const char* phase, int32_t rank) {
  if (engine_) poll_aborts();
  bool broken;
  {
    std::lock_guard lk(mu_);
    broken = !broken_.empty();
  }
  if (broken) throw_broken(phase, rank);
}

void InternodeAllToAll::poll_aborts() {
  if (!finalized_) return;
  const int32_t R = shape_.num_ranks;
  for (auto& lr : locals_) {
    for (int32_t p = 0; p < R; ++p) {
      if (same_node(p, lr->rank)) continue;
      if (counter(*lr, Kind::kAbort, 0, p).credits() <= 0) continue;
      const auto* m = reinterpret_cast<const internode::AbortMessage*>(lr->recv + layout_.recv_abort +
                                                                       int64_t{p} * internode::kAbortBytes);
      std::string text = "(no reason given)";
      if (m->magic == internode::kAbortMagic && m->length <= sizeof(m->text)) text.assign(m->text, m->length);
      std::lock_guard lk(mu_);
      if (broken_.empty()) {
        broken_ = str_cat("rank ", p, " failed: ", text);
        broken_by_timeout_ = m->timed_out != 0;
        cv_.notify_all();
      }
      return;
    }
  }
}

void InternodeAllToAll::broadcast_abort(const std::string& reason, bool timed_out) {
  if (!engine_ || !finalized_) return;
  {
    std::lock_guard lk(mu_);
    if (abort_sent_ || closed_) return;
    abort_sent_ = true;
  }
  const int32_t R = shape_.num_ranks;
  std::vector<std::shared_ptr<fabric::TransferState>> sent;
  for (auto& lr : locals_) {
    auto* m = reinterpret_cast<internode::AbortMessage*>(lr->send + layout_.send_abort);
    m->magic = internode::kAbortMagic;
    m->source = lr->rank;
    m->timed_out = timed_out ? 1 : 0;
    m->length = static_cast<uint32_t>(std::min(reason.size(), sizeof(m->text)));
    std::memcpy(m->text, reason.data(), m->length);
    for (int32_t p = 0; p < R; ++p) {
      if (same_node(p, lr->rank) || local_index_[p] >= 0) continue;  // this process knows already
      try {
        fabric::WriteRequest req;
        req.src = lr->send_region;
        req.dst = &peers_[p].receive;
        req.length = internode::kAbortBytes;
        req.src_offset = static_cast<uint64_t>(layout_.send_abort);
        req.dst_offset = static_cast<uint64_t>(layout_.recv_abort + int64_t{lr->rank} * internode::kAbortBytes);
        req.imm = internode::make_imm(Kind::kAbort, 0, lr->rank, p);
        sent.push_back(engine_->write(req));
      } catch (const std::exception&) {
        // Best effort: a peer that cannot be told times out on its own.
      }
    }
  }
  // Let the reason land before this process reports the error (and perhaps exits).
  auto deadline = deadline_after(std::min(kAbortDeliveryS, timeout_s_));
  for (auto& s : sent) {
    try {
      s->wait(std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count()));
    } catch (const std::exception&) {
    }
  }
}

void InternodeAllToAll::check_pending(Local& me, const char* phase) {
  for (auto* ops : {&me.dispatch_ops, &me.combine_ops}) {
    for (Pending& op : *ops) {
      if (op.state->finished() && op.state->status() != fabric::TransferState::Status::kDone) {
        fail(phase, me.rank, str_cat("the ", op.what, " write to rank ", op.peer, " failed: ", op.state->error()),
             Failure::kTransfer);
      }
    }
  }
  // Acks are never waited for, and a failed one is no error here: it fails when the peer already
  // closed (it needs nothing more from us) or died (then its data never comes, and that wait
  // reports it). Forget them once done.
  auto& acks = me.signal_ops;
  acks.erase(std::remove_if(acks.begin(), acks.end(), [](const Pending& op) { return op.state->finished(); }),
             acks.end());
}

// ---------------------------------------------------------------------------------------------
// Waits

fabric::ImmCounter& InternodeAllToAll::counter(Local& me, Kind kind, uint64_t generation, int32_t peer) {
  const size_t i =
      (size_t(static_cast<uint32_t>(kind)) * internode::kGenerations + generation % internode::kGenerations) *
          shape_.num_ranks + peer;
  return *me.counters[i];
}

template <typename Ready>
bool InternodeAllToAll::wait_local(const char* phase, int32_t rank, Clock::time_point deadline, Ready ready) {
  std::unique_lock lk(mu_);
  while (true) {
    if (!broken_.empty()) {
      lk.unlock();
      throw_broken(phase, rank);
    }
    if (ready()) return true;
    const auto now = Clock::now();
    if (now >= deadline) return false;
    cv_.wait_until(lk, std::min(deadline, now + seconds_to_duration(kSliceS)));
    if (engine_) {
      lk.unlock();
      poll_aborts();
      lk.lock();
    }
  }
}

bool InternodeAllToAll::wait_imms(Local& me, const char* phase, Kind kind, uint64_t generation, int32_t peer,
                                  uint64_t count, Clock::time_point deadline) {
  if (count == 0) return true;
  fabric::ImmCounter& c = counter(me, kind, generation, peer);
  while (true) {
    const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
    try {
      c.wait(static_cast<int64_t>(count), std::clamp(left, 0.0, kSliceS));
      return true;
    } catch (const Timeout&) {
    } catch (const TransferFailed& e) {
      fail(phase, me.rank,
           str_cat("the TransferEngine failed while waiting for the ", internode::kind_name(kind), " of rank ", peer,
                   ": ", e.what()),
           Failure::kTransfer);
    }
    check_usable(phase, me.rank);
    check_pending(me, phase);
    if (Clock::now() >= deadline) return false;
  }
}

bool InternodeAllToAll::wait_transfers(Local& me, const char* phase, std::vector<Pending>& ops,
                                       Clock::time_point deadline) {
  for (Pending& op : ops) {
    try {
      op.state->wait(std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count()));
    } catch (const Timeout&) {
      return false;
    } catch (const std::exception& e) {
      fail(phase, me.rank, str_cat("the ", op.what, " write to rank ", op.peer, " failed: ", e.what()),
           Failure::kTransfer);
    }
  }
  ops.clear();
  return true;
}

void InternodeAllToAll::fail_timeout(const char* phase, int32_t rank, const char* waiting_for, uint64_t generation,
                                     const std::vector<int32_t>& missing, const std::string& detail) {
  fail(phase, rank,
       str_cat("timed out after ", timeout_s_, " s waiting for ", waiting_for, " #", generation, " of ranks [",
               rank_list(missing), "]", detail,
               "; every rank of the AllToAll must run the same sequence of dispatch/combine calls (a rank in "
               "another node that died or stalls looks like this too)"),
       Failure::kTimeout);
}

// ---------------------------------------------------------------------------------------------
// Posting

std::shared_ptr<fabric::TransferState> InternodeAllToAll::post_message(Local& me, Phase phase, int32_t peer,
                                                                       int64_t src_offset, int64_t dst_offset,
                                                                       int64_t bytes, Kind kind, uint64_t generation) {
  // One piece (one imm) per sender domain whatever the length (internode_post.h).
  const uint64_t t0 = now_ns();
  auto state = internode::post_message(*engine_, me.send_region, peers_[peer].receive, src_offset, dst_offset, bytes,
                                       internode::make_imm(kind, generation, me.rank, peer));
  me.post_ns[phase] += now_ns() - t0;
  me.bytes[phase] += static_cast<uint64_t>(bytes);
  me.ops[phase] += 1;
  return state;
}

std::shared_ptr<fabric::TransferState> InternodeAllToAll::post_signal(Local& me, Phase phase, int32_t peer, Kind kind,
                                                                      uint64_t generation) {
  const uint64_t t0 = now_ns();
  auto state = internode::post_signal(*engine_, peers_[peer].receive, internode::make_imm(kind, generation, me.rank, peer));
  me.post_ns[phase] += now_ns() - t0;
  me.ops[phase] += 1;
  return state;
}

void InternodeAllToAll::record_timing(Local& me, Phase phase, uint64_t start_ns) {
  me.timing[size_t(phase) * kTimingRing + me.calls[phase] % kTimingRing] = {start_ns, now_ns()};
  me.calls[phase] += 1;
}

// ---------------------------------------------------------------------------------------------
// Messages in place

const std::byte* InternodeAllToAll::dispatch_slot(const Local& me, int32_t source) const {
  return same_node(source, me.rank)
             ? locals_[local_index_[source]]->send + layout_.send_dispatch_slots +
                   int64_t{me.rank} * layout_.dispatch_slot_bytes
             : me.recv + layout_.recv_dispatch_slots + int64_t{source} * layout_.dispatch_slot_bytes;
}

const std::byte* InternodeAllToAll::combine_message(const Local& me, int32_t expert_rank) const {
  if (same_node(expert_rank, me.rank)) {
    const Local& d = *locals_[local_index_[expert_rank]];
    return d.send + layout_.send_combine + d.pack_offset[me.rank];
  }
  return me.recv + layout_.recv_combine + me.routed_offset_to[expert_rank];
}

// ---------------------------------------------------------------------------------------------
// dispatch

uint32_t InternodeAllToAll::dispatch_send(int32_t rank, const ArrayRef& x, const ArrayRef& x_scale,
                                          const ArrayRef& indices, const ArrayRef& weights, int32_t bound_m) {
  constexpr const char* kPhase = "dispatch_send";
  Local& me = local(kPhase, rank);
  const uint64_t t0 = now_ns();
  const int32_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int32_t S = shape_.scale_cols, L = shape_.local_experts();
  std::string bad = check_array("x", x, dispatch_dtype_, {T, H});
  if (bad.empty()) bad = check_array("x_scale", x_scale, DType::kF32, {T, S});
  if (bad.empty()) bad = check_array("indices", indices, DType::kS32, {T, K});
  if (bad.empty()) bad = check_array("weights", weights, DType::kF32, {T, K});
  check_usable(kPhase, rank);
  if (!bad.empty()) fail(kPhase, rank, bad);
  check_pending(me, kPhase);
  uint64_t gen;
  {
    std::lock_guard lk(mu_);
    gen = me.dispatch_sent + 1;
    if (me.dispatch_sent != me.dispatch_recvd) gen = 0;
  }
  if (gen == 0) {
    fail(kPhase, rank,
         "called again before dispatch_recv; one AllToAll has one dispatch in flight (use one AllToAll per "
         "micro-batch)");
  }
  const auto deadline = deadline_after(timeout_s_);

  // Our send slots are free once the last dispatch's writes are done and every destination
  // consumed dispatch #gen-1 (ranks of this node: their counter; other nodes: their free ack).
  const uint64_t w0 = now_ns();
  if (!wait_transfers(me, kPhase, me.dispatch_ops, deadline)) {
    fail(kPhase, rank, str_cat("timed out after ", timeout_s_, " s waiting for the engine to complete the writes of ",
                               "dispatch_send #", gen - 1),
         Failure::kTimeout);
  }
  if (gen > 1) {
    std::vector<int32_t> missing;
    for (int32_t d = 0; d < R; ++d) {
      bool ok = same_node(d, rank)
                    ? wait_local(kPhase, rank, deadline,
                                 [&] { return locals_[local_index_[d]]->dispatch_recvd >= gen - 1; })
                    : wait_imms(me, kPhase, Kind::kDispatchFree, gen - 1, d, internode::signal_imms(peers_[d].sender),
                                deadline);
      if (!ok) missing.push_back(d);
    }
    if (!missing.empty()) fail_timeout(kPhase, rank, "dispatch_recv", gen - 1, missing);
  }
  me.wait_ns[kDispatchSend] += now_ns() - w0;

  // Pack one message per destination: each token once, t ascending.
  const int32_t bm = clamp_bound(bound_m, T);
  const auto* idx = static_cast<const int32_t*>(indices.data);
  std::memcpy(me.sent_indices.data(), idx, size_t(T) * K * sizeof(int32_t));
  me.sent_bound = bm;
  std::vector<int32_t> tokens_to(R, 0), stamp(R, -1);
  std::fill(me.sent_entries_to.begin(), me.sent_entries_to.end(), 0);
  for (int32_t t = 0; t < bm; ++t) {
    for (int32_t k = 0; k < K; ++k) {
      const int32_t e = idx[int64_t{t} * K + k];
      if (!valid_expert(e, shape_.num_experts)) continue;
      const int32_t d = owner_rank(e, L);
      ++me.sent_entries_to[d];
      if (stamp[d] != t) {
        stamp[d] = t;
        ++tokens_to[d];
      }
    }
  }
  internode::combine_offsets(layout_, me.sent_entries_to.data(), R, me.sent_offset_to.data());
  std::vector<internode::DispatchLayout> lay(R);
  for (int32_t d = 0; d < R; ++d) lay[d] = internode::dispatch_layout(shape_, layout_.row_bytes, tokens_to[d]);
  const auto* xs = static_cast<const std::byte*>(x.data);
  const auto* ss = static_cast<const float*>(x_scale.data);
  const int64_t kHeader = sizeof(internode::DispatchHeader);
  std::vector<int32_t> pos(R, 0);
  std::fill(stamp.begin(), stamp.end(), -1);
  for (int32_t t = 0; t < bm; ++t) {
    for (int32_t k = 0; k < K; ++k) {
      const int32_t e = idx[int64_t{t} * K + k];
      if (!valid_expert(e, shape_.num_experts)) continue;
      const int32_t d = owner_rank(e, L);
      if (stamp[d] == t) continue;
      stamp[d] = t;
      std::byte* msg = me.send + layout_.send_dispatch_slots + int64_t{d} * layout_.dispatch_slot_bytes + kHeader;
      const int32_t i = pos[d]++;
      reinterpret_cast<int32_t*>(msg + lay[d].token_ids)[i] = t;
      std::memcpy(msg + lay[d].indices + int64_t{i} * K * 4, idx + int64_t{t} * K, size_t(K) * 4);
      std::memcpy(msg + lay[d].x + int64_t{i} * layout_.row_bytes, xs + int64_t{t} * layout_.row_bytes,
                  size_t(layout_.row_bytes));
      if (S > 0)
        std::memcpy(msg + lay[d].scales + int64_t{i} * S * 4, ss + int64_t{t} * S, size_t(S) * 4);
    }
  }
  for (int32_t d = 0; d < R; ++d) {
    auto* h = reinterpret_cast<internode::DispatchHeader*>(me.send + layout_.send_dispatch_slots +
                                                           int64_t{d} * layout_.dispatch_slot_bytes);
    *h = internode::DispatchHeader{};
    h->magic = internode::kDispatchMagic;
    h->generation = static_cast<uint32_t>(gen);
    h->source = rank;
    h->tokens = tokens_to[d];
    h->combine_rows = me.sent_entries_to[d];
    h->bound_m = bm;
    h->combine_offset = me.sent_offset_to[d];
  }

  // Other nodes: header and rows in one write into the destination's private slot for us.
  for (int32_t d = 0; d < R; ++d) {
    if (same_node(d, rank)) continue;
    try {
      me.dispatch_ops.push_back(
          {d, "dispatch message",
           post_message(me, kDispatchSend, d, layout_.send_dispatch_slots + int64_t{d} * layout_.dispatch_slot_bytes,
                        layout_.recv_dispatch_slots + int64_t{rank} * layout_.dispatch_slot_bytes,
                        kHeader + lay[d].bytes, Kind::kDispatch, gen)});
    } catch (const std::exception& e) {
      fail(kPhase, rank, str_cat("could not post the dispatch to rank ", d, ": ", e.what()), Failure::kTransfer);
    }
  }
  {
    std::lock_guard lk(mu_);
    me.dispatch_sent = gen;
  }
  cv_.notify_all();
  record_timing(me, kDispatchSend, t0);
  return static_cast<uint32_t>(gen);
}

void InternodeAllToAll::dispatch_recv(int32_t rank, uint32_t send_done, const ArrayRef& expert_x,
                                      const ArrayRef& expert_scale, const ArrayRef& expert_counts) {
  constexpr const char* kPhase = "dispatch_recv";
  Local& me = local(kPhase, rank);
  const uint64_t t0 = now_ns();
  const int32_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int32_t S = shape_.scale_cols, L = shape_.local_experts();
  const int64_t M = shape_.max_recv_tokens;
  std::string bad = check_array("expert_x", expert_x, dispatch_dtype_, {M, H});
  if (bad.empty()) bad = check_array("expert_scale", expert_scale, DType::kF32, {M, S});
  if (bad.empty()) bad = check_array("expert_counts", expert_counts, DType::kS32, {L});
  check_usable(kPhase, rank);
  if (!bad.empty()) fail(kPhase, rank, bad);
  check_pending(me, kPhase);
  uint64_t gen, sent;
  {
    std::lock_guard lk(mu_);
    gen = me.dispatch_recvd + 1;
    sent = me.dispatch_sent;
  }
  if (sent != gen || send_done != static_cast<uint32_t>(gen)) {
    fail(kPhase, rank,
         str_cat("send_done token ", send_done, " does not come from this AllToAll's pending dispatch_send (expected #",
                 gen, ", dispatch_send ran ", sent, " times)"));
  }
  const auto deadline = deadline_after(timeout_s_);

  // Every source's message: ranks of this node publish through their counter; the others' one
  // write delivers message_imms() imms whatever its length.
  const uint64_t w0 = now_ns();
  std::vector<int32_t> missing;
  for (int32_t s = 0; s < R; ++s) {
    const bool ok = same_node(s, rank)
                        ? wait_local(kPhase, rank, deadline,
                                     [&] { return locals_[local_index_[s]]->dispatch_sent >= gen; })
                        : wait_imms(me, kPhase, Kind::kDispatch, gen, s, internode::message_imms(peers_[s].sender),
                                    deadline);
    if (!ok) missing.push_back(s);
  }
  if (!missing.empty()) fail_timeout(kPhase, rank, "dispatch_send", gen, missing);
  me.wait_ns[kDispatchRecv] += now_ns() - w0;

  // Check every header, count rows per local expert over every source's routes, then place them
  // in (source, token, k) order: the layout of layout.h, bit for bit that of the CPU reference.
  const int64_t kHeader = sizeof(internode::DispatchHeader);
  const int32_t first = rank * L;
  std::vector<int32_t> counts(L, 0), start(L), kept(L), cursor(L, 0);
  for (int32_t s = 0; s < R; ++s) {
    const auto& h = *reinterpret_cast<const internode::DispatchHeader*>(dispatch_slot(me, s));
    if (h.magic != internode::kDispatchMagic || h.generation != static_cast<uint32_t>(gen) || h.source != s ||
        h.tokens < 0 || h.tokens > T || h.combine_rows < 0 || h.combine_rows > T * K || h.combine_offset < 0 ||
        h.combine_offset + layout_.combine_header_bytes + int64_t{h.combine_rows} * layout_.combine_row_bytes >
            layout_.recv_combine_bytes) {
      fail(kPhase, rank,
           str_cat("rank ", s, " sent a malformed dispatch message (magic 0x", std::hex, h.magic, std::dec,
                   ", generation ", h.generation, " expected ", gen, ", source ", h.source, ", tokens ", h.tokens,
                   ", combine rows ", h.combine_rows, " at ", h.combine_offset, ")"));
    }
    const auto lay = internode::dispatch_layout(shape_, layout_.row_bytes, h.tokens);
    const std::byte* msg = dispatch_slot(me, s) + kHeader;
    const auto* ids = reinterpret_cast<const int32_t*>(msg + lay.token_ids);
    const auto* ind = reinterpret_cast<const int32_t*>(msg + lay.indices);
    int32_t prev = -1;
    for (int32_t i = 0; i < h.tokens; ++i) {
      if (ids[i] <= prev || ids[i] >= T) {
        fail(kPhase, rank,
             str_cat("rank ", s, " sent a malformed dispatch message: token id ", ids[i], " at position ", i,
                     " (ids must ascend within [0, ", T, "))"));
      }
      prev = ids[i];
      for (int32_t k = 0; k < K; ++k) {
        const int32_t e = ind[int64_t{i} * K + k];
        if (valid_expert(e, shape_.num_experts) && owner_rank(e, L) == rank) ++counts[e - first];
      }
    }
    me.combine_offset_at[s] = h.combine_offset;
    me.combine_rows_at[s] = h.combine_rows;
  }
  int64_t used_rows = 0;
  const int64_t dropped =
      compute_segments(counts.data(), L, shape_.expert_padding, M, start.data(), kept.data(), &used_rows);

  const int64_t row_bytes = layout_.row_bytes;
  auto* out_x = static_cast<std::byte*>(expert_x.data);
  auto* out_scale = static_cast<float*>(expert_scale.data);
  // Padding rows and the tail are zero; kept rows are written below (each row once).
  auto zero_rows = [&](int64_t lo, int64_t hi) {
    if (hi <= lo) return;
    std::memset(out_x + lo * row_bytes, 0, size_t(hi - lo) * size_t(row_bytes));
    if (S > 0) std::memset(out_scale + lo * S, 0, size_t(hi - lo) * S * sizeof(float));
  };
  for (int32_t le = 0; le < L; ++le)
    zero_rows(int64_t{start[le]} + kept[le], le + 1 < L ? int64_t{start[le + 1]} : used_rows);
  zero_rows(used_rows, M);
  std::fill(me.row_source.begin(), me.row_source.begin() + used_rows, -1);
  std::fill(me.kept_from.begin(), me.kept_from.end(), 0);
  for (int32_t s = 0; s < R; ++s) {
    const auto& h = *reinterpret_cast<const internode::DispatchHeader*>(dispatch_slot(me, s));
    const auto lay = internode::dispatch_layout(shape_, layout_.row_bytes, h.tokens);
    const std::byte* msg = dispatch_slot(me, s) + kHeader;
    const auto* ids = reinterpret_cast<const int32_t*>(msg + lay.token_ids);
    const auto* ind = reinterpret_cast<const int32_t*>(msg + lay.indices);
    for (int32_t i = 0; i < h.tokens; ++i) {
      for (int32_t k = 0; k < K; ++k) {
        const int32_t e = ind[int64_t{i} * K + k];
        if (!valid_expert(e, shape_.num_experts) || owner_rank(e, L) != rank) continue;
        const int32_t le = e - first;
        if (cursor[le] >= kept[le]) continue;  // overflow: dropped, counted above
        const int64_t row = start[le] + cursor[le]++;
        std::memcpy(out_x + row * row_bytes, msg + lay.x + int64_t{i} * row_bytes, size_t(row_bytes));
        if (S > 0)
          std::memcpy(out_scale + row * S, msg + lay.scales + int64_t{i} * S * 4, size_t(S) * sizeof(float));
        me.row_source[row] = static_cast<int32_t>((int64_t{s} * T + ids[i]) * K + k);
        ++me.kept_from[size_t(s) * L + le];
      }
    }
  }
  std::memcpy(expert_counts.data, kept.data(), size_t(L) * sizeof(int32_t));
  me.kept = kept;
  me.used_rows = used_rows;
  me.routed_indices = me.sent_indices;
  me.routed_bound = me.sent_bound;
  me.routed_entries_to = me.sent_entries_to;
  me.routed_offset_to = me.sent_offset_to;

  // The other nodes may overwrite our slots from now on.
  for (int32_t s = 0; s < R; ++s) {
    if (same_node(s, rank)) continue;
    try {
      me.signal_ops.push_back({s, "dispatch free ack", post_signal(me, kDispatchRecv, s, Kind::kDispatchFree, gen)});
    } catch (const std::exception& e) {
      fail(kPhase, rank, str_cat("could not acknowledge the dispatch of rank ", s, ": ", e.what()),
           Failure::kTransfer);
    }
  }
  {
    std::lock_guard lk(mu_);
    me.dropped += dropped;
    me.dispatch_recvd = gen;
  }
  cv_.notify_all();
  record_timing(me, kDispatchRecv, t0);
}

// ---------------------------------------------------------------------------------------------
// combine

uint32_t InternodeAllToAll::combine_send(int32_t rank, const ArrayRef& expert_y, const ArrayRef& expert_counts) {
  constexpr const char* kPhase = "combine_send";
  Local& me = local(kPhase, rank);
  const uint64_t t0 = now_ns();
  const int32_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int32_t L = shape_.local_experts();
  const int64_t M = shape_.max_recv_tokens;
  std::string bad = check_array("expert_y", expert_y, combine_dtype_, {M, H});
  if (bad.empty()) bad = check_array("expert_counts", expert_counts, DType::kS32, {L});
  check_usable(kPhase, rank);
  if (!bad.empty()) fail(kPhase, rank, bad);
  check_pending(me, kPhase);
  uint64_t gen, dispatch_gen;
  bool in_flight;
  {
    std::lock_guard lk(mu_);
    dispatch_gen = me.dispatch_recvd;
    in_flight = me.combine_sent != me.combine_recvd;
    gen = me.combine_sent + 1;
  }
  if (dispatch_gen == 0) fail(kPhase, rank, "no dispatch ran before it");
  if (in_flight) {
    fail(kPhase, rank,
         "called again before combine_recv; one AllToAll has one combine in flight (use one AllToAll per "
         "micro-batch)");
  }
  const auto* given = static_cast<const int32_t*>(expert_counts.data);
  for (int32_t e = 0; e < L; ++e) {
    if (given[e] != -1 && given[e] != me.kept[e]) {
      fail(kPhase, rank,
           str_cat("expert_counts[", e, "] = ", given[e], " but the last dispatch received ", me.kept[e],
                   " rows for that expert; pass the expert_counts dispatch returned"));
    }
  }
  const auto deadline = deadline_after(timeout_s_);
  const uint64_t w0 = now_ns();
  if (!wait_transfers(me, kPhase, me.combine_ops, deadline)) {
    fail(kPhase, rank, str_cat("timed out after ", timeout_s_, " s waiting for the engine to complete the writes of ",
                               "combine_send #", gen - 1),
         Failure::kTimeout);
  }
  if (gen > 1) {
    std::vector<int32_t> missing;
    for (int32_t s = 0; s < R; ++s) {
      bool ok = same_node(s, rank)
                    ? wait_local(kPhase, rank, deadline,
                                 [&] { return locals_[local_index_[s]]->combine_recvd >= gen - 1; })
                    : wait_imms(me, kPhase, Kind::kCombineFree, gen - 1, s, internode::signal_imms(peers_[s].sender),
                                deadline);
      if (!ok) missing.push_back(s);
    }
    if (!missing.empty()) fail_timeout(kPhase, rank, "combine_recv", gen - 1, missing);
  }
  me.wait_ns[kCombineSend] += now_ns() - w0;

  // Pack, per source, a header and the rows kept for it in its (t, k) order, sources in order.
  const int64_t TK = int64_t{T} * K;
  std::vector<std::vector<std::pair<int32_t, int32_t>>> rows_for(R);  // (slot t*K+k, row)
  for (int64_t row = 0; row < me.used_rows; ++row) {
    const int32_t src = me.row_source[row];
    if (src < 0) continue;  // padding
    rows_for[src / TK].push_back({static_cast<int32_t>(src % TK), static_cast<int32_t>(row)});
  }
  const int64_t cb = layout_.combine_row_bytes, chb = layout_.combine_header_bytes;
  const auto* y = static_cast<const std::byte*>(expert_y.data);
  int64_t offset = 0;
  for (int32_t s = 0; s < R; ++s) {
    auto& list = rows_for[s];
    std::sort(list.begin(), list.end());
    me.pack_offset[s] = offset;
    me.pack_rows[s] = static_cast<int32_t>(list.size());
    std::byte* msg = me.send + layout_.send_combine + offset;
    auto* h = reinterpret_cast<internode::CombineHeader*>(msg);
    *h = internode::CombineHeader{};
    h->magic = internode::kCombineMagic;
    h->generation = static_cast<uint32_t>(gen);
    h->dispatch_generation = static_cast<uint32_t>(dispatch_gen);
    h->source = rank;
    h->rows = me.pack_rows[s];
    std::memcpy(msg + sizeof(internode::CombineHeader), &me.kept_from[size_t(s) * L], size_t(L) * sizeof(int32_t));
    for (size_t j = 0; j < list.size(); ++j)
      std::memcpy(msg + chb + int64_t(j) * cb, y + int64_t{list[j].second} * cb, size_t(cb));
    offset += chb + int64_t{me.pack_rows[s]} * cb;
  }

  for (int32_t s = 0; s < R; ++s) {
    if (same_node(s, rank)) continue;
    const int32_t n = me.pack_rows[s];
    if (n > me.combine_rows_at[s]) {  // cannot happen with well-formed headers: never write past them
      fail(kPhase, rank,
           str_cat("rank ", s, " reserved ", me.combine_rows_at[s], " combine rows for this rank but it kept ", n));
    }
    try {
      me.combine_ops.push_back({s, "combine message",
                                post_message(me, kCombineSend, s, layout_.send_combine + me.pack_offset[s],
                                             layout_.recv_combine + me.combine_offset_at[s], chb + int64_t{n} * cb,
                                             Kind::kCombine, gen)});
    } catch (const std::exception& e) {
      fail(kPhase, rank, str_cat("could not post the combine to rank ", s, ": ", e.what()), Failure::kTransfer);
    }
  }
  {
    std::lock_guard lk(mu_);
    me.combine_dispatch_gen = dispatch_gen;
    me.combine_sent = gen;
  }
  cv_.notify_all();
  record_timing(me, kCombineSend, t0);
  return static_cast<uint32_t>(gen);
}

void InternodeAllToAll::combine_recv(int32_t rank, uint32_t send_done, const ArrayRef& indices,
                                     const ArrayRef& weights, int32_t bound_m, const ArrayRef& y) {
  constexpr const char* kPhase = "combine_recv";
  Local& me = local(kPhase, rank);
  const uint64_t t0 = now_ns();
  const int32_t R = shape_.num_ranks, T = shape_.max_tokens, H = shape_.hidden, K = shape_.experts_per_token;
  const int32_t L = shape_.local_experts();
  std::string bad = check_array("indices", indices, DType::kS32, {T, K});
  if (bad.empty()) bad = check_array("weights", weights, DType::kF32, {T, K});
  if (bad.empty()) bad = check_array("y", y, combine_dtype_, {T, H});
  check_usable(kPhase, rank);
  if (!bad.empty()) fail(kPhase, rank, bad);
  check_pending(me, kPhase);
  uint64_t gen, sent, dispatch_gen;
  {
    std::lock_guard lk(mu_);
    gen = me.combine_recvd + 1;
    sent = me.combine_sent;
    dispatch_gen = me.dispatch_recvd;
  }
  if (sent != gen || send_done != static_cast<uint32_t>(gen)) {
    fail(kPhase, rank,
         str_cat("send_done token ", send_done, " does not come from this AllToAll's pending combine_send (expected #",
                 gen, ", combine_send ran ", sent, " times)"));
  }
  const auto deadline = deadline_after(timeout_s_);

  const uint64_t w0 = now_ns();
  std::vector<int32_t> missing;
  for (int32_t d = 0; d < R; ++d) {
    const bool ok = same_node(d, rank)
                        ? wait_local(kPhase, rank, deadline,
                                     [&] { return locals_[local_index_[d]]->combine_sent >= gen; })
                        : wait_imms(me, kPhase, Kind::kCombine, gen, d, internode::message_imms(peers_[d].sender),
                                    deadline);
    if (!ok) missing.push_back(d);
  }
  if (!missing.empty()) fail_timeout(kPhase, rank, "combine_send", gen, missing);
  me.wait_ns[kCombineRecv] += now_ns() - w0;

  // Every expert rank combined the rows of our last dispatch, with our routing.
  for (int32_t d = 0; d < R; ++d) {
    const auto& h = *reinterpret_cast<const internode::CombineHeader*>(combine_message(me, d));
    if (h.magic != internode::kCombineMagic || h.generation != static_cast<uint32_t>(gen) || h.source != d ||
        h.rows < 0 || h.rows > me.routed_entries_to[d]) {
      fail(kPhase, rank,
           str_cat("rank ", d, " sent a malformed combine message (magic 0x", std::hex, h.magic, std::dec,
                   ", generation ", h.generation, " expected ", gen, ", source ", h.source, ", rows ", h.rows,
                   " of at most ", me.routed_entries_to[d], ")"));
    }
    if (h.dispatch_generation != static_cast<uint32_t>(dispatch_gen)) {
      fail(kPhase, rank,
           str_cat("rank ", d, " combined the rows of dispatch #", h.dispatch_generation,
                   " but this rank's last dispatch is #", dispatch_gen));
    }
  }
  const int32_t bm = clamp_bound(bound_m, T);
  const auto* idx = static_cast<const int32_t*>(indices.data);
  if (bm != me.routed_bound) {
    fail(kPhase, rank, str_cat("bound_m = ", bm, " but the matching dispatch used bound_m = ", me.routed_bound));
  }
  for (int64_t i = 0; i < int64_t{bm} * K; ++i) {
    if (idx[i] != me.routed_indices[i]) {
      fail(kPhase, rank,
           str_cat("indices[", i / K, ", ", i % K, "] = ", idx[i], " but the matching dispatch routed it to expert ",
                   me.routed_indices[i], "; combine needs the indices given to dispatch"));
    }
  }

  // Which of our entries each expert rank kept: per local expert of that rank, a prefix of our
  // entries in (t, k) order; its packed rows are the kept entries in (t, k) order.
  std::vector<int32_t> entries(size_t(R) * L, 0);
  for (int64_t i = 0; i < int64_t{bm} * K; ++i) {
    const int32_t e = idx[i];
    if (valid_expert(e, shape_.num_experts)) ++entries[e];  // e = d*L + le
  }
  std::vector<const int32_t*> kept_by(R);
  std::vector<const uint16_t*> rows_by(R);
  for (int32_t d = 0; d < R; ++d) {
    const std::byte* msg = combine_message(me, d);
    const auto& h = *reinterpret_cast<const internode::CombineHeader*>(msg);
    kept_by[d] = reinterpret_cast<const int32_t*>(msg + sizeof(internode::CombineHeader));
    int64_t sum = 0;
    for (int32_t le = 0; le < L; ++le) {
      const int32_t k = kept_by[d][le];
      if (k < 0 || k > entries[size_t(d) * L + le]) {
        fail(kPhase, rank,
             str_cat("rank ", d, " reports ", k, " rows kept for its expert ", le, " from this rank, which routed ",
                     entries[size_t(d) * L + le], " there"));
      }
      sum += k;
    }
    if (sum != h.rows) {
      fail(kPhase, rank, str_cat("rank ", d, " sent ", h.rows, " combine rows but reports ", sum, " kept"));
    }
    rows_by[d] = reinterpret_cast<const uint16_t*>(msg + layout_.combine_header_bytes);
  }

  const auto* w = static_cast<const float*>(weights.data);
  auto* out = static_cast<uint16_t*>(y.data);
  std::vector<int32_t> seen(size_t(R) * L, 0), packed(R, 0);
  std::vector<float> acc(H);
  for (int32_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    if (t < bm) {
      for (int32_t k = 0; k < K; ++k) {
        const int64_t slot = int64_t{t} * K + k;
        const int32_t e = idx[slot];
        if (!valid_expert(e, shape_.num_experts)) continue;
        const int32_t d = owner_rank(e, L), le = e - d * L;
        if (seen[e]++ >= kept_by[d][le]) continue;  // dropped at dispatch: adds nothing
        accumulate_row(acc.data(), rows_by[d] + int64_t{packed[d]++} * H, w[slot], H);
      }
    }
    round_row_to_bf16(acc.data(), out + int64_t{t} * H, H);
  }

  for (int32_t d = 0; d < R; ++d) {
    if (same_node(d, rank)) continue;
    try {
      me.signal_ops.push_back({d, "combine free ack", post_signal(me, kCombineRecv, d, Kind::kCombineFree, gen)});
    } catch (const std::exception& e) {
      fail(kPhase, rank, str_cat("could not acknowledge the combine of rank ", d, ": ", e.what()),
           Failure::kTransfer);
    }
  }
  {
    std::lock_guard lk(mu_);
    me.combine_recvd = gen;
  }
  cv_.notify_all();
  record_timing(me, kCombineRecv, t0);
}

// ---------------------------------------------------------------------------------------------
// Outside jit

std::vector<int64_t> InternodeAllToAll::dropped_rows() const {
  std::lock_guard lk(mu_);
  std::vector<int64_t> out(shape_.num_ranks, -1);
  for (auto& lr : locals_) out[lr->rank] = lr->dropped;
  return out;
}

std::pair<std::string, bool> InternodeAllToAll::error() {
  if (engine_) poll_aborts();  // a peer's failure counts too
  std::lock_guard lk(mu_);
  return {broken_, broken_by_timeout_};
}

void InternodeAllToAll::drain(double timeout_s) {
  const auto deadline = deadline_after(timeout_s);
  for (auto& lr : locals_) {
    for (auto* ops : {&lr->dispatch_ops, &lr->combine_ops, &lr->signal_ops}) {
      for (Pending& op : *ops) {
        try {
          op.state->wait(std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count()));
        } catch (const std::exception&) {
        }
      }
      ops->clear();
    }
  }
}

void InternodeAllToAll::close() {
  {
    std::lock_guard lk(mu_);
    if (closed_) return;
    closed_ = true;
    if (broken_.empty()) broken_ = "the AllToAll was closed while a program was still using it";
  }
  cv_.notify_all();
  if (engine_) engine_->close();  // waits in progress fail with "engine closed"
}

std::vector<uint64_t> InternodeAllToAll::timings(int32_t rank, int n) const {
  const Local* me = find_local(rank);
  JG_CHECK_ARG(me, "MoE internode: timings: rank ", rank, " is not held by this process");
  JG_CHECK_ARG(n >= 0 && n <= kTimingRing, "MoE internode: timings: n must be in [0, ", kTimingRing, "], got ", n);
  std::vector<uint64_t> out(size_t(n) * kPhases * 2, 0);
  for (int p = 0; p < kPhases; ++p) {
    const int64_t calls = static_cast<int64_t>(me->calls[p]);
    for (int i = 0; i < n; ++i) {
      const int64_t c = calls - n + i;
      if (c < 0) continue;
      const auto& t = me->timing[size_t(p) * kTimingRing + size_t(c % kTimingRing)];
      out[(size_t(i) * kPhases + p) * 2] = t[0];
      out[(size_t(i) * kPhases + p) * 2 + 1] = t[1];
    }
  }
  return out;
}

std::vector<uint64_t> InternodeAllToAll::engine_bytes(int32_t rank) const {
  const Local* me = find_local(rank);
  JG_CHECK_ARG(me, "MoE internode: engine_bytes: rank ", rank, " is not held by this process");
  return {me->bytes.begin(), me->bytes.end()};
}

std::vector<uint64_t> InternodeAllToAll::engine_ops(int32_t rank) const {
  const Local* me = find_local(rank);
  JG_CHECK_ARG(me, "MoE internode: engine_ops: rank ", rank, " is not held by this process");
  return {me->ops.begin(), me->ops.end()};
}

std::vector<uint64_t> InternodeAllToAll::phase_costs(int32_t rank) const {
  const Local* me = find_local(rank);
  JG_CHECK_ARG(me, "MoE internode: phase_costs: rank ", rank, " is not held by this process");
  std::vector<uint64_t> out;
  for (int p = 0; p < kPhases; ++p) {
    out.push_back(me->post_ns[p]);
    out.push_back(me->wait_ns[p]);
  }
  return out;
}

}  // namespace jax_garden::moe
