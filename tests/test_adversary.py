"""The engine's adversarial delivery mode (docs/testing.md) and the receivers' bounds at the exact
boundary:

* settings: parsed and refused with clear errors; the environment variable; off by default;
* it acts on every path (fabric RMA, same-process ipc, staged) and its counters say so;
* what it must never do: count an imm before its own piece's data landed (checked on every path
  from the receiver's imm callbacks), lose a piece, or complete a delivery-completion op before its
  bytes landed; with transmit completion it reports an op complete while the bytes are held, having
  copied the source first;
* a connection reset mid-op fails the op loudly: the pieces before the reset landed, none after;
* held pieces of an op that fails are dropped, never posted late;
* forged writes one byte past a region, on the ipc path and into a staged receiver (forged control
  messages), are refused and a guard byte after the region never changes.
"""

from __future__ import annotations

import os
import struct
import threading
import time

import numpy as np
import pytest

from conftest import adversary_quiet, assert_no_more_imms, random_bytes, settle_imms
from descriptor_codec import decode, forge
from jax_garden import _adversary, fabric

HEAVY = "seed=3,hold=0.8,msg=0.5,imm=0.5,last=0.8,delay_ms=4,last_ms=20"
TARGETED_ONLY = "seed=1,hold=0,msg=0,imm=0,last=0,tail=0"


# ---- settings ------------------------------------------------------------------------------------------

def test_settings_are_parsed_and_bad_ones_refused(engines, monkeypatch):
    monkeypatch.delenv("JAX_GARDEN_ADVERSARY", raising=False)
    assert engines().adversary is None  # off by default
    for off in ("", "off", "0", "no", "false"):
        assert engines(adversary=off).adversary is None
    a = engines(adversary="seed=9,hold=0.25,delay_ms=2,last_ms=8,reset=0.5,early=0,split=5")
    spec = a.adversary.spec
    for part in ("seed=9", "hold=0.25", "tail=0.05", "delay_ms=2", "last_ms=8", "reset=0.5", "early=0", "split=5"):
        assert part in spec, spec
    assert engines(adversary="42").adversary.spec.startswith("seed=42,")  # a bare number is the seed
    for bad, msg in [("seed=1,bogus=2", "unknown setting 'bogus'"), ("hold=1.5", "hold is a probability"),
                     ("seed=-1", "seed must be"), ("delay_ms=x", "is not a number"),
                     ("delay_ms=20,last_ms=10", "last_ms"), ("early=2", "early is 0 or 1"), ("split=0", "split")]:
        with pytest.raises(ValueError, match=msg):
            engines(adversary=bad)
    with pytest.raises(TypeError, match="adversary"):
        engines(adversary=7)
    monkeypatch.setenv("JAX_GARDEN_ADVERSARY", "seed=5,imm=0.9")
    assert engines().adversary.spec.startswith("seed=5,") and "imm=0.9" in engines().adversary.spec
    assert engines(adversary="").adversary is None  # an explicit setting wins over the environment
    monkeypatch.setenv("JAX_GARDEN_ADVERSARY", "hold=7")
    with pytest.raises(ValueError, match="JAX_GARDEN_ADVERSARY"):
        engines()
    e = engines(adversary=TARGETED_ONLY)
    with pytest.raises(ValueError, match="32 bits"):
        e.adversary.hold(1 << 32)
    with pytest.raises(TypeError):
        e.adversary.hold("7")
    e.adversary.hold(7)
    with pytest.raises(ValueError, match="already active"):
        e.adversary.hold(7)
    assert e.adversary.release(7) == 0


# ---- it acts, on every path, and never delivers an imm before its data -------------------------------------

def _paths(engines, spec: str, *, completion: str = "delivery"):
    """(name, sender, receiver, source region, destination region, destination array, path) per path."""
    out = []
    for seed, name in enumerate(("fabric", "ipc", "staged")):
        kw = dict(split_threshold=8192, staging_chunk_bytes=8192, staging_slots=4, completion=completion)
        a, b = engines(2, adversary=spec, **kw), engines(2, adversary=spec, **kw)
        src = random_bytes(1 << 20, seed)
        dst = np.zeros(1 << 20, np.uint8)
        ra = a.register(src, staged=name == "staged")  # staged source: chunks written straight to dst
        rb = b.register(dst)
        path = "ipc" if name == "ipc" else None
        assert a.path_for(ra, rb.descriptor, path) == name
        out.append((name, a, b, ra, rb, src, dst, path))
    return out


def test_imm_never_counted_before_its_data_on_every_path(engines):
    """Under heavy holding and reordering, every imm a receiver counts proves its own data landed: each
    op carries its own imm value, and the receiver's on_count callback (run once the count is there)
    finds every byte of that op already in place."""
    for name, a, b, ra, rb, src, dst, path in _paths(engines, HEAVY):
        problems: list[str] = []
        ops = []  # (imm, [(dst offset, src offset, length)], expected imms)
        slot = 16 << 10
        for i in range(40):
            imm = 1000 + i
            base = i * slot
            if i % 3 == 0:  # a single write, cut over both domains when long
                n = slot if i % 2 else 3000 + i
                t = a.write(ra, rb.descriptor, n, base, base, imm=imm, path=path)
                ops.append((imm, [(base, base, n)], fabric.imm_writes("write", domains=2, length=n,
                                                                      split_threshold=a.split_threshold), t))
            elif i % 3 == 1:  # paged: one imm per page
                pages = np.arange(4)
                t = a.write_paged(ra, rb.descriptor, 1024, pages[::-1], pages, 4096, 4096, base, base, imm=imm,
                                  path=path)
                ops.append((imm, [(base + p * 4096, base + (3 - p) * 4096, 1024) for p in range(4)], 4, t))
            else:
                t = a.scatter(ra, [(rb.descriptor, 5000, base, base), (rb.descriptor, 777, base + 8192, base + 9000)],
                              imm=imm, sharding="bytes", path=path)
                ops.append((imm, [(base, base, 5000), (base + 9000, base + 8192, 777)],
                            2 * fabric.imm_writes("scatter", domains=2, sharding="bytes"), t))
        done = threading.Semaphore(0)
        for imm, spans, count, _ in ops:
            def check(imm=imm, spans=spans):
                for d, s, n in spans:
                    if not np.array_equal(dst[d:d + n], src[s:s + n]):
                        problems.append(f"{name}: imm {imm} counted before its bytes [{d}, {d + n}) landed")
                done.release()
            b.imm_counter(imm).on_count(count, check)
        for *_, t in ops:
            t.wait(30)
        for _ in ops:
            assert done.acquire(timeout=30), f"{name}: not every op's imms arrived"
        assert not problems, problems[:5]
        settle_imms(a, b, rb.descriptor, probe_imm=99)
        for imm, _, count, _ in ops:
            c = b.imm_counter(imm)
            assert c.total == count and c.credits == 0, (name, imm, c.total, count)
        sa, sb = a.adversary.stats(), b.adversary.stats()
        assert sa["held"] > 0 and sa["reordered"] > 0, (name, sa)
        if name == "fabric":
            assert sa["last_held"] > 0 and sb["imms_held"] > 0, (sa, sb)
        if name == "ipc":  # copies started late and reordered; records cut; the owner held what it took
            assert sa["copies_delayed"] > 0 and sa["imm_splits"] > 0 and sb["imms_held"] > 0, (sa, sb)
        if name == "staged":
            assert sa["imm_splits"] > 0, sa


def test_delivery_completion_never_early_and_transmit_completion_copies_the_source(engines):
    b = engines()
    dst = np.zeros(1 << 16, np.uint8)
    rb = b.register(dst)
    for completion in ("delivery", "transmit"):
        a = engines(completion=completion, adversary=TARGETED_ONLY)
        src = np.full(1 << 16, 7, np.uint8)
        ra = a.register(src)
        dst[:] = 0
        imm = 50 if completion == "delivery" else 51
        a.adversary.hold(imm)
        t = a.write(ra, rb.descriptor, 4096, imm=imm)
        assert a.adversary.holding(imm) == 1
        time.sleep(0.2)  # the write is held: nothing has landed
        assert not dst.any()
        if completion == "delivery":
            assert not t.done, "a delivery-completion write completed while its bytes were held"
        else:
            assert t.done and not t.failed, "a transmit-completion write is reported complete while held"
            assert a.adversary.stats()["early_completions"] == 1
            src[:] = 9  # the caller may reuse its source now: what was written at the call lands
        assert a.adversary.release(imm) == 1
        t.wait(10)
        b.imm_counter(imm).wait(1, 10)
        assert (dst[:4096] == 7).all() and not dst[4096:].any()


# Every ipc copy held; the first one of an engine (seed 7) for about 1.5 s.
IPC_HELD = "seed=7,hold=1,msg=0,imm=0,last=0,tail=0,delay_ms=1500,last_ms=1500"


def test_ipc_held_copy_delivery_completion_waits_and_transmit_completion_copies_the_source(engines):
    """On the ipc path a held copy starts late: a delivery-completion write stays pending until its bytes
    landed and its record was taken; a transmit-completion write is reported done at once, from a copy
    of its source taken at the call (the source changed while the copy is still held)."""
    b = engines()
    dst = np.zeros(1 << 16, np.uint8)
    rb = b.register(dst)
    for completion, imm in (("delivery", 60), ("transmit", 61)):
        a = engines(completion=completion, adversary=IPC_HELD)
        src = np.full(1 << 16, 7, np.uint8)
        ra = a.register(src)
        dst[:] = 0
        t = a.write(ra, rb.descriptor, 4096, imm=imm, path="ipc")
        if completion == "delivery":
            assert not t.done, "a delivery-completion ipc write completed while its copy was held"
            assert a.adversary.stats()["held_now"] == 1 and not dst.any()
        else:
            assert t.done and not t.failed, "a transmit-completion ipc write is reported done while held"
            assert a.adversary.stats()["early_completions"] == 1
            src[:] = 9  # the caller may reuse its source now: what was written at the call lands
            assert a.adversary.stats()["held_now"] == 1, "the copy was no longer held when the source changed"
        t.wait(10)
        b.imm_counter(imm).wait(1, 10)
        assert (dst[:4096] == 7).all() and not dst[4096:].any()
        assert a.adversary.stats()["copies_delayed"] == 1
        adversary_quiet(a)


def test_ipc_held_copies_are_overtaken_and_every_imm_still_proves_its_data(engines):
    """Toward one owner, a copy held back starts after later ones (their records are taken first), and
    each imm the owner counts still finds its own bytes in place."""
    a = engines(adversary="seed=5,hold=0.5,msg=0,imm=0.5,last=0,tail=0.2,delay_ms=4,last_ms=30")
    b = engines()
    src = random_bytes(64 * 4096, 11)
    dst = np.zeros_like(src)
    ra, rb = a.register(src), b.register(dst)
    problems: list[str] = []
    done = threading.Semaphore(0)
    order: list[int] = []
    for i in range(64):
        def check(i=i):
            order.append(i)
            if not np.array_equal(dst[i * 4096:(i + 1) * 4096], src[i * 4096:(i + 1) * 4096]):
                problems.append(f"imm {200 + i} counted before its bytes landed")
            done.release()
        b.imm_counter(200 + i).on_count(1, check)
    ts = [a.write(ra, rb.descriptor, 4096, i * 4096, i * 4096, imm=200 + i, path="ipc") for i in range(64)]
    for t in ts:
        t.wait(10)
    for _ in range(64):
        assert done.acquire(timeout=10)
    assert not problems, problems[:5]
    s = a.adversary.stats()
    assert s["copies_delayed"] > 0 and s["tail_held"] > 0 and s["reordered"] > 0, s
    assert order != sorted(order), "every imm was counted in submission order"
    assert np.array_equal(dst, src)


def test_reset_mid_op_fails_the_op_and_only_the_first_pieces_land(engines):
    a = engines(adversary="seed=4,hold=0,msg=0,imm=0,last=0,tail=0,reset=1")
    b = engines()
    src, dst = random_bytes(64 * 1024, 2), np.zeros(64 * 1024, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    pages = np.arange(16)
    t = a.write_paged(ra, rb.descriptor, 1024, pages, pages, 1024, 1024, imm=8)
    with pytest.raises(fabric.TransferError, match="connection reset"):
        t.wait(10)
    assert a.adversary.stats()["resets"] == 1
    # One imm per page that went before the reset; those pages landed, the others never do.
    settle_imms(a, b, rb.descriptor, probe_imm=98)
    landed = b.imm_counter(8).total
    assert 1 <= landed < 16
    assert np.array_equal(dst[:landed * 1024], src[:landed * 1024]) and not dst[landed * 1024:].any()
    # The connection recovers: a single-piece op is never reset.
    a.write(ra, rb.descriptor, 1024, imm=9).wait(10)
    b.imm_counter(9).wait(1, 10)


def test_held_pieces_of_a_failed_op_are_dropped_not_posted_late(engines):
    a = engines(timeout=1.0, adversary=TARGETED_ONLY)
    b = engines()
    src, dst = np.ones(8192, np.uint8), np.zeros(8192, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    a.adversary.hold(12)
    t = a.write(ra, rb.descriptor, 8192, imm=12)
    with pytest.raises((TimeoutError, fabric.TransferError)):
        t.wait(10)  # the engine's deadline fails the op whose piece never went
    adversary_quiet(a)  # dropped, not held any more
    assert a.adversary.holding(12) == 0 and a.adversary.release(12) == 0
    # The timeout charged the silent peer: ops toward it fail at once for the engine timeout (1 s);
    # the probe goes once that quarantine is over.
    time.sleep(1.2)
    assert_no_more_imms(b.imm_counter(12), 0, a, b, rb.descriptor, probe_imm=97)
    assert not dst.any()


def test_process_totals_include_every_engine(engines):
    before = _adversary.totals()
    a, b = engines(adversary="seed=2,hold=1"), engines()
    ra, rb = a.register(np.ones(4096, np.uint8)), b.register(np.zeros(4096, np.uint8))
    for _ in range(5):
        a.write(ra, rb.descriptor, 64, imm=3).wait(10)
    a.close()
    after = _adversary.totals()
    assert after["held"] - before["held"] == 5 == after["pieces"] - before["pieces"]


# ---- exact-boundary forged writes ----------------------------------------------------------------------

GUARD = 0xAB


def test_ipc_receiver_refuses_writes_past_the_region_at_the_exact_boundary(engines):
    a, b = engines(), engines()
    src = a.register(np.full(16384, 0xCD, np.uint8))
    arena = np.zeros(8193, np.uint8)
    arena[8192] = GUARD  # the byte just past the registered region
    rd = b.register(arena[:8192])
    forged = forge(rd.descriptor, length=8193)  # claims one byte more than the owner registered
    refused = [lambda: a.write(src, forged, 8193, path="ipc"),
               lambda: a.write(src, forged, 2, dst_offset=8191, path="ipc"),
               lambda: a.write(src, forged, 1, dst_offset=8192, path="ipc"),
               lambda: a.write_paged(src, forged, 4096, [0], [1], 4096, 4096, dst_offset=1, path="ipc"),
               lambda: a.scatter(src, [(forged, 4097, 0, 4096)], path="ipc")]
    for op in refused:
        with pytest.raises(ValueError, match=r"run past the end of the region \(8192 bytes\)"):
            op()
        assert arena[8192] == GUARD and not arena[:8192].any()
    # Up to the last byte is fine, with the real descriptor and with the forged one.
    a.write(src, rd.descriptor, 8192, path="ipc", imm=4).wait(10)
    b.imm_counter(4).wait(1, 10)
    assert (arena[:8192] == 0xCD).all() and arena[8192] == GUARD
    arena[:8192] = 0
    a.write(src, forged, 1, dst_offset=8191, path="ipc", imm=5).wait(10)
    a.write_paged(src, forged, 4096, [0], [1], 4096, 4096, path="ipc", imm=5).wait(10)
    b.imm_counter(5).wait(2, 10)
    assert (arena[4096:8192] == 0xCD).all() and not arena[:4096].any() and arena[8192] == GUARD


STAGE_OPEN, STAGE_CHUNK = 2, 4  # control.h MsgKind


def _stage_open(xfer: int, d: dict, total: int, imm: int) -> bytes:
    return struct.pack("<QQQQQQBIQ", xfer, d["region_key"], d["base"], d["length"], total, 1, 1, imm, 1)


def _stage_chunk(xfer: int, slot: int, off: int, length: int) -> bytes:
    return struct.pack("<QII", xfer, slot, 1) + struct.pack("<QQ", off, length)


def test_staged_receiver_refuses_segments_past_the_region_at_the_exact_boundary(engines):
    """A peer that forges the staging rendezvous (open a transfer into a region whose key it holds, then
    announce a chunk whose segment ends one byte past the region) is refused; a segment ending exactly
    at the region's end lands. Each forged transfer is followed by a valid one whose imm proves the
    receiver handled the forged one first (one connection, in order)."""
    kw = dict(staging_chunk_bytes=8192, staging_slots=2)
    a, b = engines(adversary="", **kw), engines(adversary="", **kw)
    arena = np.zeros(8193, np.uint8)
    arena[8192] = GUARD
    rd = b.register(arena[:8192], staged=True)
    d = decode(bytes(rd.descriptor))
    # A real staged write first: the receiver's bounce slot 0 now holds 0xCD bytes.
    src = a.register(np.full(8192, 0xCD, np.uint8))
    a.write(src, rd.descriptor, 8192, imm=60).wait(10)
    b.imm_counter(60).wait(1, 10)
    arena[:8192] = 0
    slots = b.staging_stats()["recv_slots"]

    def free_slots_become(n: int, what: str) -> None:
        deadline = time.monotonic() + 10
        while b.staging_stats()["recv_slots_free"] != n:
            assert time.monotonic() < deadline, what
            time.sleep(0.002)

    def forged_transfer(xfer: int, off: int, length: int, imm: int) -> None:
        free_slots_become(slots, "the receiver's slots did not come back")
        a._native._send_internal(b.address, STAGE_OPEN, _stage_open(xfer, d, length, imm)).wait(10)
        free_slots_become(slots - 1, "no slot was granted to the forged transfer")  # slot 0: the last freed
        a._native._send_internal(b.address, STAGE_CHUNK, _stage_chunk(xfer, 0, off, length)).wait(10)

    xfer = 1 << 40
    for off, length in [(8192 - 63, 64), (8192, 1), (8191, 2)]:
        xfer += 1
        forged_transfer(xfer, off, length, imm=61)
        xfer += 1
        forged_transfer(xfer, 8192 - 64, 64, imm=62)  # valid: ends exactly at the region's end
        b.imm_counter(62).wait(1, 10)
        assert arena[8192] == GUARD, f"segment [{off}, +{length}) wrote past the region"
        assert (arena[8128:8192] == 0xCD).all() and not arena[:8128].any()
        arena[:8192] = 0
    assert b.imm_counter(61).total == 0  # no forged transfer completed
    s = b.staging_stats()
    assert s["recv_slots_free"] == s["recv_slots"] and s["inbound"] == 0, s
