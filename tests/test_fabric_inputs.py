"""Bad arguments to the waits of jax_garden.fabric get a clear error at once (ValueError for a wrong
value, TypeError for a wrong type), never an unbounded or silently shortened wait."""

from __future__ import annotations

import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def engine():
    from jax_garden import fabric

    eng = fabric.TransferEngine(provider="tcp")
    yield eng
    eng.close()


@pytest.mark.parametrize("timeout", [-1, -0.5, math.nan, math.inf])
def test_transfer_wait_rejects_unbounded_or_negative_timeouts(engine, timeout):
    buf = np.zeros(64, np.uint8)
    region = engine.register(buf)
    t = engine.write(region, region.descriptor, 16, imm=1)
    with pytest.raises(ValueError, match=r"Transfer.wait: timeout must be None or a finite number"):
        t.wait(timeout)
    t.wait(10)  # the op itself is untouched by the refused wait
    t.wait()
    t.wait(0)
    engine.imm_counter(1).wait(1, timeout=10)


def test_transfer_wait_rejects_a_non_number(engine):
    buf = np.zeros(64, np.uint8)
    region = engine.register(buf)
    t = engine.write(region, region.descriptor, 16, imm=2)
    with pytest.raises(TypeError):
        t.wait("10")
    t.wait(10)
    engine.imm_counter(2).wait(1, timeout=10)


@pytest.mark.parametrize("timeout", [-1, math.nan, math.inf])
def test_imm_counter_wait_rejects_unbounded_or_negative_timeouts(engine, timeout):
    counter = engine.imm_counter(3)
    with pytest.raises(ValueError, match="ImmCounter.wait: timeout must be a finite number"):
        counter.wait(1, timeout)
    with pytest.raises(ValueError, match="count must be >= 0"):
        counter.wait(-1, 1.0)
    with pytest.raises(TimeoutError):  # a valid wait is still bounded
        counter.wait(1, 0.05)


def test_on_count_needs_a_callable(engine):
    counter = engine.imm_counter(4)
    with pytest.raises(TypeError):
        counter.on_count(1, 5)
    fired = []
    counter.on_count(1, lambda: fired.append(True))
    engine.write_imm(engine.register(np.zeros(8, np.uint8)).descriptor, 4).wait(10)
    for _ in range(200):
        if fired:
            break
        import time

        time.sleep(0.01)
    assert fired


@pytest.mark.parametrize("count,timeout,exc,match", [
    (-1, None, ValueError, "wait: count must be >= 0"),
    (1 << 31, None, ValueError, "wait: count must be <= 2147483647"),
    (1, -1, ValueError, "wait: timeout must be a finite number > 0"),
    (1, math.nan, ValueError, "wait: timeout must be a finite number > 0"),
    (1, math.inf, ValueError, "wait: timeout must be a finite number > 0"),
    (1, "1", TypeError, "wait: timeout must be a number"),
])
def test_jit_wait_checks_count_and_timeout_when_traced(engine, count, timeout, exc, match):
    from jax_garden import fabric

    with pytest.raises(exc, match=match):
        fabric.wait(engine.imm_counter(5), count, np.zeros(4, np.float32), timeout=timeout)


@pytest.mark.parametrize("value, ok", [("0", True), ("4096", True), ("-1", False), ("lots", False)])
def test_copy_kernel_setting_is_checked_when_an_engine_is_created(monkeypatch, value, ok):
    """JAX_GARDEN_IPC_COPY_KERNEL_BYTES: a byte count (0 turns the ipc copy kernel off); anything else
    names the variable before an engine exists."""
    from jax_garden import fabric

    monkeypatch.setenv("JAX_GARDEN_IPC_COPY_KERNEL_BYTES", value)
    if not ok:
        with pytest.raises(ValueError, match=f"JAX_GARDEN_IPC_COPY_KERNEL_BYTES={value!r} is not valid"):
            fabric.TransferEngine(provider="tcp")
        return
    eng = fabric.TransferEngine(provider="tcp")
    try:  # host memory never takes the GPU copy kernel: it writes and counts as before
        src, dst = np.arange(256, dtype=np.uint8), np.zeros(256, np.uint8)
        rs, rd = eng.register(src), eng.register(dst)
        eng.write(rs, rd.descriptor, 256, imm=4, path="ipc").wait(10)
        eng.imm_counter(4).wait(1, 10)
        np.testing.assert_array_equal(dst, src)
        assert eng.staging_stats()["ipc_kernel_records"] == 0
    finally:
        eng.close()


@pytest.mark.parametrize("value, exc", [(-1, ValueError), (1.5, TypeError), ("16M", TypeError)])
def test_copy_kernel_argument_is_checked(value, exc):
    from jax_garden import fabric

    with pytest.raises(exc, match="ipc_copy_kernel_bytes"):
        fabric.TransferEngine(provider="tcp", ipc_copy_kernel_bytes=value)
