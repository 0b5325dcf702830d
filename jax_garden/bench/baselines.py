"""Baselines that several benchmarks run in the same run as their own rows: the raw libfabric
``fi_writemsg`` floor (``bench fabric``'s raw_fabric_bench moving the same bytes in writes of the same
size) and ``jax.experimental.transfer`` between two CPU processes on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np


def recv(conn: Any, timeout: float = 900.0) -> tuple:
    """The next message of a worker's pipe; TimeoutError when none comes, RuntimeError for an error."""
    if not conn.poll(timeout):
        raise TimeoutError(f"worker: no answer within {timeout} s")
    out = conn.recv()
    if out[0] == "error":
        raise RuntimeError(out[1])
    return out


def raw_baseline(size: int, count: int, rounds: int = 3, timeout: float = 300.0) -> dict:
    """GB/s of the raw libfabric fi_writemsg loop (bench.fabric's raw_fabric_bench) moving ``count``
    writes of ``size`` bytes, 64 in flight: median and best of ``rounds`` runs (loopback on these
    VMs flips between a fast and a slow state per process pair; see bench.fabric)."""
    from jax_garden.bench import fabric as fb

    plan = [{"kind": "bw", "size": int(size), "count": int(count), "window": 64}]
    ns = argparse.Namespace(timeout=timeout, seed=1234, pin_cpus=None)
    vals = []
    for _ in range(rounds):
        m = fb.metrics_from_records(fb.run_system("raw", plan, ns))
        g = m.get(("write", int(size)), {}).get("gbps")
        if g:
            vals.append(g)
    return {"median": float(np.median(vals)) if vals else None, "best": max(vals, default=None), "runs": vals}


def _xfer_server(conn: Any, nbytes: int, rounds: int) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        import jax
        import jax.numpy as jnp
        from jax.experimental import transfer

        srv = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
        arrays = [jnp.ones((nbytes // 8 // 2,), jnp.bfloat16) for _ in range(8)]
        jax.block_until_ready(arrays)
        conn.send(("address", srv.address()))
        for v in range(rounds + 1):
            conn.recv()
            srv.await_pull(v, arrays)
            conn.send(("armed",))
        conn.recv()
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _xfer_client(conn: Any, nbytes: int, rounds: int, address: str) -> None:
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        import jax
        import jax.numpy as jnp
        from jax.experimental import transfer

        srv = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"])
        c = srv.connect(address)
        spec = jax.ShapeDtypeStruct((nbytes // 8 // 2,), jnp.bfloat16,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        times = []
        for v in range(rounds + 1):
            conn.send(("go", v))
            conn.recv()
            t0 = time.perf_counter()
            out = c.pull(v, [spec] * 8)
            jax.block_until_ready(out)
            if v:
                times.append(time.perf_counter() - t0)
        conn.send(("times", times))
    except BaseException as e:  # noqa: BLE001
        conn.send(("error", f"{type(e).__name__}: {e}"))


def jax_transfer_baseline(nbytes: int, rounds: int) -> dict:
    """jax.experimental.transfer between two CPU processes on 127.0.0.1: the receiver pulls 8 arrays
    of nbytes/8 that the sender armed with await_pull."""
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    srv = ctx.Process(target=_xfer_server, args=(b, nbytes, rounds), daemon=True)
    srv.start()
    cli = None
    try:
        addr = recv(a, 120)[1]
        c1, c2 = ctx.Pipe()
        cli = ctx.Process(target=_xfer_client, args=(c2, nbytes, rounds, addr), daemon=True)
        cli.start()
        while True:
            msg = recv(c1, 300)
            if msg[0] == "times":
                break
            a.send(("arm",))
            recv(a, 120)
            c1.send(("armed",))
        a.send(("done",))
        t = float(np.median(msg[1]))
        return {"seconds": t, "GBps": nbytes / t / 1e9}
    finally:
        for p in (srv, cli):
            if p is not None:
                p.join(timeout=5)
                if p.is_alive():
                    os.kill(p.pid, signal.SIGKILL)
