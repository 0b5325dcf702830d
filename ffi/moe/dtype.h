// Element types of the MoE operands, shared by the CPU reference, the CUDA context and the
// bindings (which receive numpy dtype names from Python).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace jax_garden::moe {

enum class DType : int32_t { kBF16, kF8E4M3FN, kF32, kS32, kU32, kOther };

const char* dtype_name(DType t);  // numpy names: "bfloat16", "float8_e4m3fn", ...
size_t dtype_size(DType t);       // bytes per element (0 for kOther)
DType parse_dtype(const std::string& name);  // throws InvalidArgument for other names

}  // namespace jax_garden::moe
