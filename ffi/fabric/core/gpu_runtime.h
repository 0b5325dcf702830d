// What the TransferEngine needs from CUDA, behind one interface so that the engine compiles and runs
// without it: the CPU build links a stub whose available() is false (gpu_runtime.cc), the CUDA build
// links gpu_runtime_cuda.cc (static cudart; driver API only through cudaGetDriverEntryPointByVersion,
// so libcuda is never a link dependency and the module imports on hosts without a GPU).
//
// Copies are asynchronous on streams the runtime owns (one outbound and one inbound stream per
// device, created on first use). They report completion either through CopyJob::poll(), which never
// blocks (the staged path's worker polls them between libfabric progress calls), or through 64-bit
// stores the stream performs after them into host memory a peer polls (the ipc path's imm records,
// copy_then_store). Host-to-host copies (host_copy) complete at once; they are how host memory
// stands in for GPU memory in the CPU tests of the same protocols.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"

namespace jax_garden::fabric {

struct PointerInfo {
  bool is_device = false;  // CUDA device memory (cudaMalloc, cuMemAlloc, pools, cuMemCreate)
  bool is_managed = false;
  int device = -1;
  uint64_t alloc_base = 0, alloc_size = 0;  // the allocation holding the pointer
};

struct CopySegment {
  uint64_t dst = 0, src = 0, bytes = 0;  // addresses in this process (UVA: host or device)
};

// Page copy: page i moves page_bytes from src + src_pages[i]*src_stride to dst + dst_pages[i]*dst_stride
// (offsets already folded into src / dst). The page lists are the caller's (a view, never copied
// until they are packed for the device).
struct PagedCopy {
  uint64_t dst = 0, src = 0;
  uint64_t page_bytes = 0, src_stride = 0, dst_stride = 0;
  const uint32_t* src_pages = nullptr;
  const uint32_t* dst_pages = nullptr;
  size_t pages = 0;
};

// A 64-bit store a stream performs in stream order (address: as the device sees it).
struct StreamStore {
  uint64_t address = 0, value = 0;
};

class CopyJob {
 public:
  virtual ~CopyJob() = default;
  // 0: still running; 1: done; -1: failed (*error says why). Never blocks.
  virtual int poll(std::string* error) = 0;
};

// Copies on the calling thread (memcpy) and is done at once.
std::unique_ptr<CopyJob> host_copy(const std::vector<CopySegment>& segments);
std::unique_ptr<CopyJob> host_paged_copy(const PagedCopy& copy);
std::unique_ptr<CopyJob> failed_copy(std::string error);

// cudaErrorAlreadyMapped from cudaIpcOpenMemHandle: this process still holds a mapping that the
// driver takes for the handle's (a peer freed an allocation we mapped and made a new one there).
struct IpcAlreadyMapped : FabricError {
  using FabricError::FabricError;
};

class GpuRuntime {
 public:
  virtual ~GpuRuntime() = default;
  // A CUDA driver and at least one GPU were found.
  virtual bool available() = 0;
  virtual std::string status() = 0;  // why not available, or what was found
  virtual int device_count() = 0;

  // Pointer queries and CUDA IPC. All throw FabricError on driver errors.
  virtual PointerInfo query(uint64_t ptr) = 0;  // is_device = false for host memory
  virtual std::array<uint8_t, 64> ipc_export(uint64_t alloc_base) = 0;
  // The mapped allocation base. Throws IpcAlreadyMapped when the driver refuses the handle as
  // already mapped in this process.
  virtual uint64_t ipc_open(const std::array<uint8_t, 64>& handle, int device) = 0;
  virtual void ipc_close(uint64_t mapped_base) = 0;
  // Virtual-memory-management ranges (cuMemCreate; XLA's allocators make them): the range holding
  // `ptr` and whether it was created exportable as a POSIX fd (vmm = false for other memory).
  struct VmmRange {
    bool vmm = false;
    bool fd_exportable = false;
    uint64_t base = 0, size = 0;
  };
  virtual VmmRange vmm_range(uint64_t ptr) = 0;
  virtual int vmm_export_fd(uint64_t ptr) = 0;  // a new fd the caller owns
  // Imports an exported range (the caller still owns and closes `fd`), maps it into this process
  // with read/write access for `device`; returns the mapped base. vmm_grant gives one more local
  // device access to a mapping.
  virtual uint64_t vmm_map(int fd, uint64_t size, int device) = 0;
  virtual void vmm_grant(uint64_t mapped_base, uint64_t size, int device) = 0;
  virtual std::string pci_bus_id(int device) = 0;
  virtual int device_of_pci_bus_id(const std::string& bus_id) = 0;  // -1 when not visible here
  virtual bool can_access(int device, int owner_device) = 0;        // same device or peer access
  virtual bool dmabuf_supported(int device) = 0;
  virtual int dmabuf_fd(uint64_t base, uint64_t size) = 0;  // -1 when not available

  // Asynchronous copies on the runtime's streams of `device` (lane 0: outbound, 1: inbound).
  virtual std::unique_ptr<CopyJob> copy(int device, int lane, const std::vector<CopySegment>& segments) = 0;
  // Paged copy through a copy kernel on `device` (the page lists travel to the device with it).
  virtual std::unique_ptr<CopyJob> paged_copy(int device, const PagedCopy& copy) = 0;

  // The ipc path: copies on the outbound stream of `device` (one batched driver call for several
  // segments), then, in stream order after them, each of `stores` (cuStreamWriteValue64, which
  // fences the copies' writes first): whoever polls the stored words learns that the bytes landed,
  // with no event and no host thread in between. Throws FabricError (nothing was enqueued when the
  // copies failed to enqueue).
  // When the copies total at most `kernel_bytes` and fit one launch (16-byte aligned, few segments
  // and stores), one copy kernel does both and the call returns true (less host work than the two
  // driver calls).
  virtual bool copy_then_store(int device, const CopySegment* segments, size_t n, const StreamStore* stores,
                               size_t m, uint64_t kernel_bytes) = 0;
  // The same with a paged copy (copy kernel). Returns the pinned page-list buffer it used, to hand
  // back with release_page_lists() once the stores landed.
  virtual size_t paged_copy_then_store(int device, const PagedCopy& copy, const StreamStore* stores, size_t m) = 0;
  virtual void release_page_lists(size_t buffer) = 0;
  // Streams can store into host memory (cuStreamWriteValue64 is available).
  virtual bool stream_stores() = 0;
  // Host memory GPUs may store into (cudaHostRegister, portable and mapped, made with `device`
  // current so that no other GPU gets a context): its device address, 0 when that is not possible
  // here (no GPU, or the registration failed).
  virtual uint64_t register_host(void* p, size_t bytes, int device) = 0;
  virtual void unregister_host(void* p) = 0;

  // Pinned host memory (cudaHostAlloc Portable|Mapped); nullptr when unavailable. With UVA the
  // device address of mapped memory equals the host address.
  virtual void* host_alloc(size_t bytes) = 0;
  virtual void host_free(void* p) = 0;
  virtual uint64_t device_address(void* host) = 0;

  // On a caller's stream (the XLA stream of the jit ops, on `device`), in stream order. Throw
  // FabricError.
  virtual void stream_write_u64(void* stream, uint64_t address, uint64_t value) = 0;
  virtual void stream_store_u32_from_device(int device, void* stream, uint64_t address, const void* device_value) = 0;
  virtual void stream_wait_geq_u64(void* stream, uint64_t address, uint64_t value) = 0;
  virtual void stream_copy(int device, void* stream, void* dst, const void* src, size_t bytes) = 0;

  // Same-run baselines for the benchmark: GB/s (1e9 bytes/s) measured with CUDA events, `iters`
  // copies back to back (src == dst: a same-device cudaMemcpyAsync, else cudaMemcpyPeerAsync).
  virtual double bench_peer_copy(int src_device, int dst_device, size_t bytes, int iters) = 0;
  virtual double bench_host_to_device(int device, size_t bytes, int iters) = 0;

  // Test and benchmark helpers: plain device buffers (cudaMalloc) and host <-> device copies.
  virtual uint64_t device_alloc(int device, size_t bytes) = 0;
  virtual void device_free(uint64_t ptr) = 0;
  virtual void memcpy_sync(uint64_t dst, uint64_t src, size_t bytes) = 0;
};

// The process-wide runtime (CUDA build: initialised on first use; CPU build: the stub).
GpuRuntime& gpu_runtime();

// Host identity for same-host / same-process checks: the kernel boot id, and a random per-process
// nonce (pids repeat across PID namespaces on one host).
const std::string& host_id();
uint64_t process_nonce();

}  // namespace jax_garden::fabric
