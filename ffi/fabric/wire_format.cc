#include "fabric/wire_format.h"

#include <cstring>
#include <sstream>

#include "common/error.h"

namespace jax_garden::fabric {
namespace {

constexpr uint32_t kAddressMagic = 0x414e474a;     // "JGNA"
constexpr uint32_t kDescriptorMagic = 0x444d474a;  // "JGMD"

class Writer {
 public:
  template <typename T>
  void put(T v) {
    uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));  // little-endian hosts only (x86-64, aarch64)
    out.insert(out.end(), b, b + sizeof(T));
  }
  void put_bytes(const Bytes& b) {
    put<uint16_t>(static_cast<uint16_t>(b.size()));
    out.insert(out.end(), b.begin(), b.end());
  }
  void put_string(const std::string& s) { put_bytes(Bytes(s.begin(), s.end())); }
  Bytes finish() {
    put<uint32_t>(checksum32(out.data(), out.size()));
    return std::move(out);
  }
  Bytes out;
};

class Reader {
 public:
  Reader(const uint8_t* d, size_t n, const char* what) : data(d), size(n), what(what) {}
  template <typename T>
  T get(const char* field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, data + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  Bytes get_bytes(const char* field, size_t max_len) {
    uint16_t n = get<uint16_t>(field);
    JG_CHECK_ARG(n <= max_len, what, ": field '", field, "' claims ", n, " bytes (at most ", max_len, " allowed)");
    need(n, field);
    Bytes b(data + pos, data + pos + n);
    pos += n;
    return b;
  }
  void need(size_t n, const char* field) {
    JG_CHECK_ARG(pos + n <= size, what, " is truncated: field '", field, "' needs ", n, " bytes at offset ", pos,
                 " but only ", size - pos, " remain (", size, " bytes given)");
  }
  void verify_checksum() {
    JG_CHECK_ARG(size >= 4, what, " is truncated: ", size, " bytes");
    uint32_t stored;
    std::memcpy(&stored, data + size - 4, 4);
    uint32_t actual = checksum32(data, size - 4);
    JG_CHECK_ARG(stored == actual, what, " is corrupt: checksum 0x", std::hex, actual, " != stored 0x", stored);
    size -= 4;  // the rest of parsing must not reach into the checksum
  }
  void expect_end() {
    JG_CHECK_ARG(pos == size, what, " has ", size - pos, " unexpected trailing bytes");
  }
  void expect_header(uint32_t magic) {
    JG_CHECK_ARG(size >= 10, what, " is truncated: ", size, " bytes is shorter than any valid one");
    uint32_t m = get<uint32_t>("magic");
    JG_CHECK_ARG(m == magic, what, " has the wrong magic 0x", std::hex, m, " (expected 0x", magic,
                 "): not a jax_garden ", what);
    verify_checksum();
    uint16_t version = get<uint16_t>("version");
    JG_CHECK_ARG(version == kWireFormatVersion, what, " has format version ", version,
                 " but this build reads version ", kWireFormatVersion);
  }

  const uint8_t* data;
  size_t size;
  size_t pos = 0;
  const char* what;
};

}  // namespace

uint32_t checksum32(const uint8_t* data, size_t size) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 16777619u;
  return h;
}

Bytes NetAddress::to_bytes() const {
  Writer w;
  w.put<uint32_t>(kAddressMagic);
  w.put<uint16_t>(kWireFormatVersion);
  w.put_string(provider);
  w.put<uint8_t>(static_cast<uint8_t>(domains.size()));
  for (const auto& d : domains) w.put_bytes(d);
  return w.finish();
}

NetAddress NetAddress::from_bytes(const uint8_t* data, size_t size) {
  Reader r(data, size, "NetAddress");
  r.expect_header(kAddressMagic);
  NetAddress a;
  Bytes p = r.get_bytes("provider", 64);
  a.provider.assign(p.begin(), p.end());
  JG_CHECK_ARG(!a.provider.empty(), "NetAddress has an empty provider name");
  uint8_t n = r.get<uint8_t>("domain count");
  JG_CHECK_ARG(n >= 1 && n <= kMaxDomains, "NetAddress claims ", int(n), " domains (1..", kMaxDomains, " allowed)");
  for (uint8_t i = 0; i < n; ++i) {
    a.domains.push_back(r.get_bytes("endpoint name", kMaxEndpointNameBytes));
    JG_CHECK_ARG(!a.domains.back().empty(), "NetAddress domain ", int(i), " has an empty endpoint name");
  }
  r.expect_end();
  return a;
}

std::string NetAddress::to_string() const {
  std::ostringstream os;
  os << provider << "[";
  for (size_t i = 0; i < domains.size(); ++i) {
    if (i) os << ",";
    uint32_t h = checksum32(domains[i].data(), domains[i].size());
    os << std::hex << (h & 0xffff);
  }
  os << "]";
  return os.str();
}

Bytes MemoryDescriptor::to_bytes() const {
  Writer w;
  w.put<uint32_t>(kDescriptorMagic);
  w.put<uint16_t>(kWireFormatVersion);
  w.put_string(provider);
  w.put<uint64_t>(base);
  w.put<uint64_t>(length);
  w.put<uint8_t>(virtual_addressing ? 1 : 0);
  w.put<uint8_t>(static_cast<uint8_t>(kind));
  w.put<int32_t>(device);
  w.put<uint8_t>(static_cast<uint8_t>(domains.size()));
  for (const auto& d : domains) {
    w.put_bytes(d.endpoint);
    w.put<uint64_t>(d.key);
  }
  return w.finish();
}

MemoryDescriptor MemoryDescriptor::from_bytes(const uint8_t* data, size_t size) {
  Reader r(data, size, "MemoryDescriptor");
  r.expect_header(kDescriptorMagic);
  MemoryDescriptor d;
  Bytes p = r.get_bytes("provider", 64);
  d.provider.assign(p.begin(), p.end());
  JG_CHECK_ARG(!d.provider.empty(), "MemoryDescriptor has an empty provider name");
  d.base = r.get<uint64_t>("base");
  d.length = r.get<uint64_t>("length");
  JG_CHECK_ARG(d.base + d.length >= d.base, "MemoryDescriptor region [0x", std::hex, d.base, ", +0x", d.length,
               ") wraps around the address space");
  uint8_t va = r.get<uint8_t>("addressing");
  JG_CHECK_ARG(va <= 1, "MemoryDescriptor addressing flag is ", int(va), " (0 or 1 expected)");
  d.virtual_addressing = va == 1;
  uint8_t kind = r.get<uint8_t>("memory kind");
  JG_CHECK_ARG(kind <= 1, "MemoryDescriptor memory kind is ", int(kind), " (0 = host, 1 = cuda expected)");
  d.kind = static_cast<MemoryKind>(kind);
  d.device = r.get<int32_t>("device");
  JG_CHECK_ARG(d.kind == MemoryKind::kHost ? d.device == -1 : d.device >= 0, "MemoryDescriptor device ", d.device,
               " does not fit memory kind ", int(kind));
  uint8_t n = r.get<uint8_t>("domain count");
  JG_CHECK_ARG(n >= 1 && n <= kMaxDomains, "MemoryDescriptor claims ", int(n), " domains (1..", kMaxDomains,
               " allowed)");
  for (uint8_t i = 0; i < n; ++i) {
    DomainKey k;
    k.endpoint = r.get_bytes("endpoint name", kMaxEndpointNameBytes);
    JG_CHECK_ARG(!k.endpoint.empty(), "MemoryDescriptor domain ", int(i), " has an empty endpoint name");
    k.key = r.get<uint64_t>("key");
    d.domains.push_back(std::move(k));
  }
  r.expect_end();
  return d;
}

NetAddress MemoryDescriptor::owner() const {
  NetAddress a;
  a.provider = provider;
  for (const auto& d : domains) a.domains.push_back(d.endpoint);
  return a;
}

}  // namespace jax_garden::fabric
