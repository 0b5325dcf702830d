// Bindings for jax_garden.fabric (submodule _jax_garden.fabric). No logic: argument conversion,
// GIL handling and exception mapping only.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "common/error.h"
#include "common/registry.h"
#include "fabric/engine.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace jax_garden::fabric {
namespace {

Bytes to_bytes(nb::bytes b) {
  const auto* p = static_cast<const uint8_t*>(b.data());
  return Bytes(p, p + b.size());
}
nb::bytes from_bytes(const Bytes& b) { return nb::bytes(reinterpret_cast<const char*>(b.data()), b.size()); }

ScatterSharding parse_sharding(const std::string& s) {
  if (s == "targets") return ScatterSharding::kTargets;
  if (s == "bytes") return ScatterSharding::kBytes;
  throw InvalidArgument(str_cat("sharding must be 'targets' or 'bytes', got '", s, "'"));
}

// A Python callable that can be copied and dropped on threads that do not hold the GIL.
std::shared_ptr<nb::object> share_callable(nb::object fn) {
  return std::shared_ptr<nb::object>(new nb::object(std::move(fn)), [](nb::object* p) {
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
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const Timeout& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const TransferFailed& e) {
      PyErr_SetString(transfer_error.ptr(), e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const FabricError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  nb::class_<NetAddress>(m, "NetAddress")
      .def_static("from_bytes", [](nb::bytes b) {
        return NetAddress::from_bytes(static_cast<const uint8_t*>(b.data()), b.size());
      }, "data"_a)
      .def("__bytes__", [](const NetAddress& a) { return from_bytes(a.to_bytes()); })
      .def_prop_ro("provider", [](const NetAddress& a) { return a.provider; })
      .def_prop_ro("num_domains", [](const NetAddress& a) { return a.domains.size(); })
      .def("__eq__", [](const NetAddress& a, const NetAddress& b) { return a == b; })
      .def("__hash__", [](const NetAddress& a) { auto b = a.to_bytes(); return checksum32(b.data(), b.size()); })
      .def("__repr__", [](const NetAddress& a) { return "NetAddress(" + a.to_string() + ")"; });

  nb::class_<MemoryDescriptor>(m, "MemoryDescriptor")
      .def_static("from_bytes", [](nb::bytes b) {
        return MemoryDescriptor::from_bytes(static_cast<const uint8_t*>(b.data()), b.size());
      }, "data"_a)
      .def("__bytes__", [](const MemoryDescriptor& d) { return from_bytes(d.to_bytes()); })
      .def_prop_ro("provider", [](const MemoryDescriptor& d) { return d.provider; })
      .def_prop_ro("base", [](const MemoryDescriptor& d) { return d.base; })
      .def_prop_ro("length", [](const MemoryDescriptor& d) { return d.length; })
      .def_prop_ro("num_domains", [](const MemoryDescriptor& d) { return d.domains.size(); })
      .def_prop_ro("is_cuda", [](const MemoryDescriptor& d) { return d.kind == MemoryKind::kCuda; })
      .def_prop_ro("owner", &MemoryDescriptor::owner)
      .def("__eq__", [](const MemoryDescriptor& a, const MemoryDescriptor& b) { return a == b; })
      .def("__repr__", [](const MemoryDescriptor& d) {
        return str_cat("MemoryDescriptor(", d.provider, ", base=0x", std::hex, d.base, std::dec, ", length=", d.length,
                       ", domains=", d.domains.size(), d.kind == MemoryKind::kCuda ? ", cuda" : "", ")");
      });

  nb::class_<TransferState>(m, "Transfer")
      .def("wait", &TransferState::wait, "timeout"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Block until the operation completed; raises TransferError on failure, TimeoutError on timeout.")
      .def_prop_ro("done", [](const TransferState& t) { return t.status() != TransferState::Status::kPending; })
      .def_prop_ro("failed", [](const TransferState& t) {
        auto s = t.status();
        return s == TransferState::Status::kFailed || s == TransferState::Status::kTimedOut;
      })
      .def_prop_ro("error", &TransferState::error)
      .def_prop_ro("id", &TransferState::id)
      .def("__repr__", [](const TransferState& t) {
        const char* names[] = {"pending", "done", "failed", "timed out"};
        return str_cat("Transfer(", t.what(), ", ", names[int(t.status())], ")");
      });

  nb::class_<MemoryRegion>(m, "MemoryRegion")
      .def_prop_ro("descriptor", [](const MemoryRegion& r) { return r.descriptor(); })
      .def_prop_ro("base", &MemoryRegion::base)
      .def_prop_ro("length", &MemoryRegion::length);

  nb::class_<ImmCounter>(m, "ImmCounter")
      .def("wait", &ImmCounter::wait, "count"_a, "timeout"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("on_count", [](ImmCounter& c, int64_t count, nb::object fn) {
        auto shared = share_callable(std::move(fn));
        c.on_count(count, [shared]() { call_python(shared); });
      }, "count"_a, "callback"_a)
      .def_prop_ro("credits", &ImmCounter::credits)
      .def_prop_ro("total", &ImmCounter::total)
      .def_prop_ro("imm", &ImmCounter::imm)
      .def_prop_ro("id", &ImmCounter::id);

  nb::class_<Watcher>(m, "Watcher")
      .def("slot_address", &Watcher::slot_address, "index"_a)
      .def("read", [](Watcher& w, uint32_t i) {
        JG_CHECK_ARG(i < Watcher::kSlots, "watcher slot ", i, " out of range");
        return __atomic_load_n(&w.slots()[i], __ATOMIC_ACQUIRE);
      }, "index"_a)
      .def("store", [](Watcher& w, uint32_t i, uint64_t v) {
        JG_CHECK_ARG(i < Watcher::kSlots, "watcher slot ", i, " out of range");
        __atomic_store_n(&w.slots()[i], v, __ATOMIC_RELEASE);
      }, "index"_a, "value"_a)
      .def_prop_ro_static("num_slots", [](nb::handle) { return Watcher::kSlots; });

  nb::class_<EngineCore>(m, "Engine")
      .def_static("create", [](const std::string& provider, const std::string& node, uint32_t domains,
                               double timeout, uint32_t max_message_bytes, uint64_t split_threshold) {
        EngineOptions o;
        o.provider = provider;
        o.node = node;
        o.domains = domains;
        o.timeout_s = timeout;
        o.max_message_bytes = max_message_bytes;
        o.sharding.split_threshold = split_threshold;
        nb::gil_scoped_release release;
        return EngineCore::create(o);
      }, "provider"_a, "node"_a, "domains"_a, "timeout"_a, "max_message_bytes"_a, "split_threshold"_a)
      .def_prop_ro("address", [](const EngineCore& e) { return e.address(); })
      .def_prop_ro("provider", [](const EngineCore& e) { return e.provider(); })
      .def_prop_ro("num_domains", &EngineCore::num_domains)
      .def_prop_ro("supports_gpu_memory", &EngineCore::provider_supports_hmem)
      .def_prop_ro("timeout", [](const EngineCore& e) { return e.options().timeout_s; })
      .def_prop_ro("split_threshold", [](const EngineCore& e) { return e.options().sharding.split_threshold; })
      .def_prop_ro("max_message_bytes", [](const EngineCore& e) { return e.options().max_message_bytes; })
      .def_prop_ro("closed", &EngineCore::closed)
      .def("register_memory", &EngineCore::register_memory, "ptr"_a, "length"_a, "cuda"_a, "device"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("write", &EngineCore::write, "region"_a, "dst"_a, "length"_a, "src_offset"_a, "dst_offset"_a, "imm"_a)
      .def("write_paged", &EngineCore::write_paged, "region"_a, "dst"_a, "page_bytes"_a, "src_pages"_a,
           "dst_pages"_a, "src_stride"_a, "dst_stride"_a, "src_offset"_a, "dst_offset"_a, "imm"_a)
      .def("scatter", [](EngineCore& e, const std::shared_ptr<MemoryRegion>& r,
                         const std::vector<std::tuple<MemoryDescriptor, uint64_t, uint64_t, uint64_t>>& dsts,
                         const std::string& sharding, std::optional<uint32_t> imm) {
        std::vector<ScatterDestination> v;
        for (auto& [d, len, so, doff] : dsts) v.push_back({d, len, so, doff});
        return e.scatter(r, v, parse_sharding(sharding), imm);
      }, "region"_a, "targets"_a, "sharding"_a, "imm"_a)
      .def("write_imm", &EngineCore::write_imm, "dst"_a, "imm"_a)
      .def("barrier", &EngineCore::barrier, "peers"_a, "imm"_a)
      .def("send", [](EngineCore& e, const NetAddress& to, nb::bytes payload) {
        return e.send(to, to_bytes(payload));
      }, "to"_a, "payload"_a)
      .def("recv", [](EngineCore& e, double timeout) {
        Message m;
        {
          nb::gil_scoped_release release;
          m = e.recv(timeout);
        }
        return std::make_pair(m.sender, from_bytes(m.payload));
      }, "timeout"_a)
      .def("imm_counter", &EngineCore::imm_counter, "imm"_a)
      .def("watcher", [](EngineCore& e, nb::object fn) {
        auto shared = share_callable(std::move(fn));
        return e.watcher([shared](uint32_t s, uint64_t o, uint64_t n) { call_python(shared, s, o, n); });
      }, "callback"_a)
      .def("close", &EngineCore::close, nb::call_guard<nb::gil_scoped_release>());

  m.def("imm_writes", [](const std::string& op, uint32_t domains, uint64_t length, uint64_t pages,
                         const std::string& sharding, uint64_t split_threshold) {
    ShardingPolicy p;
    p.split_threshold = split_threshold;
    return imm_writes(op, domains, length, pages, parse_sharding(sharding), p);
  }, "op"_a, "domains"_a, "length"_a, "pages"_a, "sharding"_a, "split_threshold"_a);
}

}  // namespace
}  // namespace jax_garden::fabric

JG_REGISTER_BINDINGS(fabric, jax_garden::fabric::BindFabric);
