"""The service floor under kv and weights (jax_garden._service): the typed-message codec, the imm-tag
table (against the native MoE protocol), the mailbox (routing by protocol, user messages, resends
and de-duplication, liveness probes), the bootstrap, and kv and weights sharing one engine."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from jax_garden._service import codec, mailbox as mbx, tags
from jax_garden._service.bootstrap import Bootstrap
from jax_garden._service.codec import U8, U32, U64, Blob, Blobs, OptU64, Protocol, Text, U32Array
from jax_garden._service.mailbox import Mailbox
from jax_garden._service.tags import ProtocolId, Service

jax = pytest.importorskip("jax")


# ---- codec ----------------------------------------------------------------------------------------

TEST = Protocol("test", 200)


class _Kind:
    ALL = 1
    SMALL = 2


@TEST.message(_Kind.ALL)
class Everything:
    a: U8
    b: U32
    c: U64
    d: OptU64
    e: Blob
    f: Text
    g: U32Array
    h: Blobs


@TEST.message(_Kind.SMALL)
class Small:
    x: U32


def test_codec_round_trip_and_checks():
    m = Everything(255, 2**32 - 1, 2**64 - 1, None, b"\x00\x01", "héllo", np.arange(5, dtype=np.uint32),
                   (b"", b"xyz"))
    back = TEST.decode(TEST.encode(m))
    assert (back.a, back.b, back.c, back.d, back.e, back.f, back.h) == (m.a, m.b, m.c, None, m.e, m.f, m.h)
    assert back.g.tolist() == [0, 1, 2, 3, 4]
    assert TEST.decode(TEST.encode(Everything(0, 0, 0, 7, b"", "", [], ()))).d == 7
    with pytest.raises(ValueError, match="Small.x: 4294967296 is not a u32"):
        TEST.encode(Small(1 << 32))
    with pytest.raises(ValueError, match="is not a u32"):
        TEST.encode(Small(-1))
    with pytest.raises(ValueError, match="is not a u32"):
        TEST.encode(Small(True))
    with pytest.raises(TypeError, match="not a message of protocol test"):
        TEST.encode(3)
    good = TEST.encode(Small(7))
    with pytest.raises(ValueError, match="truncated"):
        TEST.decode(good[:-1])
    with pytest.raises(ValueError, match="1 trailing bytes"):
        TEST.decode(good + b"\0")
    with pytest.raises(ValueError, match="unknown kind 9"):
        TEST.decode(b"\x09" + good[1:])
    with pytest.raises(ValueError, match="empty"):
        TEST.decode(b"")
    with pytest.raises(TypeError, match="wire type"):
        @TEST.message(_Kind.SMALL + 10)
        class Bad:  # noqa: F811
            x: int
    sealed = codec.seal(b"ABCD", b"body")
    assert codec.unseal(sealed, b"ABCD", "frame") == b"body"
    with pytest.raises(ValueError, match="checksum"):
        codec.unseal(sealed[:-1] + b"\0", b"ABCD", "frame")
    with pytest.raises(ValueError, match="wrong magic"):
        codec.unseal(b"WXYZ" + sealed[4:], b"ABCD", "frame")
    with pytest.raises(TypeError, match="must be bytes"):
        codec.unseal("text", b"ABCD", "frame")


# ---- the imm-tag table ----------------------------------------------------------------------------------

def test_imm_tags_are_distinct_and_agree_with_their_services():
    from jax_garden import kv, weights
    from jax_garden._jax_garden import moe as native_moe

    table = {t.service: t.tag for t in tags.IMM_TAGS}
    assert set(table) == set(Service) and len(set(table.values())) == len(table)  # no two services share a tag
    assert all(0 <= t < 16 for t in table.values())
    # MoE across nodes: the tag lives in C++ (internode_protocol.h); the native module's imms carry it
    for kind in range(3):
        assert native_moe.internode_imm(kind, 5, 1, 0) >> 28 == table[Service.MOE_INTERNODE]
    assert kv.kv_imm(0, 0, 0, 0) >> 28 == table[Service.KV] == kv.IMM_TAG
    assert weights.DEFAULT_IMM_TAG == table[Service.WEIGHTS]
    assert weights.imm_value(weights.DEFAULT_IMM_TAG, 3, 1) >> 28 == table[Service.WEIGHTS]
    assert mbx.IMM_DOORBELL >> 28 == mbx.IMM_PING >> 28 == table[Service.MAILBOX]
    for service, tag in table.items():
        assert tags.owner_of_tag(tag) is service
    # a weights tag that another service owns is refused; a free one is accepted
    from jax_garden.weights.protocol import check_imm_tag
    for service, tag in table.items():
        if service is not Service.WEIGHTS:
            with pytest.raises(ValueError, match=service.value):
                check_imm_tag(tag)
    assert check_imm_tag(3) == 3
    with pytest.raises(TypeError):
        check_imm_tag("10")
    assert {p.value for p in ProtocolId} == {0, 1, 2}


# ---- the mailbox -----------------------------------------------------------------------------------------

@pytest.fixture
def boxes(engines):
    """Two engines with their mailboxes (released at the end)."""
    made = []

    def make():
        mb = Mailbox.acquire(engines())
        made.append(mb)
        return mb

    yield make
    for mb in made:
        mb.release()


def test_routes_by_protocol_and_keeps_user_messages_apart(boxes):
    a, b = boxes(), boxes()
    got: dict = {"kv": [], "weights": []}
    b.route(ProtocolId.KV, lambda env: got["kv"].append(env))
    b.route(ProtocolId.WEIGHTS, lambda env: got["weights"].append(env))
    with pytest.raises(ValueError, match="already has a handler"):
        b.route(ProtocolId.KV, lambda env: None)
    a.send(b.contact, ProtocolId.KV, b"to kv")
    a.send(b.contact, ProtocolId.WEIGHTS, b"to weights")
    a.send_user(b.contact, b"to the application")
    a.engine.send(b.engine.address, b"raw engine traffic")
    user = sorted([b.recv_user(10), b.recv_user(10)], key=lambda x: x[1])
    assert user[0] == (None, b"raw engine traffic") and user[1] == (a.contact, b"to the application")
    deadline = time.monotonic() + 10
    while not (got["kv"] and got["weights"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [e.message for e in got["kv"]] == [b"to kv"] and got["kv"][0].sender == a.contact
    assert [e.message for e in got["weights"]] == [b"to weights"]
    # a protocol with no handler on the receiver is dropped, never handed to another service
    b.unroute(ProtocolId.WEIGHTS)
    a.send(b.contact, ProtocolId.WEIGHTS, b"nobody")
    a.send(b.contact, ProtocolId.KV, b"after")
    while len(got["kv"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [e.message for e in got["kv"]] == [b"to kv", b"after"] and len(got["weights"]) == 1
    with pytest.raises(TimeoutError):
        b.recv_user(0.1)


def test_one_mailbox_per_engine_and_size_limit(engines):
    eng = engines(max_message_bytes=4096)
    m1, m2 = Mailbox.acquire(eng), Mailbox.acquire(eng)
    try:
        assert m1 is m2
        with pytest.raises(ValueError, match="control-message limit"):
            m1.send(m1.contact, ProtocolId.KV, b"x" * 5000)
    finally:
        m1.release()
        assert not m2.closed
        m2.release()
    fresh = Mailbox.acquire(eng)
    assert m1.closed and fresh is not m1 and not fresh.closed  # a new one after the last release
    fresh.release()
    with pytest.raises(TypeError):
        Mailbox.acquire("engine")


class _FailedTransfer:
    done, failed, error = True, True, "injected failure"


def test_messages_are_resent_and_deduplicated(boxes, monkeypatch):
    """A message whose send fails is sent again by the ticker; a message that arrived although its
    completion reported a failure is dropped the second time (same sequence number)."""
    a, b = boxes(), boxes()
    real = Mailbox.post
    plan = {"lost": 1, "reported_failed": 1}

    def flaky(self, out):
        if out.attempts == 0:
            if b"lost" in out.frame and plan["lost"]:
                plan["lost"] -= 1
                out.attempts += 1
                out.transfers = [_FailedTransfer()]  # neither the message nor its doorbell left
                return
            if b"twice" in out.frame and plan["reported_failed"]:
                plan["reported_failed"] -= 1
                real(self, out)  # delivered ...
                out.transfers = [_FailedTransfer()]  # ... but reported failed: it is sent again
                return
        real(self, out)

    monkeypatch.setattr(Mailbox, "post", flaky)
    a.send_user(b.contact, b"lost once")
    a.send_user(b.contact, b"twice")
    got = sorted(b.recv_user(5)[1] for _ in range(2))
    assert got == [b"lost once", b"twice"]
    time.sleep(0.8)  # the resend of "twice" arrived meanwhile and was dropped
    with pytest.raises(TimeoutError):
        b.recv_user(0.2)
    assert plan == {"lost": 0, "reported_failed": 0}


def test_intercept_holds_and_deliver_routes(boxes):
    a, b = boxes(), boxes()
    seen, held = [], []
    b.route(ProtocolId.KV, seen.append)
    b.intercept(lambda env: held.append(env) or True)
    a.send(b.contact, ProtocolId.KV, b"held")
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert seen == [] and len(held) == 1
    b.intercept(None)
    b.deliver(held[0])
    assert [e.message for e in seen] == [b"held"]


def test_timers_and_ticks(boxes):
    mb = boxes()
    fired, ticks = threading.Event(), []
    t0 = time.monotonic()
    mb.call_later(0.05, fired.set)
    mb.on_tick(ticks.append)
    assert fired.wait(5) and time.monotonic() - t0 < 2
    deadline = time.monotonic() + 5
    while not ticks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ticks
    mb.off_tick(ticks.append)


def test_probe_finds_a_closed_peer_dead(engines):
    a = Mailbox.acquire(engines())
    other = engines()
    b = Mailbox.acquire(other)
    try:
        probe = mbx.PeerProbe(b.contact)
        assert probe.check(a) is None  # the first probe goes out
        deadline = time.monotonic() + 10
        while probe.check(a) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe.check(a) is None  # alive: answered probes keep it alive
        b.release()
        other.close()
        while probe.check(a) is None and time.monotonic() < deadline + 20:
            time.sleep(0.05)
        assert probe.dead and "liveness probe failed" in probe.dead
        assert a.is_dead(b.contact)
        with pytest.raises(mbx.PeerDead, match="unreachable"):
            a.send(b.contact, ProtocolId.KV, b"x")
    finally:
        a.release()


def test_contacts():
    from jax_garden import kv

    assert kv.Contact is mbx.Contact
    with pytest.raises(TypeError, match="contact"):
        mbx.as_contact(12)
    with pytest.raises(ValueError, match="hex"):
        mbx.as_contact("not hex")
    with pytest.raises(ValueError, match="wrong magic"):
        mbx.as_contact(b"XXXX" + b"\0" * 20)


# ---- bootstrap -------------------------------------------------------------------------------------------

def test_bootstrap_with_callables():
    store: dict = {}
    reached: list = []

    def fetch(key, timeout):
        deadline = time.monotonic() + timeout
        while key not in store:
            if time.monotonic() > deadline:
                raise TimeoutError(key)
            time.sleep(0.01)
        return store[key]

    boot = Bootstrap(publish=store.__setitem__, fetch=fetch, barrier=lambda name, t: reached.append(name))
    assert boot.kind == "callable"
    boot.publish("a/0", b"zero")
    store["a/1"] = b"one"
    assert boot.exchange("a", {0: b"zero"}, [1], 1.0) == {1: b"one"}
    assert boot.fetch("a/0", 1.0) == b"zero"
    with pytest.raises(TimeoutError):
        boot.fetch("missing", 0.05)
    boot.barrier("b", 1.0)
    assert reached == ["b"]
    with pytest.raises(TypeError):
        boot.publish(3, b"x")
    with pytest.raises(TypeError):
        boot.publish("k", "not bytes")
    with pytest.raises(ValueError, match="both"):
        Bootstrap(publish=store.__setitem__)
    with pytest.raises(ValueError, match="no barrier"):
        Bootstrap(publish=store.__setitem__, fetch=fetch).barrier("x", 1.0)


def test_bootstrap_needs_jax_distributed():
    from jax_garden._compat import distributed_client

    if distributed_client() is not None:
        pytest.skip("jax.distributed is initialised in this process")
    with pytest.raises(RuntimeError, match="jax.distributed.initialize"):
        Bootstrap()


# ---- kv and weights on one engine ------------------------------------------------------------------------

def test_kv_and_weights_share_one_engine(engines):
    """A DecodeSide and a weights Subscriber on one engine, a PrefillSide and a Publisher on another:
    a KV request and a weight push run at the same time and neither service loses or diverts the
    other's control messages or imms."""
    import struct as st

    from jax_garden import kv, weights
    from jax_garden.weights import TensorSpec as T
    from kv_workers import check_request, run_prefill

    inference, trainer = engines(timeout=3.0), engines(timeout=3.0)
    lay = kv.KVLayout(num_layers=2, num_pages=16, page_tokens=4, kv_heads=2, head_dim=8, dtype="float32")
    dec = kv.DecodeSide(kv.PagedKVCache(inference, lay), timeout=20)
    pf = kv.PrefillSide(kv.PagedKVCache(trainer, lay), timeout=20)
    specs = {"w": T((64, 256), "bfloat16", None)}
    plan = weights.Plan(weights.Layout.from_pytree(specs), weights.Layout.from_pytree(specs), chunk_bytes=8192)
    sub = weights.Subscriber(plan, specs, engine=inference)
    pub = weights.Publisher(plan, engine=trainer, staging_bytes=4 * 8192)
    try:
        with pytest.raises(ValueError, match="one per engine"):
            weights.Subscriber(plan, specs, engine=inference)
        pub.connect([sub.address])
        w = np.random.default_rng(0).standard_normal((64, 256)).astype(jax.numpy.bfloat16)
        req = dec.reserve(7)
        dec.send_ticket(pf.contact, req, st.pack("<q", 3))
        handle = pub.push({"w": w}, 1)
        ticket, extra = pf.recv_ticket(20)
        run_prefill(pf, ticket, 3)
        handle.wait(30)
        assert sub.wait(1, 30) == 1
        assert np.array_equal(np.asarray(sub.params()["w"]).view(np.uint16), w.view(np.uint16))
        assert req.wait(20) is kv.State.READY and req.payload == st.pack("<q", 3)
        check_request(dec.cache, req, 3)
        dec.send_message(pf.contact, b"still there")
        assert pf.recv_message(10) == (dec.contact, b"still there")
    finally:
        for x in (pub, sub, dec, pf):
            x.close()
