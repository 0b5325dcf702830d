#include "moe/proxy_protocol.h"

namespace jax_garden::moe::proxy {

const char* proxy_kernel_name(int kernel) {
  static const char* const names[] = {"dispatch_send plan", "dispatch_send pack", "dispatch_recv wait",
                                      "dispatch_recv route", "dispatch_recv copy", "combine_send plan",
                                      "combine_send pack", "combine_recv wait", "combine_recv route",
                                      "combine_recv sum"};
  return kernel >= 0 && kernel < kProxyKernels ? names[kernel] : "?";
}

ControlLayout control_layout(int32_t num_ranks) {
  ControlLayout l;
  const int64_t R = num_ranks;
  static_assert(kProxyKernels * 2 * 4 <= 128, "progress words must fit before the ready records");
  l.arrived = round_up(l.ready + int64_t{kKinds} * R * int64_t{sizeof(ReadyRecord)}, 64);
  l.bytes = round_up(l.arrived + int64_t{kKinds} * R * 4, 4096);
  return l;
}

AreaLayout area_layout(const MoeShape& shape, DType dispatch_dtype) {
  AreaLayout a;
  a.regions = internode::region_layout(shape, dispatch_dtype);
  a.sync = round_up(a.regions.recv_bytes, 256);
  a.sync_stride = round_up(int64_t{shape.num_ranks} * 4, 128);
  a.recv_alloc = round_up(a.sync + 4 * a.sync_stride, 4096);
  a.send_alloc = round_up(a.regions.send_bytes, 4096);
  return a;
}

LocalLayout local_layout(const MoeShape& s) {
  const int64_t R = s.num_ranks, T = s.max_tokens, K = s.experts_per_token, L = s.local_experts(),
                M = s.max_recv_tokens, TK = T * K;
  LocalLayout l;
  int64_t at = 0;
  auto take = [&](int64_t bytes) {
    const int64_t here = at;
    at = round_up(at + bytes, 256);
    return here;
  };
  l.state = take(kStateWords * 4);
  l.err_dev = take(4);
  l.timing = take(4 * int64_t{kTimingRing} * 2 * 8);
  l.sent_idx = take(TK * 4);
  l.routed_idx = take(TK * 4);
  l.tok_count = take(R * 4);
  l.tok_list = take(R * T * 4);
  l.sent_entries = take(R * 4);
  l.sent_offset = take(R * 8);
  l.routed_entries = take(R * 4);
  l.routed_offset = take(R * 8);
  l.msg_tokens = take(R * 4);
  l.combine_offset_at = take(R * 8);
  l.combine_rows_at = take(R * 4);
  l.counts = take(R * L * 4);
  l.kept_from = take(R * L * 4);
  l.kept = take(L * 4);
  l.row_of_entry = take(R * TK * 4);
  l.row_src = take(M * 4);
  l.pack_list = take(R * TK * 4);
  l.pack_rows = take(R * 4);
  l.kept_by = take(R * L * 4);
  l.rowpos = take(TK * 4);
  l.keptflag = take(TK);
  l.bytes = at;
  return l;
}

}  // namespace jax_garden::moe::proxy
