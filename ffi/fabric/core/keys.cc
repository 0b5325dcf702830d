#include "fabric/core/keys.h"

#include <sys/random.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"

namespace jax_garden::fabric {

uint64_t random_u64() {
  uint64_t v = 0;
  size_t got = 0;
  while (got < sizeof(v)) {
    ssize_t n = getrandom(reinterpret_cast<char*>(&v) + got, sizeof(v) - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw FabricError(str_cat("getrandom failed: ", std::strerror(errno)));
    }
    got += static_cast<size_t>(n);
  }
  return v;
}

uint64_t KeyAllocator::next() {
  MutexLock lk(mu_);
  while (true) {
    uint64_t k = random_u64();
    if (k != 0 && issued_.insert(k).second) return k;
  }
}

}  // namespace jax_garden::fabric
