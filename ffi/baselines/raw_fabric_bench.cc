// raw_fabric_bench: the raw-libfabric baseline of `python -m jax_garden.bench fabric`.
//
// Deliberately independent of the TransferEngine (ffi/fabric): one fabric, one domain, one RDM
// endpoint, one registered buffer, one CQ, busy polling, fi_writemsg with FI_REMOTE_CQ_DATA.
// It is what "the best a direct libfabric user gets" means in the benchmark's ratios.
//
// One binary, launched twice:
//   raw_fabric_bench --role server --plan PLAN [--port 0]      prints {"event":"listening","port":N}
//   raw_fabric_bench --role client --plan PLAN --port N        prints one JSON line per test
// The two exchange fabric addresses, buffer base addresses and MR keys over a plain TCP socket
// on 127.0.0.1, which also carries the (untimed) barrier before each test. The client writes,
// the server is the target. Both must get the same PLAN (checked by hash at the handshake):
//   lat:SIZE:ITERS:WARMUP        ping-pong: one write with imm; the target waits for its remote CQ
//                                entry, answers with an imm-only write; sample = post -> answer seen
//                                (and the local completion reaped). Reported as RTT samples in ns.
//   bw:SIZE:COUNT:WINDOW         COUNT writes with imm, at most WINDOW in flight; the target counts
//                                COUNT remote CQ entries and answers once; elapsed = first post ->
//                                answer seen.
//   paged:PAGE:PAGES:ITERS:WINDOW  one write per page (random page slots on both sides, drawn from
//                                a pool twice the page count), each with imm, WINDOW in flight; the
//                                target counts PAGES entries and answers; sample per op (1 warmup).
// Tests are separated by ';'. Data are verified at sampled positions on the first op of every
// lat and paged test, so the baseline provably moves the bytes it claims.

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace {

[[noreturn]] void die(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "raw_fabric_bench: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::exit(1);
}

#define FI_CHECK(call)                                                                   \
  do {                                                                                   \
    int _rc = static_cast<int>(call);                                                    \
    if (_rc != 0) die("%s failed: %d (%s)", #call, _rc, fi_strerror(-_rc));              \
  } while (0)

using Clock = std::chrono::steady_clock;
inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// Data pattern: 64-bit word w of a buffer holds mix(w); the server checks received bytes against it.
inline uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
inline uint8_t pattern_byte(uint64_t pos) { return static_cast<uint8_t>(mix(pos >> 3) >> (8 * (pos & 7))); }

// ---------------------------------------------------------------- options and plan

struct Test {
  enum Kind { kLat, kBw, kPaged } kind;
  uint64_t size = 0;    // write size, or page size for paged
  uint64_t count = 0;   // lat: iters; bw: writes; paged: pages per op
  uint64_t iters = 0;   // paged: timed ops
  uint64_t warmup = 0;  // lat: untimed iterations first
  uint64_t window = 1;  // writes in flight
};

struct Options {
  std::string role;
  std::string host = "127.0.0.1";
  int port = 0;
  std::string provider = "tcp";
  std::string plan;
  uint64_t seed = 1234;
  double timeout_s = 120.0;  // per test
  bool delivery_complete = false;  // FI_DELIVERY_COMPLETE on every write (the engine's default semantics)
};

uint64_t parse_u64(const std::string& s, const char* what) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0) die("bad %s '%s': expected an unsigned integer", what, s.c_str());
  return v;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t p = s.find(sep, start);
    out.push_back(s.substr(start, p == std::string::npos ? std::string::npos : p - start));
    if (p == std::string::npos) break;
    start = p + 1;
  }
  return out;
}

std::vector<Test> parse_plan(const std::string& plan) {
  std::vector<Test> tests;
  for (const std::string& item : split(plan, ';')) {
    if (item.empty()) continue;
    auto f = split(item, ':');
    Test t{};
    if (f[0] == "lat" && f.size() == 4) {
      t.kind = Test::kLat;
      t.size = parse_u64(f[1], "lat size");
      t.count = parse_u64(f[2], "lat iters");
      t.warmup = parse_u64(f[3], "lat warmup");
    } else if (f[0] == "bw" && f.size() == 4) {
      t.kind = Test::kBw;
      t.size = parse_u64(f[1], "bw size");
      t.count = parse_u64(f[2], "bw count");
      t.window = parse_u64(f[3], "bw window");
    } else if (f[0] == "paged" && f.size() == 5) {
      t.kind = Test::kPaged;
      t.size = parse_u64(f[1], "page size");
      t.count = parse_u64(f[2], "page count");
      t.iters = parse_u64(f[3], "paged iters");
      t.window = parse_u64(f[4], "paged window");
    } else {
      die("bad plan item '%s': expected lat:SIZE:ITERS:WARMUP, bw:SIZE:COUNT:WINDOW or "
          "paged:PAGE:PAGES:ITERS:WINDOW", item.c_str());
    }
    if (t.size == 0 && t.kind != Test::kLat) die("bad plan item '%s': size must be > 0", item.c_str());
    if (t.window == 0) die("bad plan item '%s': window must be > 0", item.c_str());
    tests.push_back(t);
  }
  if (tests.empty()) die("empty plan");
  return tests;
}

uint64_t buffer_bytes(const std::vector<Test>& tests) {
  uint64_t n = 4096;
  for (const Test& t : tests) n = std::max(n, t.kind == Test::kPaged ? 2 * t.size * t.count : t.size);
  return n;
}

// ---------------------------------------------------------------- control socket

struct Control {
  int fd = -1;
  double timeout_s = 120.0;

  void wait_fd(short events) {
    pollfd p{fd, events, 0};
    int rc = ::poll(&p, 1, static_cast<int>(timeout_s * 1000));
    if (rc == 0) die("control socket: peer silent for %.0f s", timeout_s);
    if (rc < 0) die("control socket poll: %s", std::strerror(errno));
  }
  void send_all(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      wait_fd(POLLOUT);
      ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) die("control socket send: %s", std::strerror(errno));
      p += k;
      n -= static_cast<size_t>(k);
    }
  }
  void recv_all(void* data, size_t n) {
    char* p = static_cast<char*>(data);
    while (n > 0) {
      wait_fd(POLLIN);
      ssize_t k = ::recv(fd, p, n, 0);
      if (k < 0 && errno == EINTR) continue;
      if (k == 0) die("control socket: peer closed the connection");
      if (k < 0) die("control socket recv: %s", std::strerror(errno));
      p += k;
      n -= static_cast<size_t>(k);
    }
  }
  void barrier() {
    uint8_t b = 0xB7, r = 0;
    send_all(&b, 1);
    recv_all(&r, 1);
    if (r != 0xB7) die("control socket: barrier byte 0x%02x, expected 0xb7", r);
  }
};

Control connect_control(const Options& opt) {
  Control c;
  c.timeout_s = opt.timeout_s;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(opt.port));
  if (inet_pton(AF_INET, opt.host.c_str(), &sa.sin_addr) != 1) die("bad --host '%s': expected an IPv4 address", opt.host.c_str());
  int one = 1;
  if (opt.role == "server") {
    int ls = ::socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0) die("socket: %s", std::strerror(errno));
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(ls, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0)
      die("bind %s:%d: %s", opt.host.c_str(), opt.port, std::strerror(errno));
    if (::listen(ls, 1) != 0) die("listen: %s", std::strerror(errno));
    socklen_t len = sizeof sa;
    getsockname(ls, reinterpret_cast<sockaddr*>(&sa), &len);
    std::printf("{\"event\":\"listening\",\"port\":%d}\n", ntohs(sa.sin_port));
    std::fflush(stdout);
    pollfd p{ls, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(opt.timeout_s * 1000)) <= 0) die("no client connected within %.0f s", opt.timeout_s);
    c.fd = ::accept(ls, nullptr, nullptr);
    if (c.fd < 0) die("accept: %s", std::strerror(errno));
    ::close(ls);
  } else {
    if (opt.port <= 0) die("--role client needs --port of the server, got %d", opt.port);
    c.fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (::connect(c.fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0)
      die("connect %s:%d: %s", opt.host.c_str(), opt.port, std::strerror(errno));
  }
  setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return c;
}

// ---------------------------------------------------------------- libfabric

struct Handshake {
  uint32_t magic;
  uint32_t addr_len;
  uint8_t addr[256];
  uint64_t base;
  uint64_t key;
  uint64_t len;
  uint64_t plan_hash;
};
constexpr uint32_t kMagic = 0x4A475246;  // "JGRF"

struct Fabric {
  fi_info* info = nullptr;
  fid_fabric* fabric = nullptr;
  fid_domain* domain = nullptr;
  fid_av* av = nullptr;
  fid_cq* cq = nullptr;
  fid_ep* ep = nullptr;
  fid_mr* mr = nullptr;
  void* desc = nullptr;
  uint8_t* buf = nullptr;
  uint64_t len = 0;
  uint64_t key = 0;
  bool virt_addr = false;
  fi_addr_t peer = FI_ADDR_UNSPEC;
  uint64_t remote_base = 0, remote_key = 0, remote_len = 0;
  double timeout_s = 120.0;

  // Completion counters, reset per test.
  uint64_t remote_imms = 0;  // remote writes with CQ data that landed here
  uint64_t local_done = 0;   // our own writes completed
  uint64_t posted = 0;

  // FI_CONTEXT mode needs one fi_context per operation in flight, owned until its completion.
  std::vector<fi_context> ctx;
  size_t next_ctx = 0;

  uint64_t write_flags = FI_REMOTE_CQ_DATA | FI_COMPLETION;

  void open(const Options& opt, uint64_t nbytes) {
    timeout_s = opt.timeout_s;
    if (opt.delivery_complete) write_flags |= FI_DELIVERY_COMPLETE;
    fi_info* hints = fi_allocinfo();
    hints->caps = FI_MSG | FI_RMA;
    hints->mode = FI_CONTEXT;
    hints->ep_attr->type = FI_EP_RDM;
    hints->domain_attr->mr_mode =
        FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->domain_attr->cq_data_size = 4;
    hints->fabric_attr->prov_name = strdup(opt.provider.c_str());
    int rc = fi_getinfo(FI_VERSION(1, 17), opt.host.c_str(), nullptr, FI_SOURCE, hints, &info);
    fi_freeinfo(hints);
    if (rc != 0 || info == nullptr)
      die("fi_getinfo(provider=%s, node=%s, FI_EP_RDM, FI_RMA|FI_MSG, cq_data_size>=4) found nothing: %d (%s)",
          opt.provider.c_str(), opt.host.c_str(), rc, fi_strerror(-rc));
    if (info->mode & FI_RX_CQ_DATA)
      die("provider %s requires FI_RX_CQ_DATA (posted receives per remote write); this baseline does not "
          "implement that", info->fabric_attr->prov_name);
    const uint64_t mr_mode = info->domain_attr->mr_mode;
    if (mr_mode & FI_MR_RAW) die("provider %s uses raw MR keys (FI_MR_RAW); not supported here", info->fabric_attr->prov_name);
    virt_addr = (mr_mode & FI_MR_VIRT_ADDR) != 0;

    FI_CHECK(fi_fabric(info->fabric_attr, &fabric, nullptr));
    FI_CHECK(fi_domain(fabric, info, &domain, nullptr));
    fi_av_attr av_attr{};
    av_attr.type = info->domain_attr->av_type == FI_AV_UNSPEC ? FI_AV_TABLE : info->domain_attr->av_type;
    FI_CHECK(fi_av_open(domain, &av_attr, &av, nullptr));
    fi_cq_attr cq_attr{};
    cq_attr.format = FI_CQ_FORMAT_DATA;
    cq_attr.wait_obj = FI_WAIT_NONE;  // busy polling: the lowest-latency way to drive manual progress
    cq_attr.size = info->tx_attr->size + info->rx_attr->size;
    FI_CHECK(fi_cq_open(domain, &cq_attr, &cq, nullptr));
    FI_CHECK(fi_endpoint(domain, info, &ep, nullptr));
    FI_CHECK(fi_ep_bind(ep, &av->fid, 0));
    FI_CHECK(fi_ep_bind(ep, &cq->fid, FI_TRANSMIT | FI_RECV));
    FI_CHECK(fi_enable(ep));

    len = nbytes;
    // Page-aligned, pre-faulted memory so the timed loops never take a first-touch fault.
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) die("mmap of %" PRIu64 " bytes: %s", len, std::strerror(errno));
    buf = static_cast<uint8_t*>(p);

    const uint64_t requested_key = (mr_mode & FI_MR_PROV_KEY) ? 0 : 0x5EED;
    FI_CHECK(fi_mr_reg(domain, buf, len, FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE, 0,
                       requested_key, 0, &mr, nullptr));
    if (mr_mode & FI_MR_ENDPOINT) {
      FI_CHECK(fi_mr_bind(mr, &ep->fid, 0));
      FI_CHECK(fi_mr_enable(mr));
    }
    key = fi_mr_key(mr);
    if (key == FI_KEY_NOTAVAIL) die("fi_mr_key: key not available");
    desc = fi_mr_desc(mr);
    ctx.resize(info->tx_attr->size + 64);
  }

  Handshake local_handshake(uint64_t plan_hash) const {
    Handshake h{};
    h.magic = kMagic;
    size_t alen = sizeof h.addr;
    FI_CHECK(fi_getname(&ep->fid, h.addr, &alen));
    h.addr_len = static_cast<uint32_t>(alen);
    h.base = reinterpret_cast<uint64_t>(buf);
    h.key = key;
    h.len = len;
    h.plan_hash = plan_hash;
    return h;
  }

  void connect_peer(const Handshake& h) {
    int n = fi_av_insert(av, h.addr, 1, &peer, 0, nullptr);
    if (n != 1) die("fi_av_insert of the peer address returned %d", n);
    remote_base = h.base;
    remote_key = h.key;
    remote_len = h.len;
  }

  void reset_counts() { remote_imms = local_done = posted = 0; }

  // Reads every available completion; counts remote imms and local write completions.
  void progress() {
    fi_cq_data_entry e[64];
    ssize_t n = fi_cq_read(cq, e, 64);
    if (n == -FI_EAGAIN) return;
    if (n == -FI_EAVAIL) {
      fi_cq_err_entry err{};
      fi_cq_readerr(cq, &err, 0);
      die("completion error: %d (%s), provider: %s", err.err, fi_strerror(err.err),
          fi_cq_strerror(cq, err.prov_errno, err.err_data, nullptr, 0));
    }
    if (n < 0) die("fi_cq_read: %zd (%s)", n, fi_strerror(static_cast<int>(-n)));
    for (ssize_t i = 0; i < n; ++i) {
      if (e[i].flags & FI_REMOTE_CQ_DATA) ++remote_imms;
      else if (e[i].flags & (FI_WRITE | FI_RMA)) ++local_done;
    }
  }

  template <typename Pred>
  void poll_until(Pred done, const char* what) {
    int64_t deadline = now_ns() + static_cast<int64_t>(timeout_s * 1e9);
    uint32_t spins = 0;
    while (!done()) {
      progress();
      if ((++spins & 0xFFF) == 0 && now_ns() > deadline)
        die("timed out after %.0f s waiting for %s (remote imms %" PRIu64 ", local %" PRIu64 "/%" PRIu64 ")",
            timeout_s, what, remote_imms, local_done, posted);
    }
  }

  // One fi_writemsg with remote CQ data; len 0 is an imm-only write. Retries -FI_EAGAIN while
  // driving progress, which is what the provider asks for on a full queue.
  void write(uint64_t src_off, uint64_t dst_off, uint64_t n, uint32_t imm) {
    if (src_off + n > len || dst_off + n > remote_len)
      die("write out of range: src %" PRIu64 "+%" PRIu64 " of %" PRIu64 ", dst %" PRIu64 " of %" PRIu64,
          src_off, n, len, dst_off, remote_len);
    iovec iov{buf + src_off, n};
    void* d = desc;
    fi_rma_iov rma{(virt_addr ? remote_base : 0) + dst_off, n, remote_key};
    fi_msg_rma msg{};
    msg.msg_iov = &iov;
    msg.desc = &d;
    msg.iov_count = n ? 1 : 0;
    msg.addr = peer;
    msg.rma_iov = &rma;
    msg.rma_iov_count = 1;
    msg.context = &ctx[next_ctx];
    next_ctx = (next_ctx + 1) % ctx.size();
    msg.data = imm;
    int64_t deadline = now_ns() + static_cast<int64_t>(timeout_s * 1e9);
    while (true) {
      ssize_t rc = fi_writemsg(ep, &msg, write_flags);
      if (rc == 0) break;
      if (rc != -FI_EAGAIN) die("fi_writemsg(len=%" PRIu64 "): %zd (%s)", n, rc, fi_strerror(static_cast<int>(-rc)));
      progress();
      if (now_ns() > deadline) die("fi_writemsg kept returning -FI_EAGAIN for %.0f s", timeout_s);
    }
    ++posted;
  }

  // Posts a write once fewer than `window` of ours are in flight.
  void write_windowed(uint64_t src_off, uint64_t dst_off, uint64_t n, uint32_t imm, uint64_t window) {
    uint64_t limit = std::min<uint64_t>(window, ctx.size() - 1);
    if (posted - local_done >= limit) poll_until([&] { return posted - local_done < limit; }, "a free window slot");
    write(src_off, dst_off, n, imm);
  }

  void close() {
    if (mr) fi_close(&mr->fid);
    if (ep) fi_close(&ep->fid);
    if (cq) fi_close(&cq->fid);
    if (av) fi_close(&av->fid);
    if (domain) fi_close(&domain->fid);
    if (fabric) fi_close(&fabric->fid);
    if (info) fi_freeinfo(info);
    if (buf) munmap(buf, len);
  }
};

constexpr uint32_t kImmData = 1;
constexpr uint32_t kImmAck = 2;

// Page slots for a paged test: PAGES distinct slots out of 2*PAGES, per side, from a seeded PRNG
// (both processes derive the same lists, so the target can check where each page landed).
void page_slots(uint64_t pages, uint64_t seed, std::vector<uint64_t>& src, std::vector<uint64_t>& dst) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> pool(2 * pages);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  src.assign(pool.begin(), pool.begin() + pages);
  std::shuffle(pool.begin(), pool.end(), rng);
  dst.assign(pool.begin(), pool.begin() + pages);
}

void fill_pattern(uint8_t* buf, uint64_t len) {
  uint64_t words = len / 8;
  auto* w = reinterpret_cast<uint64_t*>(buf);
  for (uint64_t i = 0; i < words; ++i) w[i] = mix(i);
  for (uint64_t p = words * 8; p < len; ++p) buf[p] = pattern_byte(p);
}

// Checks dst[dst_off, dst_off+n) against the pattern at src_off, at sampled positions.
void check_bytes(const uint8_t* buf, uint64_t dst_off, uint64_t src_off, uint64_t n, const char* what) {
  if (n == 0) return;
  auto check = [&](uint64_t i) {
    uint8_t want = pattern_byte(src_off + i), got = buf[dst_off + i];
    if (got != want)
      die("%s: data mismatch at byte %" PRIu64 " of %" PRIu64 " (dst offset %" PRIu64 "): got 0x%02x, expected 0x%02x",
          what, i, n, dst_off + i, got, want);
  };
  for (uint64_t i = 0; i < n; i += 4093) check(i);
  check(n - 1);
}

std::string json_samples(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ",";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

void run_client(Fabric& f, Control& c, const std::vector<Test>& tests, uint64_t seed) {
  fill_pattern(f.buf, f.len);
  for (size_t ti = 0; ti < tests.size(); ++ti) {
    const Test& t = tests[ti];
    c.barrier();
    f.reset_counts();
    if (t.kind == Test::kLat) {
      std::vector<int64_t> samples;
      samples.reserve(t.count);
      for (uint64_t i = 0; i < t.warmup + t.count; ++i) {
        uint64_t acks = f.remote_imms;
        int64_t t0 = now_ns();
        f.write(0, 0, t.size, kImmData);
        f.poll_until([&] { return f.remote_imms > acks && f.local_done == f.posted; }, "the target's answer");
        int64_t t1 = now_ns();
        if (i >= t.warmup) samples.push_back(t1 - t0);
      }
      std::printf("{\"kind\":\"lat\",\"size\":%" PRIu64 ",\"iters\":%" PRIu64 ",\"rtt_ns\":%s}\n", t.size, t.count,
                  json_samples(samples).c_str());
    } else if (t.kind == Test::kBw) {
      int64_t t0 = now_ns();
      for (uint64_t i = 0; i < t.count; ++i) f.write_windowed(0, 0, t.size, kImmData, t.window);
      f.poll_until([&] { return f.remote_imms >= 1 && f.local_done == f.posted; }, "the target's answer");
      int64_t t1 = now_ns();
      std::printf("{\"kind\":\"bw\",\"size\":%" PRIu64 ",\"count\":%" PRIu64 ",\"window\":%" PRIu64
                  ",\"elapsed_ns\":%" PRId64 "}\n", t.size, t.count, t.window, t1 - t0);
    } else {
      std::vector<uint64_t> src, dst;
      page_slots(t.count, seed + ti, src, dst);
      std::vector<int64_t> samples;
      for (uint64_t it = 0; it < t.iters + 1; ++it) {  // op 0 is warmup (connection, verification)
        uint64_t acks = f.remote_imms;
        int64_t t0 = now_ns();
        for (uint64_t p = 0; p < t.count; ++p)
          f.write_windowed(src[p] * t.size, dst[p] * t.size, t.size, kImmData, t.window);
        f.poll_until([&] { return f.remote_imms > acks && f.local_done == f.posted; }, "the target's answer");
        int64_t t1 = now_ns();
        if (it > 0) samples.push_back(t1 - t0);
        if (it == 0) c.barrier();  // let the target verify the pages before they are rewritten
      }
      std::printf("{\"kind\":\"paged\",\"page\":%" PRIu64 ",\"pages\":%" PRIu64 ",\"iters\":%" PRIu64
                  ",\"window\":%" PRIu64 ",\"op_ns\":%s}\n", t.size, t.count, t.iters, t.window,
                  json_samples(samples).c_str());
    }
    std::fflush(stdout);
  }
  c.barrier();
}

void run_server(Fabric& f, Control& c, const std::vector<Test>& tests, uint64_t seed) {
  for (size_t ti = 0; ti < tests.size(); ++ti) {
    const Test& t = tests[ti];
    std::vector<uint64_t> src, dst;
    if (t.kind == Test::kPaged) {
      page_slots(t.count, seed + ti, src, dst);
      std::memset(f.buf, 0, std::min(f.len, 2 * t.count * t.size));
    } else {
      std::memset(f.buf, 0, t.size);
    }
    c.barrier();
    f.reset_counts();
    if (t.kind == Test::kLat) {
      for (uint64_t i = 0; i < t.warmup + t.count; ++i) {
        f.poll_until([&] { return f.remote_imms > i; }, "a data write");
        f.write(0, 0, 0, kImmAck);
        if (i == 0) check_bytes(f.buf, 0, 0, t.size, "lat");
      }
    } else if (t.kind == Test::kBw) {
      f.poll_until([&] { return f.remote_imms >= t.count; }, "all data writes");
      f.write(0, 0, 0, kImmAck);
    } else {
      for (uint64_t it = 0; it < t.iters + 1; ++it) {
        f.poll_until([&] { return f.remote_imms >= (it + 1) * t.count; }, "all page writes");
        f.write(0, 0, 0, kImmAck);
        if (it == 0) {
          for (uint64_t p = 0; p < t.count; ++p) {
            check_bytes(f.buf, dst[p] * t.size, src[p] * t.size, 1, "paged first byte");
            check_bytes(f.buf, dst[p] * t.size + t.size - 1, src[p] * t.size + t.size - 1, 1, "paged last byte");
          }
          f.poll_until([&] { return f.local_done == f.posted; }, "the answer's completion");
          c.barrier();
        }
      }
    }
    f.poll_until([&] { return f.local_done == f.posted; }, "the answers' completions");
  }
  c.barrier();
}

void usage() {
  std::fprintf(stderr,
               "usage: raw_fabric_bench --role server|client --plan PLAN [--port N] [--host 127.0.0.1] "
               "[--provider tcp] [--seed N] [--timeout SECONDS] [--delivery-complete]\n");
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die("%s needs a value", a.c_str());
      return argv[++i];
    };
    if (a == "--role") opt.role = value();
    else if (a == "--host") opt.host = value();
    else if (a == "--port") opt.port = static_cast<int>(parse_u64(value(), "--port"));
    else if (a == "--provider") opt.provider = value();
    else if (a == "--plan") opt.plan = value();
    else if (a == "--seed") opt.seed = parse_u64(value(), "--seed");
    else if (a == "--timeout") opt.timeout_s = std::atof(value().c_str());
    else if (a == "--delivery-complete") opt.delivery_complete = true;
    else if (a == "-h" || a == "--help") { usage(); return 0; }
    else { usage(); die("unknown argument '%s'", a.c_str()); }
  }
  if (opt.role != "server" && opt.role != "client") { usage(); die("--role must be server or client, got '%s'", opt.role.c_str()); }
  if (!(opt.timeout_s > 0)) die("--timeout must be > 0 seconds");
  std::vector<Test> tests = parse_plan(opt.plan);
  const uint64_t plan_hash = std::hash<std::string>{}(opt.plan) ^ opt.seed;

  Control ctl = connect_control(opt);
  Fabric f;
  f.open(opt, buffer_bytes(tests));
  Handshake mine = f.local_handshake(plan_hash), theirs{};
  ctl.send_all(&mine, sizeof mine);
  ctl.recv_all(&theirs, sizeof theirs);
  if (theirs.magic != kMagic) die("handshake: bad magic 0x%08x", theirs.magic);
  if (theirs.plan_hash != plan_hash) die("handshake: the peer runs a different --plan/--seed");
  if (theirs.addr_len == 0 || theirs.addr_len > sizeof theirs.addr) die("handshake: address length %u", theirs.addr_len);
  f.connect_peer(theirs);
  if (opt.role == "client") {
    const uint32_t v = fi_version();
    std::printf("{\"event\":\"fabric\",\"libfabric\":\"%u.%u\",\"provider\":\"%s\",\"mr_mode\":%" PRIu64
                ",\"virt_addr\":%s,\"buffer\":%" PRIu64 "}\n",
                FI_MAJOR(v), FI_MINOR(v), f.info->fabric_attr->prov_name,
                static_cast<uint64_t>(f.info->domain_attr->mr_mode), f.virt_addr ? "true" : "false", f.len);
    std::fflush(stdout);
    run_client(f, ctl, tests, opt.seed);
  } else {
    run_server(f, ctl, tests, opt.seed);
  }
  f.close();
  ::close(ctl.fd);
  return 0;
}
