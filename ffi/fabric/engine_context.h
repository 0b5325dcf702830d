// What the engine's transports share: the worker, the settings, the engine's identity and tables.
// The facade (engine.h) builds one and owns it; transports hold a reference.
#pragma once

#include <memory>

#include "fabric/domain.h"
#include "fabric/engine_parts.h"
#include "fabric/imm_counter.h"
#include "fabric/imm_mailbox.h"
#include "fabric/options.h"
#include "fabric/region.h"
#include "fabric/worker.h"

namespace jax_garden::fabric {

class ControlPlane;
class StagingTransport;
class IpcTransport;
class JobRunner;

struct EngineContext {
  EngineOptions options;
  std::unique_ptr<ProviderInfo> provider;
  std::shared_ptr<Worker> worker;
  NetAddress address;
  Bytes address_bytes;  // this engine's NetAddress, as frames carry it
  std::unique_ptr<ImmTarget> imm_target;
  std::shared_ptr<RegionTable> regions;
  std::shared_ptr<ImmCounterTable> counters;
  std::shared_ptr<ImmMailbox> mailbox;  // where same-host engines deliver imms (null: none)
  MessageQueue messages;
  std::unique_ptr<PeerKnowledge> peers;
  // Transports, run by the worker in its passes (worker tasks).
  std::unique_ptr<ControlPlane> control;
  std::unique_ptr<StagingTransport> staging;
  std::unique_ptr<IpcTransport> ipc;
  std::unique_ptr<JobRunner> jobs;

  uint32_t num_domains() const { return static_cast<uint32_t>(address.domains.size()); }
};

}  // namespace jax_garden::fabric
