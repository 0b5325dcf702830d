// Host copies, host identity, and (CPU build) the GPU runtime stub.
#include "fabric/core/gpu_runtime.h"

#include <unistd.h>

#include <cstring>
#include <fstream>
#include <random>

#include "common/error.h"

namespace jax_garden::fabric {
namespace {

class DoneJob : public CopyJob {
 public:
  int poll(std::string*) override { return 1; }
};

class FailedJob : public CopyJob {
 public:
  explicit FailedJob(std::string e) : error_(std::move(e)) {}
  int poll(std::string* error) override {
    if (error) *error = error_;
    return -1;
  }

 private:
  std::string error_;
};

}  // namespace

std::unique_ptr<CopyJob> host_copy(const std::vector<CopySegment>& segments) {
  for (const auto& s : segments)
    if (s.bytes) std::memmove(reinterpret_cast<void*>(s.dst), reinterpret_cast<const void*>(s.src), s.bytes);
  return std::make_unique<DoneJob>();
}

std::unique_ptr<CopyJob> host_paged_copy(const PagedCopy& c) {
  for (size_t i = 0; i < c.pages; ++i) {
    std::memcpy(reinterpret_cast<void*>(c.dst + uint64_t(c.dst_pages[i]) * c.dst_stride),
                reinterpret_cast<const void*>(c.src + uint64_t(c.src_pages[i]) * c.src_stride), c.page_bytes);
  }
  return std::make_unique<DoneJob>();
}

std::unique_ptr<CopyJob> failed_copy(std::string error) { return std::make_unique<FailedJob>(std::move(error)); }

const std::string& host_id() {
  static const std::string id = [] {
    std::ifstream f("/proc/sys/kernel/random/boot_id");
    std::string s;
    std::getline(f, s);
    if (s.empty()) {
      char name[256] = {0};
      gethostname(name, sizeof(name) - 1);
      s = std::string("host:") + name;
    }
    return s.substr(0, 64);
  }();
  return id;
}

uint64_t process_nonce() {
  static const uint64_t nonce = [] {
    std::random_device rd;
    uint64_t v = (uint64_t(rd()) << 32) ^ rd() ^ (uint64_t(getpid()) << 17);
    return v ? v : 1;
  }();
  return nonce;
}

#ifndef JAX_GARDEN_WITH_CUDA

namespace {

[[noreturn]] void no_gpu(const char* what) {
  throw FabricError(str_cat(what, ": this build of jax_garden has no CUDA support (no GPU runtime)"));
}

class NoGpuRuntime final : public GpuRuntime {
 public:
  bool available() override { return false; }
  std::string status() override { return "this build of jax_garden has no CUDA support"; }
  int device_count() override { return 0; }
  PointerInfo query(uint64_t) override { return {}; }
  std::array<uint8_t, 64> ipc_export(uint64_t) override { no_gpu("cudaIpcGetMemHandle"); }
  uint64_t ipc_open(const std::array<uint8_t, 64>&, int) override { no_gpu("cudaIpcOpenMemHandle"); }
  void ipc_close(uint64_t) override {}
  VmmRange vmm_range(uint64_t) override { return {}; }
  int vmm_export_fd(uint64_t) override { no_gpu("cuMemExportToShareableHandle"); }
  uint64_t vmm_map(int, uint64_t, int) override { no_gpu("cuMemImportFromShareableHandle"); }
  void vmm_grant(uint64_t, uint64_t, int) override { no_gpu("cuMemSetAccess"); }
  std::string pci_bus_id(int) override { return ""; }
  int device_of_pci_bus_id(const std::string&) override { return -1; }
  bool can_access(int, int) override { return false; }
  bool dmabuf_supported(int) override { return false; }
  int dmabuf_fd(uint64_t, uint64_t) override { return -1; }
  std::unique_ptr<CopyJob> copy(int, int, const std::vector<CopySegment>&) override {
    return failed_copy("GPU copy requested but this build has no CUDA support");
  }
  std::unique_ptr<CopyJob> paged_copy(int, const PagedCopy&) override {
    return failed_copy("GPU copy requested but this build has no CUDA support");
  }
  bool copy_then_store(int, const CopySegment*, size_t, const StreamStore*, size_t, uint64_t) override {
    no_gpu("cudaMemcpyAsync");
  }
  size_t paged_copy_then_store(int, const PagedCopy&, const StreamStore*, size_t) override { no_gpu("paged copy"); }
  void release_page_lists(size_t) override {}
  bool stream_stores() override { return false; }
  uint64_t register_host(void*, size_t, int) override { return 0; }
  void unregister_host(void*) override {}
  void* host_alloc(size_t) override { return nullptr; }
  void host_free(void*) override {}
  uint64_t device_address(void* host) override { return reinterpret_cast<uint64_t>(host); }
  void stream_write_u64(void*, uint64_t, uint64_t) override { no_gpu("cuStreamWriteValue64"); }
  void stream_store_u32_from_device(int, void*, uint64_t, const void*) override { no_gpu("signal kernel"); }
  void stream_wait_geq_u64(void*, uint64_t, uint64_t) override { no_gpu("cuStreamWaitValue64"); }
  void stream_copy(int, void*, void*, const void*, size_t) override { no_gpu("cudaMemcpyAsync"); }
  double bench_peer_copy(int, int, size_t, int) override { no_gpu("cudaMemcpyPeerAsync"); }
  double bench_host_to_device(int, size_t, int) override { no_gpu("cudaMemcpyAsync"); }
  uint64_t device_alloc(int, size_t) override { no_gpu("cudaMalloc"); }
  void device_free(uint64_t) override {}
  void memcpy_sync(uint64_t, uint64_t, size_t) override { no_gpu("cudaMemcpy"); }
};

}  // namespace

GpuRuntime& gpu_runtime() {
  static NoGpuRuntime rt;
  return rt;
}

#endif  // !JAX_GARDEN_WITH_CUDA

}  // namespace jax_garden::fabric
