#include "common/registry.h"

namespace jax_garden {

std::vector<FfiTargetEntry>& ffi_target_registry() {
  static std::vector<FfiTargetEntry> registry;
  return registry;
}

std::vector<std::pair<std::string, BindingFn>>& binding_registry() {
  static std::vector<std::pair<std::string, BindingFn>> registry;
  return registry;
}

}  // namespace jax_garden
