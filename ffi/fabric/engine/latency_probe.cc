#include "fabric/engine/latency_probe.h"

#include "common/error.h"

namespace jax_garden::fabric {

std::vector<int64_t> ping_pong(Engine& engine, const std::shared_ptr<MemoryRegion>& region,
                               const MemoryDescriptor& peer, uint64_t bytes, uint32_t imm_data, uint32_t imm_ack,
                               int warmup, int iters, bool initiator, double timeout_s) {
  JG_CHECK_ARG(warmup >= 0 && iters > 0, "ping_pong: warmup must be >= 0 and iters > 0, got ", warmup, ", ", iters);
  auto data = engine.imm_counter(imm_data);
  auto ack = engine.imm_counter(imm_ack);
  const int64_t need = static_cast<int64_t>(
      bytes ? imm_writes(OpKind::kWrite, engine.num_domains(), bytes, 0, ScatterSharding::kTargets,
                         engine.options().sharding)
            : 1);
  WriteRequest write;
  write.src = region;
  write.dst = &peer;
  write.length = bytes;
  write.imm = imm_data;
  ImmRequest ping{OpKind::kImm, {&peer}, imm_data};
  ImmRequest pong{OpKind::kImm, {&peer}, imm_ack};
  std::vector<int64_t> samples;
  std::vector<std::shared_ptr<TransferState>> sent;
  sent.reserve(warmup + iters);
  for (int i = 0; i < warmup + iters; ++i) {
    if (initiator) {
      auto t0 = Clock::now();
      auto t = bytes ? engine.write(write) : engine.write_imm(ping);
      ack->wait(1, timeout_s);
      t->wait(timeout_s);
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
      if (i >= warmup) samples.push_back(ns);
    } else {
      // The responder's data arrives with the sender's domain count; the benchmark runs both sides
      // with the same count, so our own is the sender's.
      data->wait(need, timeout_s);
      sent.push_back(engine.write_imm(pong));
    }
  }
  for (auto& t : sent) t->wait(timeout_s);
  return samples;
}

}  // namespace jax_garden::fabric
