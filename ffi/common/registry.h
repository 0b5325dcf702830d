// Static registries: each op family registers its XLA FFI targets and its Python bindings
// from its own file, and ffi/python/module.cc hands them to Python as one dict.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace nanobind { class module_; }

namespace jax_garden {

struct FfiTargetEntry {
  std::string name;      // target name as registered with XLA
  std::string platform;  // "cpu" or "CUDA"
  void* handler;         // XLA_FFI_Handler*
};

std::vector<FfiTargetEntry>& ffi_target_registry();

struct FfiTargetRegistration {
  FfiTargetRegistration(const char* name, const char* platform, void* handler) {
    ffi_target_registry().push_back({name, platform, handler});
  }
};

using BindingFn = void (*)(nanobind::module_&);
std::vector<std::pair<std::string, BindingFn>>& binding_registry();

struct BindingRegistration {
  BindingRegistration(const char* name, BindingFn fn) { binding_registry().emplace_back(name, fn); }
};

}  // namespace jax_garden

#define JG_CONCAT_INNER(a, b) a##b
#define JG_CONCAT(a, b) JG_CONCAT_INNER(a, b)

// JG_REGISTER_FFI_TARGET("jg_fabric_signal", "cpu", SignalCpu);
#define JG_REGISTER_FFI_TARGET(name, platform, handler)                                \
  static ::jax_garden::FfiTargetRegistration JG_CONCAT(jg_ffi_reg_, __LINE__)(         \
      name, platform, reinterpret_cast<void*>(handler))

// JG_REGISTER_BINDINGS(fabric, BindFabric): BindFabric(m) adds to submodule `fabric`.
#define JG_REGISTER_BINDINGS(name, fn) \
  static ::jax_garden::BindingRegistration JG_CONCAT(jg_bind_reg_, __LINE__)(#name, fn)
