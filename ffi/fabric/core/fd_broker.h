// Hands file descriptors of this process's exportable GPU memory to other processes on the host.
//
// A virtual-memory-management range (cuMemCreate with the POSIX fd handle type; XLA's allocators
// make these) has no legacy CUDA IPC handle: a peer maps it from a file descriptor, which only a
// process holding it can pass on. The broker keeps one exported fd per registered region and
// answers requests on an abstract Unix socket named after the process nonce, sending the fd with
// SCM_RIGHTS. A request names the region key (the random capability that descriptors carry);
// an unknown key is refused, and so is a requester running as another user (SO_PEERCRED). Every
// exchange is bounded by a timeout on both sides.
#pragma once

#include <cstdint>
#include <string>

namespace jax_garden::fabric {

class FdBroker {
 public:
  // Serves `fd` (owned by the broker from now on) to requests for `region_key`. The serving
  // thread starts at the first add().
  static void add(uint64_t region_key, int fd);
  // Stops serving `region_key` and closes its fd (no-op if unknown).
  static void remove(uint64_t region_key);
  // From the broker of the process `process_nonce` on this host: a new fd the caller owns, or -1
  // with *why set (no such process, unknown key, no answer within timeout_s).
  static int fetch(uint64_t process_nonce, uint64_t region_key, double timeout_s, std::string* why);
  // The abstract socket name of a process's broker (without the leading NUL).
  static std::string socket_name(uint64_t process_nonce);
};

}  // namespace jax_garden::fabric
