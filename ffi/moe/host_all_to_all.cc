#include "moe/host_all_to_all.h"

#include "common/error.h"

namespace jax_garden::moe {

ObjectRegistry<HostAllToAll>& cpu_contexts() {
  static auto* registry = new ObjectRegistry<HostAllToAll>();  // never destroyed: handlers may run late
  return *registry;
}

std::shared_ptr<HostAllToAll> find_cpu_context(uint64_t id) {
  auto context = cpu_contexts().find(id);
  if (!context) {
    throw InvalidArgument(str_cat("MoE: no live CPU AllToAll context with id ", id,
                                  " (closed, or created in another process)"));
  }
  return context;
}

bool close_cpu_context(uint64_t id) {
  auto context = cpu_contexts().remove(id);  // the last reference may go with a running call
  if (!context) return false;
  context->close();
  return true;
}

}  // namespace jax_garden::moe
