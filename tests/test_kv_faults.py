"""jax_garden.kv conventions and fault signals: every wrong type a TypeError and every wrong value a
ValueError before anything is posted, one timeout rule, clear errors after close(), pages chosen by
the caller, the prefill side told when its stream ends badly, host reads of the cache, re-registering
moved buffers, and dead or silent peers noticed within the liveness interval (real processes,
SIGKILL and SIGSTOP) with the engine timeout far longer."""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest

from fabric_group import run_group
from kv_workers import check_request, run_prefill

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jax_garden import fabric, kv  # noqa: E402

SMALL = dict(num_layers=3, num_pages=48, page_tokens=4, kv_heads=4, head_dim=8, dtype="float32")


@pytest.fixture
def pair():
    made = []

    def make(layout=None, **kw):
        layout = layout or kv.KVLayout(**SMALL)
        ed, ep = (fabric.TransferEngine(provider="tcp", timeout=3.0) for _ in range(2))
        made.extend([ed, ep])
        dec = kv.DecodeSide(kv.PagedKVCache(ed, layout), timeout=20, **kw)
        pf = kv.PrefillSide(kv.PagedKVCache(ep, layout), timeout=20)
        made[:0] = [dec, pf]
        return dec, pf

    yield make
    for x in made:
        x.close()


# ---- conventions ----------------------------------------------------------------------------------

def test_wrong_types_and_values(pair):
    dec, pf = pair()
    cache = dec.cache
    req = dec.reserve(4)
    type_errors = [
        lambda: dec.reserve(3.5), lambda: dec.reserve("4"), lambda: dec.reserve(4, timeout="1"),
        lambda: req.wait(timeout="1"), lambda: req.cancel(timeout=[1]), lambda: pf.recv_ticket(timeout="x"),
        lambda: dec.recv_message(timeout=b"1"), lambda: dec.send_ticket(pf.contact, 3),
        lambda: dec.send_ticket(12, req), lambda: dec.send_message(pf.contact, "text"),
        lambda: dec.reserve(4, pages=[1.5]), lambda: kv.PageAllocator("3"), lambda: cache.allocator.alloc(2.0),
        lambda: cache.allocator.free("0"), lambda: kv.DecodeSide(cache, max_requests="8"),
        lambda: kv.DecodeSide(cache, timeout="30"), lambda: kv.DecodeSide(cache, liveness_s=None),
        lambda: kv.PrefillSide(pf.cache, timeout="x"), lambda: pf.open_stream(req.ticket, [0], layerwise="yes"),
        lambda: pf.open_stream(req.ticket, [0], on_end=3), lambda: pf.open_stream(req.ticket, "0"),
        lambda: pf.marks.slot(1.5), lambda: kv.plan_writes(cache.layout, "1", 1, [0], [0]),
        lambda: kv.kv_imm("0", 0, 0, 0), lambda: cache.region("0", 0, 0), lambda: cache.read(1.0),
        lambda: cache.commit("k", cache.v), lambda: kv.KVLayout(**{**SMALL, "page_tokens": 1.5}),
        lambda: kv.PagedKVCache(dec.cache.engine, kv.KVLayout(**SMALL), devices=3),
        lambda: kv.Ticket.from_bytes("ticket"),
    ]
    for i, call in enumerate(type_errors):
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"case {i} raised nothing")
    value_errors = [
        lambda: dec.reserve(0), lambda: req.wait(timeout=-1), lambda: req.wait(timeout=float("nan")),
        lambda: req.wait(timeout=float("inf")), lambda: dec.reserve(4, timeout=-0.5),
        lambda: dec.reserve(4, pages=[1, 1]), lambda: dec.reserve(4, pages=[1, 2]), lambda: dec.reserve(4, pages=[99]),
        lambda: kv.PageAllocator(0), lambda: cache.allocator.alloc(0), lambda: cache.allocator.free([48]),
        lambda: kv.DecodeSide(cache, max_requests=0), lambda: kv.DecodeSide(cache, liveness_s=0),
        lambda: pf.marks.slot(3), lambda: cache.region(0, 2, 0), lambda: cache.read(3), lambda: kv.kv_imm(15, 0, 0, 0),
        lambda: kv.plan_writes(cache.layout, 3, 1, [0], [0]), lambda: pf.recv_ticket(timeout=-1),
    ]
    for i, call in enumerate(value_errors):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} raised nothing")
    # timeout 0 checks once without blocking
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        req.wait(0)
    with pytest.raises(TimeoutError):
        pf.recv_ticket(0)
    assert time.monotonic() - t0 < 1.0
    assert req.state is kv.State.PENDING and req.progress()["opened"] is False  # nothing was posted


def test_every_call_after_close_is_a_clear_error(pair):
    dec, pf = pair()
    req = dec.reserve(4)
    dec.close()
    assert req.state is kv.State.CANCELLED
    for call in (lambda: dec.reserve(4), lambda: dec.send_ticket(pf.contact, req), lambda: dec.poll(),
                 lambda: dec.send_message(pf.contact, b"x"), lambda: dec.recv_message(0.1), lambda: dec.lookup(req.ticket)):
        with pytest.raises(RuntimeError, match="DecodeSide is closed"):
            call()
    dec.close()  # idempotent
    pf.close()
    for call in (lambda: pf.recv_ticket(0.1), lambda: pf.open_stream(req.ticket, [0]),
                 lambda: pf.send_message(dec.contact, b"x"), lambda: pf.recv_message(0.1)):
        with pytest.raises(RuntimeError, match="PrefillSide is closed"):
            call()


# ---- pages, prefill told, host reads, re-registration ---------------------------------------------------

def test_reserve_chosen_pages(pair):
    dec, pf = pair()
    alloc = dec.cache.allocator
    req = dec.reserve(9, pages=[40, 3, 17])  # 3 pages of 4 tokens, in token order
    assert req.pages.tolist() == [40, 3, 17] and not alloc.is_free([40, 3, 17]).any()
    with pytest.raises(kv.OutOfPages, match="page 3 is not free"):
        dec.reserve(4, pages=[3])
    with pytest.raises(kv.OutOfPages, match="page 40 is not free"):
        alloc.take([41, 40])
    assert alloc.is_free([41]).all()  # nothing taken by the refused call
    run_prefill(pf, req.ticket, 6)
    assert req.wait(20) is kv.State.READY
    check_request(dec.cache, req, 6)
    req.release()
    assert alloc.is_free([40, 3, 17]).all()


def test_prefill_is_told_when_its_stream_is_cancelled(pair):
    dec, pf = pair()
    req = dec.reserve(8)
    told = threading.Event()
    seen = []
    s = pf.open_stream(req.ticket, pf.cache.allocator.alloc(2), on_end=lambda st: (seen.append(st), told.set()))
    s.check()  # streaming: nothing to say
    pf.marks.slot(0).store(s.token)
    assert req.cancel() is kv.State.CANCELLED
    assert told.wait(10) and seen == [s] and s.state == "cancelled"
    with pytest.raises(kv.StreamError, match="cancelled by the decode side"):
        s.check()
    with pytest.raises(kv.StreamError, match="cancelled"):
        s.finish(b"")
    # a deadline on the decode side tells the prefill the same way
    req2 = dec.reserve(4, timeout=0.5)
    told.clear()
    s2 = pf.open_stream(req2.ticket, pf.cache.allocator.alloc(1), on_end=lambda st: told.set())
    assert req2.wait(10) is kv.State.FAILED and told.wait(10) and s2.state == "cancelled"


def _donated_step():
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(ks, vs, page, val):
        return ([k.at[page].set(val) for k in ks], [v.at[page].set(-val) for v in vs])
    return step


def test_cache_survives_a_host_read(pair):
    """README's decode loop after a host read of the cache: a read that is not kept changes nothing;
    a NumPy view kept alive makes commit refuse the step with a message naming the cause and the
    read path, and the cache works again once the view is gone."""
    dec, pf = pair()
    cache = dec.cache
    req = dec.reserve(5)
    run_prefill(pf, req.ticket, 2)
    assert req.wait(20) is kv.State.READY
    step = _donated_step()
    np.asarray(cache.k[0])  # a host read, not kept
    k, v = step(cache.k, cache.v, 47, jnp.float32(1))
    cache.commit(k, v)
    kept = np.asarray(cache.k[0])  # a view of the registered memory, kept alive
    k, v = step(cache.k, cache.v, 47, jnp.float32(2))
    with pytest.raises(kv.BufferMovedError, match=r"np\.asarray\(cache\.k\[l\]\).*cache\.read\(layer\)"):
        cache.commit(k, v)
    assert cache.broken is None
    del kept
    k, v = step(cache.k, cache.v, 47, jnp.float32(3))
    cache.commit(k, v)
    rk, rv = cache.read(0)
    assert rk[47].ravel()[0] == 3.0 and rv[47].ravel()[0] == -3.0
    check_request(cache, req, 2)  # the streamed pages are intact
    cache.host_view(0, 0)[:4] = np.frombuffer(np.float32(9.5).tobytes(), np.uint8)
    assert cache.read(0)[0].ravel()[0] == 9.5  # read copies afresh: later writes show


def test_moved_buffers_can_be_reregistered(pair):
    dec, pf = pair()
    cache = dec.cache
    old = dec.reserve(4)
    sneaky = jax.jit(lambda ks, vs: (ks, vs, [k * 2 for k in ks], [v * 2 for v in vs]), donate_argnums=(0, 1))
    _, _, k2, v2 = sneaky(cache.k, cache.v)
    with pytest.raises(kv.BufferMovedError, match=r"reregister"):
        cache.commit(k2, v2)
    assert cache.broken and old.wait(10) is kv.State.FAILED and "cache broken" in old.reason
    bad = [jnp.zeros(cache.layout.array_shape, jnp.float16)] * cache.layout.num_layers
    with pytest.raises(ValueError, match="shape"):
        cache.reregister(bad, v2)
    old_id = dec.cache_id
    cache.reregister(k2, v2)
    assert cache.broken is None and dec.cache_id != old_id
    assert [cache.region(0, 0, 0).base] == [k2[0].unsafe_buffer_pointer()]
    with pytest.raises(ValueError, match="unknown cache id"):
        pf.open_stream(old.ticket, pf.cache.allocator.alloc(1))
    req = dec.reserve(10)
    run_prefill(pf, req.ticket, 8)
    assert req.wait(20) is kv.State.READY
    check_request(cache, req, 8)


# ---- dead and silent peers, across processes ------------------------------------------------------------

PROC_LAYOUT = dict(num_layers=8, num_pages=64, page_tokens=8, kv_heads=4, head_dim=16, dtype="bfloat16")
SLOW_ENGINE = 30.0  # the engine timeout: far longer than the liveness interval
LIVENESS = 0.5


@pytest.mark.parametrize("sig", ["KILL", "STOP"])
def test_dead_or_silent_prefill_noticed_within_liveness(sig):
    from kv_workers import killed_prefill_worker
    cfg = dict(layout=PROC_LAYOUT, signal=sig, engine_timeout=SLOW_ENGINE, liveness_s=LIVENESS)
    out = run_group(killed_prefill_worker, 3, cfg, timeout=150, expect_dead={1})
    res = out[0]
    assert res["state"] == "FAILED" and "prefill side" in res["reason"] and "unreachable" in res["reason"], res
    if sig == "STOP":
        assert "no answer to a liveness probe" in res["reason"], res
    # noticed within the liveness interval (plus a tick and scheduling slack), not the engine timeout
    assert res["failed_after"] < LIVENESS + 2.0 < SLOW_ENGINE, res
    assert res["quarantined"] and res["released"], res
    assert out[2] == "ok"


@pytest.mark.parametrize("sig", ["KILL", "STOP"])
def test_dead_or_silent_decode_noticed_within_liveness(sig):
    from kv_workers import killed_decode_worker
    cfg = dict(layout=PROC_LAYOUT, signal=sig, engine_timeout=SLOW_ENGINE, liveness_s=LIVENESS, layer_s=0.4)
    out = run_group(killed_decode_worker, 3, cfg, timeout=150, expect_dead={1})
    res = out[0]
    assert res["state"] == "failed" and "decode side" in res["reason"], res
    assert res["failed_after"] < LIVENESS + 2.0 < SLOW_ENGINE, res
    assert res["told"] == [True], res  # on_end told the prefill once, with its stream
    assert out[2] == "ok"
