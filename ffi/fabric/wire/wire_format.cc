#include "fabric/wire/wire_format.h"

#include <cstring>
#include <sstream>

#include "common/error.h"

namespace jax_garden::fabric {
namespace {

constexpr uint32_t kAddressMagic = 0x414e474a;     // "JGNA"
constexpr uint32_t kDescriptorMagic = 0x444d474a;  // "JGMD"

}  // namespace

Bytes NetAddress::to_bytes() const {
  Writer w;
  w.put<uint32_t>(kAddressMagic);
  w.put<uint16_t>(kWireFormatVersion);
  w.put_string(provider);
  w.put<uint8_t>(static_cast<uint8_t>(domains.size()));
  for (const auto& d : domains) w.put_bytes(d);
  return w.finish();
}

NetAddress NetAddress::from_bytes(const uint8_t* data, size_t size) {
  Reader r(data, size, "NetAddress");
  r.expect_header(kAddressMagic, kWireFormatVersion);
  NetAddress a;
  Bytes p = r.get_bytes("provider", 64);
  a.provider.assign(p.begin(), p.end());
  JG_CHECK_ARG(!a.provider.empty(), "NetAddress has an empty provider name");
  uint8_t n = r.get<uint8_t>("domain count");
  JG_CHECK_ARG(n >= 1 && n <= kMaxDomains, "NetAddress claims ", int(n), " domains (1..", kMaxDomains, " allowed)");
  for (uint8_t i = 0; i < n; ++i) {
    a.domains.push_back(r.get_bytes("endpoint name", kMaxEndpointNameBytes));
    JG_CHECK_ARG(!a.domains.back().empty(), "NetAddress domain ", int(i), " has an empty endpoint name");
  }
  r.expect_end();
  return a;
}

std::string NetAddress::to_string() const {
  std::ostringstream os;
  os << provider << "[";
  for (size_t i = 0; i < domains.size(); ++i) {
    if (i) os << ",";
    uint32_t h = checksum32(domains[i].data(), domains[i].size());
    os << std::hex << (h & 0xffff);
  }
  os << "]";
  return os.str();
}

Bytes MemoryDescriptor::to_bytes() const {
  Writer w;
  w.put<uint32_t>(kDescriptorMagic);
  w.put<uint16_t>(kWireFormatVersion);
  w.put_string(provider);
  w.put<uint64_t>(base);
  w.put<uint64_t>(length);
  w.put<uint8_t>(virtual_addressing ? 1 : 0);
  w.put<uint8_t>(static_cast<uint8_t>(kind));
  w.put<int32_t>(device);
  const bool vmm = has_ipc && ipc_kind == IpcKind::kVmm;
  w.put<uint8_t>(static_cast<uint8_t>((staged ? 1 : 0) | (has_ipc ? 2 : 0) | (vmm ? 4 : 0)));
  w.put<uint64_t>(imm_base);
  w.put<uint32_t>(stage_chunk_bytes);
  w.put_string(host_id);
  w.put<uint32_t>(pid);
  w.put<uint64_t>(process_nonce);
  w.put<uint64_t>(region_key);
  w.put<uint32_t>(region_slot);
  w.put<uint32_t>(mailbox);
  if (has_ipc) {
    if (vmm)
      w.put<uint64_t>(ipc_range_bytes);
    else
      w.out.insert(w.out.end(), ipc_handle.begin(), ipc_handle.end());
    w.put<uint64_t>(ipc_offset);
    w.put_string(pci_bus_id);
  }
  w.put<uint8_t>(static_cast<uint8_t>(domains.size()));
  for (const auto& d : domains) {
    w.put_bytes(d.endpoint);
    w.put<uint64_t>(d.key);
    w.put<uint64_t>(d.imm_key);
  }
  return w.finish();
}

MemoryDescriptor MemoryDescriptor::from_bytes(const uint8_t* data, size_t size) {
  Reader r(data, size, "MemoryDescriptor");
  r.expect_header(kDescriptorMagic, kWireFormatVersion);
  MemoryDescriptor d;
  Bytes p = r.get_bytes("provider", 64);
  d.provider.assign(p.begin(), p.end());
  JG_CHECK_ARG(!d.provider.empty(), "MemoryDescriptor has an empty provider name");
  d.base = r.get<uint64_t>("base");
  d.length = r.get<uint64_t>("length");
  JG_CHECK_ARG(d.base + d.length >= d.base, "MemoryDescriptor region [0x", std::hex, d.base, ", +0x", d.length,
               ") wraps around the address space");
  uint8_t va = r.get<uint8_t>("addressing");
  JG_CHECK_ARG(va <= 1, "MemoryDescriptor addressing flag is ", int(va), " (0 or 1 expected)");
  d.virtual_addressing = va == 1;
  uint8_t kind = r.get<uint8_t>("memory kind");
  JG_CHECK_ARG(kind <= 1, "MemoryDescriptor memory kind is ", int(kind), " (0 = host, 1 = cuda expected)");
  d.kind = static_cast<MemoryKind>(kind);
  d.device = r.get<int32_t>("device");
  JG_CHECK_ARG(d.kind == MemoryKind::kHost ? d.device == -1 : d.device >= 0, "MemoryDescriptor device ", d.device,
               " does not fit memory kind ", int(kind));
  uint8_t flags = r.get<uint8_t>("flags");
  JG_CHECK_ARG((flags & ~7u) == 0, "MemoryDescriptor has unknown flag bits 0x", std::hex, int(flags));
  d.staged = (flags & 1) != 0;
  d.has_ipc = (flags & 2) != 0;
  JG_CHECK_ARG(d.has_ipc || !(flags & 4), "MemoryDescriptor marks a VMM range but carries no IPC export");
  d.ipc_kind = (flags & 4) ? IpcKind::kVmm : IpcKind::kLegacy;
  JG_CHECK_ARG(!d.has_ipc || d.kind == MemoryKind::kCuda, "MemoryDescriptor carries a CUDA IPC handle for host memory");
  d.imm_base = r.get<uint64_t>("imm target");
  d.stage_chunk_bytes = r.get<uint32_t>("staging chunk size");
  JG_CHECK_ARG(d.stage_chunk_bytes >= 4096, "MemoryDescriptor staging chunk size ", d.stage_chunk_bytes,
               " is below 4096 bytes");
  Bytes host = r.get_bytes("host id", kMaxHostIdBytes);
  JG_CHECK_ARG(!host.empty(), "MemoryDescriptor has an empty host id");
  d.host_id.assign(host.begin(), host.end());
  d.pid = r.get<uint32_t>("pid");
  d.process_nonce = r.get<uint64_t>("process nonce");
  d.region_key = r.get<uint64_t>("region key");
  JG_CHECK_ARG(d.region_key != 0, "MemoryDescriptor has no region key");
  d.region_slot = r.get<uint32_t>("region slot");
  d.mailbox = r.get<uint32_t>("imm mailbox");
  if (d.has_ipc) {
    if (d.ipc_kind == IpcKind::kVmm)
      d.ipc_range_bytes = r.get<uint64_t>("vmm range size");
    else
      r.get_raw(d.ipc_handle.data(), kIpcHandleBytes, "ipc handle");
    d.ipc_offset = r.get<uint64_t>("ipc offset");
    JG_CHECK_ARG(d.ipc_offset <= d.base, "MemoryDescriptor IPC offset 0x", std::hex, d.ipc_offset,
                 " exceeds the region base 0x", d.base);
    JG_CHECK_ARG(d.ipc_kind != IpcKind::kVmm || (d.ipc_offset <= d.ipc_range_bytes &&
                                                  d.length <= d.ipc_range_bytes - d.ipc_offset),
                 "MemoryDescriptor region [+0x", std::hex, d.ipc_offset, ", +0x", d.length,
                 ") does not fit its VMM range of 0x", d.ipc_range_bytes, " bytes");
    Bytes bus = r.get_bytes("pci bus id", kMaxPciBusIdBytes);
    JG_CHECK_ARG(!bus.empty(), "MemoryDescriptor has a CUDA IPC handle but no PCI bus id");
    d.pci_bus_id.assign(bus.begin(), bus.end());
  }
  uint8_t n = r.get<uint8_t>("domain count");
  JG_CHECK_ARG(n >= 1 && n <= kMaxDomains, "MemoryDescriptor claims ", int(n), " domains (1..", kMaxDomains,
               " allowed)");
  for (uint8_t i = 0; i < n; ++i) {
    DomainKey k;
    k.endpoint = r.get_bytes("endpoint name", kMaxEndpointNameBytes);
    JG_CHECK_ARG(!k.endpoint.empty(), "MemoryDescriptor domain ", int(i), " has an empty endpoint name");
    k.key = r.get<uint64_t>("key");
    k.imm_key = r.get<uint64_t>("imm key");
    d.domains.push_back(std::move(k));
  }
  r.expect_end();
  return d;
}

NetAddress MemoryDescriptor::owner() const {
  NetAddress a;
  a.provider = provider;
  for (const auto& d : domains) a.domains.push_back(d.endpoint);
  return a;
}

}  // namespace jax_garden::fabric
