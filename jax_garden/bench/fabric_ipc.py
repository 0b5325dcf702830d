"""The ``ipc`` system of ``python -m jax_garden.bench fabric``: the engine's ipc path on host memory,
both ends in one process (two engines; the ipc path takes host memory only within a process), the
same plan and protocol as the other systems (see bench/fabric.py)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from jax_garden.bench.fabric import IMM_ACK, IMM_DATA, check_bytes, fill_pattern, page_slots, plan_buffer_bytes


def ipc_worker(plan: list[dict], timeout: float, seed: int, emit: Callable[[dict], None]) -> None:
    """The ``ipc`` system: both ends in this process (two engines), host memory, path="ipc"."""
    from jax_garden import fabric

    nbytes = plan_buffer_bytes(plan)
    src, dst = np.zeros(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    fill_pattern(src)
    with fabric.TransferEngine(provider="tcp") as a, fabric.TransferEngine(provider="tcp") as b:
        ra, rb = a.register(src), b.register(dst)
        da, db = ra.descriptor, rb.descriptor
        data, ack = b.imm_counter(IMM_DATA), a.imm_counter(IMM_ACK)
        back = np.zeros(8, np.uint8)
        rback = b.register(back)
        emit({"event": "engine", "provider": a.provider, "domains": a.num_domains, "path": a.path_for(ra, db, "ipc")})
        for ti, t in enumerate(plan):
            if t["kind"] == "lat":
                size = t["size"]
                samples = []
                for i in range(t["warmup"] + t["iters"]):
                    t0 = time.perf_counter_ns()
                    tr = a.write(ra, db, size, imm=IMM_DATA, path="ipc")
                    data.wait(1, timeout)
                    tb = b.write(rback, da, 0, imm=IMM_ACK, path="ipc")
                    ack.wait(1, timeout)
                    tr.wait(timeout)
                    tb.wait(timeout)
                    t1 = time.perf_counter_ns()
                    if i >= t["warmup"]:
                        samples.append(t1 - t0)
                    if i == 0:
                        check_bytes(dst, 0, 0, size, "ipc lat")
                emit({"kind": "lat", "size": size, "iters": t["iters"], "rtt_ns": samples})
            elif t["kind"] == "bw":
                size, count, window = t["size"], t["count"], t["window"]
                pending: list = []
                head = 0
                t0 = time.perf_counter_ns()
                for _ in range(count):
                    if len(pending) - head >= window:
                        pending[head].wait(timeout)
                        head += 1
                    pending.append(a.write(ra, db, size, imm=IMM_DATA, path="ipc"))
                data.wait(count, timeout + 60)
                for tr in pending[head:]:
                    tr.wait(timeout)
                t1 = time.perf_counter_ns()
                emit({"kind": "bw", "size": size, "count": count, "window": window, "elapsed_ns": t1 - t0})
            else:
                page, pages = t["page"], t["pages"]
                sp, dp = page_slots(pages, seed + ti)
                samples = []
                for it in range(t["iters"] + 1):
                    t0 = time.perf_counter_ns()
                    tr = a.write_paged(ra, db, page, sp, dp, page, page, imm=IMM_DATA, path="ipc")
                    data.wait(pages, timeout)
                    tr.wait(timeout)
                    t1 = time.perf_counter_ns()
                    if it == 0:
                        check_bytes(dst, dp.astype(np.uint64) * page, sp.astype(np.uint64) * page, page, "ipc paged")
                    else:
                        samples.append(t1 - t0)
                emit({"kind": "paged", "page": page, "pages": pages, "iters": t["iters"], "window": t["window"],
                      "op_ns": samples})
