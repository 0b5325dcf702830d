// The extension module: hands Python the FFI targets (a dict per platform) and one
// submodule of bindings per op family. No logic lives here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "common/registry.h"

namespace nb = nanobind;

NB_MODULE(_jax_garden, m) {
  m.doc() = "jax_garden native extension (TransferEngine, MoE, XLA FFI targets)";

  // {"cpu": {name: capsule}, "CUDA": {name: capsule}}; registered once by jax_garden/_ffi.py.
  m.def("ffi_targets", []() {
    nb::dict by_platform;
    for (const auto& entry : jax_garden::ffi_target_registry()) {
      nb::str platform(entry.platform.c_str());
      if (!by_platform.contains(platform)) by_platform[platform] = nb::dict();
      nb::dict targets = nb::borrow<nb::dict>(by_platform[platform]);
      targets[entry.name.c_str()] = nb::capsule(entry.handler);
    }
    return by_platform;
  });

#ifdef JAX_GARDEN_WITH_CUDA
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif

  for (const auto& [name, bind] : jax_garden::binding_registry()) {
    nb::module_ sub = m.def_submodule(name.c_str());
    bind(sub);
  }
}
