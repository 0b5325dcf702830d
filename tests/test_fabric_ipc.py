"""The ipc path's imm delivery through shared-memory mailboxes, on CPU (host memory of one process
takes ``path="ipc"``; GPU memory across processes is tests/test_fabric_gpu.py): every imm counted
exactly once, through ring wrap-around and back-pressure, ops with and without imm, scatter to
several engines, both completion modes, a closed destination, and the mailbox protocol across
processes (a sender that exits cleanly releases its ring, one that dies has it reclaimed). The
counting tests are marked ``adversarial``: CI runs them again under the adversarial delivery mode
(held and reordered copies, cut records, held arrivals; docs/testing.md)."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from jax_garden import fabric
from jax_garden._jax_garden import fabric as native

PROVIDER = "tcp"
RING_RECORDS = 2048  # imm_record::kRingRecords


@pytest.fixture
def engines():
    made = []

    def make(**kw):
        e = fabric.TransferEngine(provider=PROVIDER, timeout=kw.pop("timeout", 10.0), **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def test_descriptor_names_its_engines_mailbox(engines):
    a, b = engines(), engines()
    ra, rb = a.register(np.zeros(64, np.uint8)), b.register(np.zeros(64, np.uint8))
    ma, mb = ra.descriptor.mailbox, rb.descriptor.mailbox
    assert ma > 0 and mb > 0 and ma != mb  # one mailbox per engine
    assert fabric.MemoryDescriptor.from_bytes(bytes(rb.descriptor)).mailbox == mb
    assert a.path_for(ra, rb.descriptor, "ipc", why=True) == ("ipc", "ipc: requested")


@pytest.mark.adversarial
def test_many_writes_wrap_the_ring_and_count_exactly(engines):
    """More writes in flight than a ring holds: the surplus waits for room and starts in order;
    every imm arrives exactly once and every write lands."""
    a, b = engines(), engines()
    n = 3 * RING_RECORDS + 5
    src = np.arange(n, dtype=np.uint64)
    dst = np.zeros(n, np.uint64)
    rs, rd = a.register(src), b.register(dst)
    ts = [a.write(rs, rd.descriptor, 8, src_offset=8 * i, dst_offset=8 * i, imm=7, path="ipc") for i in range(n)]
    b.imm_counter(7).wait(n, 60)
    for t in ts:
        t.wait(60)
    np.testing.assert_array_equal(dst, src)
    time.sleep(0.05)
    assert b.imm_counter(7).total == n and b.imm_counter(7).credits == 0
    stats = a.staging_stats()  # host memory: the records were stored by the submitting thread
    assert stats["ipc_host_records"] == n and stats["ipc_stream_records"] == stats["ipc_event_records"] == 0


@pytest.mark.adversarial
def test_paged_and_scatter_count_like_rma(engines):
    a, b, c = engines(domains=2), engines(), engines()
    src = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    db, dc = np.zeros(1 << 20, np.uint8), np.zeros(1 << 16, np.uint8)
    rs, rb, rc = a.register(src), b.register(db), c.register(dc)
    # a 2-domain sender's big write delivers one imm per domain piece, as over RMA
    a.write(rs, rb.descriptor, 1 << 20, imm=1, path="ipc").wait(30)
    want = fabric.imm_writes("write", domains=2, length=1 << 20)
    assert want == 2
    b.imm_counter(1).wait(want, 30)
    np.testing.assert_array_equal(db, src)
    db[:] = 0
    sp, dp = np.arange(64)[::-1].copy(), np.arange(64)
    a.write_paged(rs, rb.descriptor, 4096, sp, dp, 8192, 4096, imm=2, path="ipc").wait(30)
    b.imm_counter(2).wait(64, 30)
    for i in range(64):
        np.testing.assert_array_equal(db[4096 * i:4096 * (i + 1)], src[8192 * (63 - i):8192 * (63 - i) + 4096])
    # scatter: runs of targets per destination engine, "bytes" sharding counts domains per target
    targets = [(rb.descriptor, 100, 0, 0), (rb.descriptor, 100, 100, 200), (rc.descriptor, 300, 500, 1000),
               (rb.descriptor, 50, 900, 400)]
    a.scatter(rs, targets, imm=3, sharding="bytes", path="ipc").wait(30)
    b.imm_counter(3).wait(3 * 2, 30)
    c.imm_counter(3).wait(1 * 2, 30)
    np.testing.assert_array_equal(db[200:300], src[100:200])
    np.testing.assert_array_equal(db[400:450], src[900:950])
    np.testing.assert_array_equal(dc[1000:1300], src[500:800])
    time.sleep(0.05)
    assert b.imm_counter(3).total == 6 and c.imm_counter(3).total == 2


def test_scatter_run_to_one_region_is_one_copy_however_its_descriptor_was_passed(engines):
    """Consecutive targets in one region go as one batched copy with one imm record, whether the
    list repeats one descriptor object, carries separate copies of it, or was prepared once."""
    a, b, c = engines(), engines(), engines()
    src = np.random.default_rng(3).integers(0, 256, 1 << 16, dtype=np.uint8)
    db, dc = np.zeros(1 << 16, np.uint8), np.zeros(1 << 16, np.uint8)
    rs, rb, rc = a.register(src), b.register(db), c.register(dc)
    raw = bytes(rb.descriptor)
    lists = {
        "one object": [(rb.descriptor, 1024, 2048 * j, 2048 * j) for j in range(8)],
        "copies": [(fabric.MemoryDescriptor.from_bytes(raw), 1024, 2048 * j, 2048 * j) for j in range(8)],
        "bytes": [(raw, 1024, 2048 * j, 2048 * j) for j in range(8)],
        "prepared": fabric.ScatterTargets([(raw, 1024, 2048 * j, 2048 * j) for j in range(8)]),
    }
    for i, (how, targets) in enumerate(lists.items()):
        before = a.staging_stats()["ipc_host_records"]
        a.scatter(rs, targets, imm=20 + i, path="ipc").wait(10)
        b.imm_counter(20 + i).wait(8, 10)
        assert a.staging_stats()["ipc_host_records"] == before + 1, how
    for j in range(8):
        np.testing.assert_array_equal(db[2048 * j:2048 * j + 1024], src[2048 * j:2048 * j + 1024])
    # runs end where the destination changes: b, b | c | b
    before = a.staging_stats()["ipc_host_records"]
    targets = [(raw, 64, 0, 0), (fabric.MemoryDescriptor.from_bytes(raw), 64, 64, 64), (rc.descriptor, 64, 128, 0),
               (raw, 64, 192, 128)]
    a.scatter(rs, targets, imm=30, path="ipc").wait(10)
    b.imm_counter(30).wait(3, 10)
    c.imm_counter(30).wait(1, 10)
    assert a.staging_stats()["ipc_host_records"] == before + 3
    np.testing.assert_array_equal(db[128:192], src[192:256])
    np.testing.assert_array_equal(dc[:64], src[128:192])
    time.sleep(0.05)
    assert b.imm_counter(30).total == 3 and c.imm_counter(30).total == 1


@pytest.mark.adversarial
def test_write_without_imm_completes_and_counts_nothing(engines):
    a, b = engines(), engines()
    src, dst = np.full(4096, 9, np.uint8), np.zeros(4096, np.uint8)
    rs, rd = a.register(src), b.register(dst)
    for _ in range(3):
        a.write(rs, rd.descriptor, 4096, path="ipc").wait(10)  # completes once the owner took its record
    np.testing.assert_array_equal(dst, src)
    a.write(rs, rd.descriptor, 16, imm=0, path="ipc").wait(10)  # imm 0 is an imm like any other
    b.imm_counter(0).wait(1, 10)
    time.sleep(0.05)
    assert b.imm_counter(0).total == 1


@pytest.mark.adversarial
@pytest.mark.parametrize("completion", ["delivery", "transmit"])
def test_both_completion_modes(engines, completion):
    a, b = engines(completion=completion), engines()
    src, dst = np.arange(1 << 16, dtype=np.uint8), np.zeros(1 << 16, np.uint8)
    rs, rd = a.register(src), b.register(dst)
    ts = [a.write(rs, rd.descriptor, 1024, src_offset=1024 * i, dst_offset=1024 * i, imm=5, path="ipc")
          for i in range(64)]
    for t in ts:
        t.wait(10)
    b.imm_counter(5).wait(64, 10)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.adversarial
def test_closed_destination_fails_at_once(engines):
    a, b = engines(timeout=30.0), engines()
    src, dst = np.ones(4096, np.uint8), np.zeros(4096, np.uint8)
    rs, rd = a.register(src), b.register(dst)
    a.write(rs, rd.descriptor, 4096, imm=1, path="ipc").wait(10)  # maps it and claims a ring
    desc = rd.descriptor
    b.close()
    t0 = time.monotonic()
    with pytest.raises(fabric.TransferError, match="closed|does not exist|no longer has"):
        a.write(rs, desc, 4096, imm=1, path="ipc").wait(10)
    assert time.monotonic() - t0 < 5.0  # not the 30 s timeout
    # the sender keeps working toward live engines
    c = engines()
    rc = c.register(dst)
    a.write(rs, rc.descriptor, 4096, imm=2, path="ipc").wait(10)
    c.imm_counter(2).wait(1, 10)


def test_prepare_reports_the_path_and_refuses_what_a_write_would(engines):
    """prepare sets up what the first op would (ring claimed, memory mapped on GPUs) and fails as
    that op would: a destination region gone, a destination engine closed, this engine closed."""
    a, b = engines(), engines()
    src, dst = np.arange(4096, dtype=np.uint8), np.zeros(4096, np.uint8)
    rs, rd = a.register(src), b.register(dst)
    assert a.prepare(rs, rd.descriptor, "ipc") == "ipc"
    assert a.prepare(rs, rd.descriptor) == a.path_for(rs, rd.descriptor)
    a.write(rs, rd.descriptor, 4096, imm=3, path="ipc").wait(10)  # the prepared ring carries the write
    b.imm_counter(3).wait(1, 10)
    np.testing.assert_array_equal(dst, src)
    with pytest.raises(ValueError, match="path"):
        a.prepare(rs, rd.descriptor, "carrier-pigeon")
    gone = b.register(np.zeros(64, np.uint8))
    desc = gone.descriptor
    del gone
    gc.collect()
    time.sleep(0.2)  # the owner's worker deregisters asynchronously
    with pytest.raises(fabric.TransferError, match="no longer|deregistered|does not exist"):
        a.prepare(rs, desc, "ipc")
    c = engines()
    rc = c.register(np.zeros(64, np.uint8))
    cdesc = rc.descriptor
    c.close()
    with pytest.raises(fabric.TransferError, match="closed|does not exist|no longer"):
        a.prepare(rs, cdesc, "ipc")
    a.close()
    with pytest.raises(fabric.TransferError, match="prepare: the engine is closed"):
        a.prepare(rs, rd.descriptor, "ipc")


def test_write_to_itself(engines):
    a = engines()
    buf = np.arange(8192, dtype=np.uint8)
    r = a.register(buf)
    a.write(r, r.descriptor, 4096, src_offset=0, dst_offset=4096, imm=9, path="ipc").wait(10)
    a.imm_counter(9).wait(1, 10)
    np.testing.assert_array_equal(buf[4096:], buf[:4096])


# ---- the mailbox protocol across processes -------------------------------------------------------

def _post(nonce: int, serial: int, imm: int, count: int, keep: bool, conn) -> None:
    from jax_garden._jax_garden import fabric as nat

    conn.send(nat._mailbox_post(nonce, serial, imm, count, keep, 10.0))
    conn.recv()  # exit when told


def _spawn_post(nonce, serial, imm, count, keep):
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_post, args=(nonce, serial, imm, count, keep, child), daemon=True)
    p.start()
    return p, parent


def test_mailbox_sender_releases_its_ring_and_a_dead_one_is_reclaimed(engines):
    b = engines()
    rd = b.register(np.zeros(64, np.uint8))
    nonce, serial = native.process_nonce(), rd.descriptor.mailbox
    assert native._mailbox_senders(nonce, serial) == 0
    procs = []
    try:
        # a sender that closes cleanly: its record is taken, then its ring is free again
        p, conn = _spawn_post(nonce, serial, 21, 3, False)
        procs.append(p)
        b.imm_counter(21).wait(3, 30)
        assert conn.recv() is True
        assert native._mailbox_senders(nonce, serial) == 0
        conn.send("exit")
        # a sender that dies keeping its ring: counted, then its ring is reset once it is gone
        p, conn = _spawn_post(nonce, serial, 22, 2, True)
        procs.append(p)
        b.imm_counter(22).wait(2, 30)
        assert conn.recv() is False
        assert native._mailbox_senders(nonce, serial) == 1
        p.kill()
        p.join(10)
        deadline = time.monotonic() + 10
        while native._mailbox_senders(nonce, serial) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert native._mailbox_senders(nonce, serial) == 0
        # ... and the ring serves a new sender, whose record counts once
        p, conn = _spawn_post(nonce, serial, 23, 1, False)
        procs.append(p)
        b.imm_counter(23).wait(1, 30)
        assert conn.recv() is True
        conn.send("exit")
        time.sleep(0.05)
        assert b.imm_counter(22).total == 2 and b.imm_counter(23).total == 1
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                os.kill(p.pid, 9)
                p.join(5)


def test_mailbox_of_a_closed_engine_refuses_senders(engines):
    b = engines()
    rd = b.register(np.zeros(64, np.uint8))
    nonce, serial = native.process_nonce(), rd.descriptor.mailbox
    b.close()
    with pytest.raises(fabric.TransferError, match="does not exist|closed"):
        native._mailbox_post(nonce, serial, 1, 1, False, 1.0)
