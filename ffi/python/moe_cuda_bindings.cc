// Bindings of `_jax_garden.moe_cuda`: the NVLink MoE context (ffi/moe/nvlink_all_to_all.h), driven
// by jax_garden/_moe_cuda.py. No logic here. In a CPU-only build the submodule exists with
// available = False.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "common/registry.h"
#include "moe/nvlink_protocol.h"

#ifdef JAX_GARDEN_WITH_CUDA
#include <memory>
#include <string>

#include "moe/dtype.h"
#include "moe/layout.h"
#include "moe/nvlink_all_to_all.h"
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
    if (id != 0) nvlink_contexts().remove(id);
    id = 0;
    context->close();
  }
};
#endif

void bind_moe_cuda(nb::module_& m) {
  m.attr("max_ranks") = kMaxRanks;
#ifdef JAX_GARDEN_WITH_CUDA
  m.attr("available") = true;
  nb::class_<NvlinkContextHandle>(m, "NvlinkAllToAll")
      .def(
          "__init__",
          [](NvlinkContextHandle* self, const MoeShape& shape, const std::string& dispatch_dtype, double timeout_s,
             int32_t chunk_bytes, int32_t blocks_per_sm) {
            NvlinkOptions options;
            options.timeout_s = timeout_s;
            options.chunk_bytes = chunk_bytes;
            options.blocks_per_sm = blocks_per_sm;
            new (self) NvlinkContextHandle{
                std::make_shared<NvlinkAllToAll>(shape, parse_dtype(dispatch_dtype), options), 0};
          },
          nb::arg("shape"), nb::arg("dispatch_dtype"), nb::arg("timeout_s"),
          nb::arg("chunk_bytes") = kDefaultChunkBytes, nb::arg("blocks_per_sm") = 2)
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
             if (h.id == 0) h.id = nvlink_contexts().add(h.context);
             return report;
           })
      .def_ro("id", &NvlinkContextHandle::id, "Registry id once finalized (0 before, and once closed).")
      .def_prop_ro("sym_bytes", [](const NvlinkContextHandle& h) { return h.context->sym_bytes(); })
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
#else
  m.attr("available") = false;
#endif
}

}  // namespace
}  // namespace jax_garden::moe

JG_REGISTER_BINDINGS(moe_cuda, jax_garden::moe::bind_moe_cuda);
