// Bindings of `_jax_garden.moe`: create/destroy CPU AllToAll contexts (ids for the FFI attribute
// `context_id`), and the layout formula Python needs for shapes. No logic here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <memory>

#include "common/registry.h"
#include "moe/cpu_all_to_all.h"
#include "moe/layout.h"

namespace nb = nanobind;
namespace jgm = jax_garden::moe;

namespace {

void BindMoe(nb::module_& m) {
  m.doc() = "MoE dispatch/combine: CPU reference contexts (one per AllToAll, found by id).";

  m.def(
      "create_cpu_context",
      [](int32_t num_ranks, int32_t num_experts, int32_t experts_per_token, int32_t hidden,
         int32_t max_tokens, int64_t max_recv_tokens, int32_t expert_padding, int32_t scale_cols,
         const std::string& dispatch_dtype, const std::string& combine_dtype, double timeout_s) {
        jgm::MoeShape shape{num_ranks, num_experts,     experts_per_token, hidden,
                            max_tokens, max_recv_tokens, expert_padding,    scale_cols};
        auto ctx = std::make_shared<jgm::CpuAllToAll>(shape, jgm::parse_dtype(dispatch_dtype),
                                                      jgm::parse_dtype(combine_dtype), timeout_s);
        return jgm::register_cpu_context(std::move(ctx));
      },
      nb::arg("num_ranks"), nb::arg("num_experts"), nb::arg("experts_per_token"),
      nb::arg("hidden"), nb::arg("max_tokens"), nb::arg("max_recv_tokens"),
      nb::arg("expert_padding"), nb::arg("scale_cols"), nb::arg("dispatch_dtype"),
      nb::arg("combine_dtype"), nb::arg("timeout_s"),
      "Creates a CPU context and returns its id (u64). ValueError names a wrong argument.");

  m.def("destroy_cpu_context", &jgm::unregister_cpu_context, nb::arg("context_id"),
        "Forgets a context; calls already running keep it alive until they return. "
        "Returns False if the id was unknown.");

  m.def(
      "cpu_dropped_rows",
      [](uint64_t id) { return jgm::find_cpu_context(id)->dropped_rows(); },
      nb::arg("context_id"),
      "Rows dropped for lack of max_recv_tokens space, per receiving rank, since creation.");

  m.def("live_cpu_contexts", &jgm::live_cpu_contexts);

  m.def("worst_case_recv_tokens", &jgm::worst_case_recv_tokens, nb::arg("num_ranks"),
        nb::arg("max_tokens"), nb::arg("experts_per_token"), nb::arg("local_experts"),
        nb::arg("expert_padding"));
}

}  // namespace

JG_REGISTER_BINDINGS(moe, BindMoe);
