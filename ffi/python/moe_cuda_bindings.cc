// Bindings of submodule _jax_garden.moe_cuda: the CUDA MoE context (no logic here).
// In a CPU-only build the submodule exists with available = False.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common/registry.h"

#ifdef JAX_GARDEN_WITH_CUDA
#include <memory>

#include "moe/moe_cuda.h"
#endif

namespace nb = nanobind;

namespace {

#ifdef JAX_GARDEN_WITH_CUDA
namespace mc = jax_garden::moe_cuda;

// Python owns one reference; the registry holds another from finalize() to close().
struct PyContext {
  std::shared_ptr<mc::Context> ctx;
  uint64_t id = 0;
};
#endif

void BindMoeCuda(nb::module_& m) {
#ifdef JAX_GARDEN_WITH_CUDA
  m.attr("available") = true;
  m.attr("max_ranks") = mc::kMaxRanks;
  nb::class_<PyContext>(m, "Context")
      .def(
          "__init__",
          [](PyContext* self, int64_t num_experts, int64_t experts_per_token, int64_t hidden, int64_t max_tokens,
             int64_t max_recv_tokens, int64_t num_ranks, int64_t dispatch_elem_bytes, int64_t scale_cols,
             int64_t expert_padding, double timeout_s, int64_t chunk_bytes, int64_t blocks_per_sm) {
            mc::Config c;
            c.num_experts = num_experts;
            c.experts_per_token = experts_per_token;
            c.hidden = hidden;
            c.max_tokens = max_tokens;
            c.max_recv_tokens = max_recv_tokens;
            c.num_ranks = num_ranks;
            c.dispatch_elem_bytes = dispatch_elem_bytes;
            c.scale_cols = scale_cols;
            c.expert_padding = expert_padding;
            c.timeout_s = timeout_s;
            c.chunk_bytes = chunk_bytes;
            c.blocks_per_sm = blocks_per_sm;
            new (self) PyContext{std::make_shared<mc::Context>(c), 0};
          },
          nb::arg("num_experts"), nb::arg("experts_per_token"), nb::arg("hidden"), nb::arg("max_tokens"),
          nb::arg("max_recv_tokens"), nb::arg("num_ranks"), nb::arg("dispatch_elem_bytes"), nb::arg("scale_cols"),
          nb::arg("expert_padding"), nb::arg("timeout_s"), nb::arg("chunk_bytes") = mc::kChunkBytes,
          nb::arg("blocks_per_sm") = 2)
      .def("add_rank", [](PyContext& p, int ordinal, int rank) { p.ctx->AddRank(ordinal, rank); },
           nb::arg("ordinal"), nb::arg("rank"))
      .def("ipc_handle", [](PyContext& p, int ordinal) {
             const std::string h = p.ctx->IpcHandle(ordinal);
             return nb::bytes(h.data(), h.size());
           }, nb::arg("ordinal"))
      .def("connect_local", [](PyContext& p, int ordinal, int peer_rank, int peer_ordinal) {
             p.ctx->ConnectLocal(ordinal, peer_rank, peer_ordinal);
           }, nb::arg("ordinal"), nb::arg("peer_rank"), nb::arg("peer_ordinal"))
      .def("connect_ipc", [](PyContext& p, int ordinal, int peer_rank, nb::bytes handle) {
             p.ctx->ConnectIpc(ordinal, peer_rank, std::string(handle.c_str(), handle.size()));
           }, nb::arg("ordinal"), nb::arg("peer_rank"), nb::arg("handle"))
      .def("finalize", [](PyContext& p) {
             std::string report = p.ctx->Finalize();
             if (p.id == 0) p.id = mc::RegisterContext(p.ctx);
             return report;
           })
      .def_prop_ro("id", [](const PyContext& p) { return p.id; })
      .def_prop_ro("sym_bytes", [](const PyContext& p) { return p.ctx->sym_bytes(); })
      .def("synchronize", [](PyContext& p) { p.ctx->Synchronize(); })
      .def("close", [](PyContext& p) {
             if (p.id != 0) mc::UnregisterContext(p.id);
             p.id = 0;
             p.ctx->Close();
           })
      .def("error", [](const PyContext& p) {
             std::string msg;
             const int32_t code = p.ctx->ErrorCode(&msg);
             return nb::make_tuple(code, msg);
           })
      .def("timings", [](const PyContext& p, int ordinal, int n) { return p.ctx->Timings(ordinal, n); },
           nb::arg("ordinal"), nb::arg("n"))
      .def("generations", [](const PyContext& p, int ordinal) { return p.ctx->Generations(ordinal); },
           nb::arg("ordinal"))
      .def("dropped_rows", [](const PyContext& p, int ordinal) { return p.ctx->DroppedRows(ordinal); },
           nb::arg("ordinal"))
      .def("handler_calls", [](const PyContext& p) { return p.ctx->HandlerCalls(); })
      .def("ordinals", [](const PyContext& p) { return p.ctx->Ordinals(); });
#else
  m.attr("available") = false;
#endif
}

}  // namespace

JG_REGISTER_BINDINGS(moe_cuda, BindMoeCuda);
