// The CUDA implementation of GpuRuntime (built only with CUDA). cudart is linked statically; the
// driver API (address ranges, stream memory operations, DMA-BUF handles, device attributes) is
// reached through cudaGetDriverEntryPointByVersion, so libcuda.so is loaded by cudart at run time
// and never becomes a link dependency: the module imports on machines without a GPU, where
// available() is simply false.
#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "common/error.h"
#include "fabric/core/gpu_kernels.h"
#include "fabric/core/gpu_runtime.h"

namespace jax_garden::fabric {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw FabricError(str_cat(what, " failed: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e)));
  }
}

void check_cu(CUresult r, const char* what) {
  if (r != CUDA_SUCCESS) throw FabricError(str_cat(what, " failed: CUresult ", int(r)));
}

// Makes `device` current for the scope and restores the caller's device (XLA's and Python's threads
// keep their own current device).
class DeviceGuard {
 public:
  // Always sets the device: on a thread that never used CUDA, cudaGetDevice() reports device 0
  // while no context is current, and driver-API calls (cuMemGetAddressRange) would fail with
  // CUDA_ERROR_INVALID_CONTEXT. cudaSetDevice makes the primary context current.
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    check(cudaSetDevice(device), "cudaSetDevice");
    if (prev_ == device) prev_ = -1;
  }
  ~DeviceGuard() {
    if (prev_ >= 0) cudaSetDevice(prev_);
  }

 private:
  int prev_ = -1;
};

using PFN_GetAddressRange = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
using PFN_StreamValue64 = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
using PFN_GetHandleForAddressRange = CUresult (*)(void*, CUdeviceptr, size_t, CUmemRangeHandleType,
                                                  unsigned long long);
using PFN_DeviceGet = CUresult (*)(CUdevice*, int);
using PFN_DeviceGetAttribute = CUresult (*)(int*, CUdevice_attribute, CUdevice);
// Virtual memory management (CUDA 10.2+).
using PFN_MemRetainAllocationHandle = CUresult (*)(CUmemGenericAllocationHandle*, void*);
using PFN_MemGetAllocationPropertiesFromHandle = CUresult (*)(CUmemAllocationProp*, CUmemGenericAllocationHandle);
using PFN_MemRelease = CUresult (*)(CUmemGenericAllocationHandle);
using PFN_MemExportToShareableHandle = CUresult (*)(void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType,
                                                    unsigned long long);
using PFN_MemImportFromShareableHandle = CUresult (*)(CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType);
using PFN_MemAddressReserve = CUresult (*)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
using PFN_MemAddressFree = CUresult (*)(CUdeviceptr, size_t);
using PFN_MemMap = CUresult (*)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
using PFN_MemUnmap = CUresult (*)(CUdeviceptr, size_t);
using PFN_MemSetAccess = CUresult (*)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);

template <typename F>
F entry_point(const char* name, unsigned version) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  if (cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return reinterpret_cast<F>(fn);
}

class EventJob final : public CopyJob {
 public:
  // release() runs at destruction and gets the event back (the runtime pools events).
  EventJob(cudaEvent_t ev, std::function<void(cudaEvent_t)> release) : ev_(ev), release_(std::move(release)) {}
  ~EventJob() override { release_(ev_); }
  int poll(std::string* error) override {
    if (done_) return 1;
    cudaError_t e = cudaEventQuery(ev_);
    if (e == cudaSuccess) {
      done_ = true;
      return 1;
    }
    if (e == cudaErrorNotReady) return 0;
    cudaGetLastError();
    if (error) *error = str_cat("GPU copy failed: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e));
    return -1;
  }

 private:
  cudaEvent_t ev_;
  std::function<void(cudaEvent_t)> release_;
  bool done_ = false;
};

class CudaRuntime final : public GpuRuntime {
 public:
  CudaRuntime() {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n <= 0) {
      cudaGetLastError();
      status_ = e != cudaSuccess ? str_cat("no usable CUDA driver/GPU: ", cudaGetErrorName(e), ": ", cudaGetErrorString(e))
                                 : "no CUDA GPU found";
      return;
    }
    count_ = n;
    get_address_range_ = entry_point<PFN_GetAddressRange>("cuMemGetAddressRange", 12000);
    write_value64_ = entry_point<PFN_StreamValue64>("cuStreamWriteValue64", 12000);
    wait_value64_ = entry_point<PFN_StreamValue64>("cuStreamWaitValue64", 12000);
    get_handle_for_range_ = entry_point<PFN_GetHandleForAddressRange>("cuMemGetHandleForAddressRange", 12000);
    device_get_ = entry_point<PFN_DeviceGet>("cuDeviceGet", 12000);
    device_get_attribute_ = entry_point<PFN_DeviceGetAttribute>("cuDeviceGetAttribute", 12000);
    mem_retain_ = entry_point<PFN_MemRetainAllocationHandle>("cuMemRetainAllocationHandle", 12000);
    mem_props_ = entry_point<PFN_MemGetAllocationPropertiesFromHandle>("cuMemGetAllocationPropertiesFromHandle", 12000);
    mem_release_ = entry_point<PFN_MemRelease>("cuMemRelease", 12000);
    mem_export_ = entry_point<PFN_MemExportToShareableHandle>("cuMemExportToShareableHandle", 12000);
    mem_import_ = entry_point<PFN_MemImportFromShareableHandle>("cuMemImportFromShareableHandle", 12000);
    mem_reserve_ = entry_point<PFN_MemAddressReserve>("cuMemAddressReserve", 12000);
    mem_address_free_ = entry_point<PFN_MemAddressFree>("cuMemAddressFree", 12000);
    mem_map_ = entry_point<PFN_MemMap>("cuMemMap", 12000);
    mem_unmap_ = entry_point<PFN_MemUnmap>("cuMemUnmap", 12000);
    mem_set_access_ = entry_point<PFN_MemSetAccess>("cuMemSetAccess", 12000);
    if (!get_address_range_) {
      status_ = "the CUDA driver does not provide cuMemGetAddressRange";
      return;
    }
    sms_.assign(n, 0);
    for (int d = 0; d < n; ++d) cudaDeviceGetAttribute(&sms_[d], cudaDevAttrMultiProcessorCount, d);
    streams_.assign(n, {nullptr, nullptr});
    available_ = true;
    status_ = str_cat(n, " CUDA device(s)");
  }

  bool available() override { return available_; }
  std::string status() override { return status_; }
  int device_count() override { return count_; }

  PointerInfo query(uint64_t ptr) override {
    PointerInfo info;
    if (!available_) return info;
    cudaPointerAttributes attr{};
    cudaError_t e = cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr));
    if (e != cudaSuccess) {
      cudaGetLastError();
      return info;  // not memory CUDA knows
    }
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return info;
    info.is_device = true;
    info.is_managed = attr.type == cudaMemoryTypeManaged;
    info.device = attr.device;
    DeviceGuard g(attr.device);
    CUdeviceptr base = 0;
    size_t size = 0;
    check_cu(get_address_range_(&base, &size, static_cast<CUdeviceptr>(ptr)), "cuMemGetAddressRange");
    info.alloc_base = base;
    info.alloc_size = size;
    return info;
  }

  std::array<uint8_t, 64> ipc_export(uint64_t alloc_base) override {
    static_assert(sizeof(cudaIpcMemHandle_t) == 64, "cudaIpcMemHandle_t is 64 bytes");
    cudaIpcMemHandle_t h{};
    check(cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(alloc_base)), "cudaIpcGetMemHandle");
    std::array<uint8_t, 64> out{};
    std::memcpy(out.data(), &h, 64);
    return out;
  }

  uint64_t ipc_open(const std::array<uint8_t, 64>& handle, int device) override {
    DeviceGuard g(device);
    cudaIpcMemHandle_t h{};
    std::memcpy(&h, handle.data(), 64);
    void* p = nullptr;
    const cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (e == cudaErrorAlreadyMapped) {
      cudaGetLastError();
      throw IpcAlreadyMapped("cudaIpcOpenMemHandle failed: cudaErrorAlreadyMapped: this process still maps memory "
                             "the driver takes for this handle's");
    }
    check(e, "cudaIpcOpenMemHandle");
    return reinterpret_cast<uint64_t>(p);
  }

  void ipc_close(uint64_t mapped_base) override {
    if (cudaIpcCloseMemHandle(reinterpret_cast<void*>(mapped_base)) != cudaSuccess) cudaGetLastError();
  }

  bool vmm_api() const {
    return mem_retain_ && mem_props_ && mem_release_ && mem_export_ && mem_import_ && mem_reserve_ &&
           mem_address_free_ && mem_map_ && mem_unmap_ && mem_set_access_;
  }

  VmmRange vmm_range(uint64_t ptr) override {
    VmmRange r;
    if (!available_ || !vmm_api()) return r;
    PointerInfo pi = query(ptr);
    if (!pi.is_device) return r;
    DeviceGuard g(pi.device);
    CUmemGenericAllocationHandle h{};
    // Fails (CUDA_ERROR_INVALID_VALUE) for memory that cuMemCreate did not make.
    if (mem_retain_(&h, reinterpret_cast<void*>(ptr)) != CUDA_SUCCESS) return r;
    CUmemAllocationProp prop{};
    CUresult pr = mem_props_(&prop, h);
    mem_release_(h);
    if (pr != CUDA_SUCCESS) return r;
    r.vmm = true;
    r.fd_exportable = (prop.requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) != 0;
    r.base = pi.alloc_base;
    r.size = pi.alloc_size;
    return r;
  }

  int vmm_export_fd(uint64_t ptr) override {
    if (!vmm_api()) throw FabricError("the CUDA driver lacks the virtual memory management API");
    PointerInfo pi = query(ptr);
    DeviceGuard g(pi.device);
    CUmemGenericAllocationHandle h{};
    check_cu(mem_retain_(&h, reinterpret_cast<void*>(ptr)), "cuMemRetainAllocationHandle");
    int fd = -1;
    CUresult r = mem_export_(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
    mem_release_(h);  // the fd holds its own reference to the allocation
    check_cu(r, "cuMemExportToShareableHandle(POSIX_FD)");
    return fd;
  }

  uint64_t vmm_map(int fd, uint64_t size, int device) override {
    if (!vmm_api()) throw FabricError("the CUDA driver lacks the virtual memory management API");
    DeviceGuard g(device);
    CUmemGenericAllocationHandle h{};
    check_cu(mem_import_(&h, reinterpret_cast<void*>(static_cast<intptr_t>(fd)),
                         CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
             "cuMemImportFromShareableHandle");
    CUdeviceptr va = 0;
    CUresult r = mem_reserve_(&va, size, 0, 0, 0);
    if (r == CUDA_SUCCESS) {
      r = mem_map_(va, size, 0, h, 0);
      if (r != CUDA_SUCCESS) mem_address_free_(va, size);
    }
    mem_release_(h);  // the mapping holds its own reference
    check_cu(r, "cuMemAddressReserve/cuMemMap of an imported range");
    try {
      vmm_grant(va, size, device);
    } catch (...) {
      mem_unmap_(va, size);
      mem_address_free_(va, size);
      throw;
    }
    return static_cast<uint64_t>(va);
  }

  void vmm_grant(uint64_t mapped_base, uint64_t size, int device) override {
    if (!vmm_api()) throw FabricError("the CUDA driver lacks the virtual memory management API");
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    check_cu(mem_set_access_(static_cast<CUdeviceptr>(mapped_base), size, &access, 1), "cuMemSetAccess");
  }

  std::string pci_bus_id(int device) override {
    char buf[64] = {0};
    if (cudaDeviceGetPCIBusId(buf, sizeof(buf) - 1, device) != cudaSuccess) {
      cudaGetLastError();
      return "";
    }
    return buf;
  }

  int device_of_pci_bus_id(const std::string& bus_id) override {
    if (!available_ || bus_id.empty()) return -1;
    std::lock_guard lk(mu_);
    auto it = bus_ids_.find(bus_id);
    if (it != bus_ids_.end()) return it->second;
    int d = -1;
    if (cudaDeviceGetByPCIBusId(&d, bus_id.c_str()) != cudaSuccess) {
      cudaGetLastError();
      d = -1;
    }
    bus_ids_[bus_id] = d;
    return d;
  }

  bool can_access(int device, int owner) override {
    if (!available_ || device < 0 || owner < 0 || device >= count_ || owner >= count_) return false;
    if (device == owner) return true;
    std::lock_guard lk(mu_);
    auto key = std::make_pair(device, owner);
    auto it = peer_access_.find(key);
    if (it != peer_access_.end()) return it->second;
    int ok = 0;
    if (cudaDeviceCanAccessPeer(&ok, device, owner) != cudaSuccess) {
      cudaGetLastError();
      ok = 0;
    }
    peer_access_[key] = ok != 0;
    return ok != 0;
  }

  bool dmabuf_supported(int device) override {
    if (!available_ || !device_get_ || !device_get_attribute_ || !get_handle_for_range_) return false;
    CUdevice dev;
    int v = 0;
    if (device_get_(&dev, device) != CUDA_SUCCESS) return false;
    if (device_get_attribute_(&v, CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED, dev) != CUDA_SUCCESS) return false;
    return v != 0;
  }

  int dmabuf_fd(uint64_t base, uint64_t size) override {
    if (!get_handle_for_range_) return -1;
    int fd = -1;
    if (get_handle_for_range_(&fd, static_cast<CUdeviceptr>(base), size, CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD, 0) !=
        CUDA_SUCCESS)
      return -1;
    return fd;
  }

  std::unique_ptr<CopyJob> copy(int device, int lane, const std::vector<CopySegment>& segments) override {
    try {
      DeviceGuard g(device);
      cudaStream_t s = stream(device, lane);
      enqueue_copies(s, segments.data(), segments.size());
      return record(device, s, nullptr);
    } catch (const std::exception& e) {
      return failed_copy(e.what());
    }
  }

  std::unique_ptr<CopyJob> paged_copy(int device, const PagedCopy& c) override {
    try {
      DeviceGuard g(device);
      cudaStream_t s = stream(device, 0);
      if (c.pages == 0) return record(device, s, nullptr);
      size_t slot = enqueue_paged(device, s, c);
      return record(device, s, [this, slot]() { release_index_buffer(slot); });  // releases it on failure too
    } catch (const std::exception& e) {
      return failed_copy(e.what());
    }
  }

  bool copy_then_store(int device, const CopySegment* segments, size_t n, const StreamStore* stores, size_t m,
                       uint64_t kernel_bytes) override {
    DeviceGuard g(device);
    cudaStream_t s = stream(device, 0);
    if (kernel_bytes && fused_copy(device, s, segments, n, stores, m, kernel_bytes)) return true;
    enqueue_copies(s, segments, n);
    enqueue_stores(s, stores, m);
    return false;
  }

  size_t paged_copy_then_store(int device, const PagedCopy& c, const StreamStore* stores, size_t m) override {
    DeviceGuard g(device);
    cudaStream_t s = stream(device, 0);
    size_t slot = c.pages == 0 ? kNoIndexBuffer : enqueue_paged(device, s, c);
    // If the stores fail to enqueue, the kernel may still read the page lists: the buffer is then
    // never handed out again.
    enqueue_stores(s, stores, m);
    return slot;
  }

  void release_page_lists(size_t buffer) override {
    if (buffer != kNoIndexBuffer) release_index_buffer(buffer);
  }

  bool stream_stores() override { return available_ && write_value64_ != nullptr; }

  uint64_t register_host(void* p, size_t bytes, int device) override {
    if (!available_ || device < 0 || device >= count_) return 0;
    DeviceGuard g(device);
    if (cudaHostRegister(p, bytes, cudaHostRegisterPortable | cudaHostRegisterMapped) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    void* d = nullptr;
    if (cudaHostGetDevicePointer(&d, p, 0) != cudaSuccess) {
      cudaGetLastError();
      cudaHostUnregister(p);
      cudaGetLastError();
      return 0;
    }
    return reinterpret_cast<uint64_t>(d);
  }

  void unregister_host(void* p) override {
    if (p && cudaHostUnregister(p) != cudaSuccess) cudaGetLastError();
  }

  void* host_alloc(size_t bytes) override {
    if (!available_) return nullptr;
    void* p = nullptr;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return p;
  }

  void host_free(void* p) override {
    if (p && cudaFreeHost(p) != cudaSuccess) cudaGetLastError();
  }

  uint64_t device_address(void* host) override {
    void* d = nullptr;
    if (cudaHostGetDevicePointer(&d, host, 0) != cudaSuccess) {
      cudaGetLastError();
      return reinterpret_cast<uint64_t>(host);  // UVA: the same address
    }
    return reinterpret_cast<uint64_t>(d);
  }

  void stream_write_u64(void* stream, uint64_t address, uint64_t value) override {
    if (!write_value64_) throw FabricError("cuStreamWriteValue64 is not available from this CUDA driver");
    check_cu(write_value64_(static_cast<CUstream>(stream), static_cast<CUdeviceptr>(address), value, 0),
             "cuStreamWriteValue64");
  }

  void stream_store_u32_from_device(int device, void* stream, uint64_t address, const void* device_value) override {
    DeviceGuard g(device);
    check(launch_store_u32(reinterpret_cast<uint64_t*>(address), static_cast<const uint32_t*>(device_value),
                           static_cast<cudaStream_t>(stream)),
          "signal store kernel launch");
  }

  void stream_wait_geq_u64(void* stream, uint64_t address, uint64_t value) override {
    if (!wait_value64_) throw FabricError("cuStreamWaitValue64 is not available from this CUDA driver");
    check_cu(wait_value64_(static_cast<CUstream>(stream), static_cast<CUdeviceptr>(address), value,
                           CU_STREAM_WAIT_VALUE_GEQ),
             "cuStreamWaitValue64");
  }

  void stream_copy(int device, void* stream, void* dst, const void* src, size_t bytes) override {
    DeviceGuard g(device);
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, static_cast<cudaStream_t>(stream)), "cudaMemcpyAsync");
  }

  double bench_peer_copy(int src_device, int dst_device, size_t bytes, int iters) override {
    void *src = nullptr, *dst = nullptr;
    {
      DeviceGuard g(dst_device);
      check(cudaMalloc(&dst, bytes), "cudaMalloc");
    }
    DeviceGuard g(src_device);
    check(cudaMalloc(&src, bytes), "cudaMalloc");
    cudaError_t pe = cudaDeviceEnablePeerAccess(dst_device, 0);
    if (pe != cudaSuccess) cudaGetLastError();  // already enabled, or same device
    double gbs = time_copies(iters, bytes, [&](cudaStream_t s) {
      if (src_device == dst_device) return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s);
      return cudaMemcpyPeerAsync(dst, dst_device, src, src_device, bytes, s);
    });
    cudaFree(src);
    {
      DeviceGuard g2(dst_device);
      cudaFree(dst);
    }
    return gbs;
  }

  double bench_host_to_device(int device, size_t bytes, int iters) override {
    DeviceGuard g(device);
    void *host = nullptr, *dst = nullptr;
    check(cudaHostAlloc(&host, bytes, cudaHostAllocPortable), "cudaHostAlloc");
    check(cudaMalloc(&dst, bytes), "cudaMalloc");
    std::memset(host, 1, bytes);
    double gbs = time_copies(iters, bytes, [&](cudaStream_t s) {
      return cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, s);
    });
    cudaFree(dst);
    cudaFreeHost(host);
    return gbs;
  }

  uint64_t device_alloc(int device, size_t bytes) override {
    DeviceGuard g(device);
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc");
    return reinterpret_cast<uint64_t>(p);
  }

  void device_free(uint64_t ptr) override {
    if (ptr && cudaFree(reinterpret_cast<void*>(ptr)) != cudaSuccess) cudaGetLastError();
  }

  void memcpy_sync(uint64_t dst, uint64_t src, size_t bytes) override {
    check(cudaMemcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes, cudaMemcpyDefault),
          "cudaMemcpy");
  }

 private:
  static constexpr size_t kNoIndexBuffer = ~size_t{0};

  // Copies in stream order: one cudaMemcpyAsync, or one batched call for several (falling back to
  // a loop where the driver refuses the batch).
  void enqueue_copies(cudaStream_t s, const CopySegment* segments, size_t n) {
    thread_local std::vector<void*> dsts;
    thread_local std::vector<const void*> srcs;
    thread_local std::vector<size_t> sizes;
    dsts.clear();
    srcs.clear();
    sizes.clear();
    for (size_t i = 0; i < n; ++i) {
      if (!segments[i].bytes) continue;
      dsts.push_back(reinterpret_cast<void*>(segments[i].dst));
      srcs.push_back(reinterpret_cast<const void*>(segments[i].src));
      sizes.push_back(segments[i].bytes);
    }
    if (dsts.size() > 1 && batch_copies_.load(std::memory_order_relaxed)) {
      cudaMemcpyAttributes attr{};
      attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
      size_t attr_index = 0;
      cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), dsts.size(), &attr, &attr_index, 1, s);
      if (e == cudaSuccess) return;
      cudaGetLastError();
      batch_copies_.store(false, std::memory_order_relaxed);  // e.g. an older driver: one call per copy
    }
    for (size_t i = 0; i < dsts.size(); ++i)
      check(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, s), "cudaMemcpyAsync");
  }

  void enqueue_stores(cudaStream_t s, const StreamStore* stores, size_t m) {
    if (!m) return;
    if (!write_value64_) throw FabricError("cuStreamWriteValue64 is not available from this CUDA driver");
    for (size_t i = 0; i < m; ++i)
      check_cu(write_value64_(static_cast<CUstream>(s), static_cast<CUdeviceptr>(stores[i].address), stores[i].value, 0),
               "cuStreamWriteValue64 (imm record)");
  }

  // Copies and stores as one kernel on `s` (lane 0 of `device`) when they fit its arguments; false
  // (nothing enqueued) when they do not.
  bool fused_copy(int device, cudaStream_t s, const CopySegment* segments, size_t n, const StreamStore* stores,
                  size_t m, uint64_t kernel_bytes) {
    if (m > size_t(kFusedMaxStores)) return false;
    FusedCopyArgs a{};
    uint64_t total = 0;
    for (size_t i = 0; i < n; ++i) {
      const CopySegment& c = segments[i];
      if (!c.bytes) continue;
      if (a.segments == uint32_t(kFusedMaxSegments) || ((c.dst | c.src | c.bytes) & 15)) return false;
      a.dst[a.segments] = c.dst;
      a.src[a.segments] = c.src;
      a.bytes[a.segments] = c.bytes;
      ++a.segments;
      total += c.bytes;
    }
    if (total > kernel_bytes) return false;
    for (size_t k = 0; k < m; ++k) {
      a.store_address[k] = stores[k].address;
      a.store_value[k] = stores[k].value;
    }
    a.stores = static_cast<uint32_t>(m);
    a.blocks_done = blocks_done(device, s);
    check(launch_fused_copy(a, sms_[device], s), "ipc copy kernel launch");
    return true;
  }

  // The fused copy kernel's finished-block counter of `device`'s lane-0 stream `s` (zeroed once, in
  // its order).
  uint32_t* blocks_done(int device, cudaStream_t s) {
    std::lock_guard lk(mu_);
    if (blocks_done_.size() < size_t(count_)) blocks_done_.assign(count_, nullptr);
    uint32_t*& c = blocks_done_[device];
    if (!c) {
      void* p = nullptr;
      check(cudaMalloc(&p, sizeof(uint32_t)), "cudaMalloc (copy kernel counter)");
      cudaError_t e = cudaMemsetAsync(p, 0, sizeof(uint32_t), s);
      if (e != cudaSuccess) cudaFree(p);
      check(e, "cudaMemset (copy kernel counter)");
      c = static_cast<uint32_t*>(p);
    }
    return c;
  }

  // Page lists: packed into a pooled pinned buffer, copied to a stream-ordered device buffer (no
  // host synchronisation anywhere), read by the kernel from device memory. Returns the pinned
  // buffer, to release once the copy is known complete.
  size_t enqueue_paged(int device, cudaStream_t s, const PagedCopy& c) {
    size_t n = c.pages;
    size_t bytes = n * 2 * sizeof(uint32_t);
    auto [buf, slot] = acquire_index_buffer(bytes);
    auto* idx = static_cast<uint32_t*>(buf);
    std::memcpy(idx, c.src_pages, n * sizeof(uint32_t));
    std::memcpy(idx + n, c.dst_pages, n * sizeof(uint32_t));
    void* dev_idx = nullptr;
    cudaError_t e = cudaMallocAsync(&dev_idx, bytes, s);
    if (e == cudaSuccess) e = cudaMemcpyAsync(dev_idx, idx, bytes, cudaMemcpyHostToDevice, s);
    PagedCopyArgs a{};
    a.dst = c.dst;
    a.src = c.src;
    a.page_bytes = c.page_bytes;
    a.src_stride = c.src_stride;
    a.dst_stride = c.dst_stride;
    a.src_pages = static_cast<const uint32_t*>(dev_idx);
    a.dst_pages = static_cast<const uint32_t*>(dev_idx) + n;
    a.pages = static_cast<uint32_t>(n);
    if (e == cudaSuccess) e = launch_paged_copy(a, sms_[device], s);
    if (dev_idx) cudaFreeAsync(dev_idx, s);
    if (e != cudaSuccess) {
      release_index_buffer(slot);
      check(e, "paged copy (page lists to the device, kernel launch)");
    }
    return slot;
  }

  cudaStream_t stream(int device, int lane) {
    std::lock_guard lk(mu_);
    JG_CHECK_ARG(device >= 0 && device < count_, "GPU device ", device, " out of range (", count_, " devices)");
    auto& s = lane == 0 ? streams_[device].first : streams_[device].second;
    if (!s) check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    return s;
  }

  // Events belong to a device's context: the pool is per device (the caller made `device` current).
  std::unique_ptr<CopyJob> record(int device, cudaStream_t s, std::function<void()> release) {
    cudaEvent_t ev = nullptr;
    {
      std::lock_guard lk(mu_);
      auto& pool = free_events_[device];
      if (!pool.empty()) {
        ev = pool.back();
        pool.pop_back();
      }
    }
    cudaError_t e = ev ? cudaSuccess : cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(ev, s);
    if (e != cudaSuccess) {
      if (ev) cudaEventDestroy(ev);
      if (release) release();
      check(e, "cudaEventRecord");
    }
    return std::make_unique<EventJob>(ev, [this, device, release = std::move(release)](cudaEvent_t done) {
      if (release) release();
      std::lock_guard lk(mu_);
      auto& pool = free_events_[device];
      if (pool.size() < 4096)
        pool.push_back(done);
      else
        cudaEventDestroy(done);
    });
  }

  std::pair<void*, size_t> acquire_index_buffer(size_t bytes) {
    std::lock_guard lk(mu_);
    for (size_t i = 0; i < index_buffers_.size(); ++i) {
      auto& b = index_buffers_[i];
      if (!b.in_use && b.bytes >= bytes) {
        b.in_use = true;
        return {b.ptr, i};
      }
    }
    size_t want = std::max<size_t>(bytes, 1 << 16);
    void* p = nullptr;
    check(cudaHostAlloc(&p, want, cudaHostAllocPortable | cudaHostAllocMapped), "cudaHostAlloc (page lists)");
    index_buffers_.push_back({p, want, true});
    return {p, index_buffers_.size() - 1};
  }

  void release_index_buffer(size_t slot) {
    std::lock_guard lk(mu_);
    index_buffers_[slot].in_use = false;
  }

  template <typename F>
  double time_copies(int iters, size_t bytes, F&& one) {
    cudaStream_t s;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
    cudaEvent_t a, b;
    check(cudaEventCreate(&a), "cudaEventCreate");
    check(cudaEventCreate(&b), "cudaEventCreate");
    for (int i = 0; i < 2; ++i) check(one(s), "warm-up copy");
    check(cudaEventRecord(a, s), "cudaEventRecord");
    for (int i = 0; i < iters; ++i) check(one(s), "timed copy");
    check(cudaEventRecord(b, s), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "cudaEventElapsedTime");
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaStreamDestroy(s);
    return double(bytes) * iters / (double(ms) * 1e-3) / 1e9;
  }

  struct IndexBuffer {
    void* ptr;
    size_t bytes;
    bool in_use;
  };

  bool available_ = false;
  std::string status_;
  int count_ = 0;
  std::vector<int> sms_;
  std::mutex mu_;
  std::vector<std::pair<cudaStream_t, cudaStream_t>> streams_;
  std::vector<IndexBuffer> index_buffers_;
  std::vector<uint32_t*> blocks_done_;  // per device, for the lane-0 stream's fused copies
  std::map<std::string, int> bus_ids_;
  std::map<std::pair<int, int>, bool> peer_access_;
  std::map<int, std::vector<cudaEvent_t>> free_events_;
  std::atomic<bool> batch_copies_{true};
  PFN_GetAddressRange get_address_range_ = nullptr;
  PFN_StreamValue64 write_value64_ = nullptr;
  PFN_StreamValue64 wait_value64_ = nullptr;
  PFN_GetHandleForAddressRange get_handle_for_range_ = nullptr;
  PFN_DeviceGet device_get_ = nullptr;
  PFN_DeviceGetAttribute device_get_attribute_ = nullptr;
  PFN_MemRetainAllocationHandle mem_retain_ = nullptr;
  PFN_MemGetAllocationPropertiesFromHandle mem_props_ = nullptr;
  PFN_MemRelease mem_release_ = nullptr;
  PFN_MemExportToShareableHandle mem_export_ = nullptr;
  PFN_MemImportFromShareableHandle mem_import_ = nullptr;
  PFN_MemAddressReserve mem_reserve_ = nullptr;
  PFN_MemAddressFree mem_address_free_ = nullptr;
  PFN_MemMap mem_map_ = nullptr;
  PFN_MemUnmap mem_unmap_ = nullptr;
  PFN_MemSetAccess mem_set_access_ = nullptr;
};

}  // namespace

GpuRuntime& gpu_runtime() {
  static CudaRuntime* rt = new CudaRuntime();  // never destroyed: streams outlive static teardown order
  return *rt;
}

}  // namespace jax_garden::fabric
