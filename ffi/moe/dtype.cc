#include "moe/dtype.h"

#include "common/error.h"

namespace jax_garden::moe {

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kBF16: return "bfloat16";
    case DType::kF8E4M3FN: return "float8_e4m3fn";
    case DType::kF32: return "float32";
    case DType::kS32: return "int32";
    case DType::kU32: return "uint32";
    default: return "other";
  }
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::kBF16: return 2;
    case DType::kF8E4M3FN: return 1;
    case DType::kF32: case DType::kS32: case DType::kU32: return 4;
    default: return 0;
  }
}

DType parse_dtype(const std::string& name) {
  for (DType t : {DType::kBF16, DType::kF8E4M3FN, DType::kF32, DType::kS32, DType::kU32}) {
    if (name == dtype_name(t)) return t;
  }
  throw InvalidArgument(str_cat("MoE: unsupported dtype '", name, "'"));
}

}  // namespace jax_garden::moe
