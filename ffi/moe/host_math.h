// Row math shared by the host MoE implementations (cpu_all_to_all.cc, the internode_*.cc phases):
// operand checks, bf16 <-> f32, and the one combine accumulation, so that every host path gives the
// same bits as the NumPy reference (tests/moe_reference.py).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "moe/host_all_to_all.h"

namespace jax_garden::moe {

std::string dims_str(const std::vector<int64_t>& dims);

// "" when `a` has the expected dtype and dims, else a message naming operand and wrong value.
std::string check_array(const char* what, const ArrayRef& a, DType dtype, const std::vector<int64_t>& dims);

inline float bf16_to_f32(uint16_t v) {
  const uint32_t bits = uint32_t{v} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as ml_dtypes / XLA convert f32 -> bf16; NaN stays a quiet NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// acc[i] = acc[i] + w * v[i] with a separately rounded product and sum (no FMA contraction,
// whatever -march the build uses): combine's k-order f32 accumulation of one row.
void accumulate_row(float* acc, const uint16_t* v, float w, int64_t n);

// out[i] = bf16(acc[i]) for n channels.
void round_row_to_bf16(const float* acc, uint16_t* out, int64_t n);

}  // namespace jax_garden::moe
