// Bindings of `_jax_garden.moe`: the MoeShape every context takes, the layout functions of
// ffi/moe/layout.h (Python computes sizes with them, never by itself), the CUDA kernels' error
// codes (DeviceError), and the CPU reference context. No logic here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/registry.h"
#include "moe/cpu_all_to_all.h"
#include "moe/layout.h"
#include "moe/nvlink_protocol.h"

namespace nb = nanobind;

namespace jax_garden::moe {
namespace {

// A CPU context as Python holds it: the registry holds it too, from construction to close().
struct CpuContextHandle {
  std::shared_ptr<CpuAllToAll> context;
  uint64_t id = 0;

  ~CpuContextHandle() { close(); }
  void close() {
    if (id != 0) close_cpu_context(id);
    id = 0;
  }
};

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
      .value("ROUTING_MISMATCH", kErrRoutingMismatch);
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

void bind_moe(nb::module_& m) {
  m.doc() = "MoE dispatch/combine: shapes, layout math, CPU reference contexts (found by id).";
  bind_shape(m);
  bind_layout(m);
  bind_device_errors(m);
  bind_cpu_context(m);
}

}  // namespace
}  // namespace jax_garden::moe

JG_REGISTER_BINDINGS(moe, jax_garden::moe::bind_moe);
