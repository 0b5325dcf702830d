# Must run before jax initialises a backend: the MoE CPU suite runs its ranks as 8 CPU devices of
# one process (fabric tests use processes, not devices, and are unaffected).
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()


import numpy as np  # noqa: E402
import pytest  # noqa: E402

# ---- the adversarial delivery mode (docs/testing.md) ----------------------------------------------
# `pytest --adversary=1,2` runs every test marked `adversarial` once per seed with
# JAX_GARDEN_ADVERSARY=seed=N,<--adversary-spec> in its environment (spawned children inherit it),
# so every engine it creates holds back, delays and reorders deliveries; the seed is in the test id
# (`...-adv1]`). Without the option, marked tests run as usual.
ADVERSARY_SPEC = "hold=0.5,msg=0.3,imm=0.3,last=0.5,tail=0.05,delay_ms=3,last_ms=20"


def pytest_addoption(parser):
    parser.addoption("--adversary", metavar="SEEDS", default=None,
                     help="run the tests marked 'adversarial' under the engine's adversarial delivery mode, once "
                          "per seed (comma-separated, e.g. 1,2); the seed is in the test id (adv1)")
    parser.addoption("--adversary-spec", metavar="SPEC", default=ADVERSARY_SPEC,
                     help=f"the mode's other settings (default {ADVERSARY_SPEC})")


def _adversary_seeds(config) -> list[int]:
    raw = config.getoption("adversary")
    if not raw:
        return []
    try:
        return [int(s) for s in raw.split(",") if s.strip()]
    except ValueError:
        raise pytest.UsageError(f"--adversary takes comma-separated integer seeds, got {raw!r}") from None


def pytest_generate_tests(metafunc):
    seeds = _adversary_seeds(metafunc.config)
    if seeds and metafunc.definition.get_closest_marker("adversarial"):
        metafunc.fixturenames.append("adversary_seed")
        metafunc.parametrize("adversary_seed", seeds, ids=[f"adv{s}" for s in seeds])


def adversarial_run() -> bool:
    """True while a test runs under the adversarial mode from --adversary (tests that loop many
    times shorten their loops: every delivery may wait a few milliseconds)."""
    return bool(os.environ.get("JAX_GARDEN_ADVERSARY"))


@pytest.fixture(autouse=True)
def _adversarial_mode(request, monkeypatch):
    """Sets the mode's environment for a test parametrized by --adversary, and checks afterwards that
    the mode acted in the engines this process created (children are not visible from here)."""
    callspec = getattr(request.node, "callspec", None)
    seed = callspec.params.get("adversary_seed") if callspec else None
    if seed is None:
        yield None
        return
    spec = f"seed={seed},{request.config.getoption('adversary_spec')}"
    monkeypatch.setenv("JAX_GARDEN_ADVERSARY", spec)
    from jax_garden import _adversary

    before = _adversary.totals()
    yield spec
    after = _adversary.totals()
    seen = after["pieces"] - before["pieces"]
    if seen >= 20:
        assert after["held"] > before["held"], f"the adversarial mode ({spec}) held none of {seen} pieces"


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


def adversary_quiet(*engines, timeout: float = 10.0) -> None:
    """Wait until the adversarial mode of these engines holds nothing back (no-op where it is off)."""
    import time

    deadline = time.monotonic() + timeout
    for e in engines:
        if e.adversary is None:
            continue
        while e.adversary.stats()["held_now"]:
            assert time.monotonic() < deadline, f"the adversarial mode still holds {e.adversary.stats()}"
            time.sleep(0.002)


def settle_imms(sender, receiver, dst_descriptor, *, probe_imm: int, timeout: float = 10.0) -> None:
    """Once every op ``sender`` posted toward ``dst_descriptor`` completed at the sender, makes sure
    every imm they carry was counted at ``receiver`` (rather than sleeping and hoping). A probe imm
    goes on every sender domain (one barrier to the same peer once per domain), behind what that
    connection carried before: loopback tcp delivers a connection in order and the receiver counts its
    completions in order, so once every probe is counted every earlier imm was too. Pieces and imms the
    adversarial mode holds back are waited out first (its own counters), on both sides."""
    adversary_quiet(sender, timeout=timeout)
    sender.barrier([dst_descriptor] * sender.num_domains, imm=probe_imm).wait(timeout)
    receiver.imm_counter(probe_imm).wait(sender.num_domains, timeout)
    adversary_quiet(receiver, timeout=timeout)


def assert_no_more_imms(counter, expected: int, sender, receiver, dst_descriptor, *, probe_imm: int,
                        timeout: float = 10.0) -> None:
    """``counter`` ends with exactly ``expected`` arrivals, all taken by the test's waits (no imm beyond
    what imm_writes() predicted), proven with settle_imms()."""
    settle_imms(sender, receiver, dst_descriptor, probe_imm=probe_imm, timeout=timeout)
    assert counter.credits == 0 and counter.total == expected, (
        f"{counter.total} imms arrived ({counter.credits} not taken), {expected} expected")
