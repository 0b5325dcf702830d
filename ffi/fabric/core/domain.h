// Domain: one NIC as libfabric sees it (fabric + domain + RDM endpoint + CQ + AV). Only the
// engine's worker thread touches a Domain after construction (FI_THREAD_DOMAIN).
#pragma once

#include <rdma/fabric.h>
#include <rdma/fi_domain.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "fabric/core/policy.h"
#include "fabric/wire/wire_format.h"

namespace jax_garden::fabric {

struct ProviderInfo;

// The fi_info chosen for an engine, shared by its domains.
struct ProviderInfo {
  fi_info* info = nullptr;     // owned; one entry, duplicated per domain
  std::string name;            // e.g. "tcp;ofi_rxm", "efa", "verbs;ofi_rxm"
  bool hmem = false;           // FI_HMEM: the provider can register GPU memory
  bool mr_local = false;       // FI_MR_LOCAL: local buffers need a registered desc
  bool virtual_addressing = false;  // FI_MR_VIRT_ADDR
  bool provider_keys = false;  // FI_MR_PROV_KEY
  bool mr_endpoint = false;    // FI_MR_ENDPOINT: MRs are bound to the endpoint
  bool needs_context = false;  // FI_CONTEXT / FI_CONTEXT2 mode bits
  size_t cq_data_size = 0;
  size_t max_msg_size = 0;
  ~ProviderInfo();

  // provider: "tcp", "efa", "verbs", "shm", a full name like "tcp;ofi_rxm", or "" for auto
  // (efa > verbs;ofi_rxm > tcp). node: source address to bind ("" = provider's choice).
  static std::unique_ptr<ProviderInfo> select(const std::string& provider, const std::string& node);
};

struct MemoryRegistration {
  fid_mr* mr = nullptr;
  void* desc = nullptr;
  uint64_t key = 0;
};

class Domain {
 public:
  Domain(const ProviderInfo& provider, int index);
  ~Domain();
  Domain(const Domain&) = delete;
  Domain& operator=(const Domain&) = delete;

  fid_ep* ep() const { return ep_; }
  fid_cq* cq() const { return cq_; }
  const Bytes& name() const { return name_; }
  int index() const { return index_; }

  // Peer endpoint -> fi_addr_t, inserted into the AV on first use and cached.
  fi_addr_t resolve(const Bytes& endpoint);

  // Registers per plan_registration()'s arguments (system memory, FI_HMEM_CUDA iovec, or
  // FI_HMEM_CUDA + DMA-BUF fd where the libfabric headers have FI_MR_DMABUF).
  MemoryRegistration register_memory(void* addr, size_t length, const RegistrationArgs& args, uint64_t requested_key,
                                     int dmabuf_fd = -1, uint64_t dmabuf_offset = 0);
  MemoryRegistration register_host(void* addr, size_t length, uint64_t requested_key);
  void unregister(MemoryRegistration& reg);

 private:
  const ProviderInfo& provider_;
  int index_;
  fid_fabric* fabric_ = nullptr;
  fid_domain* domain_ = nullptr;
  fid_cq* cq_ = nullptr;
  fid_av* av_ = nullptr;
  fid_ep* ep_ = nullptr;
  Bytes name_;
  std::map<Bytes, fi_addr_t> peers_;
};

std::string fi_error_string(int rc);

}  // namespace jax_garden::fabric
