"""TransferEngine semantics with engines on 127.0.0.1 (libfabric tcp provider). Several engines in
one process are separate endpoints talking over real TCP connections; tests/test_fabric_procs.py
repeats the core ops and the fault cases across processes."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from jax_garden import fabric
from conftest import assert_no_more_imms, random_bytes, settle_imms

PROVIDER = "tcp"


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))



# ---- imm accounting ---------------------------------------------------------------------------

def test_imm_writes_table():
    assert fabric.imm_writes("write", domains=1, length=1 << 30) == 1
    assert fabric.imm_writes("write", domains=2, length=100) == 1
    assert fabric.imm_writes("write", domains=2, length=1 << 20) == 2
    assert fabric.imm_writes("write", domains=4, length=64 << 20) == 4
    assert fabric.imm_writes("write", domains=3, length=8192, split_threshold=4096) == 1  # < 3 aligned pieces
    assert fabric.imm_writes("write", domains=3, length=12289, split_threshold=4096) == 2  # 8 KiB + rest
    assert fabric.imm_writes("paged", domains=4, pages=37) == 37
    assert fabric.imm_writes("scatter", domains=4, sharding="targets") == 1
    assert fabric.imm_writes("scatter", domains=4, sharding="bytes") == 4
    assert fabric.imm_writes("imm", domains=2) == 1
    assert fabric.imm_writes("barrier", domains=2) == 1
    with pytest.raises(ValueError, match="unknown op 'read'"):
        fabric.imm_writes("read", domains=1)
    with pytest.raises(ValueError, match="domains"):
        fabric.imm_writes("write", domains=0, length=1)


# ---- single writes ------------------------------------------------------------------------------

@pytest.mark.adversarial
@pytest.mark.parametrize("domains", [1, 2, 3])
@pytest.mark.parametrize("length", [1, 4096, 1_000_003, (3 << 20) + 12345])
def test_write_contents_and_imm_count(engines, domains, length):
    a, b = engines(domains, split_threshold=64 << 10), engines(domains)
    src, dst = random_bytes(length + 100, domains), np.zeros(length + 300, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    imm = 1000 + domains
    t = a.write(ra, rb.descriptor, length, src_offset=100, dst_offset=200, imm=imm)
    t.wait(10)
    expected = fabric.imm_writes("write", domains=domains, length=length, split_threshold=a.split_threshold)
    if domains > 1 and length >= 64 << 10:
        assert expected == domains  # sharded over every domain
    c = b.imm_counter(imm)
    c.wait(expected, 10)
    np.testing.assert_array_equal(dst[200:200 + length], src[100:100 + length])
    assert not dst[:200].any() and not dst[200 + length:].any()
    assert_no_more_imms(c, expected, a, b, rb.descriptor, probe_imm=9999)


def test_checked_write_path_honours_offsets(engines):
    """write() takes its checked path for descriptor bytes, NumPy integers or an explicit path; the
    offsets must reach the engine there too (the fast path is covered above)."""
    a, b = engines(2, split_threshold=8192), engines(2)
    src, dst = random_bytes(64 << 10, 12), np.zeros(64 << 10, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    cases = [(bytes(rb.descriptor), 1000, 100, 3000, {}),
             (rb.descriptor, np.int64(20000), np.uint32(7), np.int32(5000), {}),
             (rb.descriptor, 16384, 40000, 30000, {"path": "fabric"})]
    for i, (desc, n, so, do, kw) in enumerate(cases):
        dst[:] = 0
        a.write(ra, desc, n, src_offset=so, dst_offset=do, imm=70 + i, **kw).wait(10)
        n, so, do = int(n), int(so), int(do)
        b.imm_counter(70 + i).wait(fabric.imm_writes("write", domains=2, length=n, split_threshold=8192), 10)
        np.testing.assert_array_equal(dst[do:do + n], src[so:so + n])
        assert not dst[:do].any() and not dst[do + n:].any(), f"case {i}: bytes outside [{do}, {do + n})"


def test_write_without_imm_and_descriptor_bytes(engines):
    a, b = engines(), engines()
    src, dst = random_bytes(10000, 1), np.zeros(10000, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    desc = fabric.MemoryDescriptor.from_bytes(bytes(rb.descriptor))
    assert desc == rb.descriptor and desc.length == 10000
    a.write(ra, bytes(rb.descriptor), 10000).wait(10)
    # Without an imm the receiver has no completion: the sender's completion only frees the source
    # (on tcp it comes when the bytes left), so poll for the data.
    deadline = time.monotonic() + 10
    while not np.array_equal(src, dst) and time.monotonic() < deadline:
        time.sleep(0.01)
    np.testing.assert_array_equal(src, dst)


@pytest.mark.adversarial
def test_ten_thousand_small_writes_every_imm_counted(engines):
    a, b = engines(2), engines(2)
    n, size = 10_000, 64
    src = random_bytes(n * size, 7)
    dst = np.zeros(n * size, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    transfers = [a.write(ra, rb.descriptor, size, src_offset=i * size, dst_offset=i * size, imm=42 + (i % 3))
                 for i in range(n)]
    for t in transfers:
        t.wait(30)
    counts = [len(range(k, n, 3)) for k in range(3)]
    for k in range(3):
        b.imm_counter(42 + k).wait(counts[k], 30)
    np.testing.assert_array_equal(src, dst)
    settle_imms(a, b, rb.descriptor, probe_imm=9999)
    assert [b.imm_counter(42 + k).total for k in range(3)] == counts
    assert all(b.imm_counter(42 + k).credits == 0 for k in range(3))


def test_write_256_mib(engines):
    a, b = engines(2), engines(2)
    n = 256 << 20
    src = np.empty(n, np.uint8)
    src.view(np.uint64)[:] = np.arange(n // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15
    dst = np.zeros(n, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    a.write(ra, rb.descriptor, n, imm=5).wait(60)
    b.imm_counter(5).wait(fabric.imm_writes("write", domains=2, length=n), 60)
    assert np.array_equal(src, dst)


# ---- paged writes and scatter -------------------------------------------------------------------

@pytest.mark.adversarial
@pytest.mark.parametrize("domains", [1, 2])
def test_write_paged(engines, domains):
    a, b = engines(domains), engines(domains)
    page, src_stride, dst_stride, pages = 1000, 1024, 1500, 97
    src = random_bytes(src_stride * 128 + 64, 3)
    dst = np.zeros(dst_stride * 160 + 32, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    rng = np.random.default_rng(0)
    src_pages = rng.permutation(128)[:pages]
    dst_pages = rng.permutation(160)[:pages]
    t = a.write_paged(ra, rb.descriptor, page, src_pages, dst_pages, src_stride, dst_stride,
                      src_offset=64, dst_offset=32, imm=77)
    t.wait(10)
    c = b.imm_counter(77)
    c.wait(fabric.imm_writes("paged", domains=domains, pages=pages), 10)
    expect = np.zeros_like(dst)
    for s, d in zip(src_pages, dst_pages):
        expect[32 + d * dst_stride:32 + d * dst_stride + page] = src[64 + s * src_stride:64 + s * src_stride + page]
    np.testing.assert_array_equal(dst, expect)
    assert_no_more_imms(c, pages, a, b, rb.descriptor, probe_imm=9999)


@pytest.mark.adversarial
@pytest.mark.parametrize("sharding", ["targets", "bytes"])
def test_scatter(engines, sharding):
    a = engines(3)
    peers = [engines(2) for _ in range(3)]
    src = random_bytes(300_000, 11)
    ra = a.register(src)
    dsts = [np.zeros(200_000, np.uint8) for _ in peers]
    regs = [p.register(d) for p, d in zip(peers, dsts)]
    lengths = [100_001, 0, 77_777]  # uneven, and one empty target
    targets = [(r.descriptor, n, 1000 * i, 5 * i) for i, (r, n) in enumerate(zip(regs, lengths))]
    a.scatter(ra, targets, imm=9, sharding=sharding).wait(10)
    per_target = fabric.imm_writes("scatter", domains=3, sharding=sharding)
    for i, (p, n) in enumerate(zip(peers, lengths)):
        c = p.imm_counter(9)
        c.wait(per_target, 10)
        np.testing.assert_array_equal(dsts[i][5 * i:5 * i + n], src[1000 * i:1000 * i + n])
        assert not dsts[i][5 * i + n:].any()
        assert_no_more_imms(c, per_target, a, p, regs[i].descriptor, probe_imm=9999)


@pytest.mark.adversarial
@pytest.mark.parametrize("sharding", ["targets", "bytes"])
def test_prepared_scatter_targets_post_many_times(engines, sharding):
    """ScatterTargets built once (descriptors given as objects and as bytes) post the same writes as
    the plain list, every time: 3 pushes of new source contents, each checked bitwise with its imms."""
    a = engines(2)
    peers = [engines(2) for _ in range(2)]
    dsts = [np.zeros(100_000, np.uint8) for _ in peers]
    regs = [p.register(d) for p, d in zip(peers, dsts)]
    spans = [(0, 30_000, 0, 50), (1, 20_000, 30_000, 7), (0, 40_000, 50_000, 40_000), (1, 1, 90_000, 99_999)]
    descs = [bytes(regs[0].descriptor), regs[1].descriptor]  # peer 0's as bytes, peer 1's as the object
    prepared = fabric.ScatterTargets([(descs[i], n, so, do) for i, n, so, do in spans])
    # one descriptor object (or one bytes value) is copied once
    assert len(prepared) == 4 and prepared.nbytes == 90_001 and prepared.num_destinations == 2
    src = np.zeros(100_000, np.uint8)
    ra = a.register(src)
    per_target = fabric.imm_writes("scatter", domains=2, sharding=sharding)
    for push in range(3):
        src[:] = random_bytes(src.size, 40 + push)
        a.scatter(ra, prepared, imm=12, sharding=sharding).wait(10)
        for i, p in enumerate(peers):
            p.imm_counter(12).wait(per_target * sum(1 for t in spans if t[0] == i), 10)
        for i, n, so, do in spans:
            np.testing.assert_array_equal(dsts[i][do:do + n], src[so:so + n])


def test_prepared_scatter_targets_refuse_bad_input(engines):
    a, b = engines(), engines()
    rb = b.register(np.zeros(1000, np.uint8))
    ra = a.register(np.zeros(100, np.uint8))
    d = rb.descriptor
    with pytest.raises(TypeError, match="scatter target 1 must be"):
        fabric.ScatterTargets([(d, 1, 0, 0), (d, 1, 0)])
    with pytest.raises(TypeError, match="scatter target 0 descriptor"):
        fabric.ScatterTargets([("nope", 1, 0, 0)])
    with pytest.raises(ValueError, match="length"):
        fabric.ScatterTargets([(d, -1, 0, 0)])
    with pytest.raises(ValueError, match=r"scatter target 1: destination bytes \[999, 1001\) run past the end of "
                                         r"the destination region \(1000 bytes\)"):
        fabric.ScatterTargets([(d, 10, 0, 0), (d, 2, 0, 999)])
    with pytest.raises(ValueError, match="the destination list is empty"):
        fabric.ScatterTargets([])
    # the source bounds belong to each call: checked before anything is posted
    t = fabric.ScatterTargets([(d, 10, 0, 0), (d, 10, 95, 10)])
    with pytest.raises(ValueError, match=r"scatter: target 1: source bytes \[95, 105\) run past the end"):
        a.scatter(ra, t, imm=3)
    assert_no_more_imms(b.imm_counter(3), 0, a, b, d, probe_imm=9999)  # target 0 was not posted either


@pytest.mark.adversarial
def test_write_imm_and_barrier(engines):
    es = [engines() for _ in range(4)]
    regs = [e.register(np.zeros(4096, np.uint8)) for e in es]
    es[0].write_imm(regs[1].descriptor, 123).wait(10)
    es[1].imm_counter(123).wait(1, 10)
    # every engine barriers with all others
    ts = [e.barrier([r.descriptor for j, r in enumerate(regs) if j != i], imm=500) for i, e in enumerate(es)]
    for e in es:
        e.imm_counter(500).wait(3, 10)
    for t in ts:
        t.wait(10)


@pytest.mark.adversarial
def test_credit_semantics_arrivals_before_counter_and_wait(engines):
    a, b = engines(), engines()
    ra, rb = a.register(np.ones(64, np.uint8)), b.register(np.zeros(64, np.uint8))
    for _ in range(5):
        a.write(ra, rb.descriptor, 8, imm=31).wait(10)
    settle_imms(a, b, rb.descriptor, probe_imm=9999)  # every arrival counted
    c = b.imm_counter(31)  # created after the arrivals: they were banked
    assert c.total == 5
    c.wait(3, 1)
    c.wait(2, 1)
    with pytest.raises(TimeoutError, match="0 of 1"):
        c.wait(1, 0.2)
    assert b.imm_counter(31) is not None and b.imm_counter(31).id == c.id


@pytest.mark.adversarial
def test_on_count_callback(engines):
    a, b = engines(), engines()
    ra, rb = a.register(np.ones(64, np.uint8)), b.register(np.zeros(64, np.uint8))
    fired = threading.Event()
    thread_names = []
    b.imm_counter(3).on_count(4, lambda: (thread_names.append(threading.current_thread().name), fired.set()))
    for _ in range(3):
        a.write_imm(rb.descriptor, 3).wait(10)
    settle_imms(a, b, rb.descriptor, probe_imm=9999)  # the three arrived: one short of the count
    assert not fired.is_set()
    a.write_imm(rb.descriptor, 3).wait(10)
    assert fired.wait(5)
    assert thread_names and thread_names[0] != threading.main_thread().name


# ---- two-sided messages -------------------------------------------------------------------------

@pytest.mark.adversarial
def test_wait_any_takes_every_arrival_and_is_woken_by_one(engines):
    a, b = engines(), engines()
    ra, rb = a.register(np.ones(64, np.uint8)), b.register(np.zeros(64, np.uint8))
    c = b.imm_counter(41)
    t0 = time.monotonic()
    assert c.wait_any(0.1) == 0  # nothing there: 0 after the timeout, nothing raised
    assert time.monotonic() - t0 >= 0.09
    for _ in range(3):
        a.write_imm(rb.descriptor, 41).wait(10)
    settle_imms(a, b, rb.descriptor, probe_imm=9999)
    assert c.wait_any(1.0) == 3 and c.credits == 0  # every credit taken at once
    # A sleeper is woken by the arrival itself, long before its timeout.
    got = []
    sleeper = threading.Thread(target=lambda: got.append((c.wait_any(20.0), time.monotonic())))
    sleeper.start()
    time.sleep(0.2)
    sent = time.monotonic()
    a.write_imm(rb.descriptor, 41).wait(10)
    sleeper.join(10)
    assert got and got[0][0] == 1 and got[0][1] - sent < 5.0
    with pytest.raises(ValueError, match="finite number of seconds"):
        c.wait_any(-1.0)
    # Closing the engine wakes a sleeper with an error.
    errors = []

    def sleep_until_closed():
        try:
            c.wait_any(20.0)
        except fabric.TransferError as e:
            errors.append(str(e))

    sleeper = threading.Thread(target=sleep_until_closed)
    sleeper.start()
    time.sleep(0.2)
    b.close()
    sleeper.join(10)
    assert not sleeper.is_alive() and errors


def test_send_recv(engines):
    a, b = engines(2), engines()
    a.send(b.address, b"first").wait(10)
    a.send(fabric.NetAddress.from_bytes(bytes(b.address)), b"x" * 100_000).wait(10)
    sender, first = b.recv_message(10)
    assert first == b"first" and sender == a.address
    assert b.recv(10) == b"x" * 100_000
    with pytest.raises(TimeoutError):
        b.recv(0.2)
    with pytest.raises(ValueError, match="control-message limit"):
        a.send(b.address, b"y" * (a._native.max_message_bytes + 1))


# ---- watchers and jit ops -----------------------------------------------------------------------

def test_watcher_callbacks(engines):
    e = engines()
    seen = []
    got = threading.Event()

    def cb(slot, old, new):
        seen.append((slot, old, new, threading.current_thread() is threading.main_thread()))
        if new == 3:
            got.set()

    w = e.watcher(cb)
    s0, s5 = w.slot(0), w.slot(5)
    s5.store(1)
    time.sleep(0.05)
    s0.store(3)
    assert got.wait(5)
    assert (5, 0, 1, False) in seen and (0, 0, 3, False) in seen
    with pytest.raises(ValueError, match="out of range"):
        w.slot(fabric.Watcher.num_slots)


def test_jit_signal_and_wait(engines):
    import jax
    import jax.numpy as jnp

    a, b = engines(), engines()
    layer_done = threading.Event()
    values = []
    w = b.watcher(lambda slot, old, new: (values.append(new), layer_done.set()))
    slot = w.slot(1)
    counter = b.imm_counter(11)
    ra = a.register(np.arange(256, dtype=np.float32))
    dst = np.zeros(256, np.float32)
    rb = b.register(dst)

    @jax.jit
    def produce(x):
        y = jnp.sin(x) * 2.0
        return fabric.signal(slot, jnp.uint32(7), y)  # signal only once y exists

    @jax.jit
    def consume(x):
        x = fabric.wait(counter, 1, x)  # x's consumers run after the imm arrived
        return x + 1.0

    out = produce(jnp.ones(8))
    np.testing.assert_allclose(out, np.sin(np.ones(8)) * 2.0, rtol=1e-6)
    assert layer_done.wait(5) and values[-1] == 7 and slot.value == 7

    def remote():
        time.sleep(0.3)
        a.write(ra, rb.descriptor, 1024, imm=11).wait(10)

    th = threading.Thread(target=remote)
    th.start()
    t0 = time.monotonic()
    res = consume(jnp.zeros(4))
    res.block_until_ready()
    assert time.monotonic() - t0 >= 0.25  # it really waited for the imm
    th.join()
    np.testing.assert_array_equal(res, np.ones(4))
    np.testing.assert_array_equal(dst, np.arange(256, dtype=np.float32))


def test_jit_wait_times_out_with_error(engines):
    import jax
    import jax.numpy as jnp

    b = engines()
    counter = b.imm_counter(99)
    f = jax.jit(lambda x: fabric.wait(counter, 2, x, timeout=0.3) * 2)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="0 of 2 arrivals"):
        f(jnp.ones(3)).block_until_ready()
    assert time.monotonic() - t0 < 10


def test_jit_ops_report_gone_objects_and_failures_by_error_code(engines):
    """The fabric handlers use the one error mapping of ffi/xla/handler_util.h: a program built
    against a watcher that is gone fails with FAILED_PRECONDITION, a wait on a closed engine's
    counter with ABORTED, a wait that runs out with DEADLINE_EXCEEDED; each message names the op."""
    import gc

    import jax
    import jax.numpy as jnp

    e = engines()
    x = jnp.ones(2)

    def build(watcher):  # the compiled programs keep no reference to the watcher
        slot = watcher.slot(0)
        counter = e.imm_counter(5)
        signal = jax.jit(lambda v: fabric.signal(slot, jnp.uint32(3), v)).lower(x).compile()
        wait = jax.jit(lambda v: fabric.wait(counter, 1, v, timeout=0.2)).lower(x).compile()
        return signal, wait

    watcher = e.watcher(lambda s, old, new: None)
    signal, wait = build(watcher)
    np.testing.assert_array_equal(signal(x), np.ones(2))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"DEADLINE_EXCEEDED: fabric\.wait: .*0 of 1 arrivals"):
        wait(x).block_until_ready()
    del watcher
    e.close()
    gc.collect()
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"FAILED_PRECONDITION: fabric\.signal: 0x[0-9a-f]+ is not a slot of a live watcher"):
        signal(x).block_until_ready()
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"ABORTED: fabric\.wait: .*engine closed"):
        wait(x).block_until_ready()


# ---- bad input ----------------------------------------------------------------------------------

def test_garbled_and_truncated_bytes_rejected(engines):
    a = engines(2)
    r = a.register(np.zeros(4096, np.uint8))
    for blob, parse in ((bytes(r.descriptor), fabric.MemoryDescriptor.from_bytes),
                        (bytes(a.address), fabric.NetAddress.from_bytes)):
        assert parse(blob) is not None
        for cut in (0, 1, 5, len(blob) // 2, len(blob) - 1):
            with pytest.raises(ValueError):
                parse(blob[:cut])
        for pos in range(0, len(blob), max(1, len(blob) // 23)):
            bad = bytearray(blob)
            bad[pos] ^= 0x5A
            with pytest.raises(ValueError):
                parse(bytes(bad))
        with pytest.raises(ValueError, match="trailing|checksum"):
            parse(blob + b"\0")
    with pytest.raises(ValueError, match="wrong magic"):
        fabric.MemoryDescriptor.from_bytes(bytes(a.address))


def test_out_of_bounds_and_bad_arguments_rejected_before_posting(engines):
    a, b = engines(), engines()
    src, dst = random_bytes(1000, 5), np.zeros(1000, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    d = rb.descriptor
    cases = [
        (lambda: a.write(ra, d, 1001), "past the end of the source"),
        (lambda: a.write(ra, d, 10, src_offset=995), "past the end of the source"),
        (lambda: a.write(ra, d, 10, dst_offset=991), "past the end of the destination"),
        (lambda: a.write(ra, d, -1), ">= 0"),
        (lambda: a.write(ra, d, 1 << 70), "64 bits"),
        (lambda: a.write(ra, d, 10, src_offset=-5), ">= 0"),
        (lambda: a.write(ra, d, 10, imm=1 << 32), "32 bits"),
        (lambda: a.write(ra, d, 2 ** 64 - 1, src_offset=2), "past the end"),
        (lambda: a.write_paged(ra, d, 100, [0, 10], [0, 1], 100, 100), "source page 10"),
        (lambda: a.write_paged(ra, d, 100, [0, 1], [0, 10], 100, 100), "destination page 10"),
        (lambda: a.write_paged(ra, d, 100, [0, 1], [0], 100, 100), "2 source pages but 1"),
        (lambda: a.write_paged(ra, d, 100, [0, 1], [0, 1], 50, 100), "overlap"),
        (lambda: a.write_paged(ra, d, 0, [0], [0], 100, 100), "page_bytes"),
        (lambda: a.scatter(ra, [(d, 10, 0, 995)]), "target 0: destination"),
        (lambda: a.scatter(ra, []), "empty"),
        (lambda: a.scatter(ra, [(d, 10, 0, 0)], sharding="rows"), "'targets' or 'bytes'"),
        (lambda: a.barrier([], imm=1), "empty"),
        (lambda: a.write(rb, d, 1), "not registered with this engine"),
        (lambda: a.register(np.zeros(0, np.uint8)), "empty"),
        (lambda: a.register(np.zeros((4, 4))[:, ::2]), "C-contiguous"),
        (lambda: fabric.TransferEngine(provider=PROVIDER, domains=9), "domains"),
        (lambda: fabric.TransferEngine(provider=PROVIDER, timeout=0), "timeout"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()
    # wrong types are TypeError, as in jax
    type_cases = [
        (lambda: a.write(d, d, 1), "MemoryRegion"),
        (lambda: a.register([1, 2]), "cannot register list"),
        (lambda: a.write(ra, d, 1.5), "length must be an integer"),
        (lambda: a.write(ra, "not a descriptor", 1), "MemoryDescriptor"),
        (lambda: a.send(a.address, 12), "bytes-like"),
        (lambda: fabric.TransferEngine(provider=PROVIDER, timeout="1"), "timeout must be a number"),
    ]
    for fn, msg in type_cases:
        with pytest.raises(TypeError, match=msg):
            fn()
    settle_imms(a, b, d, probe_imm=9999)
    assert not dst.any(), "a rejected op wrote data"
    assert b.imm_counter(0).total == 0


def test_descriptor_from_other_provider_rejected(engines):
    a = engines()
    ra = a.register(np.zeros(64, np.uint8))
    d = ra.descriptor
    blob = bytearray(bytes(d))
    # rewrite the provider name (length-prefixed after magic+version) and fix the checksum
    import struct
    import zlib  # noqa: F401
    n = struct.unpack_from("<H", blob, 6)[0]
    name = b"efa".ljust(n, b"x")[:n]
    blob[8:8 + n] = name
    from jax_garden._jax_garden import fabric as native  # noqa: F401
    body = bytes(blob[:-4])
    h = 2166136261
    for byte in body:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    other = fabric.MemoryDescriptor.from_bytes(body + struct.pack("<I", h))
    with pytest.raises(ValueError, match="for provider 'efa"):
        a.write(ra, other, 8)


def test_gpu_registration_names_the_provider(engines):
    a = engines()
    with pytest.raises(ValueError, match="tcp.*GPU memory"):
        a.register((0x10000, 4096), memory="cuda")


# ---- faults -------------------------------------------------------------------------------------

def test_unreachable_peer_fails_within_timeout(engines):
    a = engines(timeout=2.0)
    gone = fabric.TransferEngine(provider=PROVIDER)
    rg = gone.register(np.zeros(4096, np.uint8))
    desc = rg.descriptor
    gone.close()
    ra = a.register(np.ones(4096, np.uint8))
    t0 = time.monotonic()
    t = a.write(ra, desc, 4096, imm=1)
    with pytest.raises((fabric.TransferError, TimeoutError)):
        t.wait(30)
    assert time.monotonic() - t0 < 2.0 + 3.0
    assert t.failed and t.error
    # the engine still works with a live peer
    b = engines()
    rb = b.register(np.zeros(4096, np.uint8))
    a.write(ra, rb.descriptor, 4096, imm=2).wait(10)
    b.imm_counter(2).wait(1, 10)


def test_close_with_ops_in_flight_fails_them_and_leaks_no_threads(engines):
    before = native_threads()
    a, b = fabric.TransferEngine(provider=PROVIDER, domains=2), fabric.TransferEngine(provider=PROVIDER)
    n = 64 << 20
    ra, rb = a.register(np.ones(n, np.uint8)), b.register(np.zeros(n, np.uint8))
    ts = [a.write(ra, rb.descriptor, n, imm=1) for _ in range(8)]
    w = a.watcher(lambda *args: None)
    w.slot(0)
    a.close()
    outcomes = []
    for t in ts:
        try:
            t.wait(10)
            outcomes.append("done")
        except fabric.TransferError as e:
            assert "closed" in str(e)
            outcomes.append("failed")
    assert "failed" in outcomes and all(t.done for t in ts)
    with pytest.raises(fabric.TransferError, match="closed"):
        a.write(ra, rb.descriptor, 1)
    b.close()
    a.close()  # idempotent
    del ra, rb
    time.sleep(0.1)
    assert native_threads() <= before


def test_context_manager_closes():
    with fabric.TransferEngine(provider=PROVIDER) as e:
        assert not e.closed
    assert e.closed
