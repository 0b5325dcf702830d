// A process's live regions in shared memory, for writers on the same host that bypass the provider:
// CUDA IPC copies from other processes and same-process copies (path "ipc"). The provider checks
// keys and bounds of RMA writes itself; these copies go straight to memory, so they check here
// instead, and the owner's deregistration waits until the copies it admitted have finished.
//
// One table per process (/dev/shm/jax_garden.regions.<process nonce>): a header and fixed-size
// slots {key, base, length, writers}. Protocol (a Dekker-style handshake, sequentially consistent):
//   writer: writers += 1; then check key == descriptor's region key and the range fits the slot's
//           true length; copy; writers -= 1 when the copy completed (or was abandoned).
//   owner:  key = 0 (retired); then wait until writers == 0 (bounded by the engine timeout).
// Either the writer sees the retired key and backs off, or the owner sees the writer and waits.
// Keys are random and never reused, so a slot reused by a newer region refuses stale descriptors.
// The table proves liveness and bounds to well-behaved peers; it is not a security boundary
// against a hostile same-host process, which holds the CUDA IPC handle of the whole allocation.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/thread_annotations.h"

namespace jax_garden::fabric {

inline constexpr uint32_t kNoRegionSlot = 0xFFFFFFFFu;

class SharedRegionTable {
 public:
  static constexpr uint32_t kSlots = 16384;
  struct Slot;
  struct Header;

  // This process's table, created on first use (and unlinked at exit).
  static std::shared_ptr<SharedRegionTable> local();
  // The table of the process with this nonce on this host (this process's own, or a peer's,
  // mapped once and cached). Throws TransferFailed when it does not exist (the owner is gone).
  static std::shared_ptr<SharedRegionTable> of_process(uint64_t process_nonce);

  ~SharedRegionTable();

  // Owner: a slot for a live region (kNoRegionSlot when the table is full).
  uint32_t claim(uint64_t key, uint64_t base, uint64_t length);
  // Owner: retire the slot and wait (up to timeout_s) for admitted copies; false on timeout.
  bool retire(uint32_t slot, uint64_t key, double timeout_s);

  // Writer: admit a copy into [offset, offset + length) of the region (key, base); on success the
  // caller must release(slot) once the copy completed. On failure *why says what was wrong and
  // *gone tells a deregistered region (TransferFailed) from a bad range (InvalidArgument).
  bool acquire(uint32_t slot, uint64_t key, uint64_t base, uint64_t offset, uint64_t length, std::string* why,
               bool* gone);
  void release(uint32_t slot);
  // Writer, before posting: the same checks without admitting anything.
  bool check(uint32_t slot, uint64_t key, uint64_t base, uint64_t offset, uint64_t length, std::string* why,
             bool* gone) const;

 private:
  SharedRegionTable(void* mapping, size_t bytes, std::string name, bool owner);
  Slot* slot(uint32_t i) const;

  void* mapping_;
  size_t bytes_;
  std::string name_;
  bool owner_;
  Mutex free_mu_;
  std::vector<uint32_t> free_ JG_GUARDED_BY(free_mu_);  // owner only
};

}  // namespace jax_garden::fabric
