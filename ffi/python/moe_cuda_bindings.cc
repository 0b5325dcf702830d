// Bindings of `_jax_garden.moe_cuda`: the NVLink MoE context (ffi/moe/nvlink_all_to_all.h), driven
// by jax_garden/_moe_cuda.py. No logic here. In a CPU-only build the submodule exists with
// available = False.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "common/error.h"
#include "common/registry.h"
#include "moe/nvlink_protocol.h"

#ifdef JAX_GARDEN_WITH_CUDA
#include <memory>
#include <string>

#include "fabric/core/options.h"
#include "moe/dtype.h"
#include "moe/layout.h"
#include "moe/nvlink_all_to_all.h"
#include "moe/proxy_all_to_all.h"
#endif

namespace nb = nanobind;

namespace jax_garden::moe {
namespace {

#ifdef JAX_GARDEN_WITH_CUDA
// A CUDA context as Python holds it: the registry holds it too, from finalize() to close().
struct NvlinkContextHandle {
  std::shared_ptr<NvlinkAllToAll> context;
  uint64_t id = 0;

  void close() {
    if (id != 0) cuda_contexts().remove(id);
    id = 0;
    context->close();
  }
};

// A node-group context as Python holds it: registered from finalize() to close().
struct ProxyContextHandle {
  std::shared_ptr<ProxyAllToAll> context;
  uint64_t id = 0;

  void close() {
    if (id != 0) cuda_contexts().remove(id);
    id = 0;
    context->close();
  }
};

fabric::CompletionMode completion_mode(const std::string& s) {
  if (s == "delivery") return fabric::CompletionMode::kDelivery;
  if (s == "transmit") return fabric::CompletionMode::kTransmit;
  throw InvalidArgument(str_cat("completion must be 'delivery' or 'transmit', got '", s, "'"));
}

fabric::TransferPath transfer_path(const std::string& name) {
  if (name.empty() || name == "auto") return fabric::TransferPath::kAuto;
  if (name == "fabric") return fabric::TransferPath::kFabric;
  if (name == "ipc") return fabric::TransferPath::kIpc;
  if (name == "staged") return fabric::TransferPath::kStaged;
  throw InvalidArgument(str_cat("path must be 'auto', 'fabric', 'ipc' or 'staged', got '", name, "'"));
}

nb::bytes py_bytes(const std::string& b) { return nb::bytes(b.data(), b.size()); }

SyncMode sync_mode(const std::string& name) {
  if (name == "arrive") return SyncMode::kArrive;
  if (name == "flags") return SyncMode::kFlags;
  if (name == "legacy") return SyncMode::kLegacy;
  throw InvalidArgument(str_cat("moe (CUDA): sync must be 'arrive', 'flags' or 'legacy', got '", name, "'"));
}
const char* sync_mode_name(SyncMode mode) {
  switch (mode) {
    case SyncMode::kArrive: return "arrive";
    case SyncMode::kFlags: return "flags";
    case SyncMode::kLegacy: return "legacy";
  }
  return "?";
}
#endif

void bind_moe_cuda(nb::module_& m) {
  m.attr("max_ranks") = kMaxRanks;
  // nvlink_protocol.h, Stamp: what each of a kernel's timestamps marks (NvlinkAllToAll.stamps).
  m.attr("stamp_names") =
      std::vector<std::string>{"start", "end", "entry", "waited", "body", "last", "unused6", "unused7"};
#ifdef JAX_GARDEN_WITH_CUDA
  m.attr("available") = true;
  nb::class_<NvlinkContextHandle>(m, "NvlinkAllToAll")
      .def(
          "__init__",
          [](NvlinkContextHandle* self, const MoeShape& shape, const std::string& dispatch_dtype, double timeout_s,
             int32_t chunk_bytes, int32_t blocks_per_sm, const std::string& sync, bool fused, bool cooperative) {
            NvlinkOptions options;
            options.timeout_s = timeout_s;
            options.chunk_bytes = chunk_bytes;
            options.blocks_per_sm = blocks_per_sm;
            options.sync = sync_mode(sync);
            options.fused = fused;
            options.cooperative = cooperative;
            new (self) NvlinkContextHandle{
                std::make_shared<NvlinkAllToAll>(shape, parse_dtype(dispatch_dtype), options), 0};
          },
          nb::arg("shape"), nb::arg("dispatch_dtype"), nb::arg("timeout_s"),
          nb::arg("chunk_bytes") = kDefaultChunkBytes, nb::arg("blocks_per_sm") = 2, nb::arg("sync") = "arrive",
          nb::arg("fused") = true, nb::arg("cooperative") = true,
          "sync: 'arrive' (default), 'flags' or 'legacy' (nvlink_protocol.h, SyncMode); fused: dispatch()/combine() "
          "as one kernel each; cooperative: launch those with every block resident.")
      .def("add_rank", [](NvlinkContextHandle& h, int ordinal, int rank) { h.context->add_rank(ordinal, rank); },
           nb::arg("ordinal"), nb::arg("rank"))
      .def(
          "ipc_handle",
          [](NvlinkContextHandle& h, int ordinal) {
            const std::string handle = h.context->ipc_handle(ordinal);
            return nb::bytes(handle.data(), handle.size());
          },
          nb::arg("ordinal"))
      .def(
          "connect_local",
          [](NvlinkContextHandle& h, int ordinal, int peer_rank, int peer_ordinal) {
            h.context->connect_local(ordinal, peer_rank, peer_ordinal);
          },
          nb::arg("ordinal"), nb::arg("peer_rank"), nb::arg("peer_ordinal"))
      .def(
          "connect_ipc",
          [](NvlinkContextHandle& h, int ordinal, int peer_rank, nb::bytes handle) {
            h.context->connect_ipc(ordinal, peer_rank, std::string(handle.c_str(), handle.size()));
          },
          nb::arg("ordinal"), nb::arg("peer_rank"), nb::arg("handle"))
      .def("finalize",
           [](NvlinkContextHandle& h) {
             std::string report = h.context->finalize();
             if (h.id == 0) h.id = cuda_contexts().add(h.context);
             return report;
           })
      .def_ro("id", &NvlinkContextHandle::id, "Registry id once finalized (0 before, and once closed).")
      .def_prop_ro("sym_bytes", [](const NvlinkContextHandle& h) { return h.context->sym_bytes(); })
      .def("grids",
           [](const NvlinkContextHandle& h, int ordinal) {
             const NvlinkRank* r = h.context->find_rank(ordinal);
             JG_CHECK_ARG(r != nullptr, "moe (CUDA): no rank on device ordinal ", ordinal);
             const DeviceView& v = r->view;
             return std::vector<int32_t>{v.grid_dsend, v.grid_drecv, v.grid_csend, v.grid_crecv, v.grid_dfused,
                                         v.grid_cfused};
           },
           nb::arg("ordinal"),
           "Blocks each kernel launches (dispatch_send, dispatch_recv, combine_send, combine_recv, dispatch_fused, "
           "combine_fused; 0: dispatch()/combine() run the two split kernels).")
      .def_prop_ro("sync",
                   [](const NvlinkContextHandle& h) { return std::string(sync_mode_name(h.context->options().sync)); })
      .def("stamps", [](const NvlinkContextHandle& h, int ordinal, int n) { return h.context->stamps(ordinal, n); },
           nb::arg("ordinal"), nb::arg("n"), "[n][4][len(stamp_names)] device timestamps (ns) of the last n calls.")
      .def("synchronize", [](NvlinkContextHandle& h) { h.context->synchronize(); })
      .def("close", &NvlinkContextHandle::close)
      .def("error",
           [](const NvlinkContextHandle& h) {
             std::string message;
             const int32_t code = h.context->error_code(&message);
             return nb::make_tuple(code, message);  // a DeviceError value
           })
      .def("timings", [](const NvlinkContextHandle& h, int ordinal, int n) { return h.context->timings(ordinal, n); },
           nb::arg("ordinal"), nb::arg("n"))
      .def("generations", [](const NvlinkContextHandle& h, int ordinal) { return h.context->generations(ordinal); },
           nb::arg("ordinal"))
      .def("dropped_rows", [](const NvlinkContextHandle& h, int ordinal) { return h.context->dropped_rows(ordinal); },
           nb::arg("ordinal"))
      .def("handler_calls", [](const NvlinkContextHandle& h) { return h.context->handler_calls(); })
      .def("ordinals", [](const NvlinkContextHandle& h) { return h.context->ordinals(); });

  nb::class_<ProxyContextHandle>(m, "ProxyAllToAll",
                                 "CUDA context of an AllToAll in node groups (ffi/moe/proxy_all_to_all.h): NVLink "
                                 "inside a group, the host proxy and a TransferEngine between groups.")
      .def(
          "__init__",
          [](ProxyContextHandle* self, const MoeShape& shape, const std::string& dispatch_dtype, double timeout_s,
             int32_t node_size, int32_t blocks_per_sm, const std::string& provider, const std::string& node,
             uint32_t domains, const std::string& completion, uint64_t split_threshold, const std::string& path) {
            ProxyContextOptions o;
            o.timeout_s = timeout_s;
            o.node_size = node_size;
            o.blocks_per_sm = blocks_per_sm;
            o.engine.provider = provider;
            o.engine.node = node;
            o.engine.domains = domains;
            o.engine.completion = completion_mode(completion);
            o.engine.sharding.split_threshold = split_threshold;
            o.engine.default_path = transfer_path(path);
            const DType dd = parse_dtype(dispatch_dtype);
            std::shared_ptr<ProxyAllToAll> context;
            {
              nb::gil_scoped_release release;
              context = std::make_shared<ProxyAllToAll>(shape, dd, o);
            }
            new (self) ProxyContextHandle{std::move(context), 0};
          },
          nb::arg("shape"), nb::arg("dispatch_dtype"), nb::arg("timeout_s"), nb::arg("node_size"),
          nb::arg("blocks_per_sm") = 2, nb::arg("provider") = "", nb::arg("node") = "", nb::arg("domains") = 1,
          nb::arg("completion") = "delivery", nb::arg("split_threshold") = uint64_t{1} << 20,
          nb::arg("path") = "auto")
      .def("add_rank", [](ProxyContextHandle& h, int ordinal, int32_t rank) { h.context->add_rank(ordinal, rank); },
           nb::arg("ordinal"), nb::arg("rank"))
      .def("ipc_handle", [](ProxyContextHandle& h, int32_t rank) { return py_bytes(h.context->ipc_handle(rank)); },
           nb::arg("rank"))
      .def("peer_info",
           [](ProxyContextHandle& h, int32_t rank) {
             const fabric::Bytes b = h.context->peer_info(rank);
             return nb::bytes(reinterpret_cast<const char*>(b.data()), b.size());
           },
           nb::arg("rank"))
      .def("connect_peer",
           [](ProxyContextHandle& h, nb::bytes info) {
             const auto* p = reinterpret_cast<const uint8_t*>(info.c_str());
             h.context->connect_peer(fabric::Bytes(p, p + info.size()));
           },
           nb::arg("info"))
      .def("connect_local", [](ProxyContextHandle& h, int32_t rank, int32_t peer) { h.context->connect_local(rank, peer); },
           nb::arg("rank"), nb::arg("peer_rank"))
      .def("connect_ipc",
           [](ProxyContextHandle& h, int32_t rank, int32_t peer, nb::bytes handle) {
             h.context->connect_ipc(rank, peer, std::string(handle.c_str(), handle.size()));
           },
           nb::arg("rank"), nb::arg("peer_rank"), nb::arg("handle"))
      .def("remote_ranks", [](const ProxyContextHandle& h) { return h.context->remote_ranks(); })
      .def("finalize",
           [](ProxyContextHandle& h) {
             std::string report;
             {
               nb::gil_scoped_release release;
               report = h.context->finalize();
             }
             if (h.id == 0) h.id = cuda_contexts().add(h.context);
             return report;
           })
      .def_ro("id", &ProxyContextHandle::id, "Registry id once finalized (0 before, and once closed).")
      .def_prop_ro("node_size", [](const ProxyContextHandle& h) { return h.context->node_size(); })
      .def_prop_ro("provider", [](const ProxyContextHandle& h) { return h.context->provider(); })
      .def("synchronize", [](ProxyContextHandle& h) { h.context->synchronize(); },
           nb::call_guard<nb::gil_scoped_release>())
      .def("drain", [](ProxyContextHandle& h, double timeout_s) { return h.context->drain(timeout_s); },
           nb::arg("timeout_s"), nb::call_guard<nb::gil_scoped_release>())
      .def("close", &ProxyContextHandle::close, nb::call_guard<nb::gil_scoped_release>())
      .def("error",
           [](const ProxyContextHandle& h) {
             std::string message;
             const int32_t code = h.context->error_code(&message);
             return nb::make_tuple(code, message);
           })
      .def("timings", [](const ProxyContextHandle& h, int ordinal, int n) { return h.context->timings(ordinal, n); },
           nb::arg("ordinal"), nb::arg("n"))
      .def("generations", [](const ProxyContextHandle& h, int ordinal) { return h.context->generations(ordinal); },
           nb::arg("ordinal"))
      .def("dropped_rows", [](const ProxyContextHandle& h, int ordinal) { return h.context->dropped_rows(ordinal); },
           nb::arg("ordinal"))
      .def("proxy_posts", [](const ProxyContextHandle& h, int ordinal) { return h.context->proxy_posts(ordinal); },
           nb::arg("ordinal"))
      .def("proxy_bytes", [](const ProxyContextHandle& h, int ordinal) { return h.context->proxy_bytes(ordinal); },
           nb::arg("ordinal"))
      .def("handler_calls", [](const ProxyContextHandle& h) { return h.context->handler_calls(); })
      .def("ordinals", [](const ProxyContextHandle& h) { return h.context->ordinals(); })
      .def("describe", [](const ProxyContextHandle& h) { return h.context->describe(); },
           nb::call_guard<nb::gil_scoped_release>());
#else
  m.attr("available") = false;
#endif
}

}  // namespace
}  // namespace jax_garden::moe

JG_REGISTER_BINDINGS(moe_cuda, jax_garden::moe::bind_moe_cuda);
