"""The kv and weights protocols against the deliveries that unordered networks produce and loopback
tcp never does, made on purpose by the engine's adversarial delivery mode (docs/testing.md):

* the last data write of a KV request held back: the request stays PENDING until it lands, then is
  READY with every byte in place;
* a KV cancel whose FENCED message overtakes the writes it covers (transmit completion reported while
  the writes are still held): the pages stay reserved until every posted write was counted;
* the last write of a weights source held back: the new version is not in service until it lands;
* a weights push whose plan has multi-run pieces, and fp8 destinations with non-square blocks,
  checked bitwise against references written here from the documented formulas (no product code:
  not ``quantize_fp8``, not ``stage_item_numpy``).

Each test would pass on plain loopback tcp with the bug it targets; .ci/mutants.py plants those bugs
and shows which test catches each."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from kv_workers import check_request, make_prefill

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from jax_garden import fabric, kv, weights  # noqa: E402

# Only targeted holds: the random parts of the mode are off, so each test controls exactly what is late.
TARGETED_ONLY = "seed=1,hold=0,msg=0,imm=0,last=0,tail=0"


def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.002)


@pytest.fixture
def closing():
    """closing(x) registers x to be closed at the end of the test, pass or fail (last made, first closed)."""
    made = []

    def keep(x):
        made.append(x)
        return x

    yield keep
    for x in reversed(made):
        x.close()


# ---- kv ------------------------------------------------------------------------------------------------

KV_LAYOUT = dict(num_layers=3, num_pages=32, page_tokens=4, kv_heads=2, head_dim=16, dtype="float32")


def _kv_pair(closing, completion: str = "delivery", prefill_adversary: str = TARGETED_ONLY):
    lay = kv.KVLayout(**KV_LAYOUT)
    ed = closing(fabric.TransferEngine(provider="tcp", timeout=5.0, completion=completion, adversary=""))
    ep = closing(fabric.TransferEngine(provider="tcp", timeout=5.0, completion=completion,
                                       adversary=prefill_adversary))
    dec = closing(kv.DecodeSide(kv.PagedKVCache(ed, lay), timeout=30))
    pf = closing(kv.PrefillSide(kv.PagedKVCache(ep, lay), timeout=30))
    return dec, pf, ep


def _run_program(pf, s, src_pages, seed: int, layers=None) -> None:
    """Write pattern(seed) into the source pages and mark ``layers`` (all: then finish)."""
    lay = pf.cache.layout
    prog = make_prefill(pf.marks, lay, mark=layers is None)
    k, v = prog(pf.cache.k, pf.cache.v, jnp.asarray(src_pages.astype(np.int32)), jnp.uint32(s.token), jnp.int32(seed))
    pf.cache.commit(k, v)
    if layers is None:
        s.finish(struct.pack("<q", seed))
    else:
        for layer in layers:
            pf.marks.slot(layer).store(s.token)


@pytest.mark.parametrize("completion", ["delivery", "transmit"])
def test_kv_request_stays_pending_while_its_last_data_write_is_held(closing, completion):
    dec, pf, ep = _kv_pair(closing, completion)
    req = dec.reserve(5 * KV_LAYOUT["page_tokens"])
    src = pf.cache.allocator.alloc(req.pages.size)
    s = pf.open_stream(req.ticket, src)
    n_data = s.expected[0]
    assert n_data >= 6  # one write per page, K and V, every layer
    ep.adversary.hold(req.imm_data, skip=n_data - 1)  # the last data write the stream posts
    _run_program(pf, s, src, seed=21)
    # Everything else landed (the payload too); the last data write is held at the sender.
    _until(lambda: ep.adversary.holding(req.imm_data) == 1 and req.progress()["arrived_data"] == n_data - 1
           and req.progress()["arrived_payload"] == req.progress()["expected_payload"], 20,
           f"all but the held write arrive ({req.progress()})")
    with pytest.raises(TimeoutError, match="still PENDING"):
        req.wait(0.5)
    assert req.state is kv.State.PENDING and req.progress()["arrived_data"] == n_data - 1
    assert ep.adversary.release(req.imm_data) == 1
    assert req.wait(20) is kv.State.READY, req.reason
    check_request(dec.cache, req, 21)
    assert req.payload == struct.pack("<q", 21)
    s.wait(20)
    assert ep.adversary.stats()["targeted"] == 1


def test_kv_fence_that_overtakes_the_writes_it_covers(closing):
    """Transmit completion: the prefill side's writes are reported complete while they are still held,
    so its fence job sends FENCED (with the posted count) before they land. The decode side must keep
    the pages until every posted write was counted."""
    dec, pf, ep = _kv_pair(closing, "transmit", prefill_adversary=TARGETED_ONLY + ",early=1")
    free = dec.cache.allocator.num_free
    req = dec.reserve(6 * KV_LAYOUT["page_tokens"])
    src = pf.cache.allocator.alloc(req.pages.size)
    s = pf.open_stream(req.ticket, src)
    per_layer = s.expected[0] // KV_LAYOUT["num_layers"]
    ep.adversary.hold(req.imm_data, skip=per_layer // 2)  # most of layers 0 and 1 stay back
    _run_program(pf, s, src, seed=5, layers=[0, 1])
    held = 2 * per_layer - per_layer // 2
    _until(lambda: ep.adversary.holding(req.imm_data) == held and s.posted[0] == 2 * per_layer, 20,
           "layers 0 and 1 posted, all but the first writes held")
    assert ep.adversary.stats()["early_completions"] >= 1  # their Transfers completed: nothing waits for them
    result = {}
    canceller = threading.Thread(target=lambda: result.setdefault("state", req.cancel(timeout=20)))
    canceller.start()
    try:
        _until(lambda: "fenced" in req.times, 20, "FENCED reaches the decode side")
        # The fence arrived before the writes it covers: they are still held at the sender.
        assert ep.adversary.holding(req.imm_data) == held
        time.sleep(0.3)  # cancel() keeps draining meanwhile: it must not free the pages
        assert req.state is kv.State.PENDING and "state" not in result
        assert dec.cache.allocator.num_free == free - req.pages.size, "pages freed before the fenced writes landed"
    finally:
        ep.adversary.release(req.imm_data)
        canceller.join(30)
    assert result.get("state") is kv.State.CANCELLED, (result, req.reason)
    assert req.progress()["arrived_data"] == 2 * per_layer == s.posted[0]
    assert dec.cache.allocator.num_free == free and not req.quarantined


# ---- weights -------------------------------------------------------------------------------------------

def _bf16(shape, seed):
    import ml_dtypes

    return (np.random.default_rng(seed).standard_normal(shape) * 3).astype(np.float32).astype(ml_dtypes.bfloat16)


def _fp8_reference(x: np.ndarray, block: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The documented fp8 transform, written from docs/weights.md (not the product's code): per block
    B, ``scale[B] = max|x[B]| * float32(1/448)`` (1.0 for an all-zero block) and ``weight[B] =
    e4m3(clip(x[B] * float32(1 / scale[B]), -448, 448))``, rounding to nearest even, all in float32."""
    import ml_dtypes

    x = np.asarray(x).astype(np.float32)
    nb = [-(-n // b) for n, b in zip(x.shape, block)]
    scale = np.empty(nb, np.float32)
    weight = np.empty(x.shape, ml_dtypes.float8_e4m3fn)
    inv448 = np.float32(1.0) / np.float32(448.0)
    for idx in np.ndindex(*nb):
        sl = tuple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(idx, block, x.shape))
        amax = np.float32(np.abs(x[sl]).max())
        s = np.float32(amax * inv448) if amax > 0 else np.float32(1.0)
        scale[idx] = s
        inv = np.float32(np.float32(1.0) / s)
        weight[sl] = np.clip(x[sl] * inv, np.float32(-448.0), np.float32(448.0)).astype(ml_dtypes.float8_e4m3fn)
    return weight, scale


def test_fp8_reference_is_the_documented_formula():
    """The reference above, on hand-checked values: 448 * 2^-k grid points map to themselves."""
    import ml_dtypes

    x = np.zeros((2, 3), np.float32)
    x[0, :2] = [448.0, -224.0]
    x[1, 0] = 1.0
    w, s = _fp8_reference(x, (1, 2))
    assert s.shape == (2, 2) and s[0, 0] == np.float32(1.0) and s[0, 1] == np.float32(1.0)  # 448/448; zeros
    assert s[1, 0] == np.float32(1.0) / np.float32(448.0)
    assert list(w[0, :2].astype(np.float32)) == [448.0, -224.0] and w[1, 0].astype(np.float32) == 448.0
    assert w.dtype == ml_dtypes.float8_e4m3fn


def _weights_specs():
    from jax_garden.weights import MeshSharding as M, TensorSpec as T, fp8_spec

    # Sources: two publisher ranks, columns split. Destination: one subscriber holding whole tensors,
    # so every source piece is a column band of the destination: one run per row (multi-run pieces).
    src = {"w": T((48, 64), "bfloat16", M({"f": 2}, (None, "f"))),
           "e": T((96, 256), "bfloat16", M({"f": 2}, (None, "f")))}
    dst = {"w": T((48, 64), "bfloat16", None),
           "e": fp8_spec((96, 256), None, None, (32, 64))}  # non-square blocks
    return src, dst


def _weights_setup(closing, adversary: str):
    src, dst = _weights_specs()
    plan = weights.Plan(weights.Layout.from_pytree(src), weights.Layout.from_pytree(dst), chunk_bytes=8192)
    sub = closing(weights.Subscriber(plan, dst, engine=closing(fabric.TransferEngine("tcp", adversary=""))))
    engines = [closing(fabric.TransferEngine("tcp", adversary=adversary)) for _ in range(2)]
    pubs = [closing(weights.Publisher(plan, rank=r, engine=e, staging_bytes=4 * 8192, timeout=30))
            for r, e in enumerate(engines)]
    for p in pubs:
        p.connect([sub.address])
    return plan, sub, pubs, engines


def _column_shards(g: dict, rank: int) -> dict:
    return {k: v[:, v.shape[1] // 2 * rank: v.shape[1] // 2 * (rank + 1)] for k, v in g.items()}


def _push_all(pubs, g, version):
    return [p.push(_column_shards(g, r), version) for r, p in enumerate(pubs)]


def test_weights_push_with_multi_run_pieces_and_fp8_blocks_bitwise(closing):
    plan, sub, pubs, _ = _weights_setup(closing, adversary="")
    runs = [it.g.n_runs for r in range(2) for c in plan.chunks_of(r) for it in c.items]
    assert max(runs) > 1 and sum(n > 1 for n in runs) >= 2, runs  # pieces of several runs, staged
    for version in (1, 2):
        g = {"w": _bf16((48, 64), 40 + version), "e": _bf16((96, 256), 50 + version)}
        g["e"][:32, :64] = 0  # an all-zero block: scale 1.0
        for h in _push_all(pubs, g, version):
            h.wait(30)
        assert sub.wait(version, 30) == version
        p = sub.params()
        assert np.array_equal(np.asarray(p["w"]).view(np.uint16), g["w"].view(np.uint16))
        want_w, want_s = _fp8_reference(g["e"], (32, 64))
        assert np.asarray(p["e"].scale).shape == want_s.shape == (3, 4)
        assert np.array_equal(np.asarray(p["e"].scale).view(np.uint32), want_s.view(np.uint32))
        assert np.array_equal(np.asarray(p["e"].weight).view(np.uint8), want_w.view(np.uint8))


def test_weights_version_not_in_service_while_a_sources_last_write_is_held(closing):
    plan, sub, pubs, engines = _weights_setup(closing, adversary=TARGETED_ONLY)
    expected = plan.expected_imms(1, 0, engines[1].num_domains)
    assert expected >= 2
    # Source 1's imms carry (tag, epoch, rank 1): hold its last write whatever epoch it is granted.
    mask = 0xF000FFFF
    imm = weights.imm_value(pubs[1].imm_tag, 0, 1)
    engines[1].adversary.hold(imm, mask=mask, skip=expected - 1)
    g = {"w": _bf16((48, 64), 7), "e": _bf16((96, 256), 8)}
    handles = _push_all(pubs, g, 3)

    def source(p):
        st = sub.status().get("collecting", {}).get("sources", {})
        return st.get(p, {})

    _until(lambda: engines[1].adversary.holding(imm, mask=mask) == 1
           and source(1).get("arrived") == expected - 1 and source(0).get("complete"), 20,
           f"all but source 1's last write arrive ({sub.status()})")
    with pytest.raises(TimeoutError, match="source 1"):
        sub.wait(3, 0.5)
    assert sub.current_version is None and not source(1)["complete"]
    assert engines[1].adversary.release(imm, mask=mask) == 1
    for h in handles:
        h.wait(30)
    assert sub.wait(3, 30) == 3
    p = sub.params()
    assert np.array_equal(np.asarray(p["w"]).view(np.uint16), g["w"].view(np.uint16))
    want_w, _ = _fp8_reference(g["e"], (32, 64))
    assert np.array_equal(np.asarray(p["e"].weight).view(np.uint8), want_w.view(np.uint8))
