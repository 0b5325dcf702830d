// The extension module: hands Python the FFI targets (a dict per platform), one submodule of
// bindings per op family, and the one translation of our C++ exceptions (common/error.h) into
// Python exceptions for every submodule. No other logic lives here.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <exception>

#include "common/error.h"
#include "common/registry.h"

namespace nb = nanobind;

namespace {

// fabric.TransferError, created by the fabric bindings; RuntimeError until they ran.
PyObject* transfer_error_type = PyExc_RuntimeError;

// InvalidArgument -> ValueError, Timeout -> TimeoutError, TransferFailed -> fabric.TransferError,
// FabricError -> RuntimeError; other exceptions go on to nanobind's own translation.
void translate_exception(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const jax_garden::Timeout& e) {
    PyErr_SetString(PyExc_TimeoutError, e.what());
  } catch (const jax_garden::TransferFailed& e) {
    PyErr_SetString(transfer_error_type, e.what());
  } catch (const jax_garden::InvalidArgument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const jax_garden::FabricError& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
}

}  // namespace

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

  if (nb::hasattr(m, "fabric") && nb::hasattr(m.attr("fabric"), "TransferError")) {
    nb::object type = m.attr("fabric").attr("TransferError");
    transfer_error_type = type.release().ptr();  // lives as long as the process
  }
  nb::register_exception_translator(translate_exception);
}
