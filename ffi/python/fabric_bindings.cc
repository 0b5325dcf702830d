// Bindings for jax_garden.fabric (submodule _jax_garden.fabric). No logic: argument conversion,
// GIL handling and exception mapping only.
#include <cmath>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/map.h>

#include <thread>


#include "common/error.h"
#include "common/registry.h"
#include "fabric/engine/engine.h"
#include "fabric/core/fd_broker.h"
#include "fabric/core/imm_mailbox.h"
#include "fabric/engine/latency_probe.h"
#include "fabric/core/shared_regions.h"
#include "fabric/core/gpu_runtime.h"
#include "fabric/core/policy.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace jax_garden::fabric {
namespace {

nb::bytes from_bytes(const Bytes& b) { return nb::bytes(reinterpret_cast<const char*>(b.data()), b.size()); }

// Any object with the buffer protocol (bytes, bytearray, memoryview, numpy) as Bytes.
Bytes buffer_bytes(nb::handle obj, const char* what) {
  Py_buffer view;
  if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_SIMPLE) != 0) {
    PyErr_Clear();
    throw nb::type_error(str_cat(what, " must be bytes-like (bytes, bytearray, memoryview), got ",
                                 nb::type_name(obj.type()).c_str())
                             .c_str());
  }
  const auto* p = static_cast<const uint8_t*>(view.buf);
  Bytes out(p, p + view.len);
  PyBuffer_Release(&view);
  return out;
}

using PageList = nb::ndarray<const uint32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Strings are parsed here, at the Python boundary, and nowhere else.
TransferPath parse_path(const std::string& name) {
  if (name.empty() || name == "auto") return TransferPath::kAuto;
  if (name == "fabric") return TransferPath::kFabric;
  if (name == "ipc") return TransferPath::kIpc;
  if (name == "staged") return TransferPath::kStaged;
  throw InvalidArgument(str_cat("path must be None, 'fabric', 'ipc' or 'staged', got '", name, "'"));
}

ScatterSharding parse_sharding(const std::string& s) {
  if (s == "targets") return ScatterSharding::kTargets;
  if (s == "bytes") return ScatterSharding::kBytes;
  throw InvalidArgument(str_cat("sharding must be 'targets' or 'bytes', got '", s, "'"));
}

nb::dict adversary_dict(const AdversaryStats& s) {
  nb::dict d;
  d["pieces"] = s.pieces;
  d["held"] = s.held;
  d["messages_held"] = s.messages_held;
  d["reordered"] = s.reordered;
  d["last_held"] = s.last_held;
  d["tail_held"] = s.tail_held;
  d["imms_held"] = s.imms_held;
  d["imm_splits"] = s.imm_splits;
  d["copies_delayed"] = s.copies_delayed;
  d["early_completions"] = s.early_completions;
  d["resets"] = s.resets;
  d["targeted"] = s.targeted;
  d["held_now"] = s.held_now;
  return d;
}

OpKind parse_op_kind(const std::string& s) {
  if (s == "write") return OpKind::kWrite;
  if (s == "paged" || s == "write_paged") return OpKind::kPaged;
  if (s == "scatter") return OpKind::kScatter;
  if (s == "imm" || s == "write_imm") return OpKind::kImm;
  if (s == "barrier") return OpKind::kBarrier;
  throw InvalidArgument(str_cat("unknown op '", s, "' (expected write, paged, scatter, imm or barrier)"));
}

CompletionMode parse_completion(const std::string& s) {
  if (s == "delivery") return CompletionMode::kDelivery;
  if (s == "transmit") return CompletionMode::kTransmit;
  throw InvalidArgument(str_cat("completion must be 'delivery' or 'transmit', got '", s, "'"));
}

// A Python object that can be copied and dropped on threads that do not hold the GIL.
std::shared_ptr<nb::object> share_object(nb::object obj) {
  return std::shared_ptr<nb::object>(new nb::object(std::move(obj)), [](nb::object* p) {
    if (!Py_IsInitialized()) return;  // interpreter gone: leak rather than crash
    nb::gil_scoped_acquire gil;
    delete p;
  });
}

template <typename... Args>
void call_python(const std::shared_ptr<nb::object>& fn, Args... args) {
  if (!Py_IsInitialized()) return;
  nb::gil_scoped_acquire gil;
  try {
    (*fn)(args...);
  } catch (nb::python_error& e) {
    e.restore();
    PyErr_Print();  // a failing callback is reported, and the engine keeps running
  }
}

void BindFabric(nb::module_& m) {
  static nb::object transfer_error = nb::steal(
      PyErr_NewExceptionWithDoc("jax_garden.fabric.TransferError",
                                "An operation failed: the peer reported an error, could not be reached, or the "
                                "engine was closed with the operation in flight.",
                                PyExc_RuntimeError, nullptr));
  m.attr("TransferError") = transfer_error;

  nb::class_<NetAddress>(m, "NetAddress", "How to reach an engine: its provider and endpoint names (bytes(addr) to ship).")
      .def_static("from_bytes", [](nb::handle b) {
        Bytes raw = buffer_bytes(b, "NetAddress.from_bytes: data");
        return NetAddress::from_bytes(raw.data(), raw.size());
      }, "data"_a)
      .def("__bytes__", [](const NetAddress& a) { return from_bytes(a.to_bytes()); })
      .def_prop_ro("provider", [](const NetAddress& a) { return a.provider; })
      .def_prop_ro("num_domains", [](const NetAddress& a) { return a.domains.size(); })
      .def("__eq__", [](const NetAddress& a, const NetAddress& b) { return a == b; })
      .def("__hash__", [](const NetAddress& a) { auto b = a.to_bytes(); return checksum32(b.data(), b.size()); })
      .def("__repr__", [](const NetAddress& a) { return "NetAddress(" + a.to_string() + ")"; });

  nb::class_<MemoryDescriptor>(m, "MemoryDescriptor",
                               "How to write into a registered region: bytes(desc) to ship; holding it (and reaching "
                               "the engine) is the capability to write into that region and nothing else.")
      .def_static("from_bytes", [](nb::handle b) {
        Bytes raw = buffer_bytes(b, "MemoryDescriptor.from_bytes: data");
        return MemoryDescriptor::from_bytes(raw.data(), raw.size());
      }, "data"_a)
      .def("__bytes__", [](const MemoryDescriptor& d) { return from_bytes(d.to_bytes()); })
      .def_prop_ro("provider", [](const MemoryDescriptor& d) { return d.provider; })
      .def_prop_ro("base", [](const MemoryDescriptor& d) { return d.base; })
      .def_prop_ro("length", [](const MemoryDescriptor& d) { return d.length; })
      .def_prop_ro("num_domains", [](const MemoryDescriptor& d) { return d.domains.size(); })
      .def_prop_ro("is_cuda", [](const MemoryDescriptor& d) { return d.kind == MemoryKind::kCuda; })
      .def_prop_ro("is_staged", [](const MemoryDescriptor& d) { return d.staged; })
      .def_prop_ro("device", [](const MemoryDescriptor& d) { return d.device; })
      .def_prop_ro("has_ipc_handle", [](const MemoryDescriptor& d) { return d.has_ipc; })
      .def_prop_ro("ipc_kind", [](const MemoryDescriptor& d) {
        return std::string(!d.has_ipc ? "none" : d.ipc_kind == IpcKind::kVmm ? "vmm" : "legacy");
      })
      .def_prop_ro("mailbox", [](const MemoryDescriptor& d) { return d.mailbox; })
      .def_prop_ro("pci_bus_id", [](const MemoryDescriptor& d) { return d.pci_bus_id; })
      .def_prop_ro("host_id", [](const MemoryDescriptor& d) { return d.host_id; })
      .def_prop_ro("pid", [](const MemoryDescriptor& d) { return d.pid; })
      .def_prop_ro("staging_chunk_bytes", [](const MemoryDescriptor& d) { return d.stage_chunk_bytes; })
      .def_prop_ro("owner", &MemoryDescriptor::owner)
      .def("__eq__", [](const MemoryDescriptor& a, const MemoryDescriptor& b) { return a == b; })
      .def("__repr__", [](const MemoryDescriptor& d) {
        return str_cat("MemoryDescriptor(", d.provider, ", base=0x", std::hex, d.base, std::dec, ", length=", d.length,
                       ", domains=", d.domains.size(), d.kind == MemoryKind::kCuda ? ", cuda" : "",
                       d.staged ? ", staged" : "", d.has_ipc ? ", ipc" : "", ")");
      });

  nb::class_<ScatterTargetList>(m, "ScatterTargets",
                                "Scatter destinations checked once, to post many times: [(descriptor, length, "
                                "src_offset, dst_offset), ...].")
      .def("__init__", [](ScatterTargetList* self, nb::sequence targets) {
        new (self) ScatterTargetList();
        for (nb::handle item : targets) {
          auto [d, length, src_offset, dst_offset] =
              nb::cast<std::tuple<const MemoryDescriptor*, uint64_t, uint64_t, uint64_t>>(item);
          self->add(d, length, src_offset, dst_offset);
        }
        JG_CHECK_ARG(!self->targets.empty(), "ScatterTargets: the destination list is empty");
      }, "targets"_a)
      .def("__len__", [](const ScatterTargetList& l) { return l.targets.size(); })
      .def_prop_ro("nbytes", [](const ScatterTargetList& l) { return l.total_bytes; })
      .def_prop_ro("num_destinations", [](const ScatterTargetList& l) { return l.descriptors.size(); })
      .def("__repr__", [](const ScatterTargetList& l) {
        return str_cat("ScatterTargets(", l.targets.size(), " targets, ", l.total_bytes, " bytes, ",
                       l.descriptors.size(), " destinations)");
      });

  nb::class_<TransferState>(m, "Transfer",
                            "Completion of one operation (TransferEngine.write, ...). It completes within the "
                            "engine timeout plus a size allowance, with success or an error.")
      .def("wait", [](TransferState& t, std::optional<double> timeout) {
        // None: until the op's own deadline (-1 below); a number bounds the wait, so it must be one.
        JG_CHECK_ARG(!timeout || (std::isfinite(*timeout) && *timeout >= 0),
                     "Transfer.wait: timeout must be None or a finite number of seconds >= 0, got ", *timeout);
        t.wait(timeout.value_or(-1.0));
      },
           "timeout"_a = nb::none(), nb::call_guard<nb::gil_scoped_release>(),
           "Block until the operation completed (at most `timeout` seconds; None: until its own deadline, which "
           "every op has). Raises TransferError on failure, TimeoutError on a timeout.")
      .def_prop_ro("done", [](const TransferState& t) { return t.finished(); })
      .def_prop_ro("failed", [](const TransferState& t) {
        auto s = t.status();
        return s == TransferState::Status::kFailed || s == TransferState::Status::kTimedOut;
      })
      .def_prop_ro("error", &TransferState::error)
      .def_prop_ro("id", &TransferState::id)
      .def_prop_ro("what", &TransferState::what)
      .def("__repr__", [](const TransferState& t) {
        const char* names[] = {"pending", "done", "failed", "timed out"};
        return str_cat("Transfer(", t.what(), ", ", names[int(t.status())], ")");
      });

  nb::class_<MemoryRegion>(m, "MemoryRegion")
      .def_prop_ro("descriptor", [](const MemoryRegion& r) { return r.descriptor(); })
      .def_prop_ro("is_staged", &MemoryRegion::staged)
      .def_prop_ro("device", &MemoryRegion::device)
      .def_prop_ro("registration", [](const MemoryRegion& r) { return std::string(registration_mode_name(r.mode())); })
      .def_prop_ro("registration_note", &MemoryRegion::registration_note)
      .def_prop_ro("base", &MemoryRegion::base)
      .def_prop_ro("length", &MemoryRegion::length);

  nb::class_<ImmCounter>(m, "ImmCounter",
                         "Credit counter of one imm value's arrivals (arrivals before a wait are kept).")
      .def("wait", &ImmCounter::wait, "count"_a, "timeout"_a = 10.0, nb::call_guard<nb::gil_scoped_release>(),
           "Block until `count` arrivals are there (at most `timeout` seconds), then take them. Raises "
           "TimeoutError (nothing taken) or TransferError (engine closed, GPU wait stalled).")
      .def("wait_any", &ImmCounter::wait_any, "timeout"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Sleep until at least one arrival is there (at most `timeout` seconds), take them all and return "
           "how many (0 after the timeout). Neither spins nor makes the worker poll faster: for rare "
           "arrivals. Raises TransferError when the engine is closed.")
      .def("on_count", [](ImmCounter& c, int64_t count, nb::callable fn) {
        auto shared = share_object(std::move(fn));
        c.on_count(count, [shared]() { call_python(shared); });
      }, "count"_a, "callback"_a)
      .def_prop_ro("credits", &ImmCounter::credits)
      .def_prop_ro("total", &ImmCounter::total)
      .def_prop_ro("imm", &ImmCounter::imm)
      .def_prop_ro("id", &ImmCounter::id);

  nb::class_<Watcher>(m, "Watcher")
      .def("slot_address", &Watcher::slot_address, "index"_a)
      .def("read", &Watcher::read, "index"_a)
      .def("store", &Watcher::store, "index"_a, "value"_a)
      .def("detach", &Watcher::detach, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro_static("num_slots", [](nb::handle) { return Watcher::kSlots; });

  nb::class_<Engine>(m, "Engine")
      .def_static("create", [](const std::string& provider,  // "" = auto
                               const std::string& node,      // address to bind ("" = provider's choice)
                               uint32_t domains,             // NICs in the group
                               double timeout,               // seconds before a silent peer fails an op
                               uint32_t max_message_bytes,   // control-message limit
                               uint64_t split_threshold,     // single writes this long split over domains
                               const std::string& path,      // default path ("" = choose per destination)
                               uint32_t staging_chunk_bytes, uint32_t staging_slots,
                               const std::string& completion,  // "delivery" or "transmit"
                               bool vmm_ipc,                   // offer cuMemCreate GPU regions to same-host peers
                               std::optional<std::string> adversary,  // adversarial mode spec (None: env)
                               uint64_t ipc_copy_kernel_bytes) {  // ipc writes up to this size: one copy kernel
        EngineOptions o;
        o.provider = provider;
        o.node = node;
        o.domains = domains;
        o.timeout_s = timeout;
        o.max_message_bytes = max_message_bytes;
        o.sharding.split_threshold = split_threshold;
        o.default_path = parse_path(path);
        o.stage_chunk_bytes = staging_chunk_bytes;
        o.stage_slots = staging_slots;
        o.completion = parse_completion(completion);
        o.vmm_ipc = vmm_ipc;
        o.adversary = std::move(adversary);
        o.ipc_copy_kernel_bytes = ipc_copy_kernel_bytes;
        nb::gil_scoped_release release;
        return Engine::create(o);
      }, "provider"_a, "node"_a, "domains"_a, "timeout"_a, "max_message_bytes"_a, "split_threshold"_a, "path"_a,
         "staging_chunk_bytes"_a, "staging_slots"_a, "completion"_a, "vmm_ipc"_a = true,
         "adversary"_a = nb::none(), "ipc_copy_kernel_bytes"_a = EngineOptions{}.ipc_copy_kernel_bytes)
      .def_prop_ro("adversary", [](const Engine& e) -> std::optional<std::string> {
        if (!e.adversary()) return std::nullopt;
        return e.adversary()->to_string();
      })
      .def("adversary_stats", [](Engine& e) {
        AdversaryStats s;
        {
          nb::gil_scoped_release release;
          s = e.adversary_stats();
        }
        return adversary_dict(s);
      })
      .def("adversary_hold", &Engine::adversary_hold, "imm"_a, "mask"_a, "skip"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("adversary_release", &Engine::adversary_release, "imm"_a, "mask"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("adversary_holding", &Engine::adversary_holding, "imm"_a, "mask"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("address", [](const Engine& e) { return e.address(); })
      .def_prop_ro("provider", [](const Engine& e) { return e.provider(); })
      .def_prop_ro("num_domains", &Engine::num_domains)
      .def_prop_ro("supports_gpu_memory", &Engine::provider_supports_hmem)
      .def_prop_ro("timeout", [](const Engine& e) { return e.options().timeout_s; })
      .def_prop_ro("split_threshold", [](const Engine& e) { return e.options().sharding.split_threshold; })
      .def_prop_ro("max_message_bytes", [](const Engine& e) { return e.options().max_message_bytes; })
      .def_prop_ro("completion", [](const Engine& e) {
        return std::string(e.options().completion == CompletionMode::kDelivery ? "delivery" : "transmit");
      })
      .def_prop_ro("closed", &Engine::closed)
      .def_prop_ro("default_path", [](const Engine& e) { return std::string(path_name(e.options().default_path)); })
      .def("register_memory", [](Engine& e, uint64_t ptr, uint64_t length, bool cuda, bool staged, nb::object keep) {
        std::shared_ptr<MemoryRegion> r;
        {
          nb::gil_scoped_release release;
          r = e.register_memory(ptr, length, cuda, staged);
        }
        // The buffer outlives the registration: released only once nothing can write into it.
        if (!keep.is_none()) r->set_keepalive(share_object(std::move(keep)));
        return r;
      }, "ptr"_a, "length"_a, "cuda"_a, "staged"_a, "keepalive"_a)
      .def("write", [](Engine& e, std::shared_ptr<MemoryRegion> r, const MemoryDescriptor& d, uint64_t n,
                       uint64_t src_offset, uint64_t dst_offset, std::optional<uint32_t> imm, const std::string& path) {
        WriteRequest q;
        q.src = std::move(r);
        q.dst = &d;
        q.length = n;
        q.src_offset = src_offset;
        q.dst_offset = dst_offset;
        q.imm = imm;
        q.path = parse_path(path);
        return e.write(q);
      }, "region"_a, "dst"_a, "length"_a, "src_offset"_a, "dst_offset"_a, "imm"_a, "path"_a)
      .def("write_paged", [](Engine& e, std::shared_ptr<MemoryRegion> r, const MemoryDescriptor& d,
                             uint64_t page_bytes, PageList src_pages, PageList dst_pages, uint64_t src_stride,
                             uint64_t dst_stride, uint64_t src_offset, uint64_t dst_offset, std::optional<uint32_t> imm,
                             const std::string& path) {
        PagedWriteRequest q;
        q.src = std::move(r);
        q.dst = &d;
        q.page_bytes = page_bytes;
        // Page lists arrive as uint32 numpy arrays, viewed for the call (never converted or copied).
        q.src_pages = {src_pages.data(), src_pages.shape(0)};
        q.dst_pages = {dst_pages.data(), dst_pages.shape(0)};
        q.src_stride = src_stride;
        q.dst_stride = dst_stride;
        q.src_offset = src_offset;
        q.dst_offset = dst_offset;
        q.imm = imm;
        q.path = parse_path(path);
        return e.write_paged(q);
      }, "region"_a, "dst"_a, "page_bytes"_a, "src_pages"_a, "dst_pages"_a, "src_stride"_a, "dst_stride"_a,
         "src_offset"_a, "dst_offset"_a, "imm"_a, "path"_a)
      .def("scatter", [](Engine& e, std::shared_ptr<MemoryRegion> r,
                         const std::vector<std::tuple<MemoryDescriptor, uint64_t, uint64_t, uint64_t>>& targets,
                         const std::string& sharding, std::optional<uint32_t> imm, const std::string& path) {
        ScatterRequest q;
        q.src = std::move(r);
        for (auto& [d, len, so, doff] : targets) q.targets.push_back({&d, len, so, doff});
        q.sharding = parse_sharding(sharding);
        q.imm = imm;
        q.path = parse_path(path);
        return e.scatter(q);
      }, "region"_a, "targets"_a, "sharding"_a, "imm"_a, "path"_a)
      .def("scatter_prepared", [](Engine& e, std::shared_ptr<MemoryRegion> r, const ScatterTargetList& targets,
                                  const std::string& sharding, std::optional<uint32_t> imm, const std::string& path) {
        ScatterRequest q;
        q.src = std::move(r);
        q.targets = targets.targets;  // plain records; the descriptors stay in `targets` for this call
        q.sharding = parse_sharding(sharding);
        q.imm = imm;
        q.path = parse_path(path);
        return e.scatter(q);
      }, "region"_a, "targets"_a, "sharding"_a, "imm"_a, "path"_a)
      .def("path_for", [](const Engine& e, const MemoryRegion& r, const MemoryDescriptor& d, const std::string& path) {
        auto c = e.path_for(r, d, parse_path(path));
        return std::make_tuple(std::string(path_name(c.path)), c.stage_src, c.stage_dst);
      }, "region"_a, "dst"_a, "path"_a)
      .def("prepare", [](Engine& e, const MemoryRegion& r, const MemoryDescriptor& d, const std::string& path) {
        nb::gil_scoped_release release;  // may map the peer's GPU memory (a driver call)
        return std::string(path_name(e.prepare(r, d, parse_path(path)).path));
      }, "region"_a, "dst"_a, "path"_a)
      .def("path_reason", [](const Engine& e, const MemoryRegion& r, const MemoryDescriptor& d, const std::string& path) {
        return e.path_reason(r, d, parse_path(path));
      }, "region"_a, "dst"_a, "path"_a)
      .def("check", &Engine::check)
      .def("staging_stats", [](Engine& e) {
        StagingStats s;
        {
          nb::gil_scoped_release release;
          s = e.staging_stats();
        }
        nb::dict d;
        d["send_buffers"] = s.send_buffers;
        d["send_buffers_free"] = s.send_buffers_free;
        d["recv_slots"] = s.recv_slots;
        d["recv_slots_free"] = s.recv_slots_free;
        d["inbound"] = s.inbound;
        d["outbound"] = s.outbound;
        d["chunk_bytes"] = s.chunk_bytes;
        d["ipc_mappings"] = s.ipc_mappings;
        d["ipc_stream_records"] = s.ipc_stream_records;
        d["ipc_event_records"] = s.ipc_event_records;
        d["ipc_host_records"] = s.ipc_host_records;
        d["ipc_kernel_records"] = s.ipc_kernel_records;
        return d;
      })
      .def("write_imm", [](Engine& e, const MemoryDescriptor& d, uint32_t imm) {
        return e.write_imm(ImmRequest{OpKind::kImm, {&d}, imm});
      }, "dst"_a, "imm"_a)
      .def("barrier", [](Engine& e, const std::vector<MemoryDescriptor>& peers, uint32_t imm) {
        ImmRequest q{OpKind::kBarrier, {}, imm};
        for (const auto& p : peers) q.peers.push_back(&p);
        return e.write_imm(q);
      }, "peers"_a, "imm"_a)
      .def("send", [](Engine& e, const NetAddress& to, nb::handle payload) {
        return e.send(to, buffer_bytes(payload, "send: payload"));
      }, "to"_a, "payload"_a)
      // Tests only: a control message of an internal kind (control.h), as a buggy or hostile peer
      // could send one, to check what the receiver accepts.
      .def("_send_internal", [](Engine& e, const NetAddress& to, uint8_t kind, nb::handle payload) {
        JG_CHECK_ARG(kind >= 1 && kind <= kMaxMsgKind, "_send_internal: kind must be in 1..", int(kMaxMsgKind),
                     ", got ", int(kind));
        return e.send(to, buffer_bytes(payload, "_send_internal: payload"), static_cast<MsgKind>(kind));
      }, "to"_a, "kind"_a, "payload"_a)
      .def("recv", [](Engine& e, double timeout) {
        Message m;
        {
          nb::gil_scoped_release release;
          m = e.recv(timeout);
        }
        return std::make_pair(m.sender, from_bytes(m.payload));
      }, "timeout"_a)
      .def("imm_counter", &Engine::imm_counter, "imm"_a)
      .def("watcher", [](Engine& e, nb::object fn) {
        auto shared = share_object(std::move(fn));
        return e.watcher([shared](uint32_t s, uint64_t o, uint64_t n) { call_python(shared, s, o, n); });
      }, "callback"_a)
      .def("ping_pong", [](Engine& e, const std::shared_ptr<MemoryRegion>& r, const MemoryDescriptor& peer,
                           uint64_t bytes, uint32_t imm_data, uint32_t imm_ack, int warmup, int iters, bool initiator,
                           double timeout) {
        nb::gil_scoped_release release;
        return ping_pong(e, r, peer, bytes, imm_data, imm_ack, warmup, iters, initiator, timeout);
      }, "region"_a, "peer"_a, "bytes"_a, "imm_data"_a, "imm_ack"_a, "warmup"_a, "iters"_a, "initiator"_a, "timeout"_a,
         "Benchmark loop in C++ (see latency_probe.h): round-trip ns per iteration on the initiator.")
      .def("close", &Engine::close, nb::call_guard<nb::gil_scoped_release>());

  // Pure policy functions, exposed for unit tests.
  m.def("choose_path", [](const std::string& requested, bool src_cuda, bool src_staged, bool dst_cuda,
                          bool dst_staged, bool dst_has_ipc, bool same_host, bool same_process, bool gpu_can_map,
                          bool dst_mailbox) {
    PathQuery q;
    q.dst_mailbox = dst_mailbox;
    q.requested = parse_path(requested);
    q.src_cuda = src_cuda;
    q.src_staged = src_staged;
    q.dst_cuda = dst_cuda;
    q.dst_staged = dst_staged;
    q.dst_has_ipc = dst_has_ipc;
    q.same_host = same_host;
    q.same_process = same_process;
    q.gpu_can_map = gpu_can_map;
    auto c = choose_path(q);
    return std::make_tuple(std::string(path_name(c.path)), c.stage_src, c.stage_dst, explain_path(q, c));
  }, "requested"_a, "src_cuda"_a, "src_staged"_a, "dst_cuda"_a, "dst_staged"_a, "dst_has_ipc"_a, "same_host"_a,
     "same_process"_a, "gpu_can_map"_a, "dst_mailbox"_a = true);
  m.def("plan_registration", [](bool cuda, int device, bool staged, bool provider_hmem, bool headers_dmabuf,
                                bool runtime_dmabuf, bool kernel_dmabuf, bool device_dmabuf) {
    RegistrationCaps c{provider_hmem, headers_dmabuf, runtime_dmabuf, kernel_dmabuf, device_dmabuf};
    auto a = plan_registration(cuda ? MemoryKind::kCuda : MemoryKind::kHost, device, staged, c);
    nb::dict d;
    d["mode"] = std::string(registration_mode_name(a.mode));
    d["iface"] = a.iface;
    d["device"] = a.device;
    d["access"] = a.access;
    d["flags"] = a.flags;
    d["reason"] = a.reason;
    return d;
  }, "cuda"_a, "device"_a, "staged"_a, "provider_hmem"_a, "headers_dmabuf"_a, "runtime_dmabuf"_a,
     "kernel_dmabuf"_a, "device_dmabuf"_a);
  m.def("kernel_release_at_least", &kernel_release_at_least, "release"_a, "major"_a, "minor"_a);
  m.def("plan_stage_chunks", [](const std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>& segs,
                                uint64_t chunk_bytes, size_t max_segments) {
    std::vector<StageSegment> v;
    for (auto& [so, doff, n] : segs) v.push_back({so, doff, n});
    std::vector<std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>> out;
    for (auto& c : plan_stage_chunks(v, chunk_bytes, max_segments)) {
      out.emplace_back();
      for (auto& s : c.segments) out.back().emplace_back(s.src_offset, s.dst_offset, s.length);
    }
    return out;
  }, "segments"_a, "chunk_bytes"_a, "max_segments"_a);
  m.def("adversary_totals", []() { return adversary_dict(Adversary::totals()); });
  m.def("host_id", []() { return host_id(); });
  m.def("process_nonce", []() { return process_nonce(); });

  // The fd broker (fd_broker.h), for tests: serve an fd (ownership passes to the broker), stop
  // serving it, fetch one from a process on this host (TransferError on refusal or timeout).
  m.def("_fd_broker_add", &FdBroker::add, "region_key"_a, "fd"_a);
  m.def("_fd_broker_remove", &FdBroker::remove, "region_key"_a);
  m.def("_fd_broker_fetch", [](uint64_t process_nonce, uint64_t region_key, double timeout) {
    std::string why;
    int fd;
    {
      nb::gil_scoped_release release;
      fd = FdBroker::fetch(process_nonce, region_key, timeout, &why);
    }
    if (fd < 0) throw TransferFailed(why);
    return fd;
  }, "process_nonce"_a, "region_key"_a, "timeout"_a);

  // The imm mailbox (imm_mailbox.h), for tests: post one record into an engine's mailbox from this
  // process, then (keep=False) wait up to `timeout` for its owner to take it and release the ring as
  // a closing sender does, or (keep=True) leave the ring claimed, as a sender that dies does.
  // Returns whether the record was taken. And how many rings of a mailbox have a sender.
  m.def("_mailbox_post", [](uint64_t process_nonce, uint32_t serial, uint32_t imm, uint64_t count, bool keep,
                            double timeout) {
    nb::gil_scoped_release release;
    auto link = MailboxLink::open(process_nonce, serial);
    uint64_t first = 0;
    if (!link->reserve(1, &first)) throw TransferFailed("the ring is full");
    link->store(first, imm, count);
    if (keep) {
      new std::shared_ptr<MailboxLink>(link);  // never released: the ring stays claimed
      return false;
    }
    auto deadline = deadline_after(timeout);
    while (link->taken() <= first && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return link->taken() > first;
  }, "process_nonce"_a, "serial"_a, "imm"_a, "count"_a, "keep"_a, "timeout"_a);
  m.def("_mailbox_senders", &ImmMailbox::senders, "process_nonce"_a, "serial"_a);

  // GPU runtime (CUDA builds; the CPU build reports it unavailable). Helpers for tests and the
  // benchmark: plain device buffers and same-run copy baselines.
  m.def("gpu_available", []() { return gpu_runtime().available(); });
  m.def("gpu_status", []() { return gpu_runtime().status(); });
  m.def("gpu_device_count", []() { return gpu_runtime().device_count(); });
  m.def("gpu_alloc", [](int device, size_t bytes) { return gpu_runtime().device_alloc(device, bytes); },
        "device"_a, "bytes"_a);
  m.def("gpu_free", [](uint64_t ptr) { gpu_runtime().device_free(ptr); }, "ptr"_a);
  m.def("gpu_memcpy", [](uint64_t dst, uint64_t src, size_t bytes) { gpu_runtime().memcpy_sync(dst, src, bytes); },
        "dst"_a, "src"_a, "bytes"_a, nb::call_guard<nb::gil_scoped_release>());
  m.def("bench_peer_copy", [](int src, int dst, size_t bytes, int iters) {
    return gpu_runtime().bench_peer_copy(src, dst, bytes, iters);
  }, "src_device"_a, "dst_device"_a, "bytes"_a, "iters"_a, nb::call_guard<nb::gil_scoped_release>());
  m.def("bench_host_to_device", [](int device, size_t bytes, int iters) {
    return gpu_runtime().bench_host_to_device(device, bytes, iters);
  }, "device"_a, "bytes"_a, "iters"_a, nb::call_guard<nb::gil_scoped_release>());

  m.def("imm_writes", [](const std::string& op, uint32_t domains, uint64_t length, uint64_t pages,
                         const std::string& sharding, uint64_t split_threshold) {
    ShardingPolicy p;
    p.split_threshold = split_threshold;
    return imm_writes(parse_op_kind(op), domains, length, pages, parse_sharding(sharding), p);
  }, "op"_a, "domains"_a, "length"_a, "pages"_a, "sharding"_a, "split_threshold"_a);
}

}  // namespace
}  // namespace jax_garden::fabric

JG_REGISTER_BINDINGS(fabric, jax_garden::fabric::BindFabric);
