#include "fabric/core/fd_broker.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "common/error.h"
#include "common/thread_annotations.h"
#include "fabric/core/gpu_runtime.h"

namespace jax_garden::fabric {
namespace {

constexpr uint32_t kRequestMagic = 0x4446474A;  // "JGFD"
constexpr uint32_t kStatusOk = 0, kStatusUnknownKey = 1, kStatusBadRequest = 2, kStatusOtherUser = 3;
constexpr int kServeTimeoutMs = 2000;  // one slow client cannot hold the broker longer

struct Request {
  uint32_t magic;
  uint32_t reserved;
  uint64_t region_key;
};

// Process-wide, never destroyed: the serving thread may outlive static destruction.
struct BrokerState {
  Mutex mu;
  std::unordered_map<uint64_t, int> fds JG_GUARDED_BY(mu);
  std::once_flag started;
  std::string start_error;  // set once, before `started` completes
};

BrokerState& state() {
  static BrokerState* s = new BrokerState();
  return *s;
}

sockaddr_un abstract_address(uint64_t nonce, socklen_t* len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::string name = FdBroker::socket_name(nonce);
  // Abstract namespace: a leading NUL, no file; it disappears with the process.
  std::memcpy(a.sun_path + 1, name.data(), std::min(name.size(), sizeof(a.sun_path) - 2));
  *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + std::min(name.size(), sizeof(a.sun_path) - 2));
  return a;
}

void set_timeouts(int fd, double seconds) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - std::floor(seconds)) * 1e6);
  if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1000;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

bool read_exact(int fd, void* buf, size_t n) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n) {
    ssize_t k = ::recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

// Sends a status word, with `fd` attached when status is ok.
bool send_reply(int sock, uint32_t status, int fd) {
  msghdr msg{};
  iovec iov{&status, sizeof(status)};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (status == kStatusOk) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  for (;;) {
    ssize_t k = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    return k == static_cast<ssize_t>(sizeof(status));
  }
}

void serve(int listener) {
  BrokerState& s = state();
  for (;;) {
    int c = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));  // e.g. EMFILE: back off, keep serving
      continue;
    }
    set_timeouts(c, kServeTimeoutMs / 1000.0);
    // Only processes of this user get fds (an abstract socket is reachable by any process of the
    // network namespace; the region key alone would then be the whole capability).
    ucred peer{};
    socklen_t peer_len = sizeof(peer);
    bool same_user = ::getsockopt(c, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) == 0 && peer.uid == ::geteuid();
    Request req{};
    if (!read_exact(c, &req, sizeof(req)) || req.magic != kRequestMagic) {
      send_reply(c, kStatusBadRequest, -1);
    } else if (!same_user) {  // answered after the request is read: the requester hears why
      send_reply(c, kStatusOtherUser, -1);
    } else {
      // Sent under the lock: remove() cannot close the fd while it is being passed on.
      MutexLock lk(s.mu);
      auto it = s.fds.find(req.region_key);
      send_reply(c, it == s.fds.end() ? kStatusUnknownKey : kStatusOk, it == s.fds.end() ? -1 : it->second);
    }
    ::close(c);
  }
}

void start_serving() {
  BrokerState& s = state();
  std::call_once(s.started, [&s] {
    int l = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    socklen_t len = 0;
    sockaddr_un a = abstract_address(process_nonce(), &len);
    if (l < 0 || ::bind(l, reinterpret_cast<sockaddr*>(&a), len) != 0 || ::listen(l, 64) != 0) {
      s.start_error = str_cat("fd broker: cannot listen on @", FdBroker::socket_name(process_nonce()), ": ",
                              std::strerror(errno));
      if (l >= 0) ::close(l);
      return;
    }
    std::thread(serve, l).detach();
  });
  if (!s.start_error.empty()) throw FabricError(s.start_error);
}

}  // namespace

std::string FdBroker::socket_name(uint64_t process_nonce) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "jax_garden.fd.%016llx", static_cast<unsigned long long>(process_nonce));
  return buf;
}

void FdBroker::add(uint64_t region_key, int fd) {
  JG_CHECK_ARG(fd >= 0, "fd broker: invalid fd ", fd);
  try {
    start_serving();
  } catch (...) {
    ::close(fd);
    throw;
  }
  BrokerState& s = state();
  MutexLock lk(s.mu);
  auto [it, fresh] = s.fds.emplace(region_key, fd);
  if (!fresh) {
    ::close(it->second);
    it->second = fd;
  }
}

void FdBroker::remove(uint64_t region_key) {
  BrokerState& s = state();
  MutexLock lk(s.mu);
  auto it = s.fds.find(region_key);
  if (it == s.fds.end()) return;
  ::close(it->second);
  s.fds.erase(it);
}

int FdBroker::fetch(uint64_t process_nonce, uint64_t region_key, double timeout_s, std::string* why) {
  const std::string who = str_cat("the fd broker of process ", std::hex, process_nonce);
  int sock = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (sock < 0) {
    *why = str_cat("socket(AF_UNIX): ", std::strerror(errno));
    return -1;
  }
  set_timeouts(sock, timeout_s);
  socklen_t len = 0;
  sockaddr_un a = abstract_address(process_nonce, &len);
  if (::connect(sock, reinterpret_cast<sockaddr*>(&a), len) != 0) {
    *why = str_cat("cannot reach ", who, " (", std::strerror(errno),
                   "): the owner process is gone, or it registered no exportable GPU memory");
    ::close(sock);
    return -1;
  }
  Request req{kRequestMagic, 0, region_key};
  if (::send(sock, &req, sizeof(req), MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(req))) {
    *why = str_cat("sending the request to ", who, " failed: ", std::strerror(errno));
    ::close(sock);
    return -1;
  }
  uint32_t status = 0;
  msghdr msg{};
  iovec iov{&status, sizeof(status)};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t k;
  do {
    k = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  } while (k < 0 && errno == EINTR);
  int err = errno;
  ::close(sock);
  int fd = -1;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); k > 0 && c; c = CMSG_NXTHDR(&msg, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
  if (k != static_cast<ssize_t>(sizeof(status))) {
    if (fd >= 0) ::close(fd);
    *why = k < 0 && (err == EAGAIN || err == EWOULDBLOCK)
               ? str_cat(who, " did not answer within ", timeout_s, " s")
               : str_cat(who, " closed the connection without an answer");
    return -1;
  }
  if (status != kStatusOk || fd < 0) {
    if (fd >= 0) ::close(fd);
    *why = status == kStatusUnknownKey
               ? str_cat(who, " has no region with key ", std::hex, region_key, " (deregistered, or a stale descriptor)")
           : status == kStatusOtherUser
               ? str_cat(who, " serves only processes of its own user (this one runs as uid ", std::dec, ::geteuid(), ")")
               : str_cat(who, " refused the request (status ", status, ")");
    return -1;
  }
  return fd;
}

}  // namespace jax_garden::fabric
