// The CUDA IPC path (same host, both regions GPU memory; or host memory of one process, which the
// CPU tests use): the peer's allocation is imported once (cudaIpcOpenMemHandle, cached per
// process), single writes are cudaMemcpyAsync on the runtime's streams, paged writes one copy
// kernel. Every copy is admitted by the owner's shared region table first (bounds and liveness,
// shared_regions.h) and releases its admission when it completed. The worker polls the copy's event
// and only then delivers the imms through libfabric (one zero-byte write, or one imm-batch message
// for many), so the receiver counts exactly as with RMA.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fabric/gpu_runtime.h"
#include "fabric/jobs.h"
#include "fabric/shared_regions.h"

namespace jax_garden::fabric {

class IpcPart final : public Part {
 public:
  struct Spec {
    std::shared_ptr<const MemoryDescriptor> dst;
    std::vector<CopySegment> segments;  // single writes / scatter targets: offsets into the regions
    bool paged = false;
    PagedCopy pages;  // offsets into the regions (src/dst hold the offsets until mapped)
    bool has_imm = false;
    uint32_t imm = 0;
    uint64_t imm_count = 0;
  };
  IpcPart(EngineContext& ctx, Job* job, Spec spec) : Part(ctx, job), spec_(std::move(spec)) {}
  ~IpcPart() override;
  bool advance() override JG_REQUIRES_PROGRESS;
  bool idle() const override JG_REQUIRES_PROGRESS { return !copy_ && !imm_in_flight_ && !batched_; }
  // The transport started this part's copy together with the others of its pass (one event).
  void set_copy(std::shared_ptr<CopyJob> copy) {
    copy_ = std::move(copy);
    batched_ = false;
  }

 private:
  void release_admission();

  Spec spec_;
  bool started_ = false;
  bool batched_ = false;  // waiting for the end of the pass to be started in a batch
  std::shared_ptr<CopyJob> copy_;
  bool imm_in_flight_ = false;
  std::shared_ptr<SharedRegionTable> table_;  // the owner's, while a copy is admitted
};

class IpcTransport {
 public:
  explicit IpcTransport(EngineContext& ctx) : ctx_(ctx) {}

  // Before posting: bytes [offset, offset + length) of dst exist in a live region of the owner.
  // Returns "" when they do; else why not, with *gone telling a deregistered region (TransferFailed)
  // from a bad range (InvalidArgument).
  std::string check_destination(const MemoryDescriptor& dst, uint64_t offset, uint64_t length, bool* gone) const;
  // Can the GPU holding `src` map dst's GPU (same device or peer access)?
  bool gpu_can_map(const MemoryRegion& src, const MemoryDescriptor& dst) const;
  // The address where dst's region base is mapped in this process (imports the IPC handle once).
  uint64_t map(const MemoryDescriptor& dst, int device);
  static uint64_t mappings();  // legacy handles opened + VMM ranges imported, process-wide

  // One pass of the job runner: single-write copies issued during it go out as one batch per device
  // (one copy call list, one event); copies on one stream complete in order, so once one is found
  // pending the later ones of that device are not polled in the pass.
  void begin_pass() { std::fill(copy_blocked_.begin(), copy_blocked_.end(), 0); }
  bool end_pass();
  void add_to_batch(IpcPart* part, int device, std::vector<CopySegment> segments);
  bool blocked(int device) const { return device >= 0 && size_t(device) < copy_blocked_.size() && copy_blocked_[device]; }
  void block(int device);

 private:
  // A VMM range (IpcKind::kVmm): its fd from the owner's FdBroker, imported and mapped once.
  uint64_t map_vmm(const MemoryDescriptor& dst, int device);
  struct BatchEntry {
    IpcPart* part;
    int device;
    std::vector<CopySegment> segments;
  };
  EngineContext& ctx_;
  std::vector<BatchEntry> batch_;
  std::vector<int> copy_blocked_;
};

}  // namespace jax_garden::fabric
