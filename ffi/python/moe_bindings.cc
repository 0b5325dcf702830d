// Bindings of `_jax_garden.moe`: the MoeShape every context takes, the layout functions of
// ffi/moe/layout.h (Python computes sizes with them, never by itself), the CUDA kernels' error
// codes (DeviceError), and the CPU reference context. No logic here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/registry.h"
#include "fabric/core/region.h"
#include "moe/cpu_all_to_all.h"
#include "moe/host_proxy.h"
#include "moe/internode_all_to_all.h"
#include "moe/layout.h"
#include "moe/nvlink_protocol.h"

namespace nb = nanobind;

namespace jax_garden::moe {
namespace {

// A CPU context as Python holds it: the registry holds it too, from construction to close().
struct CpuContextHandle {
  std::shared_ptr<HostAllToAll> context;
  uint64_t id = 0;

  ~CpuContextHandle() { close(); }
  void close() {
    if (id != 0) close_cpu_context(id);
    id = 0;
  }
};

// An inter-node context as Python holds it: registered (found by the FFI handlers) from finalize()
// to close().
struct InternodeHandle {
  std::shared_ptr<InternodeAllToAll> context;
  uint64_t id = 0;

  ~InternodeHandle() { close(); }
  void close() {
    if (id != 0) {
      close_cpu_context(id);
    } else if (context) {
      context->close();
    }
    id = 0;
  }
  InternodeAllToAll& get() const {
    JG_CHECK_ARG(context, "InternodeAllToAll: closed");
    return *context;
  }
};

fabric::CompletionMode parse_completion(const std::string& s) {
  if (s == "delivery") return fabric::CompletionMode::kDelivery;
  if (s == "transmit") return fabric::CompletionMode::kTransmit;
  throw InvalidArgument(str_cat("completion must be 'delivery' or 'transmit', got '", s, "'"));
}

fabric::TransferPath parse_transfer_path(const std::string& name) {
  if (name.empty() || name == "auto") return fabric::TransferPath::kAuto;
  if (name == "fabric") return fabric::TransferPath::kFabric;
  if (name == "ipc") return fabric::TransferPath::kIpc;
  if (name == "staged") return fabric::TransferPath::kStaged;
  throw InvalidArgument(str_cat("path must be 'auto', 'fabric', 'ipc' or 'staged', got '", name, "'"));
}

nb::bytes to_py_bytes(const fabric::Bytes& b) { return nb::bytes(reinterpret_cast<const char*>(b.data()), b.size()); }

void bind_shape(nb::module_& m) {
  nb::class_<MoeShape>(m, "MoeShape", "The static description of one AllToAll (ffi/moe/layout.h).")
      .def(
          "__init__",
          [](MoeShape* self, int32_t num_ranks, int32_t num_experts, int32_t experts_per_token, int32_t hidden,
             int32_t max_tokens, int64_t max_recv_tokens, int32_t expert_padding, int32_t scale_cols) {
            new (self) MoeShape{num_ranks,  num_experts,     experts_per_token, hidden,
                                max_tokens, max_recv_tokens, expert_padding,    scale_cols};
          },
          nb::kw_only(), nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("experts_per_token"),
          nb::arg("hidden"), nb::arg("max_tokens"), nb::arg("max_recv_tokens"), nb::arg("expert_padding") = 1,
          nb::arg("scale_cols") = 0)
      .def_rw("num_ranks", &MoeShape::num_ranks)
      .def_rw("num_experts", &MoeShape::num_experts)
      .def_rw("experts_per_token", &MoeShape::experts_per_token)
      .def_rw("hidden", &MoeShape::hidden)
      .def_rw("max_tokens", &MoeShape::max_tokens)
      .def_rw("max_recv_tokens", &MoeShape::max_recv_tokens)
      .def_rw("expert_padding", &MoeShape::expert_padding)
      .def_rw("scale_cols", &MoeShape::scale_cols)
      .def_prop_ro("local_experts", &MoeShape::local_experts)
      .def("validate", &validate_shape, "Raises ValueError naming the first inconsistent field.")
      .def("__repr__", [](const MoeShape& s) { return str_cat("MoeShape(", describe(s), ")"); });
}

void bind_layout(nb::module_& m) {
  m.def("round_up", &round_up, nb::arg("x"), nb::arg("multiple"));
  m.def("worst_case_recv_tokens", &worst_case_recv_tokens, nb::arg("num_ranks"), nb::arg("max_tokens"),
        nb::arg("experts_per_token"), nb::arg("local_experts"), nb::arg("expert_padding"),
        "Receive rows that always suffice: round_up(R*T*K + L*(pad-1), pad).");
  m.def("clamp_bound", &clamp_bound, nb::arg("bound_m"), nb::arg("max_tokens"),
        "bound_m clamped to [0, max_tokens], as every implementation reads it.");
  m.def(
      "compute_segments",
      [](const std::vector<int32_t>& counts, int32_t expert_padding, int64_t max_recv_tokens) {
        JG_CHECK_ARG(expert_padding >= 1, "compute_segments: expert_padding must be >= 1, got ", expert_padding);
        JG_CHECK_ARG(max_recv_tokens % expert_padding == 0, "compute_segments: max_recv_tokens=", max_recv_tokens,
                     " is not a multiple of expert_padding=", expert_padding);
        const auto n = static_cast<int32_t>(counts.size());
        std::vector<int32_t> start(n), kept(n);
        int64_t used_rows = 0;
        const int64_t dropped =
            compute_segments(counts.data(), n, expert_padding, max_recv_tokens, start.data(), kept.data(), &used_rows);
        return nb::make_tuple(start, kept, dropped, used_rows);
      },
      nb::arg("counts"), nb::arg("expert_padding"), nb::arg("max_recv_tokens"),
      "(start, kept, dropped, used_rows) of the segments of one rank's receive buffer, from the rows "
      "routed to each local expert.");
}

void bind_device_errors(nb::module_& m) {
  nb::enum_<DeviceError>(m, "DeviceError", nb::is_arithmetic(),
                         "Sticky error codes recorded by the CUDA MoE kernels (ffi/moe/nvlink_protocol.h).")
      .value("NONE", kErrNone)
      .value("TIMEOUT_DISPATCH_DATA", kErrTimeoutDispatchData)
      .value("TIMEOUT_DISPATCH_FREE", kErrTimeoutDispatchFree)
      .value("TIMEOUT_COMBINE_DATA", kErrTimeoutCombineData)
      .value("TIMEOUT_COMBINE_FREE", kErrTimeoutCombineFree)
      .value("RANK_MISMATCH", kErrRankMismatch)
      .value("COUNTS_MISMATCH", kErrCountsMismatch)
      .value("PHASE_ORDER", kErrPhaseOrder)
      .value("ROUTING_MISMATCH", kErrRoutingMismatch)
      .value("MALFORMED_MESSAGE", kErrMalformedMessage)
      .value("PEER_FAILED", kErrPeerFailed)
      .value("PEER_TIMED_OUT", kErrPeerTimedOut)
      .value("TRANSFER_FAILED", kErrTransferFailed)
      .value("PROXY_PROTOCOL", kErrProxyProtocol);
  m.def("is_timeout_error", &is_timeout_error, nb::arg("code"),
        "True for the codes that are waits which ran out of time (a peer never arrived).");
  m.def("device_error_message", &device_error_message, nb::arg("code"), nb::arg("a"), nb::arg("b"),
        nb::arg("rank"), nb::arg("c"), "The message of a recorded error (what CudaContext.check raises).");
}

void bind_cpu_context(nb::module_& m) {
  nb::class_<CpuContextHandle>(m, "CpuAllToAll",
                               "CPU reference context of one AllToAll (ffi/moe/cpu_all_to_all.h), registered "
                               "under `id` (the FFI attribute context_id) until close().")
      .def(
          "__init__",
          [](CpuContextHandle* self, const MoeShape& shape, const std::string& dispatch_dtype,
             const std::string& combine_dtype, double timeout_s) {
            auto context = std::make_shared<CpuAllToAll>(shape, parse_dtype(dispatch_dtype),
                                                         parse_dtype(combine_dtype), timeout_s);
            const uint64_t id = cpu_contexts().add(context);
            new (self) CpuContextHandle{std::move(context), id};
          },
          nb::arg("shape"), nb::arg("dispatch_dtype"), nb::arg("combine_dtype"), nb::arg("timeout_s"))
      .def_ro("id", &CpuContextHandle::id, "Registry id (0 once closed).")
      .def("close", &CpuContextHandle::close,
           "Unregisters the context; calls still running fail at once. Idempotent.")
      .def("dropped_rows", [](const CpuContextHandle& h) { return h.context->dropped_rows(); },
           "Rows dropped for lack of max_recv_tokens space, per receiving rank, since creation.")
      .def("error", [](const CpuContextHandle& h) { return h.context->error(); },
           "(message, timed_out) of the first error of any rank (message '' if none); every later "
           "call fails with it.");

  m.def("live_cpu_contexts", []() { return cpu_contexts().size(); },
        "CPU contexts registered now (created and not closed).");
}

void bind_internode_context(nb::module_& m) {
  nb::class_<InternodeHandle>(
      m, "InternodeAllToAll",
      "Host context of an AllToAll whose node groups span processes (ffi/moe/internode_all_to_all.h). "
      "Lifecycle: construct, peer_info(rank) of every local rank -> exchange -> connect(info) of every "
      "rank of remote_ranks() -> finalize() (registers it under `id`) -> programs -> drain() -> close().")
      .def(
          "__init__",
          [](InternodeHandle* self, const MoeShape& shape, const std::string& dispatch_dtype,
             const std::string& combine_dtype, double timeout_s, int32_t node_size, std::vector<int32_t> local_ranks,
             const std::string& provider, const std::string& node, uint32_t domains, const std::string& completion,
             uint64_t split_threshold, const std::string& path) {
            InternodeOptions o;
            o.timeout_s = timeout_s;
            o.node_size = node_size;
            o.local_ranks = std::move(local_ranks);
            o.engine.provider = provider;
            o.engine.node = node;
            o.engine.domains = domains;
            o.engine.completion = parse_completion(completion);
            o.engine.sharding.split_threshold = split_threshold;
            o.engine.default_path = parse_transfer_path(path);
            const DType dd = parse_dtype(dispatch_dtype), cd = parse_dtype(combine_dtype);
            std::shared_ptr<InternodeAllToAll> context;
            {
              nb::gil_scoped_release release;
              context = std::make_shared<InternodeAllToAll>(shape, dd, cd, o);
            }
            new (self) InternodeHandle{std::move(context), 0};
          },
          nb::arg("shape"), nb::arg("dispatch_dtype"), nb::arg("combine_dtype"), nb::arg("timeout_s"),
          nb::arg("node_size"), nb::arg("local_ranks"), nb::arg("provider"), nb::arg("node"), nb::arg("domains"),
          nb::arg("completion"), nb::arg("split_threshold"), nb::arg("path") = "auto")
      .def_ro("id", &InternodeHandle::id, "Registry id (0 before finalize() and once closed).")
      .def_prop_ro("needs_engine", [](const InternodeHandle& h) { return h.get().needs_engine(); },
                   "True when the AllToAll has several node groups (then it owns a TransferEngine).")
      .def("remote_ranks", [](const InternodeHandle& h) { return h.get().remote_ranks(); },
           "Ranks held by other processes: connect() needs each one's peer_info.")
      .def("peer_info", [](const InternodeHandle& h, int32_t rank) { return to_py_bytes(h.get().peer_info(rank)); },
           nb::arg("rank"), "What ranks of other nodes need to reach local `rank` (bytes).")
      .def(
          "connect",
          [](InternodeHandle& h, nb::bytes info) {
            const auto* p = reinterpret_cast<const uint8_t*>(info.c_str());
            h.get().connect(fabric::Bytes(p, p + info.size()));
          },
          nb::arg("info"), "Registers a rank of another process from its peer_info bytes (checked).")
      .def(
          "finalize",
          [](InternodeHandle& h) {
            JG_CHECK_ARG(h.id == 0, "InternodeAllToAll: finalize called twice");
            h.get().finalize();
            h.id = cpu_contexts().add(h.context);
          },
          "Checks that every remote rank is connected and registers the context for the FFI handlers.")
      .def("drain", [](InternodeHandle& h, double timeout_s) { h.get().drain(timeout_s); }, nb::arg("timeout_s"),
           nb::call_guard<nb::gil_scoped_release>(),
           "Waits (bounded) until this process's writes completed, so that closing cuts none a peer counts on.")
      .def("close", &InternodeHandle::close, nb::call_guard<nb::gil_scoped_release>(),
           "Unregisters the context and closes its engine; calls still running fail at once. Idempotent.")
      .def("dropped_rows", [](const InternodeHandle& h) { return h.get().dropped_rows(); },
           "Rows dropped per receiving rank since creation (-1 for ranks of other processes).")
      .def("error", [](const InternodeHandle& h) { return h.get().error(); },
           "(message, timed_out) of the first error of this process's ranks or of a peer that reported one.")
      .def("timings", [](const InternodeHandle& h, int32_t rank, int n) { return h.get().timings(rank, n); },
           nb::arg("rank"), nb::arg("n"),
           "Steady-clock ns (start, end) of the last n calls of each phase of local `rank`: flat [n][4][2].")
      .def("engine_bytes", [](const InternodeHandle& h, int32_t rank) { return h.get().engine_bytes(rank); },
           nb::arg("rank"), "Bytes local `rank` wrote through the engine per phase so far: [4].")
      .def("engine_ops", [](const InternodeHandle& h, int32_t rank) { return h.get().engine_ops(rank); },
           nb::arg("rank"), "Writes and signals local `rank` posted per phase so far: [4].")
      .def("phase_costs", [](const InternodeHandle& h, int32_t rank) { return h.get().phase_costs(rank); },
           nb::arg("rank"),
           "Per phase of local `rank`: ns spent posting to the engine and waiting so far, flat [4][2].")
      .def("__repr__", [](const InternodeHandle& h) { return h.context ? h.context->describe() : "InternodeAllToAll(closed)"; });

  m.def("internode_imm", [](int kind, uint64_t generation, int32_t source, int32_t destination) {
        JG_CHECK_ARG(kind >= 0 && kind < internode::kKinds, "internode_imm: kind must be in [0, ", internode::kKinds,
                     "), got ", kind);
        return internode::make_imm(static_cast<internode::Kind>(kind), generation, source, destination);
      }, nb::arg("kind"), nb::arg("generation"), nb::arg("source"), nb::arg("destination"),
      "The imm value of a protocol message (tests).");
  m.def("internode_parse_imm", [](uint32_t imm) -> nb::object {
        internode::ImmFields f;
        if (!internode::parse_imm(imm, &f)) return nb::none();
        return nb::make_tuple(static_cast<int>(f.kind), f.generation_mod, f.source, f.destination);
      }, nb::arg("imm"), "(kind, generation mod 8, source, destination), or None for another imm (tests).");
  m.attr("internode_max_ranks") = internode::kMaxRanks;
}

// The GPU host proxy (host_proxy.h) over host memory: the CPU tests drive it as the kernels would
// (ready records written from Python) between two engines.
void bind_host_proxy(nb::module_& m) {
  using proxy::HostProxy;
  nb::class_<HostProxy>(m, "HostProxy",
                        "The host proxy of MoE across node groups on GPUs (ffi/moe/host_proxy.h), exposed for "
                        "tests over host memory: ranks = [(rank, control block address, send region, receive "
                        "area address)], peers = [None or (receive descriptor, sender domains, split threshold)] "
                        "by rank.")
      .def(
          "__init__",
          [](HostProxy* self, std::shared_ptr<fabric::Engine> engine, int32_t num_ranks, int32_t node_size,
             double timeout_s,
             const std::vector<std::tuple<int32_t, uint64_t, std::shared_ptr<fabric::MemoryRegion>, uint64_t>>& ranks,
             const std::vector<std::optional<std::tuple<fabric::MemoryDescriptor, uint32_t, uint64_t>>>& peers) {
            std::vector<proxy::ProxyRank> rs;
            for (const auto& [rank, control, send, recv] : ranks) {
              proxy::ProxyRank r;
              r.rank = rank;
              r.control = reinterpret_cast<char*>(control);
              r.send = send;
              r.read_abort = [recv](int32_t peer) {
                internode::AbortMessage msg;
                std::memcpy(&msg, reinterpret_cast<const char*>(recv) + int64_t{peer} * internode::kAbortBytes,
                            sizeof(msg));
                if (msg.magic != internode::kAbortMagic || msg.length > sizeof(msg.text)) return std::string("(no reason given)");
                return std::string(msg.text, msg.length);
              };
              rs.push_back(std::move(r));
            }
            std::vector<std::optional<proxy::ProxyPeer>> ps;
            for (const auto& p : peers) {
              if (!p) {
                ps.emplace_back();
                continue;
              }
              proxy::ProxyPeer peer;
              peer.receive = std::get<0>(*p);
              peer.sender.domains = std::get<1>(*p);
              peer.sender.sharding.split_threshold = std::get<2>(*p);
              ps.emplace_back(std::move(peer));
            }
            proxy::ProxyOptions o;
            o.timeout_s = timeout_s;
            o.num_ranks = num_ranks;
            o.node_size = node_size;
            new (self) HostProxy(std::move(engine), o, std::move(rs), std::move(ps));
          },
          nb::arg("engine"), nb::arg("num_ranks"), nb::arg("node_size"), nb::arg("timeout_s"), nb::arg("ranks"),
          nb::arg("peers"))
      .def("start", &HostProxy::start)
      .def("stop", &HostProxy::stop, nb::call_guard<nb::gil_scoped_release>())
      .def("poll_once", &HostProxy::poll_once, nb::call_guard<nb::gil_scoped_release>())
      .def("drain", &HostProxy::drain, nb::arg("timeout_s"), nb::call_guard<nb::gil_scoped_release>())
      .def("failure",
           [](const HostProxy& h) {
             HostProxy::Failure f = h.failure();
             return nb::make_tuple(f.code, f.peer, f.message);
           },
           "(DeviceError code, peer, message) of the first failure (code 0 if none).")
      .def("posts", &HostProxy::posts, nb::arg("index"))
      .def("bytes", &HostProxy::bytes, nb::arg("index"))
      .def("describe", &HostProxy::describe);
  m.def("proxy_control_layout", [](int32_t num_ranks) {
        const proxy::ControlLayout l = proxy::control_layout(num_ranks);
        nb::dict d;
        d["abort"] = l.abort;
        d["kernel_error"] = l.kernel_error;
        d["progress"] = l.progress;
        d["ready"] = l.ready;
        d["arrived"] = l.arrived;
        d["bytes"] = l.bytes;
        d["ready_record_bytes"] = sizeof(proxy::ReadyRecord);
        return d;
      }, nb::arg("num_ranks"), "Offsets of the host proxy's control block (proxy_protocol.h).");
  m.def("internode_message_imms", [](uint32_t domains, uint64_t split_threshold) {
        internode::SenderSettings s;
        s.domains = domains;
        s.sharding.split_threshold = split_threshold;
        return nb::make_tuple(internode::message_imms(s), internode::signal_imms(s));
      }, nb::arg("domains"), nb::arg("split_threshold"),
      "(imms of one message, imms of one free ack) from a sender with these settings.");
}

void bind_moe(nb::module_& m) {
  m.doc() = "MoE dispatch/combine: shapes, layout math, CPU reference contexts (found by id).";
  bind_shape(m);
  bind_layout(m);
  bind_device_errors(m);
  bind_cpu_context(m);
  bind_internode_context(m);
  bind_host_proxy(m);
}

}  // namespace
}  // namespace jax_garden::moe

JG_REGISTER_BINDINGS(moe, jax_garden::moe::bind_moe);
