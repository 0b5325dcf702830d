#include "fabric/engine/engine.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <thread>

#include "common/error.h"
#include "fabric/transport/control_plane.h"
#include "fabric/core/gpu_runtime.h"
#include "fabric/transport/jobs.h"
#include "fabric/transport/transport_ipc.h"

namespace jax_garden::fabric {
namespace {

bool fits(uint64_t offset, uint64_t length, uint64_t size) { return offset <= size && length <= size - offset; }

// "<what> to tcp;ofi_rxm[1a2b]": built for every op, on the stack (no heap, no stream formatting).
OpName& describe(OpName& what, const MemoryDescriptor& dst) {
  uint32_t h = dst.domains.empty() ? 0 : checksum32(dst.domains[0].endpoint.data(), dst.domains[0].endpoint.size());
  char tag[8];
  auto r = std::to_chars(tag, tag + sizeof(tag), h & 0xffff, 16);
  what << " to " << dst.provider << "[" << std::string_view(tag, static_cast<size_t>(r.ptr - tag))
       << (dst.domains.size() > 1 ? ",..]" : "]");
  return what;
}

void fill_rma_wr(WorkRequest& wr, const WritePiece& p, const MemoryRegion& src, const MemoryDescriptor& dst,
                 std::optional<uint32_t> imm, uint32_t target) {
  auto& rk = dst.domains[p.domain % dst.domains.size()];
  wr.domain = p.domain;
  wr.target = target;
  wr.local = reinterpret_cast<void*>(src.base() + p.src_offset);
  wr.length = p.length;
  wr.desc = src.desc(p.domain);
  wr.peer_endpoint = rk.endpoint;
  wr.remote_addr = dst.remote_address(p.dst_offset);
  wr.remote_key = rk.key;
  wr.has_imm = imm.has_value();
  wr.imm = imm.value_or(0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// What the worker reports, routed to the engine's tables and transports (under the progress lock).

// It is made before the worker, and the tables and transports it routes to after it: hence the
// engine's ownership struct rather than references to them.
class Engine::Sink final : public CompletionSink {
 public:
  explicit Sink(Owned& own) : own_(own) {}
  void on_imm(uint32_t imm, int64_t n) override { own_.counters->on_imm(imm, n); }
  void on_message(Frame&& frame) override JG_NO_THREAD_SAFETY_ANALYSIS {  // called with progress held
    if (frame.kind == MsgKind::kUser)
      own_.messages.push(Message{std::move(frame.sender), std::move(frame.payload)});
    else
      own_.control->on_frame(std::move(frame));  // never reaches recv()
  }
  bool on_op_failed(Op& op, const std::string& error) override JG_NO_THREAD_SAFETY_ANALYSIS {
    return own_.control->triage(op, error);
  }
  void on_peer_unreachable(const Bytes& owner, const std::string& reason) override {
    own_.peers->mark_unreachable(owner, reason);
  }

 private:
  Owned& own_;
};

// GPU waits whose imms did not arrive in time: released by the worker (see ImmCounterTable).
class Engine::GpuWaitTask final : public WorkerTask {
 public:
  explicit GpuWaitTask(ImmCounterTable& t) : table_(t) {}
  bool advance(Clock::time_point now) override {
    table_.check_gpu_waits(now);
    return false;
  }
  bool busy() const override { return table_.has_gpu_waits(); }

 private:
  ImmCounterTable& table_;
};

// ---------------------------------------------------------------------------------------------
// Construction and close

Engine::Engine(const EngineOptions& options) { own_.options = options; }

std::shared_ptr<Engine> Engine::create(const EngineOptions& options) {
  JG_CHECK_ARG(options.domains >= 1 && options.domains <= kMaxDomains, "domains must be in 1..", kMaxDomains,
               ", got ", options.domains);
  JG_CHECK_ARG(options.timeout_s > 0, "timeout must be > 0 seconds, got ", options.timeout_s);
  JG_CHECK_ARG(options.max_message_bytes >= 1024, "max_message_bytes must be >= 1024, got ",
               options.max_message_bytes);
  JG_CHECK_ARG(options.stage_chunk_bytes >= 4096 && options.stage_chunk_bytes % 4096 == 0,
               "staging_chunk_bytes must be a multiple of 4096 (>= 4096), got ", options.stage_chunk_bytes);
  JG_CHECK_ARG(options.stage_slots >= 1 && options.stage_slots <= 4096, "staging_slots must be in 1..4096, got ",
               options.stage_slots);
  JG_CHECK_ARG(options.max_outstanding_per_peer >= 1, "max_outstanding_per_peer must be >= 1");
  AdversaryOptions adversary;
  std::string spec;
  if (options.adversary) {
    spec = *options.adversary;
  } else if (const char* env = std::getenv("JAX_GARDEN_ADVERSARY")) {
    spec = env;
  }
  bool adversarial;
  try {
    adversarial = AdversaryOptions::parse(spec, &adversary);
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(str_cat(e.what(), options.adversary ? "" : " (from JAX_GARDEN_ADVERSARY)"));
  }
  // The last reference may be dropped on one of the engine's own threads (an op on the worker holding
  // the last region, a Python callback). Those threads cannot join themselves, so the engine is then
  // closed and freed from a short-lived reaper thread instead.
  std::shared_ptr<Engine> e(new Engine(options), [](Engine* p) {
    if (p->on_own_thread())
      std::thread([p] { delete p; }).detach();
    else
      delete p;
  });
  if (adversarial) e->adversary_ = adversary;
  e->start();
  return e;
}

void Engine::start() {
  const EngineOptions& o = own_.options;
  own_.provider = ProviderInfo::select(o.provider, o.node);
  callbacks_ = std::make_shared<CallbackThread>();
  sink_ = std::make_unique<Sink>(own_);
  WorkerOptions wo;
  wo.timeout_s = o.timeout_s;
  wo.max_outstanding_per_peer = o.max_outstanding_per_peer;
  wo.recv_slots = o.recv_slots;
  wo.max_message_bytes = o.max_message_bytes;
  wo.delivery_complete = o.completion == CompletionMode::kDelivery;
  own_.worker = std::make_shared<Worker>(*own_.provider, o.domains, wo, sink_.get(), callbacks_, &keys_,
                                         adversary_ ? std::make_unique<Adversary>(*adversary_) : nullptr);
  own_.address.provider = own_.provider->name;
  for (uint32_t d = 0; d < o.domains; ++d) own_.address.domains.push_back(own_.worker->endpoint(d));
  own_.address_bytes = own_.address.to_bytes();
  own_.imm_target = std::make_unique<ImmTarget>(*own_.worker);
  own_.regions = std::make_shared<RegionTable>(own_.worker, &keys_, o.timeout_s);
  own_.counters = std::make_shared<ImmCounterTable>(own_.worker, callbacks_, o.timeout_s);
  own_.peers = std::make_unique<PeerKnowledge>(o.timeout_s);
  own_.control = std::make_unique<ControlPlane>(*own_.worker, own_.address_bytes, *own_.imm_target, *own_.regions,
                                               *own_.peers, o.timeout_s);
  own_.staging = std::make_unique<StagingTransport>(own_.options, *own_.provider, *own_.worker, *own_.control,
                                                    *own_.regions, own_.address_bytes);
  try {
    own_.mailbox = ImmMailbox::create();
  } catch (const std::exception& e) {
    // No shared memory: same-host peers cannot deliver imms without the network, so its regions
    // offer no ipc path (descriptors carry mailbox 0).
    std::fprintf(stderr, "jax_garden.fabric: no imm mailbox for this engine (%s); the ipc path is off toward it\n",
                 e.what());
  }
  own_.ipc = std::make_unique<IpcTransport>(own_.options, *own_.worker, own_.mailbox.get(), *own_.counters,
                                            *own_.peers);
  own_.jobs = std::make_unique<JobRunner>(own_.worker, o.timeout_s);
  gpu_waits_ = std::make_unique<GpuWaitTask>(*own_.counters);
  own_.worker->start({own_.control.get(), own_.ipc.get(), own_.staging.get(), own_.jobs.get(), gpu_waits_.get()});
}

Engine::~Engine() { close(); }

bool Engine::on_own_thread() const {
  return (own_.worker && own_.worker->on_thread()) || (callbacks_ && callbacks_->on_thread()) ||
         watchers_.on_thread();
}

void Engine::close() {
  MutexLock close_lk(close_mu_);
  if (closed_.exchange(true)) return;
  if (!own_.worker) return;  // start() failed
  if (own_.mailbox) own_.mailbox->close();  // same-host senders' ops toward us fail from now on
  watchers_.stop();
  own_.worker->stop();  // fails the ops in flight
  own_.counters->abort_all("engine closed");
  own_.counters->release_gpu_waits("fabric.wait on GPU: the engine was closed before the imms arrived");
  own_.messages.close();
  {
    ProgressLock pl(*own_.worker);
    own_.jobs->close();
    own_.ipc->close();
    own_.staging->close();
  }
  own_.regions->close_all();
  own_.imm_target->close(*own_.worker);
  own_.worker->close_domains();  // endpoints close: what was still posted is cancelled
  callbacks_->stop();
}

void Engine::check_open(OpKind op) const {
  if (closed()) throw TransferFailed(str_cat(op_kind_name(op), ": the engine is closed"));
}

void Engine::check() {
  std::string e = own_.counters->take_error();
  if (!e.empty()) throw TransferFailed(e);
}

StagingStats Engine::staging_stats() {
  StagingStats s;
  if (!closed()) {
    ProgressLock pl(*own_.worker);
    s = own_.staging->stats();
  }
  s.chunk_bytes = own_.options.stage_chunk_bytes;
  s.ipc_mappings = IpcTransport::mappings();
  auto records = own_.ipc->record_counts();
  s.ipc_stream_records = records[0];
  s.ipc_event_records = records[1];
  s.ipc_host_records = records[2];
  s.ipc_kernel_records = records[3];
  return s;
}

AdversaryStats Engine::adversary_stats() {
  JG_CHECK_ARG(adversary_, "the adversarial delivery mode is off for this engine");
  ProgressLock pl(*own_.worker);  // the worker (and what its adversary counted) outlives close()
  return own_.worker->adversary()->stats();
}

void Engine::adversary_hold(uint32_t imm, uint32_t mask, uint64_t skip) {
  JG_CHECK_ARG(adversary_, "adversary.hold: the adversarial delivery mode is off for this engine");
  if (closed()) throw TransferFailed("adversary.hold: the engine is closed");
  ProgressLock pl(*own_.worker);
  own_.worker->adversary()->add_rule(imm, mask, skip);
}

uint64_t Engine::adversary_release(uint32_t imm, uint32_t mask) {
  JG_CHECK_ARG(adversary_, "adversary.release: the adversarial delivery mode is off for this engine");
  if (closed()) return 0;
  uint64_t n;
  {
    ProgressLock pl(*own_.worker);
    n = own_.worker->adversary()->release_rule(imm, mask);
  }
  own_.worker->wake();
  return n;
}

uint64_t Engine::adversary_holding(uint32_t imm, uint32_t mask) {
  JG_CHECK_ARG(adversary_, "adversary.holding: the adversarial delivery mode is off for this engine");
  if (closed()) return 0;
  ProgressLock pl(*own_.worker);
  return own_.worker->adversary()->holding(imm, mask);
}

// ---------------------------------------------------------------------------------------------
// Counters, watchers, messages

std::shared_ptr<ImmCounter> Engine::imm_counter(uint32_t imm) {
  if (closed()) throw TransferFailed("imm_counter: the engine is closed");
  return own_.counters->counter(imm);
}

std::shared_ptr<Watcher> Engine::watcher(Watcher::Callback cb) {
  if (closed()) throw TransferFailed("watcher: the engine is closed");
  auto w = std::make_shared<Watcher>(callbacks_, std::move(cb));
  watchers_.add(w);
  return w;
}

std::shared_ptr<TransferState> Engine::send(const NetAddress& to, const Bytes& payload, MsgKind kind) {
  check_open(OpKind::kSend);
  JG_CHECK_ARG(to.provider == provider(), "send: the address is for provider '", to.provider,
               "' but this engine uses '", provider(), "'");
  size_t header = frame_header_bytes(own_.address_bytes);
  JG_CHECK_ARG(payload.size() + header <= own_.options.max_message_bytes, "send: payload of ", payload.size(),
               " bytes exceeds the control-message limit of ", own_.options.max_message_bytes - header,
               " bytes (max_message_bytes=", own_.options.max_message_bytes, " minus a ", header,
               "-byte header); use a write for bulk data");
  OpName what(str_cat("send of ", payload.size(), " bytes to ", to.to_string()));
  if (std::string why = own_.peers->unreachable(to.domains[0]); !why.empty()) {
    auto state = new_state(what);
    state->finish(TransferState::Status::kFailed, "the peer is unreachable: " + why + "; not posted");
    return state;
  }
  auto op = own_.control->make_send_op(to.domains[0], kind, payload);
  op->user = true;
  op->state = new_state(what);
  op->deadline = deadline_after(own_.options.timeout_s);
  auto state = op->state;
  own_.worker->submit(std::move(op));
  return state;
}

Message Engine::recv(double timeout_s) {
  if (closed()) throw TransferFailed("recv: the engine is closed");
  return own_.messages.pop(timeout_s, own_.worker.get());
}

// ---------------------------------------------------------------------------------------------
// Registration

std::shared_ptr<MemoryRegion> Engine::register_memory(uint64_t ptr, uint64_t length, bool cuda, bool staged) {
  if (closed()) throw TransferFailed("register: the engine is closed");
  JG_CHECK_ARG(ptr != 0, "register: null pointer");
  JG_CHECK_ARG(length > 0, "register: length must be > 0, got ", length);
  JG_CHECK_ARG(ptr + length > ptr, "register: region [0x", std::hex, ptr, ", +0x", length, ") wraps around");
  MemoryRegion::Init init;
  init.id = next_id_.fetch_add(1);
  init.base = ptr;
  init.length = length;
  auto& desc = init.descriptor;
  desc.provider = provider();
  desc.base = ptr;
  desc.length = length;
  desc.virtual_addressing = own_.provider->virtual_addressing;
  desc.kind = cuda ? MemoryKind::kCuda : MemoryKind::kHost;
  desc.device = -1;
  desc.imm_base = own_.imm_target->address();
  desc.stage_chunk_bytes = own_.options.stage_chunk_bytes;
  desc.host_id = host_id();
  desc.pid = static_cast<uint32_t>(getpid());
  desc.process_nonce = process_nonce();
  desc.mailbox = own_.mailbox ? own_.mailbox->serial() : kNoMailbox;

  RegistrationCaps caps;
  caps.provider_hmem = own_.provider->hmem;
#ifdef FI_MR_DMABUF
  caps.headers_dmabuf = true;
#endif
  caps.runtime_dmabuf = fi_version() >= FI_VERSION(1, 20);
  int device = -1;
  if (cuda) {
    GpuRuntime& rt = gpu_runtime();
    if (!rt.available()) {
      throw InvalidArgument(str_cat("register: provider '", provider(), "' cannot use GPU memory here: ", rt.status()));
    }
    PointerInfo pi = rt.query(ptr);
    if (!pi.is_device) {
      throw InvalidArgument(str_cat("register: provider '", provider(), "' was given GPU memory at 0x", std::hex, ptr,
                                    " but CUDA does not know the pointer as device memory"));
    }
    JG_CHECK_ARG(ptr + length <= pi.alloc_base + pi.alloc_size, "register: [0x", std::hex, ptr, ", +0x", length,
                 ") runs past the end of its CUDA allocation [0x", pi.alloc_base, ", +0x", pi.alloc_size, ")");
    device = pi.device;
    desc.device = device;
    if (!pi.is_managed) {
      try {
        desc.ipc_handle = rt.ipc_export(pi.alloc_base);
        desc.ipc_offset = ptr - pi.alloc_base;
        desc.pci_bus_id = rt.pci_bus_id(device);
        desc.has_ipc = !desc.pci_bus_id.empty();
      } catch (const std::exception& e) {
        init.note = str_cat("no CUDA IPC export (", e.what(), ")");
        desc.has_ipc = false;
      }
      if (!desc.has_ipc && own_.options.vmm_ipc) {
        // cuMemCreate memory (XLA's buffers): offered through an exported fd instead (the
        // region table exports it once the region has its key).
        GpuRuntime::VmmRange v = rt.vmm_range(ptr);
        if (v.vmm && v.fd_exportable && ptr >= v.base && ptr + length <= v.base + v.size) {
          desc.ipc_kind = IpcKind::kVmm;
          desc.ipc_offset = ptr - v.base;
          desc.ipc_range_bytes = v.size;
          desc.pci_bus_id = rt.pci_bus_id(device);
          desc.has_ipc = !desc.pci_bus_id.empty();
        } else if (v.vmm) {
          init.note += v.fd_exportable ? "; its VMM range does not hold the whole region"
                                       : "; its VMM allocation is not exportable as a file descriptor";
        }
      }
    }
    struct utsname u {};
    caps.kernel_dmabuf = uname(&u) == 0 && kernel_release_at_least(u.release, 5, 12);
    caps.device_dmabuf = rt.dmabuf_supported(device);
  }
  RegistrationArgs args = plan_registration(desc.kind, device, staged, caps);
  int dmabuf_fd = -1;
  uint64_t dmabuf_offset = 0;
  if (args.mode == RegistrationMode::kHmemDmabuf) {
    PointerInfo pi = gpu_runtime().query(ptr);
    dmabuf_fd = gpu_runtime().dmabuf_fd(pi.alloc_base, pi.alloc_size);
    dmabuf_offset = ptr - pi.alloc_base;
    if (dmabuf_fd < 0) {
      RegistrationCaps no_dmabuf = caps;
      no_dmabuf.device_dmabuf = false;
      args = plan_registration(desc.kind, device, staged, no_dmabuf);
    }
  }
  struct CloseFd {
    int fd;
    ~CloseFd() {
      if (fd >= 0) ::close(fd);
    }
  } close_fd{dmabuf_fd};
  return own_.regions->add(std::move(init), args, dmabuf_fd, dmabuf_offset, own_.imm_target->keys());
}

// ---------------------------------------------------------------------------------------------
// Validation, planning and routing

void Engine::check_destination(const MemoryDescriptor& dst, const char* op) const {
  JG_CHECK_ARG(dst.provider == provider(), op, ": the destination descriptor is for provider '", dst.provider,
               "' but this engine uses '", provider(), "'");
  JG_CHECK_ARG(!dst.domains.empty(), op, ": the destination descriptor has no domains");
}

std::shared_ptr<TransferState> Engine::new_state(const OpName& what) {
  auto s = std::make_shared<TransferState>(next_id_.fetch_add(1), what);
  s->set_driver(own_.worker);
  return s;
}

std::shared_ptr<TransferState> Engine::known_failure(const MemoryDescriptor& dst, const OpName& what) {
  std::string why;
  if (std::string down = own_.peers->unreachable(dst.domains[0].endpoint); !down.empty()) {
    why = "the peer is unreachable: " + down + "; not posted";
  } else if (own_.peers->gone(dst)) {
    why = str_cat("the peer no longer has region [0x", std::hex, dst.base, ", +", std::dec, dst.length,
                  ") (an earlier write found it deregistered: a stale descriptor); not posted");
  } else {
    return nullptr;
  }
  auto state = new_state(what);
  state->finish(TransferState::Status::kFailed, why);
  return state;
}

OpTarget Engine::target_of(const MemoryDescriptor& dst, uint32_t domain) {
  return {dst.domains[0].endpoint, dst.region_key, dst.domains[domain % dst.domains.size()].key, dst.base, dst.length};
}

std::unique_ptr<Job> Engine::new_job(const OpName& what, uint64_t bytes, const std::shared_ptr<MemoryRegion>& src) {
  auto job = std::make_unique<Job>();
  job->state = new_state(what);
  job->deadline = deadline_after(own_.options.op_timeout(bytes));
  job->src = src;
  return job;
}

void Engine::check_ipc_range(const MemoryDescriptor& dst, uint64_t offset, uint64_t length, const char* op) const {
  bool gone = false;
  std::string why = own_.ipc->check_destination(dst, offset, length, &gone);
  if (why.empty() || gone) return;  // a gone region fails the Transfer (the part reports it)
  throw InvalidArgument(str_cat(op, ": destination ", why));
}

void Engine::add_staged_part(Job& job, const PathChoice& choice, const MemoryDescriptor& dst,
                             std::vector<StageSegment> segments, std::optional<uint32_t> imm, uint64_t imm_count) {
  StagedPart::Spec spec;
  spec.dst = std::make_shared<const MemoryDescriptor>(dst);
  spec.segments = std::move(segments);
  spec.stage_src = choice.stage_src;
  spec.stage_dst = choice.stage_dst;
  spec.has_imm = imm.has_value();
  spec.imm = imm.value_or(0);
  spec.imm_count = imm ? imm_count : 0;
  job.parts.push_back(own_.staging->make_part(&job, std::move(spec)));
}

std::shared_ptr<IpcOp> Engine::new_ipc_op(const OpName& what, uint32_t parts) {
  auto op = std::make_shared<IpcOp>(next_id_.fetch_add(1), what, parts);
  op->set_driver(own_.worker);
  return op;
}

PathQuery Engine::path_query(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) const {
  PathQuery q;
  q.requested = path == TransferPath::kAuto ? own_.options.default_path : path;
  q.src_cuda = src.cuda();
  q.src_staged = src.staged();
  q.dst_cuda = dst.kind == MemoryKind::kCuda;
  q.dst_staged = dst.staged;
  q.dst_has_ipc = dst.has_ipc && dst.region_slot != kNoRegionSlot;
  q.same_host = dst.host_id == host_id();
  q.same_process = q.same_host && dst.process_nonce == process_nonce() && dst.region_slot != kNoRegionSlot;
  q.dst_mailbox = dst.mailbox != kNoMailbox;
  q.gpu_can_map =
      (q.requested == TransferPath::kAuto || q.requested == TransferPath::kIpc) && own_.ipc->gpu_can_map(src, dst);
  return q;
}

PathChoice Engine::path_for(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) const {
  PathQuery q = path_query(src, dst, path);
  PathChoice c = choose_path(q);
  if (q.requested == TransferPath::kAuto && c.path == TransferPath::kStaged && q.src_cuda && q.dst_cuda &&
      q.same_host && !q.same_process && q.dst_has_ipc && !q.gpu_can_map) {
    // The classic pinned process (CUDA_VISIBLE_DEVICES): it works, staged, but far from device speed.
    static std::once_flag warned;
    std::call_once(warned, [&] {
      std::string why;
      own_.ipc->gpu_can_map(src, dst, &why);
      std::fprintf(stderr,
                   "jax_garden.fabric: GPU writes to a process on this host take the staged path (through host "
                   "memory), not ipc: %s. Let every process see every GPU and pick the one JAX uses with "
                   "jax.config.update(\"jax_cuda_visible_devices\", ...) or jax.distributed's local_device_ids.\n",
                   why.c_str());
    });
  }
  return c;
}

std::string Engine::path_reason(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) const {
  PathQuery q = path_query(src, dst, path);
  std::string why = explain_path(q, choose_path(q));
  std::string gpu;
  if (q.src_cuda && q.dst_cuda && q.same_host && !q.gpu_can_map && !own_.ipc->gpu_can_map(src, dst, &gpu))
    why += " (" + gpu + ")";
  return why;
}

PathChoice Engine::prepare(const MemoryRegion& src, const MemoryDescriptor& dst, TransferPath path) {
  if (closed()) throw TransferFailed("prepare: the engine is closed");
  JG_CHECK_ARG(src.registered_with(own_.regions.get()), "prepare: the source region was not registered with this engine");
  check_destination(dst, "prepare");
  PathChoice choice = path_for(src, dst, path);
  if (choice.path == TransferPath::kIpc) own_.ipc->prepare(dst, src.cuda() ? src.device() : -1);
  return choice;
}

std::shared_ptr<TransferState> Engine::write(const WriteRequest& r) {
  check_open(OpKind::kWrite);
  JG_CHECK_ARG(r.src && r.src->registered_with(own_.regions.get()),
               "write: the source region was not registered with this engine");
  JG_CHECK_ARG(r.dst, "write: no destination descriptor");
  const MemoryDescriptor& dst = *r.dst;
  check_destination(dst, "write");
  JG_CHECK_ARG(fits(r.src_offset, r.length, r.src->length()), "write: source bytes [", r.src_offset, ", ",
               r.src_offset + r.length, ") run past the end of the source region (", r.src->length(), " bytes)");
  JG_CHECK_ARG(fits(r.dst_offset, r.length, dst.length), "write: destination bytes [", r.dst_offset, ", ",
               r.dst_offset + r.length, ") run past the end of the destination region (", dst.length, " bytes)");
  PathChoice choice = path_for(*r.src, dst, r.path);
  if (choice.path == TransferPath::kIpc) check_ipc_range(dst, r.dst_offset, r.length, "write");
  OpName what;
  describe(what << "write of " << r.length << " bytes", dst);
  if (auto failed = known_failure(dst, what)) return failed;
  uint64_t count = imm_writes(OpKind::kWrite, num_domains(), r.length, 0, ScatterSharding::kTargets,
                              own_.options.sharding);
  if (choice.path == TransferPath::kIpc) {
    auto op = new_ipc_op(what, 1);
    CopySegment seg{r.dst_offset, r.src_offset, r.length};
    IpcCopySpec spec;
    spec.segments = &seg;
    spec.num_segments = 1;
    spec.has_imm = r.imm.has_value();
    spec.imm = r.imm.value_or(0);
    spec.imm_count = count;
    own_.ipc->start(op, r.src, dst, spec, deadline_after(own_.options.op_timeout(r.length)));
    return op;
  }
  if (choice.path == TransferPath::kStaged) {
    auto job = new_job(what, r.length, r.src);
    add_staged_part(*job, choice, dst, {{r.src_offset, r.dst_offset, r.length}}, r.imm, count);
    auto state = job->state;
    own_.jobs->submit(std::move(job));
    return state;
  }
  auto pieces = plan_write(r.length, r.src_offset, r.dst_offset, num_domains(), round_robin_.fetch_add(1),
                           own_.options.sharding);
  return submit_rma(OpKind::kWrite, what, r.length, r.src, dst, pieces, r.imm);
}

// One user op of RMA pieces toward one destination.
std::shared_ptr<TransferState> Engine::submit_rma(OpKind kind, const OpName& what, uint64_t bytes,
                                                  const std::shared_ptr<MemoryRegion>& src, const MemoryDescriptor& dst,
                                                  const std::vector<WritePiece>& pieces, std::optional<uint32_t> imm) {
  auto op = std::make_unique<Op>();
  op->kind = kind;
  op->user = true;
  op->state = new_state(what);
  op->deadline = deadline_after(own_.options.op_timeout(bytes));
  op->keep_region = src;
  op->targets.push_back(target_of(dst, pieces.empty() ? 0 : pieces[0].domain));
  op->wrs.resize(pieces.size());
  for (size_t i = 0; i < pieces.size(); ++i) fill_rma_wr(op->wrs[i], pieces[i], *src, dst, imm, 0);
  auto state = op->state;
  own_.worker->submit(std::move(op));
  return state;
}

std::shared_ptr<TransferState> Engine::write_paged(const PagedWriteRequest& r) {
  check_open(OpKind::kPaged);
  JG_CHECK_ARG(r.src && r.src->registered_with(own_.regions.get()),
               "write_paged: the source region was not registered with this engine");
  JG_CHECK_ARG(r.dst, "write_paged: no destination descriptor");
  const MemoryDescriptor& dst = *r.dst;
  check_destination(dst, "write_paged");
  JG_CHECK_ARG(r.src_pages.size() == r.dst_pages.size(), "write_paged: ", r.src_pages.size(), " source pages but ",
               r.dst_pages.size(), " destination pages");
  JG_CHECK_ARG(r.page_bytes > 0, "write_paged: page_bytes must be > 0");
  JG_CHECK_ARG(r.src_stride >= r.page_bytes || r.src_pages.size() <= 1, "write_paged: src_stride ", r.src_stride,
               " is smaller than page_bytes ", r.page_bytes, " (pages would overlap)");
  JG_CHECK_ARG(r.dst_stride >= r.page_bytes || r.dst_pages.size() <= 1, "write_paged: dst_stride ", r.dst_stride,
               " is smaller than page_bytes ", r.page_bytes, " (pages would overlap)");
  uint64_t max_src = 0, max_dst = 0;
  for (uint32_t p : r.src_pages) max_src = std::max<uint64_t>(max_src, p);
  for (uint32_t p : r.dst_pages) max_dst = std::max<uint64_t>(max_dst, p);
  if (!r.src_pages.empty()) {
    JG_CHECK_ARG(max_src <= (std::numeric_limits<uint64_t>::max() - r.src_offset) / std::max<uint64_t>(r.src_stride, 1) &&
                     fits(r.src_offset + max_src * r.src_stride, r.page_bytes, r.src->length()),
                 "write_paged: source page ", max_src, " (offset ", r.src_offset, " + ", max_src, " x stride ",
                 r.src_stride, ", ", r.page_bytes, " bytes) runs past the end of the source region (", r.src->length(),
                 " bytes)");
    JG_CHECK_ARG(max_dst <= (std::numeric_limits<uint64_t>::max() - r.dst_offset) / std::max<uint64_t>(r.dst_stride, 1) &&
                     fits(r.dst_offset + max_dst * r.dst_stride, r.page_bytes, dst.length),
                 "write_paged: destination page ", max_dst, " (offset ", r.dst_offset, " + ", max_dst, " x stride ",
                 r.dst_stride, ", ", r.page_bytes, " bytes) runs past the end of the destination region (", dst.length,
                 " bytes)");
  }
  PathChoice choice = path_for(*r.src, dst, r.path);
  if (choice.path == TransferPath::kIpc && !r.src_pages.empty())
    check_ipc_range(dst, r.dst_offset, max_dst * r.dst_stride + r.page_bytes, "write_paged");
  OpName what;
  describe(what << "paged write of " << uint64_t(r.src_pages.size()) << " x " << r.page_bytes << " bytes", dst);
  if (auto failed = known_failure(dst, what)) return failed;
  uint64_t bytes = r.page_bytes * r.src_pages.size();
  uint64_t count = imm_writes(OpKind::kPaged, num_domains(), 0, r.src_pages.size(), ScatterSharding::kTargets,
                              own_.options.sharding);
  if (choice.path == TransferPath::kIpc) {
    // One copy kernel (or memcpy loop) over the caller's page lists, no piece list.
    auto op = new_ipc_op(what, 1);
    PagedCopy pc;  // offsets: resolved against the mapped bases when the copy starts
    pc.src = r.src_offset;
    pc.dst = r.dst_offset;
    pc.page_bytes = r.page_bytes;
    pc.src_stride = r.src_stride;
    pc.dst_stride = r.dst_stride;
    pc.src_pages = r.src_pages.data();
    pc.dst_pages = r.dst_pages.data();
    pc.pages = r.src_pages.size();
    IpcCopySpec spec;
    spec.pages = &pc;
    spec.has_imm = r.imm.has_value();
    spec.imm = r.imm.value_or(0);
    spec.imm_count = count;
    own_.ipc->start(op, r.src, dst, spec, deadline_after(own_.options.op_timeout(bytes)));
    return op;
  }
  std::vector<WritePiece> pieces = plan_paged(r.page_bytes, r.src_pages, r.dst_pages, r.src_stride, r.dst_stride,
                                              r.src_offset, r.dst_offset, num_domains(), round_robin_.fetch_add(1));
  if (choice.path == TransferPath::kStaged) {
    auto job = new_job(what, bytes, r.src);
    std::vector<StageSegment> segs;
    segs.reserve(pieces.size());
    for (auto& p : pieces) segs.push_back({p.src_offset, p.dst_offset, p.length});
    add_staged_part(*job, choice, dst, std::move(segs), r.imm, count);
    auto state = job->state;
    own_.jobs->submit(std::move(job));
    return state;
  }
  return submit_rma(OpKind::kPaged, what, bytes, r.src, dst, pieces, r.imm);
}

std::shared_ptr<TransferState> Engine::scatter(const ScatterRequest& r) {
  check_open(OpKind::kScatter);
  JG_CHECK_ARG(r.src && r.src->registered_with(own_.regions.get()),
               "scatter: the source region was not registered with this engine");
  JG_CHECK_ARG(!r.targets.empty(), "scatter: the destination list is empty");
  std::vector<ScatterTarget> targets;
  std::vector<PathChoice> choices;
  uint64_t total = 0;
  bool all_fabric = true, all_ipc = true;
  // Targets to one destination usually come in runs sharing a descriptor (always with a
  // ScatterTargetList): its checks and path choice are made once per run.
  const MemoryDescriptor* checked = nullptr;
  PathChoice choice{};
  for (size_t i = 0; i < r.targets.size(); ++i) {
    const auto& t = r.targets[i];
    JG_CHECK_ARG(t.dst, "scatter: target ", i, " has no descriptor");
    if (t.dst != checked) {
      check_destination(*t.dst, "scatter");
      choice = path_for(*r.src, *t.dst, r.path);
      checked = t.dst;
    }
    JG_CHECK_ARG(fits(t.src_offset, t.length, r.src->length()), "scatter: target ", i, ": source bytes [",
                 t.src_offset, ", ", t.src_offset + t.length, ") run past the end of the source region (",
                 r.src->length(), " bytes)");
    JG_CHECK_ARG(fits(t.dst_offset, t.length, t.dst->length), "scatter: target ", i, ": destination bytes [",
                 t.dst_offset, ", ", t.dst_offset + t.length, ") run past the end of the destination region (",
                 t.dst->length, " bytes)");
    targets.push_back({t.length, t.src_offset, t.dst_offset});
    total += t.length;
    choices.push_back(choice);
    if (choices.back().path == TransferPath::kIpc) check_ipc_range(*t.dst, t.dst_offset, t.length, "scatter");
    all_fabric &= choices.back().path == TransferPath::kFabric;
    all_ipc &= choices.back().path == TransferPath::kIpc;
  }
  OpName what;
  what << "scatter of " << total << " bytes to " << uint64_t(r.targets.size()) << " targets";
  checked = nullptr;
  for (const auto& t : r.targets) {
    if (t.dst == checked) continue;
    if (auto failed = known_failure(*t.dst, what)) return failed;
    checked = t.dst;
  }
  const uint64_t per_target = imm_writes(OpKind::kScatter, num_domains(), 0, 0, r.sharding, own_.options.sharding);
  // IPC targets go in runs of consecutive targets to one destination region: one batched copy and
  // one imm record per run. The same region whether the caller passed one descriptor object or
  // several copies of it (a plain target list converts each target's descriptor separately).
  auto same_region = [](const MemoryDescriptor* a, const MemoryDescriptor* b) {
    return a == b || (a->process_nonce == b->process_nonce && a->region_key == b->region_key &&
                      a->region_slot == b->region_slot && a->base == b->base && a->host_id == b->host_id);
  };
  auto ipc_runs = [&](auto&& fn) {
    for (size_t i = 0; i < r.targets.size();) {
      if (choices[i].path != TransferPath::kIpc) {
        ++i;
        continue;
      }
      size_t j = i + 1;
      while (j < r.targets.size() && same_region(r.targets[j].dst, r.targets[i].dst) &&
             choices[j].path == TransferPath::kIpc)
        ++j;
      fn(i, j);
      i = j;
    }
  };
  if (all_ipc) {
    uint32_t runs = 0;
    ipc_runs([&](size_t, size_t) { ++runs; });
    auto op = new_ipc_op(what, runs);
    auto deadline = deadline_after(own_.options.op_timeout(total));
    thread_local std::vector<CopySegment> segs;
    ipc_runs([&](size_t i, size_t j) {
      segs.clear();
      for (size_t k = i; k < j; ++k) segs.push_back({r.targets[k].dst_offset, r.targets[k].src_offset, r.targets[k].length});
      IpcCopySpec spec;
      spec.segments = segs.data();
      spec.num_segments = segs.size();
      spec.has_imm = r.imm.has_value();
      spec.imm = r.imm.value_or(0);
      spec.imm_count = per_target * (j - i);
      own_.ipc->start(op, r.src, *r.targets[i].dst, spec, deadline);
    });
    return op;
  }
  auto pieces = plan_scatter(targets, num_domains(), r.sharding, round_robin_.fetch_add(1));
  auto op = std::make_unique<Op>();
  op->kind = OpKind::kScatter;
  op->user = true;
  op->keep_region = r.src;
  std::vector<int> target_index(r.targets.size(), -1);
  for (const auto& p : pieces) {
    if (choices[p.target].path != TransferPath::kFabric) continue;
    if (target_index[p.target] < 0) {
      target_index[p.target] = static_cast<int>(op->targets.size());
      op->targets.push_back(target_of(*r.targets[p.target].dst, p.domain));
    }
    op->wrs.emplace_back();
    fill_rma_wr(op->wrs.back(), p, *r.src, *r.targets[p.target].dst, r.imm, static_cast<uint32_t>(target_index[p.target]));
  }
  if (all_fabric) {
    op->state = new_state(what);
    op->deadline = deadline_after(own_.options.op_timeout(total));
    auto state = op->state;
    own_.worker->submit(std::move(op));
    return state;
  }
  // Mixed paths: one job, a part per staged target, one for the IPC runs and one for the RMA targets.
  auto job = new_job(what, total, r.src);
  for (size_t i = 0; i < r.targets.size(); ++i) {
    if (choices[i].path != TransferPath::kStaged) continue;
    const auto& t = r.targets[i];
    add_staged_part(*job, choices[i], *t.dst, {{t.src_offset, t.dst_offset, t.length}}, r.imm, per_target);
  }
  std::vector<IpcPart::Target> ipc_targets;
  ipc_runs([&](size_t i, size_t j) {
    IpcPart::Target t;
    t.dst = std::make_shared<const MemoryDescriptor>(*r.targets[i].dst);
    for (size_t k = i; k < j; ++k) t.segments.push_back({r.targets[k].dst_offset, r.targets[k].src_offset, r.targets[k].length});
    t.imm_count = per_target * (j - i);
    ipc_targets.push_back(std::move(t));
  });
  if (!ipc_targets.empty()) job->parts.push_back(std::make_unique<IpcPart>(job.get(), std::move(ipc_targets), r.imm, *own_.ipc));
  if (!op->wrs.empty()) {
    op->state = new_state(OpName(what) << " (RMA targets)");
    op->deadline = job->deadline;
    job->parts.push_back(std::make_unique<FabricPart>(job.get(), std::move(op), *own_.worker));
  }
  auto state = job->state;
  own_.jobs->submit(std::move(job));
  return state;
}

// One zero-byte write with `imm` to each peer (write_imm and barrier; no descriptor copies, no
// stream formatting: this is the small-message hot path).
std::shared_ptr<TransferState> Engine::write_imm(const ImmRequest& r) {
  const char* name = op_kind_name(r.kind);
  check_open(r.kind);
  JG_CHECK_ARG(r.kind == OpKind::kImm || r.kind == OpKind::kBarrier, name, ": not an imm-only operation");
  JG_CHECK_ARG(!r.peers.empty(), name, ": the peer list is empty");
  JG_CHECK_ARG(r.kind == OpKind::kBarrier || r.peers.size() == 1, name, ": one peer expected, got ", r.peers.size());
  for (const MemoryDescriptor* p : r.peers) {
    JG_CHECK_ARG(p, name, ": a peer descriptor is missing");
    check_destination(*p, name);
  }
  OpName what;
  if (r.peers.size() == 1 && r.kind == OpKind::kImm)
    describe(what << "imm write", *r.peers[0]);
  else
    what << "barrier to " << uint64_t(r.peers.size()) << " peers";
  for (const MemoryDescriptor* p : r.peers)
    if (std::string down = own_.peers->unreachable(p->domains[0].endpoint); !down.empty()) {
      auto state = new_state(what);
      state->finish(TransferState::Status::kFailed, "a peer is unreachable: " + down + "; not posted");
      return state;
    }
  auto op = std::make_unique<Op>();
  op->kind = r.kind;
  op->user = true;
  op->state = new_state(what);
  op->deadline = deadline_after(own_.options.timeout_s);
  op->wrs.resize(r.peers.size());
  op->targets.reserve(r.peers.size());
  uint32_t first = round_robin_.fetch_add(1);
  for (size_t i = 0; i < r.peers.size(); ++i) {
    own_.imm_target->fill(op->wrs[i], *r.peers[i], static_cast<uint32_t>((first + i) % num_domains()), r.imm);
    op->wrs[i].target = static_cast<uint32_t>(i);
    op->targets.push_back({r.peers[i]->domains[0].endpoint, 0, 0, 0, 0});
  }
  auto state = op->state;
  own_.worker->submit(std::move(op));
  return state;
}

}  // namespace jax_garden::fabric
