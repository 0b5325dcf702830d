"""What every host-side service (kv, weights, and MoE across nodes) stands on, one module per thing:

* ``codec``     little-endian fields, sealed frames, typed messages (a frozen dataclass each);
* ``tags``      the imm tags and mailbox protocol ids of every service, so no two collide;
* ``mailbox``   one mailbox per engine over its control messages: doorbells, resends, de-duplication,
                routing by protocol, liveness probes, timers;
* ``bootstrap`` publish / fetch / barrier over jax.distributed's key-value store or the caller's
                functions.

Internal to jax_garden: services build on these; applications use the services.
"""
