// InternodeAllToAll (internode_all_to_all.h) outside its four phases: construction (regions,
// engine), bootstrap (peer_info, connect, finalize), and what Python calls outside jit (drain,
// close, errors, statistics). The phases are one file each, on the shared steps of
// internode_steps.cc and the failure handling of internode_errors.cc:
//   internode_dispatch_send.cc  internode_dispatch_recv.cc  internode_combine_send.cc
//   internode_combine_recv.cc
#include "moe/internode_state.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "fabric/core/region.h"
#include "fabric/core/transfer.h"

namespace jax_garden::moe {

using internode::Kind;
using internode::rank_list;

namespace {

std::shared_ptr<std::byte> zeroed_buffer(int64_t bytes) {
  const size_t n = static_cast<size_t>(internode::align_up(std::max<int64_t>(bytes, 1)));
  void* p = std::aligned_alloc(internode::kAlign, n);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, n);
  return std::shared_ptr<std::byte>(static_cast<std::byte*>(p), [](std::byte* q) { std::free(q); });
}

}  // namespace

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
    lr->index = locals_.size();
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
  progress_.resize(locals_.size());  // (constructors are not analysed: no call runs yet)
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
// Outside jit

std::vector<int64_t> InternodeAllToAll::dropped_rows() const {
  MutexLock lk(mu_);
  std::vector<int64_t> out(shape_.num_ranks, -1);
  for (auto& lr : locals_) out[lr->rank] = progress_[lr->index].dropped;
  return out;
}

std::pair<std::string, bool> InternodeAllToAll::error() {
  if (engine_) poll_aborts();  // a peer's failure counts too
  MutexLock lk(mu_);
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
    MutexLock lk(mu_);
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
