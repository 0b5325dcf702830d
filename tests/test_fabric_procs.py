"""TransferEngine across processes on 127.0.0.1: every op between 2-4 processes with contents
verified, a 4-process barrier, and a peer killed mid-transfer. Children are spawned by
fabric_group.run_group, which always reaps them."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from fabric_group import run_group

PROVIDER = "tcp"


def _data(rank: int, n: int) -> np.ndarray:
    return np.random.default_rng(100 + rank).integers(0, 256, n, dtype=np.uint8)


def _ops_worker(rank: int, size: int, exchange, domains: int):
    from jax_garden import fabric

    n = 3 << 20
    eng = fabric.TransferEngine(provider=PROVIDER, domains=domains, split_threshold=256 << 10)
    src = _data(rank, n)
    # regions per peer: [write (n) | paged (64 pages x 4 KiB) | scatter slot (64 KiB)]
    dst = np.zeros(n + 64 * 4096 + 65536, np.uint8)
    rs, rd = eng.register(src), eng.register(dst)
    peers = exchange((bytes(eng.address), bytes(rd.descriptor)))
    descs = [fabric.MemoryDescriptor.from_bytes(d) for _, d in peers]
    others = [r for r in range(size) if r != rank]
    ts = []
    # rank 0 writes the big single write to rank 1; every rank pages into its right neighbour and
    # every rank scatters to all others; imms: 10 = write, 20 = paged, 30 = scatter, 40 = message.
    right = (rank + 1) % size
    if rank == 0:
        ts.append(eng.write(rs, descs[1], n, imm=10))
    pages = np.arange(64)
    ts.append(eng.write_paged(rs, descs[right], 4096, pages[::-1], pages, 8192, 4096, dst_offset=n, imm=20))
    slot = 65536 // size
    ts.append(eng.scatter(rs, [(descs[o], slot - 1, o * 1000, n + 64 * 4096 + rank * slot) for o in others],
                          imm=30, sharding="bytes"))
    eng.send(fabric.NetAddress.from_bytes(peers[right][0]), f"hello from {rank}".encode()).wait(20)
    for t in ts:
        t.wait(30)
    if rank == 1:
        eng.imm_counter(10).wait(fabric.imm_writes("write", domains=domains, length=n, split_threshold=256 << 10), 30)
        np.testing.assert_array_equal(dst[:n], _data(0, n))
    left = (rank - 1) % size
    eng.imm_counter(20).wait(64, 30)
    want = _data(left, n)
    for i in range(64):
        np.testing.assert_array_equal(dst[n + i * 4096:n + (i + 1) * 4096], want[(63 - i) * 8192:(63 - i) * 8192 + 4096])
    eng.imm_counter(30).wait(len(others) * fabric.imm_writes("scatter", domains=domains, sharding="bytes"), 30)
    for o in others:
        off = n + 64 * 4096 + o * slot
        np.testing.assert_array_equal(dst[off:off + slot - 1], _data(o, n)[rank * 1000:rank * 1000 + slot - 1])
    msg = eng.recv(30)
    assert msg == f"hello from {left}".encode(), msg
    exchange(None)  # nobody closes before everyone has verified (their writes target us)
    eng.close()
    return True


@pytest.mark.adversarial
def test_every_op_between_three_processes():
    out = run_group(_ops_worker, 3, 2, exchanges=2)
    assert out == {0: True, 1: True, 2: True}


def test_two_processes_one_domain():
    assert run_group(_ops_worker, 2, 1, exchanges=2) == {0: True, 1: True}


def _barrier_worker(rank: int, size: int, exchange, rounds: int):
    from jax_garden import fabric

    eng = fabric.TransferEngine(provider=PROVIDER, timeout=20)
    r = eng.register(np.zeros(4096, np.uint8))
    infos = exchange(bytes(r.descriptor))
    peers = [fabric.MemoryDescriptor.from_bytes(d) for i, d in enumerate(infos) if i != rank]
    entered, left = [], []
    for k in range(rounds):
        time.sleep(0.05 * rank)  # stagger: the barrier must hold the early ranks
        entered.append(time.monotonic())  # one clock for every process of the host
        t = eng.barrier(peers, imm=700 + k)
        eng.imm_counter(700 + k).wait(size - 1, 30)
        left.append(time.monotonic())
        t.wait(30)
    exchange(None)
    eng.close()
    return entered, left


@pytest.mark.adversarial
def test_barrier_across_four_processes():
    out = run_group(_barrier_worker, 4, 3, exchanges=2)
    # The barrier property: no rank leaves round k before every rank entered it. Rank 3 enters each
    # round 0.15 s after rank 0 (its stagger), so a barrier that lets a rank go early fails this.
    for k in range(3):
        last_in = max(out[r][0][k] for r in range(4))
        first_out = min(out[r][1][k] for r in range(4))
        assert first_out >= last_in, (k, [(out[r][0][k], out[r][1][k]) for r in range(4)])


def _victim(rank: int, size: int, exchange):
    from jax_garden import fabric

    eng = fabric.TransferEngine(provider=PROVIDER, domains=2)
    dst = np.zeros(256 << 20, np.uint8)
    r = eng.register(dst)
    exchange((rank, os.getpid(), bytes(r.descriptor)))
    time.sleep(600)  # killed by the test


def _survivor_or_victim(rank: int, size: int, exchange):
    if rank == 1:
        return _victim(rank, size, exchange)
    from jax_garden import fabric

    timeout = 3.0
    eng = fabric.TransferEngine(provider=PROVIDER, domains=2, timeout=timeout)
    n = 256 << 20
    src = np.ones(n, np.uint8)
    dst = np.zeros(1 << 20, np.uint8)
    rs, rd = eng.register(src), eng.register(dst)
    infos = exchange((rank, os.getpid(), bytes(rd.descriptor)))
    if rank == 2:  # the healthy peer: wait for rank 0's final write, then leave
        eng.imm_counter(5).wait(1, 60)
        assert dst[:4096].all()
        eng.close()
        return "ok"
    victim = fabric.MemoryDescriptor.from_bytes(infos[1][2])
    healthy = fabric.MemoryDescriptor.from_bytes(infos[2][2])
    pending = [eng.write(rs, victim, n, imm=1) for _ in range(8)]  # ~2 GiB toward the victim
    time.sleep(0.3)
    os.kill(infos[1][1], signal.SIGKILL)
    killed_at = time.monotonic()
    failures = 0
    for t in pending:
        try:
            t.wait(60)
        except (fabric.TransferError, TimeoutError):
            failures += 1
    elapsed = time.monotonic() - killed_at
    # every op still pending toward the dead peer failed, within timeout + size allowance
    assert failures >= 1, "no op failed although the peer was killed"
    assert elapsed < timeout + n / 200e6 + 5, elapsed
    # ops issued after the death fail too
    late = eng.write(rs, victim, 4096, imm=1)
    try:
        late.wait(30)
        late_failed = False
    except (fabric.TransferError, TimeoutError):
        late_failed = True
    # and the survivor still works with its other peer
    eng.write(rs, healthy, 4096, imm=5).wait(20)
    eng.close()
    return {"failed": failures, "of": len(pending), "elapsed": elapsed, "late_failed": late_failed}


def test_killed_peer_fails_pending_ops_and_survivor_keeps_working():
    out = run_group(_survivor_or_victim, 3, timeout=120, expect_dead={1})
    assert out[2] == "ok"
    assert out[0]["failed"] >= 1 and out[0]["late_failed"], out[0]
