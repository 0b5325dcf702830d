#include "moe/layout.h"

#include "common/error.h"

namespace jax_garden::moe {

void validate_shape(const MoeShape& s) {
  JG_CHECK_ARG(s.num_ranks >= 1, "MoE: num_ranks must be >= 1, got ", s.num_ranks);
  JG_CHECK_ARG(s.num_experts >= 1, "MoE: num_experts must be >= 1, got ", s.num_experts);
  JG_CHECK_ARG(s.num_experts % s.num_ranks == 0, "MoE: num_experts=", s.num_experts,
               " is not divisible by the number of ranks R=", s.num_ranks);
  JG_CHECK_ARG(s.experts_per_token >= 1, "MoE: experts_per_token must be >= 1, got ",
               s.experts_per_token);
  JG_CHECK_ARG(s.experts_per_token <= s.num_experts, "MoE: experts_per_token=",
               s.experts_per_token, " exceeds num_experts=", s.num_experts);
  JG_CHECK_ARG(s.hidden >= 1, "MoE: hidden must be >= 1, got ", s.hidden);
  JG_CHECK_ARG(s.max_tokens >= 1, "MoE: max_tokens must be >= 1, got ", s.max_tokens);
  JG_CHECK_ARG(s.expert_padding >= 1, "MoE: expert_padding must be >= 1, got ", s.expert_padding);
  JG_CHECK_ARG(s.max_recv_tokens >= 1, "MoE: max_recv_tokens must be >= 1, got ",
               s.max_recv_tokens);
  JG_CHECK_ARG(s.max_recv_tokens % s.expert_padding == 0, "MoE: max_recv_tokens=",
               s.max_recv_tokens, " is not a multiple of expert_padding=", s.expert_padding);
  // Row ids are stored as int32 (and CUDA kernels index with int32).
  JG_CHECK_ARG(s.max_recv_tokens <= INT32_MAX, "MoE: max_recv_tokens=", s.max_recv_tokens,
               " exceeds 2^31-1");
  JG_CHECK_ARG(int64_t{s.num_ranks} * s.max_tokens * s.experts_per_token <= INT32_MAX,
               "MoE: R*max_tokens*K=", int64_t{s.num_ranks} * s.max_tokens * s.experts_per_token,
               " exceeds 2^31-1");
  JG_CHECK_ARG(s.scale_cols >= 0, "MoE: scale_cols must be >= 0, got ", s.scale_cols);
  JG_CHECK_ARG(s.scale_cols == 0 || s.hidden % s.scale_cols == 0, "MoE: hidden=", s.hidden,
               " is not divisible by scale_cols=", s.scale_cols);
}

void validate_dispatch_dtype(const MoeShape& s, DType dispatch_dtype) {
  JG_CHECK_ARG(dispatch_dtype == DType::kBF16 || dispatch_dtype == DType::kF8E4M3FN,
               "MoE: dispatch dtype must be bfloat16 or float8_e4m3fn, got ", dtype_name(dispatch_dtype));
  JG_CHECK_ARG(dispatch_dtype != DType::kF8E4M3FN || s.scale_cols > 0,
               "MoE: float8_e4m3fn dispatch needs scale_cols > 0 (hidden / scale_block)");
  JG_CHECK_ARG(dispatch_dtype != DType::kBF16 || s.scale_cols == 0,
               "MoE: bfloat16 dispatch carries no scales, got scale_cols=", s.scale_cols);
}

std::string describe(const MoeShape& s) {
  return str_cat("R=", s.num_ranks, " E=", s.num_experts, " K=", s.experts_per_token,
                 " H=", s.hidden, " T=", s.max_tokens, " M=", s.max_recv_tokens,
                 " pad=", s.expert_padding, " S=", s.scale_cols);
}

}  // namespace jax_garden::moe
