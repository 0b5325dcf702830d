# Must run before jax initialises a backend: the MoE CPU suite runs its ranks as 8 CPU devices of
# one process (fabric tests use processes, not devices, and are unaffected).
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def engines():
    """engines(domains=1, **kw) makes TransferEngines on the tcp provider (127.0.0.1); all are closed
    when the test ends, pass or fail."""
    from jax_garden import fabric

    made = []

    def make(domains: int = 1, **kw):
        e = fabric.TransferEngine(provider="tcp", domains=domains, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def random_bytes(n: int, seed: int) -> np.ndarray:
    """Reproducible random uint8 contents for transfer checks."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
