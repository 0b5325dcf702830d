#include "moe/internode_post.h"

namespace jax_garden::moe::internode {

std::shared_ptr<fabric::TransferState> post_message(fabric::Engine& engine,
                                                    const std::shared_ptr<fabric::MemoryRegion>& src,
                                                    const fabric::MemoryDescriptor& dst, int64_t src_offset,
                                                    int64_t dst_offset, int64_t bytes, uint32_t imm) {
  fabric::ScatterRequest req;
  req.src = src;
  req.targets.push_back({&dst, static_cast<uint64_t>(bytes), static_cast<uint64_t>(src_offset),
                         static_cast<uint64_t>(dst_offset)});
  req.sharding = fabric::ScatterSharding::kBytes;
  req.imm = imm;
  return engine.scatter(req);
}

std::shared_ptr<fabric::TransferState> post_signal(fabric::Engine& engine, const fabric::MemoryDescriptor& dst,
                                                   uint32_t imm) {
  fabric::ImmRequest req;
  req.kind = fabric::OpKind::kImm;
  req.peers = {&dst};
  req.imm = imm;
  return engine.write_imm(req);
}

}  // namespace jax_garden::moe::internode
