"""jax_garden.weights conventions and fault signals (one process, engines on tcp): wrong types and
values refused before anything is sent, argument checks before stored errors, clear errors after
close(), a publisher told when its version went into service or was refused, refresh/wait that do
not hang on miscounted calls or on a stored error one rank holds, and staging sized to the model.
The dead/silent trainer cases (real processes, SIGKILL/SIGSTOP) are in test_weights.py."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from jax_garden import weights  # noqa: E402
from jax_garden.weights import MeshSharding as M, TensorSpec as T  # noqa: E402


def _values(plan, seed):
    import ml_dtypes

    rng = np.random.default_rng(seed)
    return {t.path.strip("[]'"): rng.standard_normal(t.shape).astype(ml_dtypes.bfloat16) for t in plan.src.tensors}


def _plan(src, dst, **kw):
    return weights.Plan(weights.Layout.from_pytree(src), weights.Layout.from_pytree(dst), **kw)


@pytest.fixture
def closing():
    made = []
    yield made.append
    for x in reversed(made):
        x.close()


# ---- conventions -------------------------------------------------------------------------------

def test_wrong_types_and_values(engines, closing):
    specs = {"w": T((64, 128), "bfloat16", None)}
    plan = _plan(specs, specs, chunk_bytes=8192)
    sub = weights.Subscriber(plan, specs, engine=engines())
    pub = weights.Publisher(plan, engine=engines(), staging_bytes=1 << 16)
    closing(sub)
    closing(pub)
    pub.connect([sub.address])
    params = _values(plan, 1)
    type_errors = [
        lambda: weights.MeshSharding({"x": "2"}), lambda: weights.MeshSharding({3: 2}),
        lambda: weights.MeshSharding({"x": 2}, 5), lambda: weights.MeshSharding("x"),
        lambda: weights.MeshSharding({"x": 2}, devices_per_rank="1"), lambda: T((8, "8"), "bfloat16"),
        lambda: T((8,), "nope"), lambda: weights.fp8_spec((8.5, 8)), lambda: weights.fp8_spec((8, 8), block=(8, "8")),
        lambda: weights.Layout.from_bytes("JGWL"), lambda: weights.Plan.from_bytes(3),
        lambda: weights.Layout.from_pytree(specs, devices_per_rank="2"), lambda: _plan(specs, specs, chunk_bytes="8192"),
        lambda: weights.Publisher(plan, engine="engine"), lambda: weights.Publisher(plan, staging_bytes="1"),
        lambda: weights.Publisher(plan, timeout="60"), lambda: weights.Publisher(plan, imm_tag="10"),
        lambda: weights.Subscriber(plan, specs, poll_s="fast"), lambda: weights.Subscriber(plan, specs, engine=3),
        lambda: pub.push(params, version="7"), lambda: pub.push(params, version=7.0),
        lambda: pub.connect([sub.address], timeout="x"), lambda: pub.connect(kv=3), lambda: pub.connect(sub.address),
        lambda: sub.wait("1"), lambda: sub.wait(1, timeout="1"), lambda: sub.refresh(timeout="x"),
        lambda: sub.set_peers(5),
    ]
    for i, call in enumerate(type_errors):
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"case {i} raised nothing")
    value_errors = [
        lambda: weights.MeshSharding({"x": 0}), lambda: weights.MeshSharding({}), lambda: T((8, -1), "bfloat16"),
        lambda: weights.fp8_spec((8, 8), block=(0, 8)), lambda: weights.fp8_spec((8, 8), block=(8,)),
        lambda: weights.quantize_fp8(np.ones((8, 8), np.float32), (0, 8)), lambda: _plan(specs, specs, chunk_bytes=100),
        lambda: weights.Publisher(plan, staging_bytes=0), lambda: weights.Publisher(plan, imm_tag=0xB),
        lambda: weights.Subscriber(plan, specs, fence_s=-1), lambda: weights.Subscriber(plan, specs, imm_tag=0xC),
        lambda: pub.push(params, version=-1), lambda: pub.connect([sub.address, sub.address]),
        lambda: sub.wait(1, timeout=-1), lambda: sub.refresh(timeout=float("inf")),
        lambda: weights.Layout.from_bytes(b"XXXX"),
    ]
    for i, call in enumerate(value_errors):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"case {i} raised nothing")
    assert sub.current_version is None  # nothing was sent
    h = pub.push(params, 1)
    with pytest.raises(TypeError):
        h.wait(timeout="5")
    with pytest.raises(ValueError):
        h.wait(timeout=-1)
    h.wait(30)
    with pytest.raises(TimeoutError, match="not in service"):
        sub.wait(5, timeout=0)  # 0 checks once (and takes the landed version 1 into service)
    assert sub.current_version == 1


def test_argument_checks_come_before_stored_errors(engines, closing):
    specs = {"w": T((64, 128), "bfloat16", None)}
    plan = _plan(specs, specs, chunk_bytes=8192)
    other = _plan(specs, specs, chunk_bytes=16384)  # another fingerprint
    sub = weights.Subscriber(plan, specs, engine=engines())
    closing(sub)
    stranger = weights.Publisher(other, engine=engines(), staging_bytes=1 << 16)
    closing(stranger)
    with pytest.raises(ValueError, match="fingerprint"):
        stranger.connect([sub.address])  # the subscriber stores the mismatch as an error
    with pytest.raises(TypeError):
        sub.refresh(timeout="x")  # the argument is checked first ...
    with pytest.raises(ValueError, match="fingerprint"):
        sub.refresh(1)  # ... then the stored error is raised, once
    assert sub.refresh(1) is None


def test_every_call_after_close_is_a_clear_error(engines):
    specs = {"w": T((64, 128), "bfloat16", None)}
    plan = _plan(specs, specs, chunk_bytes=8192)
    sub = weights.Subscriber(plan, specs, engine=engines())
    pub = weights.Publisher(plan, engine=engines(), staging_bytes=1 << 16)
    pub.connect([sub.address])
    pub.push(_values(plan, 2), 1).wait(30)
    assert sub.wait(1, 30) == 1
    sub.close()
    pub.close()
    for call in (lambda: sub.wait(1, 1), lambda: sub.wait(2, 1), lambda: sub.refresh(1), sub.params, sub.status,
                 lambda: sub.set_peers([sub.address]), lambda: sub.hold().__enter__()):
        with pytest.raises(RuntimeError, match="Subscriber is closed"):
            call()
    for call in (lambda: pub.push(_values(plan, 3), 2), lambda: pub.connect([sub.address])):
        with pytest.raises(RuntimeError, match="Publisher is closed"):
            call()
    sub.close()
    pub.close()  # idempotent


# ---- fault signals -----------------------------------------------------------------------------

def test_publisher_told_in_service_or_refused(engines, closing):
    """Two trainer ranks, one inference rank: a version goes into service (both publishers are
    told), a version replaced before it was complete is refused (its publisher is told why)."""
    src = {"w": T((64, 256), "bfloat16", M({"f": 2}, ("f",)))}
    dst = {"w": T((64, 256), "bfloat16", None)}
    plan = _plan(src, dst, chunk_bytes=8192)
    sub = weights.Subscriber(plan, dst, engine=engines(), fence_s=0.2)
    pubs = [weights.Publisher(plan, rank=r, engine=engines(), staging_bytes=1 << 16) for r in (0, 1)]
    for x in (sub, *pubs):
        closing(x)
    for p in pubs:
        p.connect([sub.address])

    def mine(rank, seed):
        full = _values(plan, seed)["w"]
        return {"w": full[rank * 32:(rank + 1) * 32]}

    handles = [p.push(mine(r, 1), 1) for r, p in enumerate(pubs)]
    for h in handles:
        h.wait(30)
    with pytest.raises(TimeoutError, match="did not report"):
        handles[0].wait_in_service(0.2)  # landed, but nobody took it into service yet
    assert sub.wait(1, 30) == 1
    for h in handles:
        assert h.wait_in_service(10) is h and h.in_service == [0]
    # version 2 from rank 0 only; version 3 from both replaces it before it was complete
    h2 = pubs[0].push(mine(0, 2), 2).wait(30)
    h3 = [p.push(mine(r, 3), 3) for r, p in enumerate(pubs)]
    with pytest.raises(weights.VersionRefused, match="replaced by version 3"):
        h2.wait_in_service(10)
    for h in h3:
        h.wait(30)
    assert sub.wait(3, 30) == 3
    for h in h3:
        h.wait_in_service(10)
    got = np.asarray(sub.params()["w"])
    want = np.concatenate([mine(0, 3)["w"], mine(1, 3)["w"]])
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_refresh_and_wait_do_not_hang_on_miscounted_calls_or_one_ranks_error(engines, closing):
    src = {"w": T((64, 256), "bfloat16", None)}
    dst = {"w": T((64, 256), "bfloat16", M({"t": 2}, (None, "t")))}
    plan = _plan(src, dst, chunk_bytes=8192)
    subs = [weights.Subscriber(plan, dst, rank=r, engine=engines()) for r in (0, 1)]
    pub = weights.Publisher(plan, engine=engines(), staging_bytes=1 << 16)
    for x in (*subs, pub):
        closing(x)
    for s in subs:
        s.set_peers([x.address for x in subs])
    pub.connect([s.address for s in subs])

    def wait_all(version):
        out, errors = {}, {}

        def run(r):
            try:
                out[r] = subs[r].wait(version, 30)
            except Exception as e:  # noqa: BLE001
                errors[r] = e

        threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        return out, errors

    pub.push({"w": _values(plan, 1)["w"]}, 1).wait(30)
    assert wait_all(1) == ({0: 1, 1: 1}, {})
    # extra calls on one rank only: nothing to switch to, so they return at once
    t0 = time.monotonic()
    assert subs[0].refresh(5) == 1 and subs[0].refresh(5) == 1 and subs[0].wait(1, 5) == 1
    assert time.monotonic() - t0 < 2.0
    # rank 0 alone holds a stored error (a publisher of another plan, writing only to rank 0, said
    # hello): the ranks still switch together; refresh raises it on rank 0 afterwards
    cols = {"w": T((64, 256), "bfloat16", M({"f": 2}, (None, "f")))}
    stranger = weights.Publisher(_plan(cols, dst, chunk_bytes=8192), rank=0, engine=engines(), staging_bytes=1 << 16)
    closing(stranger)
    with pytest.raises(ValueError, match="fingerprint"):
        stranger.connect([subs[0].address, subs[1].address])
    pub.push({"w": _values(plan, 2)["w"]}, 2).wait(30)
    assert wait_all(2) == ({0: 2, 1: 2}, {})
    with pytest.raises(ValueError, match="fingerprint"):
        subs[0].refresh(5)
    assert subs[1].refresh(5) == 2 and [s.current_version for s in subs] == [2, 2]
    # one rank calls refresh while the other is busy elsewhere with a landed version: the round waits
    # for it (a timeout naming the rank), and the next calls finish that round on both sides together
    pub.push({"w": _values(plan, 3)["w"]}, 3).wait(30)
    deadline = time.monotonic() + 10
    while not all(s.status().get("collecting", {}).get("complete") for s in subs):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(TimeoutError, match="no status from ranks \\[1\\]"):
        subs[0].refresh(0.3)
    assert wait_all(3) == ({0: 3, 1: 3}, {})
    got = [np.asarray(s.params()["w"]) for s in subs]
    want = _values(plan, 3)["w"]
    assert np.array_equal(np.concatenate(got, axis=1).view(np.uint16), want.view(np.uint16))


def test_staging_is_sized_to_the_model(engines, closing):
    small = {"w": T((64, 128), "bfloat16", None)}  # 16 KiB, staged (fp8 on the wire)
    dst = {"w": weights.fp8_spec((64, 128), None, None, (64, 128))}
    plan = _plan(small, dst)  # default chunk_bytes: 64 MiB
    pub = weights.Publisher(plan, engine=engines())  # default staging_bytes: 256 MiB
    closing(pub)
    staged = sum(c.nbytes for c in plan.chunks_of(0) if c.staged)
    assert 0 < pub.staging_allocated <= staged + weights.STAGE_ALIGN  # not 2 x 64 MiB for a 16 KiB model
    big = {"w": T((512, 1024), "bfloat16", None)}
    plan = _plan(big, {"w": weights.fp8_spec((512, 1024), None, None, (128, 128))}, chunk_bytes=65536)
    pub2 = weights.Publisher(plan, engine=engines(), staging_bytes=4 * 65536)
    closing(pub2)
    n = len([c for c in plan.chunks_of(0) if c.staged])
    assert n > 4 and pub2.staging_allocated <= 4 * 65536  # within the bound, pipelined over 4 slots
    with pytest.raises(ValueError, match="need at least 2"):
        weights.Publisher(plan, engine=engines(), staging_bytes=65536)


# ---- standing grants -------------------------------------------------------------------------------

def _until(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.005)


@pytest.mark.adversarial
def test_standing_grants_write_without_asking_and_never_touch_the_copy_in_service(engines, closing):
    """The subscriber offers the copy not in service for the next push; a push holding the offer
    writes at once (PushHandle.claimed), the version in service stays intact until the switch, a
    push that asks instead is granted the offer's epoch (the offer is then used up), a stale push
    still gets its clear refusal, and an offer of an earlier session (the publisher reconnected)
    is refused and fenced when claimed, leaving the version in service untouched."""
    specs = {"w": T((128, 256), "bfloat16", None), "b": T((256,), "bfloat16", None)}
    plan = _plan(specs, specs, chunk_bytes=16384, direct_min_bytes=8192)
    sub = weights.Subscriber(plan, specs, engine=engines(), fence_s=0.3)
    pub = weights.Publisher(plan, engine=engines(), staging_bytes=1 << 16, timeout=20)
    for x in (sub, pub):
        closing(x)

    def check(version_values):
        p = sub.params()
        for k in ("w", "b"):
            assert np.array_equal(np.asarray(p[k]).view(np.uint16), version_values[k].view(np.uint16)), k

    pub.connect([sub.address])
    _until(lambda: pub.offered == [0], "the offer made at connect")
    assert sub.status()["offers"][0]["slot"] == 0
    v1 = _values(plan, 1)
    h = pub.push(v1, 1).wait(30)
    assert h.claimed == [0] and h.granted_after < h.seconds
    assert sub.wait(1, 30) == 1
    check(v1)
    # after the switch the other copy is offered; a push into it leaves version 1 in service intact
    _until(lambda: pub.offered == [0], "the offer made at the switch")
    assert sub.status()["offers"][0]["slot"] == 1
    v2 = _values(plan, 2)
    h = pub.push(v2, 2).wait(30)
    assert h.claimed == [0]
    _until(lambda: sub.status().get("collecting", {}).get("complete"), "version 2 landed")
    assert sub.current_version == 1
    check(v1)
    assert sub.wait(2, 30) == 2
    check(v2)
    # asking instead: the grant uses the outstanding offer's epoch, which the publisher then drops
    _until(lambda: pub.offered == [0], "the offer after version 2")
    pub.standing_grants = False
    v3 = _values(plan, 3)
    h = pub.push(v3, 3).wait(30)
    assert h.claimed == [] and pub.offered == []
    assert sub.wait(3, 30) == 3
    check(v3)
    pub.standing_grants = True
    _until(lambda: pub.offered == [0], "the offer after version 3")
    with pytest.raises(ValueError, match="not newer"):  # not claimed: refused before anything is written
        pub.push(v3, 3).wait(30)
    assert pub.offered == [0]
    # reconnect: the subscriber drops the earlier session's offer and fences this source; a claim of
    # that offer (here re-injected, as if it had been delivered late) is refused, nothing changes
    stale = pub._offers[0]
    pub.connect([sub.address])
    assert "offers" in sub.status() and 0 not in sub.status()["offers"]
    with pub._cv:
        pub._offers[0] = stale
    with pytest.raises(ValueError, match="no longer valid"):
        pub.push(_values(plan, 4), 4).wait(30)
    assert sub.current_version == 3 and "collecting" not in sub.status()
    check(v3)
    v5 = _values(plan, 5)
    h = pub.push(v5, 5).wait(30)  # granted once the fence ends (asked, or offered after it)
    assert sub.wait(5, 30) == 5
    check(v5)


@pytest.mark.adversarial
def test_writes_that_land_before_their_claim_are_counted(engines, closing):
    """Unordered delivery: the claim reaches the subscriber only after every write it announces
    has landed (held back here); the arrivals counted under the offer's epoch complete the version."""
    specs = {"w": T((256, 256), "bfloat16", None)}
    plan = _plan(specs, specs, chunk_bytes=16384, direct_min_bytes=1 << 30)  # all staged: 8 chunks
    sub = weights.Subscriber(plan, specs, engine=engines())
    pub = weights.Publisher(plan, engine=engines(), staging_bytes=1 << 16, timeout=20)
    for x in (sub, pub):
        closing(x)
    held: list = []
    deliver = sub._on_message

    def hold_claims(sender, m):
        if isinstance(m, weights.protocol.PushClaim):
            g = sub._offers[m.src]
            want = plan.expected_imms(m.src, 0, 1)

            def later():
                _until(lambda: g.counter.total - g.base_total >= want, "every write of the claimed push")
                held.append(m)
                deliver(sender, m)
            threading.Thread(target=later, daemon=True).start()
            return
        deliver(sender, m)

    sub._on_message = hold_claims
    pub.connect([sub.address])
    _until(lambda: pub.offered == [0], "the offer")
    for v in (1, 2):
        vals = _values(plan, v)
        h = pub.push(vals, v).wait(30)
        assert h.claimed == [0] and len(held) == v
        assert sub.wait(v, 30) == v
        got = np.asarray(sub.params()["w"])
        assert np.array_equal(got.view(np.uint16), vals["w"].view(np.uint16))
        _until(lambda: pub.offered == [0], "the next offer")


@pytest.mark.adversarial
def test_a_claim_for_a_replaced_version_is_refused_and_fenced(engines, closing):
    """Two trainer ranks, one inference rank. Rank 0 moves on to version 2 while rank 1 still holds
    the offer made before version 1: its claim of version 1 arrives with its writes on the way, is
    refused (naming the newer version) and fences rank 1, whose push of version 2 is then granted
    once the fence ended; version 2 lands whole (rank 1's late version 1 bytes were overwritten)."""
    src = {"w": T((64, 256), "bfloat16", M({"f": 2}, ("f",)))}
    dst = {"w": T((64, 256), "bfloat16", None)}
    plan = _plan(src, dst, chunk_bytes=8192)
    sub = weights.Subscriber(plan, dst, engine=engines(), fence_s=1.0)
    pubs = [weights.Publisher(plan, rank=r, engine=engines(), staging_bytes=1 << 16, timeout=20) for r in (0, 1)]
    for x in (sub, *pubs):
        closing(x)
    for p in pubs:
        p.connect([sub.address])
    for p in pubs:
        _until(lambda: p.offered == [0], "the offers made at connect")

    def mine(rank, seed):
        return {"w": _values(plan, seed)["w"][rank * 32:(rank + 1) * 32]}

    h = pubs[0].push(mine(0, 1), 1).wait(30)
    assert h.claimed == [0]
    h = pubs[0].push(mine(0, 2), 2).wait(30)  # asks (its offer is used): version 1 is replaced
    assert h.claimed == []
    assert sub.status()["collecting"]["version"] == 2
    late = pubs[1].push(mine(1, 1), 1)
    with pytest.raises(ValueError, match="collecting the newer version 2"):
        late.wait(30)
    assert late.claimed == [0] and pubs[1].offered == []
    t0 = time.monotonic()
    h = pubs[1].push(mine(1, 2), 2).wait(30)  # pending while the fence runs, then granted
    assert h.claimed == [] and time.monotonic() - t0 >= 0.5  # the 1 s fence began at the refusal
    assert sub.wait(2, 30) == 2
    got = np.asarray(sub.params()["w"])
    want = np.concatenate([mine(0, 2)["w"], mine(1, 2)["w"]])
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_connect_during_a_push_is_refused(engines, closing):
    """A push writes with the connection's buffers and offers: connect is refused until the push ended."""
    specs = {"w": T((64, 128), "bfloat16", None)}
    plan = _plan(specs, specs, chunk_bytes=8192, direct_min_bytes=1 << 30)
    go = threading.Event()

    class Held(weights.Publisher):
        def before_chunk(self, index):
            go.wait(10)

    sub = weights.Subscriber(plan, specs, engine=engines())
    pub = Held(plan, engine=engines(), staging_bytes=1 << 16, timeout=20)
    for x in (sub, pub):
        closing(x)
    pub.connect([sub.address])
    h = pub.push(_values(plan, 1), 1)
    with pytest.raises(RuntimeError, match="push is still running"):
        pub.connect([sub.address])
    go.set()
    h.wait(30)
    assert sub.wait(1, 30) == 1
    pub.connect([sub.address])  # once it ended
    assert pub.push(_values(plan, 2), 2).wait(30) and sub.wait(2, 30) == 2
