#include "moe/host_math.h"

#include "common/error.h"

namespace jax_garden::moe {

std::string dims_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

std::string check_array(const char* what, const ArrayRef& a, DType dtype, const std::vector<int64_t>& dims) {
  if (a.dtype != dtype) return str_cat(what, " has dtype ", dtype_name(a.dtype), ", expected ", dtype_name(dtype));
  if (a.dims != dims) return str_cat(what, " has shape ", dims_str(a.dims), ", expected ", dims_str(dims));
  return "";
}

// The module is built for size (-Os); these loops are the host paths' hot spots, so they ask for
// vectorisation. Lane-wise SIMD multiplies and adds round exactly as the scalar ones do.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("O3", "fp-contract=off")))
#endif
void accumulate_row(float* __restrict acc, const uint16_t* __restrict v, float w, int64_t n) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float p = w * bf16_to_f32(v[i]);
    acc[i] = acc[i] + p;
  }
}

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("O3")))
#endif
void round_row_to_bf16(const float* acc, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = f32_to_bf16(acc[i]);
}

}  // namespace jax_garden::moe
