#include "moe/nvlink_protocol.h"

#include "common/error.h"

namespace jax_garden::moe {

bool is_timeout_error(int32_t code) {
  return code == kErrTimeoutDispatchData || code == kErrTimeoutDispatchFree ||
         code == kErrTimeoutCombineData || code == kErrTimeoutCombineFree || code == kErrPeerTimedOut;
}

std::string device_error_message(int32_t code, int32_t a, int32_t b, int32_t rank, int32_t c) {
  const char* sync_hint =
      " (every rank must call dispatch_send, dispatch_recv, combine_send, combine_recv the same number of "
      "times and in this order; a peer that died or was never started also ends here)";
  switch (code) {
    case kErrTimeoutDispatchData:
      return str_cat("moe (CUDA): rank ", rank, " timed out waiting for dispatch data from rank ", a,
                     " (generation ", b, ")", sync_hint);
    case kErrTimeoutDispatchFree:
      return str_cat("moe (CUDA): rank ", rank, " timed out waiting for rank ", a,
                     " to consume the previous dispatch (generation ", b, ")", sync_hint);
    case kErrTimeoutCombineData:
      return str_cat("moe (CUDA): rank ", rank, " timed out waiting for combine data from rank ", a,
                     " (generation ", b, ")", sync_hint);
    case kErrTimeoutCombineFree:
      return str_cat("moe (CUDA): rank ", rank, " timed out waiting for rank ", a,
                     " to consume the previous combine (generation ", b, ")", sync_hint);
    case kErrRankMismatch:
      return str_cat("moe (CUDA): the rank operand is ", a, " but this device holds rank ", b,
                     " of the context: the mesh order differs from the one the context was created with");
    case kErrCountsMismatch:
      return str_cat("moe (CUDA): combine_send on rank ", rank, ": expert_counts[", a, "] = ", b,
                     " but the last dispatch received ", c,
                     " rows for that expert; pass the expert_counts dispatch returned");
    case kErrPhaseOrder: {
      static const char* const what[] = {
          "dispatch_send called again before dispatch_recv (one dispatch in flight per AllToAll; "
          "use one AllToAll per micro-batch)",
          "dispatch_recv without a pending dispatch_send (or with a send_done token of another call)",
          "combine_send called again before combine_recv (one combine in flight per AllToAll)",
          "combine_recv without a pending combine_send (or with a send_done token of another call)",
          "combine_send before any dispatch"};
      return str_cat("moe (CUDA): rank ", rank, ": ", (a >= 0 && a <= 4) ? what[a] : "phase order broken",
                     " (calls so far: ", b, " and ", c, ")");
    }
    case kErrRoutingMismatch:
      if (a < 0) {
        return str_cat("moe (CUDA): combine_recv on rank ", rank, ": bound_m = ", b,
                       " but the matching dispatch used bound_m = ", c);
      }
      return str_cat("moe (CUDA): combine_recv on rank ", rank, ": indices entry ", a,
                     " (flat t*K+k) = ", b, " but the matching dispatch routed it to expert ", c,
                     "; combine needs the indices given to dispatch");
    case kErrMalformedMessage: {
      static const char* const field[] = {"magic",          "generation",   "source",     "token count",
                                          "combine rows",   "combine offset", "bound_m",  "token ids",
                                          "row count",      "kept rows",    "dispatch generation"};
      return str_cat("moe (CUDA): rank ", rank, " received a malformed message from rank ", a, ": its ",
                     (b >= 0 && b <= kFieldDispatchGeneration) ? field[b] : "header", " is ", c,
                     " (every rank must run the same AllToAll, and the same sequence of calls)");
    }
    case kErrPeerFailed:
      return str_cat("moe (CUDA): rank ", a, " (another node) failed; rank ", rank, " stopped waiting for it");
    case kErrPeerTimedOut:
      return str_cat("moe (CUDA): rank ", a, " (another node) timed out; rank ", rank, " stopped waiting for it");
    case kErrTransferFailed:
      return str_cat("moe (CUDA): rank ", rank, ": the TransferEngine could not write to rank ", a);
    case kErrProxyProtocol:
      return str_cat("moe (CUDA): rank ", rank, ": the host proxy saw a ", b, " record for rank ", a,
                     " out of sequence (generation ", c, ")");
    default:
      return str_cat("moe (CUDA): rank ", rank, " error code ", code, " (", a, ", ", b, ", ", c, ")");
  }
}

}  // namespace jax_garden::moe
