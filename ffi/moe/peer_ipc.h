// Maps a peer process's MoE buffer from its legacy CUDA IPC handle (both CUDA contexts use it).
#pragma once

#include <array>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/error.h"
#include "fabric/transport/transport_ipc.h"

namespace jax_garden::moe {

// Through the transfer engine, which holds this process's other IPC mappings: a peer that freed a
// buffer the engine mapped may hand out a handle that only opens once the engine lets go of it.
// `who` prefixes the error ("jax_garden.moe (CUDA)"). The caller closes it (cudaIpcCloseMemHandle).
inline char* open_peer_ipc(const std::string& handle, int ordinal, int peer_rank, const char* who) {
  std::array<uint8_t, fabric::kIpcHandleBytes> h{};  // the caller checked its size
  std::memcpy(h.data(), handle.data(), h.size());
  try {
    return reinterpret_cast<char*>(fabric::ipc_open_outside_engine(h, ordinal));
  } catch (const FabricError& e) {
    throw std::runtime_error(str_cat(who, ": mapping peer rank ", peer_rank, "'s buffer: ", e.what()));
  }
}

}  // namespace jax_garden::moe
