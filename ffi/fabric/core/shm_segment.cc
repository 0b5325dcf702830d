#include "fabric/core/shm_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"

namespace jax_garden::fabric {

void* create_shared_segment(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (fd < 0) throw FabricError(str_cat("shm_open(", name, "): ", std::strerror(errno)));
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    int err = errno;
    ::close(fd);
    shm_unlink(name.c_str());
    throw FabricError(str_cat("ftruncate(", name, "): ", std::strerror(err)));
  }
  void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) {
    int err = errno;
    shm_unlink(name.c_str());
    throw FabricError(str_cat("mmap(", name, "): ", std::strerror(err)));
  }
  return m;
}

}  // namespace jax_garden::fabric
