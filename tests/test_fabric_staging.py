"""Paths beyond plain RMA, on CPU: host staging (the protocol GPU memory takes on providers without
FI_HMEM) with host regions registered ``staged=True`` or ops forced to ``path="staged"``, the
same-process ``path="ipc"`` copy path, path selection, registration planning, and the faults of the
staging rendezvous (a killed sender's slots are reclaimed, a killed receiver fails the sender's op).
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from fabric_group import run_group
from jax_garden import fabric
from conftest import assert_no_more_imms, random_bytes

PROVIDER = "tcp"



def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---- pure decisions -----------------------------------------------------------------------------

def test_choose_path_table():
    cp = fabric.choose_path
    # auto
    assert cp() == ("fabric", False, False)
    assert cp(src_staged=True) == ("staged", True, False)
    assert cp(dst_staged=True) == ("staged", False, True)
    assert cp(src_staged=True, dst_staged=True) == ("staged", True, True)
    gpu_pair = dict(src_cuda=True, dst_cuda=True, dst_has_ipc=True, same_host=True, gpu_can_map=True)
    assert cp(**gpu_pair) == ("ipc", False, False)
    assert cp(**gpu_pair, src_staged=True, dst_staged=True) == ("ipc", False, False)  # tcp + GPUs on one host
    assert cp(**{**gpu_pair, "same_host": False}, src_staged=True, dst_staged=True) == ("staged", True, True)
    assert cp(**{**gpu_pair, "gpu_can_map": False}) == ("fabric", False, False)  # FI_HMEM provider
    assert cp(**{**gpu_pair, "dst_has_ipc": False}, dst_staged=True) == ("staged", False, True)
    assert cp(**{**gpu_pair, "dst_has_ipc": False, "same_process": True}) == ("ipc", False, False)
    assert cp(src_cuda=True, src_staged=True, same_host=True) == ("staged", True, False)  # GPU -> host
    assert cp(dst_cuda=True, dst_staged=True, same_host=True) == ("staged", False, True)  # host -> GPU
    assert cp(same_host=True, same_process=True) == ("fabric", False, False)  # host memory: never auto-IPC
    # the destination engine has no imm mailbox: no ipc path (its imms could not be delivered)
    assert cp(**gpu_pair, dst_mailbox=False) == ("fabric", False, False)
    assert cp(**gpu_pair, dst_mailbox=False, dst_staged=True) == ("staged", False, True)
    path, _, _, why = cp(**{**gpu_pair, "gpu_can_map": False}, dst_staged=True, why=True)
    assert path == "staged" and "cannot map the destination GPU" in why, why
    path, _, _, why = cp(**{**gpu_pair, "dst_has_ipc": False}, dst_staged=True, why=True)
    assert path == "staged" and "no CUDA IPC handle" in why and "JAX_GARDEN_VMM_IPC=0" in why, why
    # forced
    assert cp(requested="staged") == ("staged", True, True)
    assert cp(requested="fabric") == ("fabric", False, False)
    assert cp(requested="ipc", same_host=True, same_process=True) == ("ipc", False, False)
    assert cp(requested="ipc", **gpu_pair) == ("ipc", False, False)
    with pytest.raises(ValueError, match="another host"):
        cp(requested="ipc", src_cuda=True, dst_cuda=True, dst_has_ipc=True, gpu_can_map=True)
    with pytest.raises(ValueError, match="only inside one process"):
        cp(requested="ipc", same_host=True)
    with pytest.raises(ValueError, match="GPU memory and the other host"):
        cp(requested="ipc", src_cuda=True, same_host=True, same_process=True)
    with pytest.raises(ValueError, match="cannot map"):
        cp(requested="ipc", **{**gpu_pair, "gpu_can_map": False})
    with pytest.raises(ValueError, match="no CUDA IPC handle"):
        cp(requested="ipc", **{**gpu_pair, "dst_has_ipc": False})
    with pytest.raises(ValueError, match="no imm mailbox"):
        cp(requested="ipc", same_host=True, same_process=True, dst_mailbox=False)
    with pytest.raises(ValueError, match="source region is not registered"):
        cp(requested="fabric", src_staged=True)
    with pytest.raises(ValueError, match="destination region is not registered"):
        cp(requested="fabric", dst_staged=True)
    with pytest.raises(ValueError, match="path must be"):
        cp(requested="rdma")


def test_plan_registration_arguments():
    pr = fabric.plan_registration
    host = pr(cuda=False)
    assert host["mode"] == "system" and host["iface"] == 0 and host["flags"] == 0
    assert host["access"] != 0
    assert pr(cuda=False, staged=True)["mode"] == "staged"
    # no FI_HMEM (tcp): GPU memory is staged
    r = pr(cuda=True, device=3, provider_hmem=False)
    assert r["mode"] == "staged" and "FI_HMEM" in r["reason"]
    # FI_HMEM: iface CUDA + device, DMA-BUF only when every layer supports it
    every = dict(provider_hmem=True, headers_dmabuf=True, runtime_dmabuf=True, kernel_dmabuf=True, device_dmabuf=True)
    d = pr(cuda=True, device=3, **every)
    assert d["mode"] == "hmem_dmabuf" and d["iface"] == 1 and d["device"] == 3 and d["flags"] == 1 << 40
    assert d["access"] == host["access"]
    for missing, why in (("headers_dmabuf", "< 1.20"), ("runtime_dmabuf", "runtime"), ("kernel_dmabuf", "5.12"),
                         ("device_dmabuf", "DMA-BUF")):
        r = pr(cuda=True, device=1, **{**every, missing: False})
        assert r["mode"] == "hmem_iov" and r["iface"] == 1 and r["device"] == 1 and r["flags"] == 0, missing
        assert why in r["reason"], (missing, r["reason"])
    assert pr(cuda=True, device=0, staged=True, **every)["mode"] == "staged"
    from jax_garden._jax_garden import fabric as native
    assert native.kernel_release_at_least("5.15.0-91-generic", 5, 12)
    assert native.kernel_release_at_least("6.1.0", 5, 12)
    assert not native.kernel_release_at_least("5.4.0-150", 5, 12)
    assert not native.kernel_release_at_least("garbage", 5, 12)


def test_plan_stage_chunks():
    from jax_garden._jax_garden import fabric as native
    chunks = native.plan_stage_chunks([(0, 100, 10), (50, 0, 0), (20, 300, 25)], 16, 8)
    assert chunks == [[(0, 100, 10), (20, 300, 6)], [(26, 306, 16)], [(42, 322, 3)]]
    chunks = native.plan_stage_chunks([(i * 10, i * 20, 4) for i in range(5)], 1 << 20, 2)
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert native.plan_stage_chunks([], 16, 4) == []


def test_descriptor_carries_paths_and_stays_strict(engines):
    a = engines(2)
    staged = a.register(np.zeros(8192, np.uint8), staged=True)
    plain = a.register(np.zeros(8192, np.uint8))
    d = staged.descriptor
    assert d.is_staged and not plain.descriptor.is_staged and staged.is_staged and staged.registration == "staged"
    assert plain.registration == "system"
    assert d.host_id == fabric._native.host_id() and d.pid == os.getpid()
    assert not d.is_cuda and not d.has_ipc_handle and d.device == -1
    assert d.staging_chunk_bytes == 1 << 20
    assert fabric.MemoryDescriptor.from_bytes(bytes(d)) == d
    blob = bytes(d)
    for cut in (0, 7, len(blob) // 3, len(blob) - 1):
        with pytest.raises(ValueError):
            fabric.MemoryDescriptor.from_bytes(blob[:cut])
    for pos in range(0, len(blob), 3):
        bad = bytearray(blob)
        bad[pos] ^= 0xA5
        with pytest.raises(ValueError):
            fabric.MemoryDescriptor.from_bytes(bytes(bad))


# ---- staged transfers in one process --------------------------------------------------------------

@pytest.mark.adversarial
@pytest.mark.parametrize("domains", [1, 2])
@pytest.mark.parametrize("sides", ["src", "dst", "both", "forced"])
def test_staged_single_write(engines, domains, sides):
    kw = dict(staging_chunk_bytes=64 << 10, staging_slots=4)
    a, b = engines(domains, **kw), engines(domains, **kw)
    n = (1 << 20) + 12345  # more than the 4 x 64 KiB pools: slots are reused
    src, dst = random_bytes(n + 64, domains), np.zeros(n + 128, np.uint8)
    ra = a.register(src, staged=sides in ("src", "both"))
    rb = b.register(dst, staged=sides in ("dst", "both"))
    path = "staged" if sides == "forced" else None
    assert a.path_for(ra, rb.descriptor, path) == "staged"
    a.write(ra, rb.descriptor, n, src_offset=64, dst_offset=100, imm=77, path=path).wait(20)
    c = b.imm_counter(77)
    expected = fabric.imm_writes("write", domains=domains, length=n, split_threshold=a.split_threshold)
    c.wait(expected, 20)
    np.testing.assert_array_equal(dst[100:100 + n], src[64:64 + n])
    assert not dst[:100].any() and not dst[100 + n:].any()
    assert_no_more_imms(c, expected, a, b, rb.descriptor, probe_imm=9999)
    for e in (a, b):
        s = e.staging_stats()
        assert s["send_buffers_free"] == s["send_buffers"] and s["recv_slots_free"] == s["recv_slots"], s
        assert s["inbound"] == 0 and s["outbound"] == 0, s


@pytest.mark.adversarial
def test_staged_paged_and_imm_counted_after_data(engines):
    kw = dict(staging_chunk_bytes=16 << 10, staging_slots=3)
    a, b = engines(2, **kw), engines(2, **kw)
    page, pages = 3000, 200
    src = random_bytes(4096 * 256, 5)
    dst = np.zeros(5000 * 256, np.uint8)
    ra, rb = a.register(src, staged=True), b.register(dst, staged=True)
    rng = np.random.default_rng(1)
    sp, dp = rng.permutation(256)[:pages], rng.permutation(256)[:pages]
    t = a.write_paged(ra, rb.descriptor, page, sp, dp, 4096, 5000, src_offset=7, dst_offset=11, imm=5)
    c = b.imm_counter(5)
    c.wait(pages, 20)  # every page's data is in place once the imms count
    expect = np.zeros_like(dst)
    for s, d in zip(sp, dp):
        expect[11 + d * 5000:11 + d * 5000 + page] = src[7 + s * 4096:7 + s * 4096 + page]
    np.testing.assert_array_equal(dst, expect)
    t.wait(10)
    assert_no_more_imms(c, pages, a, b, rb.descriptor, probe_imm=9999)


@pytest.mark.adversarial
def test_scatter_with_mixed_paths(engines):
    a = engines(2, staging_chunk_bytes=32 << 10, staging_slots=2)
    peers = [engines(1, staging_chunk_bytes=32 << 10) for _ in range(3)]
    src = random_bytes(400_000, 9)
    ra = a.register(src)
    dsts = [np.zeros(150_000, np.uint8) for _ in peers]
    regs = [peers[0].register(dsts[0], staged=True), peers[1].register(dsts[1]), peers[2].register(dsts[2])]
    assert [a.path_for(ra, r.descriptor) for r in regs] == ["staged", "fabric", "fabric"]
    lengths = [100_001, 77_777, 0]
    targets = [(r.descriptor, n, 1000 * i, 3 * i) for i, (r, n) in enumerate(zip(regs, lengths))]
    total = 0
    for sharding in ("targets", "bytes"):
        for d in dsts:
            d[:] = 0
        a.scatter(ra, targets, imm=21, sharding=sharding).wait(20)
        per = fabric.imm_writes("scatter", domains=2, sharding=sharding)
        total += per
        for i, (p, n) in enumerate(zip(peers, lengths)):
            c = p.imm_counter(21)
            c.wait(per, 20)
            np.testing.assert_array_equal(dsts[i][3 * i:3 * i + n], src[1000 * i:1000 * i + n])
            assert not dsts[i][3 * i + n:].any()
            assert_no_more_imms(c, total, a, p, regs[i].descriptor, probe_imm=9999)
    # a forced path applies to every target
    for d in dsts:
        d[:] = 0
    a.scatter(ra, targets, imm=22, path="staged").wait(20)
    for i, (p, n) in enumerate(zip(peers, lengths)):
        p.imm_counter(22).wait(1, 20)
        np.testing.assert_array_equal(dsts[i][3 * i:3 * i + n], src[1000 * i:1000 * i + n])


def test_two_senders_into_one_staged_receiver(engines):
    kw = dict(staging_chunk_bytes=32 << 10, staging_slots=4)
    r = engines(1, **kw)
    senders = [engines(1, **kw) for _ in range(2)]
    n = 32 << 20
    dst = np.zeros(2 * n, np.uint8)
    rd = r.register(dst, staged=True)
    srcs = [random_bytes(n, 30 + i) for i in range(2)]
    regs = [s.register(x, staged=True) for s, x in zip(senders, srcs)]
    # Both submitted back to back (ops are asynchronous): 1,024 chunks each through 4 shared slots.
    ts = [senders[i].write(regs[i], rd.descriptor, n, dst_offset=i * n, imm=40 + i) for i in range(2)]
    seen_both = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and r.imm_counter(40).total + r.imm_counter(41).total < 2:
        seen_both |= r.staging_stats()["inbound"] == 2
        time.sleep(0.001)
    for t in ts:
        t.wait(30)
    for i in range(2):
        r.imm_counter(40 + i).wait(1, 20)
        np.testing.assert_array_equal(dst[i * n:(i + 1) * n], srcs[i])
    assert seen_both, "the two transfers never overlapped at the receiver"
    s = r.staging_stats()
    assert s["recv_slots_free"] == s["recv_slots"] == 4 and s["inbound"] == 0


def test_many_concurrent_staged_transfers_share_both_pools(engines):
    """More staged transfers in flight than bounce buffers on either side (what a KV stream or a
    weight push posts): a sender must not sit on send buffers that no grant will match while the
    receiver's slots are granted to transfers that have no buffer (a deadlock until the timeout)."""
    kw = dict(staging_chunk_bytes=16 << 10, staging_slots=4, timeout=5.0)
    r, s = engines(1, **kw), engines(1, **kw)
    n, k = 64 << 10, 24  # 4 chunks each, 24 transfers: 96 chunks through 4 + 4 buffers
    dst = np.zeros(n * k, np.uint8)
    rd = r.register(dst, staged=True)
    src = random_bytes(n * k, 77)
    rs = s.register(src, staged=True)
    ts = [s.write(rs, rd.descriptor, n, src_offset=i * n, dst_offset=i * n, imm=60) for i in range(k)]
    for t in ts:
        t.wait(20)
    r.imm_counter(60).wait(k, 20)
    np.testing.assert_array_equal(dst, src)
    st, rt = s.staging_stats(), r.staging_stats()
    assert st["send_buffers_free"] == st["send_buffers"] == 4 and st["outbound"] == 0, st
    assert rt["recv_slots_free"] == rt["recv_slots"] == 4 and rt["inbound"] == 0, rt


def test_imm_only_ops_reach_staged_regions_and_internal_messages_stay_internal(engines):
    a, b = engines(2), engines(2)
    ra = a.register(random_bytes(70_000, 2), staged=True)
    rb = b.register(np.zeros(70_000, np.uint8), staged=True)
    a.write_imm(rb.descriptor, 600).wait(10)
    a.barrier([rb.descriptor], 601).wait(10)
    b.imm_counter(600).wait(1, 10)
    b.imm_counter(601).wait(1, 10)
    a.write(ra, rb.descriptor, 70_000, imm=602).wait(10)
    b.imm_counter(602).wait(1, 10)
    a.send(b.address, b"user").wait(10)
    assert b.recv(10) == b"user"
    with pytest.raises(TimeoutError):  # the rendezvous messages never reach recv()
        b.recv(0.2)
    with pytest.raises(TimeoutError):
        a.recv(0.1)


def test_staged_write_to_a_dropped_region_fails(engines):
    a, b = engines(), engines()
    ra = a.register(random_bytes(10_000, 1), staged=True)
    rb = b.register(np.zeros(10_000, np.uint8), staged=True)
    desc = rb.descriptor
    del rb
    time.sleep(0.1)
    with pytest.raises(fabric.TransferError, match=r"no longer has region \[0x[0-9a-f]+, \+10000\)"):
        a.write(ra, desc, 10_000, imm=1).wait(10)
    s = a.staging_stats()
    assert s["send_buffers_free"] == s["send_buffers"] and s["outbound"] == 0


def test_forced_paths_rejected_when_impossible(engines):
    a, b = engines(), engines()
    ra, rb = a.register(np.zeros(64, np.uint8)), b.register(np.zeros(64, np.uint8), staged=True)
    with pytest.raises(ValueError, match="path='fabric' is not possible"):
        a.write(ra, rb.descriptor, 8, path="fabric")
    with pytest.raises(ValueError, match="path must be"):
        a.write(ra, rb.descriptor, 8, path="rdma")
    with pytest.raises(ValueError, match="path must be"):
        fabric.TransferEngine(provider=PROVIDER, path="nvlink")
    with pytest.raises(ValueError, match="staging_chunk_bytes"):
        fabric.TransferEngine(provider=PROVIDER, staging_chunk_bytes=1000)
    e = engines(path="staged")
    re_ = e.register(np.zeros(64, np.uint8))
    assert e.default_path == "staged" and e.path_for(re_, rb.descriptor) == "staged"
    assert e.path_for(re_, rb.descriptor, "ipc") == "ipc"  # same process: host memory can be copied directly


# ---- same-process IPC path (host memory stands in for GPU memory) --------------------------------

@pytest.mark.adversarial
def test_ipc_path_in_process_counts_exactly(engines):
    a, b = engines(2), engines(2)
    src, dst = random_bytes(1 << 20, 3), np.zeros(1 << 20, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    assert a.path_for(ra, rb.descriptor) == "fabric" and a.path_for(ra, rb.descriptor, "ipc") == "ipc"
    a.write(ra, rb.descriptor, 1 << 20, imm=3, path="ipc").wait(10)
    c = b.imm_counter(3)
    c.wait(fabric.imm_writes("write", domains=2, length=1 << 20), 10)  # 2: split like RMA would be
    np.testing.assert_array_equal(src, dst)
    assert_no_more_imms(c, 2, a, b, rb.descriptor, probe_imm=9999)
    # paged, with more imms than the zero-byte-write limit: they travel as one batch message
    dst[:] = 0
    sp = np.arange(100)[::-1]
    a.write_paged(ra, rb.descriptor, 1000, sp, np.arange(100), 4096, 1000, imm=4, path="ipc").wait(10)
    c4 = b.imm_counter(4)
    c4.wait(100, 10)
    for i in range(100):
        np.testing.assert_array_equal(dst[i * 1000:(i + 1) * 1000], src[sp[i] * 4096:sp[i] * 4096 + 1000])
    assert_no_more_imms(c4, 100, a, b, rb.descriptor, probe_imm=9999)
    a.scatter(ra, [(rb.descriptor, 5000, 0, 7)], imm=6, sharding="bytes", path="ipc").wait(10)
    b.imm_counter(6).wait(2, 10)


# ---- across processes -----------------------------------------------------------------------------

def _staged_ops_worker(rank: int, size: int, exchange):
    from jax_garden import fabric

    n = 1 << 20
    eng = fabric.TransferEngine(provider=PROVIDER, domains=2, staging_chunk_bytes=64 << 10, staging_slots=4)
    src = np.random.default_rng(rank).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n + 64 * 4096 + 65536, np.uint8)
    rs, rd = eng.register(src, staged=True), eng.register(dst, staged=True)
    peers = exchange(bytes(rd.descriptor))
    descs = [fabric.MemoryDescriptor.from_bytes(d) for d in peers]
    right, left = (rank + 1) % size, (rank - 1) % size
    others = [r for r in range(size) if r != rank]
    assert eng.path_for(rs, descs[right]) == "staged"
    try:
        eng.path_for(rs, descs[right], "ipc")
        raise AssertionError("ipc between host regions of two processes was accepted")
    except ValueError as e:
        assert "only inside one process" in str(e)
    ts = [eng.write(rs, descs[right], n, imm=10)]
    pages = np.arange(64)
    ts.append(eng.write_paged(rs, descs[right], 4096, pages[::-1], pages, 8192, 4096, dst_offset=n, imm=20))
    slot = 65536 // size
    ts.append(eng.scatter(rs, [(descs[o], slot - 1, o * 1000, n + 64 * 4096 + rank * slot) for o in others],
                          imm=30, sharding="bytes"))
    for t in ts:
        t.wait(30)
    want = np.random.default_rng(left).integers(0, 256, n, dtype=np.uint8)
    eng.imm_counter(10).wait(fabric.imm_writes("write", domains=2, length=n), 30)
    np.testing.assert_array_equal(dst[:n], want)
    eng.imm_counter(20).wait(64, 30)
    for i in range(64):
        np.testing.assert_array_equal(dst[n + i * 4096:n + (i + 1) * 4096],
                                      want[(63 - i) * 8192:(63 - i) * 8192 + 4096])
    eng.imm_counter(30).wait(len(others) * 2, 30)
    for o in others:
        off = n + 64 * 4096 + o * slot
        got = np.random.default_rng(o).integers(0, 256, n, dtype=np.uint8)[rank * 1000:rank * 1000 + slot - 1]
        np.testing.assert_array_equal(dst[off:off + slot - 1], got)
    time.sleep(0.05)
    totals = [eng.imm_counter(i).total for i in (10, 20, 30)]
    exchange(None)
    stats = eng.staging_stats()
    eng.close()
    return totals, stats


def test_staged_ops_between_three_processes():
    out = run_group(_staged_ops_worker, 3, exchanges=2)
    for rank, (totals, stats) in out.items():
        assert totals == [2, 64, 4], (rank, totals)
        assert stats["recv_slots_free"] == stats["recv_slots"] and stats["inbound"] == 0, stats
        assert stats["send_buffers_free"] == stats["send_buffers"] and stats["outbound"] == 0, stats


def _killed_sender_case(rank: int, size: int, exchange):
    from jax_garden import fabric

    timeout = 1.0
    kw = dict(staging_chunk_bytes=64 << 10, staging_slots=4, timeout=timeout)
    eng = fabric.TransferEngine(provider=PROVIDER, **kw)
    n = 256 << 20
    if rank == 1:  # the victim: streams a large staged write until it is killed
        src = np.ones(n, np.uint8)
        rs = eng.register(src, staged=True)
        infos = exchange((os.getpid(), b""))
        eng.write(rs, fabric.MemoryDescriptor.from_bytes(infos[0][1]), n, imm=1)
        time.sleep(600)
    dst = np.zeros(n, np.uint8)
    rd = eng.register(dst, staged=True)
    infos = exchange((os.getpid(), bytes(rd.descriptor)))
    wait_for(lambda: eng.staging_stats()["inbound"] == 1 and dst[:65536].any(), 30, "the transfer to start")
    os.kill(infos[1][0], signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: eng.staging_stats()["inbound"] == 0, 2 * timeout + 10, "the dead sender's transfer to go")
    reclaimed_after = time.monotonic() - killed
    stats = eng.staging_stats()
    assert stats["recv_slots_free"] == stats["recv_slots"], stats
    assert eng.imm_counter(1).total == 0  # a partial transfer never counts
    # and the receiver still takes staged writes
    other = fabric.TransferEngine(provider=PROVIDER, **kw)
    src2 = np.full(3 << 20, 7, np.uint8)
    other.write(other.register(src2, staged=True), rd.descriptor, len(src2), imm=2).wait(20)
    eng.imm_counter(2).wait(1, 20)
    assert (dst[:len(src2)] == 7).all()
    other.close()
    eng.close()
    return reclaimed_after


def test_killed_sender_slots_are_reclaimed():
    out = run_group(_killed_sender_case, 2, timeout=120, expect_dead={1})
    assert out[0] < 2 * 1.0 + 5, out


def _killed_receiver_case(rank: int, size: int, exchange):
    from jax_garden import fabric

    timeout = 1.5
    kw = dict(staging_chunk_bytes=64 << 10, staging_slots=4, timeout=timeout)
    eng = fabric.TransferEngine(provider=PROVIDER, **kw)
    n = 128 << 20
    if rank == 1:  # the victim receiver
        dst = np.zeros(n, np.uint8)
        rd = eng.register(dst, staged=True)
        exchange((os.getpid(), bytes(rd.descriptor)))
        time.sleep(600)
    src = np.ones(n, np.uint8)
    rs = eng.register(src, staged=True)
    infos = exchange((os.getpid(), b""))
    t = eng.write(rs, fabric.MemoryDescriptor.from_bytes(infos[1][1]), n, imm=1)
    wait_for(lambda: eng.staging_stats()["send_buffers_free"] < eng.staging_stats()["send_buffers"] or t.done, 30,
             "the transfer to start")
    os.kill(infos[1][0], signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises((fabric.TransferError, TimeoutError)):
        t.wait(60)
    failed_after = time.monotonic() - killed
    wait_for(lambda: eng.staging_stats()["outbound"] == 0, 10, "the failed transfer to drain")
    stats = eng.staging_stats()
    assert stats["send_buffers_free"] == stats["send_buffers"], stats
    # the sender keeps working with a live peer
    other = fabric.TransferEngine(provider=PROVIDER, **kw)
    dst2 = np.zeros(1 << 20, np.uint8)
    rd2 = other.register(dst2, staged=True)
    eng.write(rs, rd2.descriptor, 1 << 20, imm=3).wait(20)
    other.imm_counter(3).wait(1, 20)
    assert dst2.all()
    other.close()
    eng.close()
    return failed_after


def test_killed_receiver_fails_the_staged_write_within_timeout():
    out = run_group(_killed_receiver_case, 2, timeout=120, expect_dead={1})
    assert out[0] < 1.5 + (128 << 20) / 200e6 + 3, out
