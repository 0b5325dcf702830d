#include "fabric/core/domain.h"

#include <rdma/fi_cm.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>

#include <cstring>
#include <vector>

#include "common/error.h"

namespace jax_garden::fabric {
namespace {

#define JG_FI_CHECK(call, what)                                                              \
  do {                                                                                       \
    int _rc = static_cast<int>(call);                                                        \
    if (_rc != 0) throw FabricError(str_cat(what, " failed: ", fi_error_string(_rc), " (", _rc, ")")); \
  } while (0)

constexpr uint32_t kApiVersion = FI_VERSION(1, 17);

fi_info* make_hints(const char* prov_name, bool want_hmem) {
  fi_info* hints = fi_allocinfo();
  hints->ep_attr->type = FI_EP_RDM;
  hints->caps = FI_MSG | FI_RMA | FI_WRITE | FI_REMOTE_WRITE | FI_SEND | FI_RECV;
  if (want_hmem) hints->caps |= FI_HMEM;
  hints->mode = FI_CONTEXT | FI_CONTEXT2;
  hints->domain_attr->mr_mode =
      FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT | (want_hmem ? FI_MR_HMEM : 0);
  hints->domain_attr->threading = FI_THREAD_DOMAIN;
  hints->domain_attr->cq_data_size = 4;  // the imm is 32 bits on every provider we target
  hints->tx_attr->op_flags = 0;
  if (prov_name) hints->fabric_attr->prov_name = strdup(prov_name);
  return hints;
}

// Providers we accept, for a user-facing name, in preference order.
std::vector<std::string> candidates(const std::string& provider) {
  if (provider.empty()) return {"efa", "verbs;ofi_rxm", "tcp", "tcp;ofi_rxm"};
  if (provider == "verbs") return {"verbs;ofi_rxm"};
  // "tcp" is RDM natively from libfabric 1.18; 1.17 layers ofi_rxm over it.
  if (provider == "tcp") return {"tcp", "tcp;ofi_rxm"};
  return {provider};
}

}  // namespace

std::string fi_error_string(int rc) { return fi_strerror(rc < 0 ? -rc : rc); }

ProviderInfo::~ProviderInfo() {
  if (info) fi_freeinfo(info);
}

std::unique_ptr<ProviderInfo> ProviderInfo::select(const std::string& provider, const std::string& node) {
  std::string tried;
  for (const auto& name : candidates(provider)) {
    // FI_HMEM is asked only of providers that reach GPU memory with GPUDirect (efa, verbs). Others
    // (tcp, shm) may offer FI_HMEM by copying through the CUDA API inside libfabric; the engine stages
    // GPU memory through its own pipelined pinned bounce buffers instead.
    bool gpudirect = name.rfind("efa", 0) == 0 || name.rfind("verbs", 0) == 0;
    for (bool hmem : {true, false}) {
      if (hmem && !gpudirect) continue;
      fi_info* hints = make_hints(name.c_str(), hmem);
      fi_info* found = nullptr;
      int rc = fi_getinfo(kApiVersion, node.empty() ? nullptr : node.c_str(), nullptr,
                          node.empty() ? 0 : FI_SOURCE, hints, &found);
      fi_freeinfo(hints);
      if (rc != 0 || !found) {
        if (!hmem) tried += str_cat(tried.empty() ? "" : ", ", name, " (", fi_error_string(rc), ")");
        continue;
      }
      // fi_getinfo matches prov_name loosely ("tcp" also yields "tcp;ofi_rxm"); take the first
      // RDM entry whose provider matches exactly.
      fi_info* pick = nullptr;
      for (fi_info* cur = found; cur; cur = cur->next) {
        if (cur->fabric_attr->prov_name && name == cur->fabric_attr->prov_name &&
            cur->ep_attr->type == FI_EP_RDM) {
          pick = cur;
          break;
        }
      }
      if (!pick) {
        fi_freeinfo(found);
        if (!hmem) tried += str_cat(tried.empty() ? "" : ", ", name, " (no RDM endpoint)");
        continue;
      }
      auto p = std::make_unique<ProviderInfo>();
      p->info = fi_dupinfo(pick);
      fi_freeinfo(found);
      p->name = p->info->fabric_attr->prov_name;
      p->hmem = (p->info->caps & FI_HMEM) != 0;
      uint64_t mr = p->info->domain_attr->mr_mode;
      p->mr_local = (mr & FI_MR_LOCAL) != 0;
      p->virtual_addressing = (mr & FI_MR_VIRT_ADDR) != 0;
      p->provider_keys = (mr & FI_MR_PROV_KEY) != 0;
      p->mr_endpoint = (mr & FI_MR_ENDPOINT) != 0;
      p->needs_context = (p->info->mode & (FI_CONTEXT | FI_CONTEXT2)) != 0;
      p->cq_data_size = p->info->domain_attr->cq_data_size;
      p->max_msg_size = p->info->ep_attr->max_msg_size;
      if (p->cq_data_size < 4) {
        throw FabricError(str_cat("provider ", p->name, " carries only ", p->cq_data_size,
                                  " bytes of remote CQ data; the engine needs 4 for its imm values"));
      }
      return p;
    }
  }
  throw FabricError(str_cat("no libfabric provider with RDM endpoints, RMA and remote CQ data for '",
                            provider.empty() ? "auto" : provider, "'", node.empty() ? "" : " on node " + node,
                            "; tried: ", tried));
}

Domain::Domain(const ProviderInfo& provider, int index) : provider_(provider), index_(index) {
  fi_info* info = provider.info;
  JG_FI_CHECK(fi_fabric(info->fabric_attr, &fabric_, nullptr), "fi_fabric");
  JG_FI_CHECK(fi_domain(fabric_, info, &domain_, nullptr), "fi_domain");

  fi_cq_attr cq_attr{};
  cq_attr.format = FI_CQ_FORMAT_DATA;
  cq_attr.size = 0;
  cq_attr.wait_obj = FI_WAIT_NONE;  // the worker polls
  JG_FI_CHECK(fi_cq_open(domain_, &cq_attr, &cq_, nullptr), "fi_cq_open");

  fi_av_attr av_attr{};
  av_attr.type = FI_AV_TABLE;
  JG_FI_CHECK(fi_av_open(domain_, &av_attr, &av_, nullptr), "fi_av_open");

  JG_FI_CHECK(fi_endpoint(domain_, info, &ep_, nullptr), "fi_endpoint");
  JG_FI_CHECK(fi_ep_bind(ep_, &av_->fid, 0), "fi_ep_bind(av)");
  JG_FI_CHECK(fi_ep_bind(ep_, &cq_->fid, FI_TRANSMIT | FI_RECV), "fi_ep_bind(cq)");
  JG_FI_CHECK(fi_enable(ep_), "fi_enable");

  size_t len = 0;
  fi_getname(&ep_->fid, nullptr, &len);
  name_.resize(len);
  JG_FI_CHECK(fi_getname(&ep_->fid, name_.data(), &len), "fi_getname");
  name_.resize(len);
}

Domain::~Domain() {
  if (ep_) fi_close(&ep_->fid);
  if (av_) fi_close(&av_->fid);
  if (cq_) fi_close(&cq_->fid);
  if (domain_) fi_close(&domain_->fid);
  if (fabric_) fi_close(&fabric_->fid);
}

fi_addr_t Domain::resolve(const Bytes& endpoint) {
  auto it = peers_.find(endpoint);
  if (it != peers_.end()) return it->second;
  fi_addr_t addr = FI_ADDR_UNSPEC;
  int n = fi_av_insert(av_, endpoint.data(), 1, &addr, 0, nullptr);
  if (n != 1) {
    throw InvalidArgument(str_cat("peer endpoint (", endpoint.size(), " bytes) was rejected by provider ",
                                  provider_.name, ": fi_av_insert returned ", n));
  }
  peers_.emplace(endpoint, addr);
  return addr;
}

MemoryRegistration Domain::register_memory(void* addr, size_t length, const RegistrationArgs& args,
                                           uint64_t requested_key, int dmabuf_fd, uint64_t dmabuf_offset) {
  JG_CHECK_ARG(args.mode != RegistrationMode::kStaged, "staged regions are not registered with the provider");
  iovec iov{addr, length};
  fi_mr_attr attr{};
  attr.mr_iov = &iov;
  attr.iov_count = 1;
  attr.access = args.access;
  attr.requested_key = requested_key;
  attr.iface = static_cast<fi_hmem_iface>(args.iface);
  if (args.iface == FI_HMEM_CUDA) attr.device.cuda = args.device;
  uint64_t flags = 0;
  if (args.mode == RegistrationMode::kHmemDmabuf) {
#ifdef FI_MR_DMABUF
    JG_CHECK_ARG(dmabuf_fd >= 0, "DMA-BUF registration without a DMA-BUF fd");
    fi_mr_dmabuf dmabuf{};
    dmabuf.fd = dmabuf_fd;
    dmabuf.offset = dmabuf_offset;
    dmabuf.len = length;
    dmabuf.base_addr = addr;
    attr.dmabuf = &dmabuf;
    flags = args.flags;  // FI_MR_DMABUF
#else
    throw FabricError("DMA-BUF registration asked for, but this build's libfabric headers lack FI_MR_DMABUF");
#endif
  }
  MemoryRegistration reg;
  JG_FI_CHECK(fi_mr_regattr(domain_, &attr, flags, &reg.mr),
              str_cat("fi_mr_regattr(", length, " bytes, ", registration_mode_name(args.mode), ")"));
  if (provider_.mr_endpoint) {
    JG_FI_CHECK(fi_mr_bind(reg.mr, &ep_->fid, 0), "fi_mr_bind");
    JG_FI_CHECK(fi_mr_enable(reg.mr), "fi_mr_enable");
  }
  reg.desc = fi_mr_desc(reg.mr);
  reg.key = fi_mr_key(reg.mr);
  return reg;
}

MemoryRegistration Domain::register_host(void* addr, size_t length, uint64_t requested_key) {
  return register_memory(addr, length, plan_registration(MemoryKind::kHost, -1, false, {}), requested_key);
}

void Domain::unregister(MemoryRegistration& reg) {
  if (reg.mr) fi_close(&reg.mr->fid);
  reg.mr = nullptr;
}

}  // namespace jax_garden::fabric
