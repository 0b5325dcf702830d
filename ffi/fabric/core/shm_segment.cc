#include "fabric/core/shm_segment.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

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

bool process_dead(uint64_t pid) { return pid != 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH; }

void remove_dead_segments(const char* prefix, uint64_t magic, size_t pid_word) {
  DIR* dir = opendir("/dev/shm");
  if (!dir) return;
  std::vector<uint64_t> hdr(pid_word + 1);
  const size_t prefix_len = std::strlen(prefix);
  while (dirent* e = readdir(dir)) {
    if (std::strncmp(e->d_name, prefix, prefix_len) != 0) continue;
    std::string name = std::string("/") + e->d_name;
    int fd = shm_open(name.c_str(), O_RDONLY, 0);
    if (fd < 0) continue;
    std::fill(hdr.begin(), hdr.end(), 0);
    const size_t want = hdr.size() * sizeof(uint64_t);
    ssize_t n = pread(fd, hdr.data(), want, 0);
    ::close(fd);
    if (n == static_cast<ssize_t>(want) && hdr[0] == magic && process_dead(hdr[pid_word])) shm_unlink(name.c_str());
  }
  closedir(dir);
}

}  // namespace jax_garden::fabric
