// Little-endian byte writer/reader with strict bounds checks, the lowest layer of the byte formats:
// the wire formats (wire_format.h) and the engine's internal control messages (control.h) are
// written with it, and it knows neither. A short or malformed buffer is an InvalidArgument naming
// the field, never an out-of-bounds read.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/error.h"

namespace jax_garden::fabric {

using Bytes = std::vector<uint8_t>;

// FNV-1a: the trailer of every format written here (and a cheap hash of endpoint names).
inline uint32_t checksum32(const uint8_t* data, size_t size) {
  uint32_t h = 2166136261u;
  for (size_t i = 0; i < size; ++i) h = (h ^ data[i]) * 16777619u;
  return h;
}

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
  void get_raw(void* dst, size_t n, const char* field) {
    need(n, field);
    std::memcpy(dst, data + pos, n);
    pos += n;
  }
  size_t remaining() const { return size - pos; }
  void need(size_t n, const char* field) {
    JG_CHECK_ARG(n <= size - pos, what, " is truncated: field '", field, "' needs ", n, " bytes at offset ", pos,
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
  // magic, checksum (verified over the whole buffer) and format version, in that order.
  void expect_header(uint32_t magic, uint16_t expected_version) {
    JG_CHECK_ARG(size >= 10, what, " is truncated: ", size, " bytes is shorter than any valid one");
    uint32_t m = get<uint32_t>("magic");
    JG_CHECK_ARG(m == magic, what, " has the wrong magic 0x", std::hex, m, " (expected 0x", magic,
                 "): not a jax_garden ", what);
    verify_checksum();
    uint16_t version = get<uint16_t>("version");
    JG_CHECK_ARG(version == expected_version, what, " has format version ", version,
                 " but this build reads version ", expected_version);
  }

  const uint8_t* data;
  size_t size;
  size_t pos = 0;
  const char* what;
};

}  // namespace jax_garden::fabric
