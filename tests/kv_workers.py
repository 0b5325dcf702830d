"""Helpers for the kv tests: deterministic KV contents, a jitted prefill that marks each layer, and
the functions tests run in spawned processes (fabric_group.run_group).

Importing this module starts no accelerator: a GPU worker chooses the GPU its JAX uses (its rank
modulo the GPUs, all of them staying visible to CUDA) before it uses jax (spawned children import
this module to find their function)."""

from __future__ import annotations

import functools
import os
import struct
import time
from typing import Any

import numpy as np

ENGINE_TIMEOUT = 2.0  # seconds: a dead peer fails ops within this (plus size allowance)


# ---- contents ------------------------------------------------------------------------------------

def _base(seed: int, layer: int, kind: int) -> int:
    return (seed * 7919 + layer * 104729 + kind * 15485863) % 1000003


def pattern(seed: int, layer: int, kind: int, n_pages: int, page_shape: tuple, dtype: Any) -> np.ndarray:
    """Values of request ``seed``'s pages for one layer's K (kind 0) or V (kind 1): small integers,
    exact in every float dtype, so the jitted and the NumPy version agree bitwise."""
    n = n_pages * int(np.prod(page_shape))
    v = (_base(seed, layer, kind) + np.arange(n, dtype=np.int64)) % 251
    return v.astype(np.float32).astype(dtype).reshape(n_pages, *page_shape)


def jax_pattern(seed: Any, layer: int, kind: int, n_pages: int, page_shape: tuple, dtype: Any) -> Any:
    import jax
    import jax.numpy as jnp

    n = n_pages * int(np.prod(page_shape))
    base = (seed.astype(jnp.int32) * 7919 + layer * 104729 + kind * 15485863) % 1000003
    v = (base + jax.lax.iota(jnp.int32, n)) % 251
    return v.astype(jnp.float32).astype(dtype).reshape(n_pages, *page_shape)


def make_prefill(marks: Any, layout: Any, *, sleep_s: float = 0.0, mesh: Any = None, mark: bool = True,
                 pause: Any = None):
    """A jitted prefill that writes ``pattern(seed, ...)`` into the given source pages of every
    layer (donated, in place) and marks each layer with ``token``. ``sleep_s``: a host pause after
    each layer's mark (ordered by data dependence), so a test can see layers stream before the
    program ends. ``pause``: instead of sleeping, call ``pause(layer)`` on the host after each layer's
    mark (a test waits there for the watcher to act on the mark). ``mesh``: the source cache is head-sharded over this 1-D mesh (axis "kv_heads");
    the layer update and mark run in shard_map."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    from jax_garden import kv
    from jax_garden._compat import shard_map

    page_shape = layout.array_shape[1:]
    dtype = layout.np_dtype
    L = layout.num_layers

    def host_pause(layer, x):
        if pause is not None:
            pause(layer)
        else:
            time.sleep(sleep_s)
        return np.zeros((), np.int32)

    def layer_update(k, v, pages, token, seed, layer, axis_name=None):
        vals = [jax_pattern(seed, layer, kind, pages.shape[0], page_shape, dtype) for kind in (0, 1)]
        if axis_name is not None:  # this device's head slice
            h = k.shape[layout.head_axis]
            start = jax.lax.axis_index(axis_name) * h
            vals = [jax.lax.dynamic_slice_in_dim(x, start, h, axis=layout.head_axis) for x in vals]
        k = k.at[pages].set(vals[0])
        v = v.at[pages].set(vals[1])
        if mark:
            k, v = kv.mark_layer(marks, layer, token, k, v, axis_name=axis_name)
        return k, v

    def body(ks, vs, pages, token, seed):
        ks, vs = list(ks), list(vs)
        for layer in range(L):
            if mesh is None:
                ks[layer], vs[layer] = layer_update(ks[layer], vs[layer], pages, token, seed, layer)
            else:
                spec = [None] * 4
                spec[layout.head_axis] = "kv_heads"
                P = jax.sharding.PartitionSpec
                f = shard_map(functools.partial(layer_update, layer=layer, axis_name="kv_heads"), mesh=mesh,
                              in_specs=(P(*spec), P(*spec), P(), P(), P()), out_specs=(P(*spec), P(*spec)),
                              check_vma=False)
                ks[layer], vs[layer] = f(ks[layer], vs[layer], pages, token, seed)
            if sleep_s or pause is not None:
                d = io_callback(functools.partial(host_pause, layer), jax.ShapeDtypeStruct((), jnp.int32),
                                ks[layer].ravel()[0], ordered=True)
                seed = seed + d  # the next layer starts after the pause
        return ks, vs

    return jax.jit(body, donate_argnums=(0, 1))


def run_prefill(side: Any, ticket: bytes, seed: int, *, sleep_s: float = 0.0, payload: bytes | None = None,
                programs: dict | None = None, wait: bool = True, pause: Any = None, open_wait: bool = True) -> Any:
    """Open a stream for ``ticket`` on ``side`` (a PrefillSide), run the jitted prefill writing
    ``pattern(seed, ...)`` into fresh source pages, commit, finish and wait. Returns the stream.
    ``pause(stream, layer)``: called on the host after each layer's mark (see make_prefill).
    ``open_wait=False``: open without waiting for the ACCEPT (the prefill runs meanwhile)."""
    import jax.numpy as jnp

    from jax_garden import kv

    cache = side.cache
    t = kv.Ticket.from_bytes(ticket)
    src = cache.allocator.alloc(t.pages.size)
    try:
        s = side.open_stream(ticket, src, wait=open_wait)
        programs = {} if programs is None else programs
        key = (t.pages.size, sleep_s)
        if key not in programs or pause is not None:  # a pause binds this stream: never reused
            programs[key] = make_prefill(side.marks, cache.layout, sleep_s=sleep_s,
                                         pause=None if pause is None else functools.partial(pause, s),
                                         mesh=cache.mesh if cache.num_shards > 1 else None)
        k, v = programs[key](cache.k, cache.v, jnp.asarray(src.astype(np.int32)), jnp.uint32(s.token), jnp.int32(seed))
        cache.commit(k, v)
        s.finish(payload if payload is not None else struct.pack("<q", seed))
        if wait:
            s.wait(30)
        return s
    finally:
        cache.allocator.free(src)


def read_pages(arr: Any, pages: np.ndarray) -> np.ndarray:
    """The current contents of ``pages`` of a cache array. Through a fresh device copy: jax caches
    the host value of an Array at its first np.asarray, which would hide later remote writes."""
    import jax.numpy as jnp

    return np.asarray(jnp.copy(arr))[np.asarray(pages, dtype=np.int64)]


def check_request(cache: Any, req: Any, seed: int) -> None:
    """The decode cache holds pattern(seed) in every page of ``req``, every layer, K and V."""
    lay = cache.layout
    pages = req.pages.astype(np.int64)
    for layer in range(lay.num_layers):
        for kind, arrs in ((0, cache.k), (1, cache.v)):
            got = read_pages(arrs[layer], pages)
            want = pattern(seed, layer, kind, pages.size, lay.array_shape[1:], lay.np_dtype)
            if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
                bad = np.argwhere(got != want)[0]
                raise AssertionError(f"request seed {seed}: layer {layer} {'KV'[kind]} differs at page index "
                                     f"{bad[0]} (page {pages[bad[0]]}), element {tuple(bad[1:])}: "
                                     f"{got[tuple(bad)]} != {want[tuple(bad)]}")


# ---- process workers ---------------------------------------------------------------------------------
# cfg keys: layout (dict of KVLayout fields), devices (decode shards), tokens (list of request lengths),
# prefills (ranks serving tickets), sleep_s, platform ("cpu"|"gpu").


def _setup(rank: int, cfg: dict) -> None:
    if cfg.get("platform") == "gpu":
        from fabric_group import use_gpu

        use_gpu(rank % cfg.get("gpus", 2))


def _layout(cfg: dict) -> Any:
    from jax_garden import kv

    return kv.KVLayout(**cfg["layout"])


def _devices(n: int) -> list:
    import jax

    return jax.devices()[:n]


def serve_worker(rank: int, size: int, exchange: Any, cfg: dict) -> Any:
    """Rank in cfg['decodes']: decode side; rank in cfg['prefills']: prefill side. Every decode sends
    its requests round-robin to the prefills, waits for READY and checks contents bitwise."""
    _setup(rank, cfg)
    from jax_garden import fabric, kv

    lay = _layout(cfg)
    eng = fabric.TransferEngine(provider="tcp", timeout=ENGINE_TIMEOUT)
    decodes, prefills = cfg["decodes"], cfg["prefills"]
    try:
        if rank in decodes:
            cache = kv.PagedKVCache(eng, lay, devices=_devices(cfg.get("devices", {}).get(rank, 1)))
            side = kv.DecodeSide(cache, timeout=60)
        else:
            cache = kv.PagedKVCache(eng, lay, devices=_devices(cfg.get("prefill_devices", 1)))
            side = kv.PrefillSide(cache, timeout=60)
        # contacts, and a region of each cache (the path a prefill's writes take toward it)
        infos = exchange((bytes(side.contact), cache.descriptors()[0]))
        contacts = [c for c, _ in infos]
        if rank in decodes:
            reqs = []
            for i, n in enumerate(cfg["tokens"]):
                seed = 100 * rank + i
                req = side.reserve(n)
                side.send_ticket(contacts[prefills[i % len(prefills)]], req, struct.pack("<q", seed))
                reqs.append((req, seed))
            for req, seed in reqs:
                state = req.wait(60)
                assert state is kv.State.READY, (state, req.reason)
                assert req.payload == struct.pack("<q", seed)
                check_request(cache, req, seed)
                req.release()
            out = {"ready": len(reqs), "counts": dict(side.counts)}
        else:
            expected = sum(len(range(prefills.index(rank), len(cfg["tokens"]), len(prefills))) for _ in decodes)
            programs: dict = {}
            streams = []
            for _ in range(expected):
                ticket, extra = side.recv_ticket(60)
                (seed,) = struct.unpack("<q", extra)
                streams.append(run_prefill(side, ticket, seed, sleep_s=cfg.get("sleep_s", 0.0), programs=programs))
            out = {"streams": len(streams), "on_mark": sum(s.layers_posted_on_mark for s in streams),
                   "layers": lay.num_layers * len(streams), "counts": dict(side.counts),
                   "path": eng.path_for(cache.region(0, 0, 0), infos[decodes[0]][1], why=True)}
        exchange(None)  # nobody closes while a peer may still write
        side.close()
        return out
    finally:
        eng.close()


def _victim(cfg: dict) -> tuple[Any, dict]:
    """The signal that takes the victim down (SIGKILL by default; SIGSTOP freezes it: a silent peer,
    noticed only by liveness) and the sides' liveness settings."""
    import signal

    sig = getattr(signal, "SIG" + cfg.get("signal", "KILL"))
    return sig, ({"liveness_s": cfg["liveness_s"]} if "liveness_s" in cfg else {})


def killed_prefill_worker(rank: int, size: int, exchange: Any, cfg: dict) -> Any:
    """rank 0 decode, rank 1 prefill (killed mid-stream by rank 0), rank 2 healthy prefill."""
    _setup(rank, cfg)
    from jax_garden import fabric, kv

    sig, live = _victim(cfg)
    lay = _layout(cfg)
    eng = fabric.TransferEngine(provider="tcp", timeout=cfg.get("engine_timeout", ENGINE_TIMEOUT))
    cache = kv.PagedKVCache(eng, lay)
    if rank == 0:
        side = kv.DecodeSide(cache, timeout=60, quarantine_s=1.0, **live)
    else:
        side = kv.PrefillSide(cache, timeout=60, **live)
    infos = exchange((bytes(side.contact), os.getpid()))
    if rank == 1:  # the victim: streams slowly until killed
        ticket, extra = side.recv_ticket(60)
        run_prefill(side, ticket, 1, sleep_s=0.3)
        time.sleep(600)
    if rank == 2:
        ticket, extra = side.recv_ticket(60)
        run_prefill(side, ticket, 2)
        side.recv_message(60)  # rank 0 is done with us (rank 1 is dead: no more exchanges)
        side.close()
        eng.close()
        return "ok"
    free_before = cache.allocator.num_free
    doomed = side.reserve(5 * lay.page_tokens)
    side.send_ticket(infos[1][0], doomed)
    deadline = time.monotonic() + 60
    while doomed.progress()["arrived_data"] == 0:  # the stream is open and layer 0 landed
        assert time.monotonic() < deadline, "the victim never streamed"
        time.sleep(0.01)
    os.kill(infos[1][1], sig)
    killed = time.monotonic()
    state = doomed.wait(60)
    failed_after = time.monotonic() - killed
    quarantined_pages = free_before - cache.allocator.num_free
    # the decode side keeps serving: a second request through the healthy prefill
    ok = side.reserve(3 * lay.page_tokens)
    side.send_ticket(infos[2][0], ok)
    assert ok.wait(60) is kv.State.READY, ok.reason
    check_request(cache, ok, 2)
    ok.release()
    time.sleep(1.0 + 0.6)  # quarantine_s + a heartbeat: the doomed pages come back
    released = cache.allocator.num_free == free_before
    side.send_message(infos[2][0], b"bye")
    side.close()
    eng.close()
    return {"state": state.value, "reason": doomed.reason, "failed_after": failed_after,
            "quarantined": doomed.quarantined, "quarantined_pages": quarantined_pages, "released": released}


def killed_decode_worker(rank: int, size: int, exchange: Any, cfg: dict) -> Any:
    """rank 0 prefill, rank 1 decode (killed while rank 0 streams to it), rank 2 healthy decode."""
    _setup(rank, cfg)
    from jax_garden import fabric, kv

    sig, live = _victim(cfg)
    lay = _layout(cfg)
    eng = fabric.TransferEngine(provider="tcp", timeout=cfg.get("engine_timeout", ENGINE_TIMEOUT))
    cache = kv.PagedKVCache(eng, lay)
    side = kv.DecodeSide(cache, timeout=60, **live) if rank else kv.PrefillSide(cache, timeout=60, **live)
    infos = exchange((bytes(side.contact), os.getpid()))
    if rank == 1:
        req = side.reserve(6 * lay.page_tokens)
        side.send_ticket(infos[0][0], req)
        time.sleep(600)  # killed by rank 0
    if rank == 2:
        side.recv_message(60)  # rank 0 has dealt with the victim
        req = side.reserve(4 * lay.page_tokens)
        side.send_ticket(infos[0][0], req, struct.pack("<q", 7))
        assert req.wait(60) is kv.State.READY, req.reason
        check_request(cache, req, 7)
        side.send_message(infos[0][0], b"bye")
        side.close()
        eng.close()
        return "ok"
    ticket, _ = side.recv_ticket(60)
    src = cache.allocator.alloc(6)
    ended: list = []  # the prefill is told when its stream fails: (stream, when)
    s = side.open_stream(ticket, src, on_end=lambda st: ended.append((st, time.monotonic())))
    import jax
    import jax.numpy as jnp

    killed_at: list = []
    layer_s = cfg.get("layer_s", 0.25)

    def pause(layer: int) -> None:  # on the host, inside the program, after each layer's mark
        if layer == 0:  # kill the decode side once layer 0 is posted: later layers post after the kill
            deadline = time.monotonic() + 30
            while 0 not in s.layers_posted and time.monotonic() < deadline:
                time.sleep(0.002)
            os.kill(infos[1][1], sig)
            killed_at.append(time.monotonic())
        time.sleep(layer_s)

    slow = make_prefill(side.marks, lay, pause=pause)
    k, v = slow(cache.k, cache.v, jnp.asarray(src.astype(np.int32)), jnp.uint32(s.token), jnp.int32(1))
    jax.block_until_ready((k, v))
    killed = killed_at[0]
    posted = s.times["posted"]
    assert len(posted) < lay.num_layers or killed < max(posted.values()), \
        "every layer was posted before the decode side was killed"
    cache.commit(k, v)
    error = None
    try:
        s.finish(b"")
        s.wait(60)
    except kv.StreamError as e:
        error = str(e)
    deadline = time.monotonic() + 60
    while not ended and time.monotonic() < deadline:
        time.sleep(0.005)
    failed_after = (ended[0][1] if ended else time.monotonic()) - killed
    side.send_message(infos[2][0], b"go")  # the healthy decode may start
    ticket, extra = side.recv_ticket(60)
    run_prefill(side, ticket, struct.unpack("<q", extra)[0])
    side.recv_message(60)  # it checked its pages
    side.close()
    eng.close()
    return {"state": s.state, "reason": s.reason, "error": error, "failed_after": failed_after,
            "told": [x is s for x, _ in ended]}


def cycles_worker(rank: int, size: int, exchange: Any, cfg: dict) -> Any:
    """rank 0 decode, rank 1 prefill: cfg['cycles'] requests, each READY (contents checked bitwise),
    cancelled at once (often before the prefill side opened it) or cancelled after a random delay
    while layers stream. Cancelled requests' pages are reused by later ones: a write landing late
    would corrupt a later READY request's contents."""
    _setup(rank, cfg)
    import random

    from jax_garden import fabric, kv

    lay = _layout(cfg)
    eng = fabric.TransferEngine(provider="tcp", timeout=ENGINE_TIMEOUT)
    cache = kv.PagedKVCache(eng, lay)
    side = kv.DecodeSide(cache, timeout=60) if rank == 0 else kv.PrefillSide(cache, timeout=60)
    infos = exchange(bytes(side.contact))
    if rank == 1:
        programs: dict = {}
        served = cancelled = rejected = 0
        while True:
            ticket, extra = side.recv_ticket(60)
            if not ticket:
                break
            try:
                run_prefill(side, ticket, struct.unpack("<q", extra)[0], sleep_s=cfg["layer_s"], programs=programs)
                served += 1
            except kv.StreamError:
                cancelled += 1
            except ValueError:  # cancelled before it opened: the decode side rejected the ticket
                rejected += 1
        exchange(None)  # the decode side answers our last OPEN before it closes
        side.close()
        eng.close()
        return {"served": served, "cancelled": cancelled, "rejected": rejected}
    rng = random.Random(5)
    out = {"ready": 0, "cancelled": 0, "ready_after_cancel": 0}
    for i in range(cfg["cycles"]):
        req = side.reserve(rng.randint(1, 4) * lay.page_tokens - rng.randint(0, lay.page_tokens - 1))
        side.send_ticket(infos[1], req, struct.pack("<q", 1000 + i))
        mode = rng.random()
        if mode < 0.3:
            state = req.wait(60)
        else:
            if mode > 0.45:
                time.sleep(rng.random() * cfg["layer_s"] * lay.num_layers * 1.2)
            state = req.cancel()
        if state is kv.State.READY:
            check_request(cache, req, 1000 + i)
            req.release()
            out["ready" if mode < 0.3 else "ready_after_cancel"] += 1
        else:
            assert state is kv.State.CANCELLED and not req.quarantined, (state, req.reason)
            out["cancelled"] += 1
    side.send_ticket(infos[1], b"", b"")
    exchange(None)
    out["free_at_end"] = cache.allocator.num_free == lay.num_pages
    out["counts"] = dict(side.counts)
    side.close()
    eng.close()
    return out
