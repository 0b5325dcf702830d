# Must run before jax initialises a backend: the MoE CPU suite runs its ranks as 8 CPU devices of
# one process (fabric tests use processes, not devices, and are unaffected).
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
