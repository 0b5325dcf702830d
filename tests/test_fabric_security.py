"""Holding a region's descriptor is the capability to write into that region, and nothing else is
(issue 14): keys cannot be guessed from a neighbour's descriptor, are never reused, and the staged
path (which the provider does not check) asks for the same secret."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from descriptor_codec import decode, forge

FORGED_PER_BATCH = 500


def _forged_writes_all_fail(a, src, forged: list[bytes], **kw) -> int:
    """Posts the forged writes in batches; returns how many failed (each must fail or be refused)."""
    from jax_garden import fabric

    failed = 0
    for i in range(0, len(forged), FORGED_PER_BATCH):
        transfers = []
        for f in forged[i:i + FORGED_PER_BATCH]:
            try:
                transfers.append(a.write(src, f, 64, 0, 0, imm=9, **kw))
            except ValueError:
                failed += 1  # refused before anything was posted
        for t in transfers:
            try:
                t.wait(30)
            except fabric.TransferError:
                failed += 1
    return failed


def test_forged_keys_never_touch_unshared_regions(engines):
    a, b = engines(timeout=5.0), engines(timeout=5.0)
    shared = np.zeros(4096, np.uint8)
    secrets = [np.zeros(4096, np.uint8) for _ in range(4)]
    rx = b.register(shared)
    secret_regions = [b.register(s) for s in secrets]  # only rx's descriptor is given to `a`
    src = a.register(np.full(4096, 0xAB, np.uint8))
    key = decode(bytes(rx.descriptor))["domains"][0]["key"]
    rng = np.random.default_rng(14)
    neighbours = [key + d for d in range(-2500, 2501) if d != 0 and 0 < key + d < 1 << 64]
    random_keys = [int(k) for k in rng.integers(1, 1 << 63, 10_000 - len(neighbours), dtype=np.uint64)]
    guesses = (neighbours + random_keys)[:10_000]
    # the attacker also aims at the secrets' addresses (heap layouts are guessable), with every key
    forged = [forge(rx.descriptor, key=k, base=secrets[i % 4].ctypes.data if i % 3 == 0 else shared.ctypes.data)
              for i, k in enumerate(guesses)]
    assert len(forged) == 10_000
    assert _forged_writes_all_fail(a, src, forged) == 10_000
    for s in secrets:
        assert not s.any(), "a forged key wrote into a region whose descriptor was never shared"
    # the shared descriptor still works (the connection recovered)
    a.write(src, rx.descriptor, 64, imm=10).wait(10)
    b.imm_counter(10).wait(1, 10)
    assert (shared[:64] == 0xAB).all() and not shared[64:].any()
    del secret_regions


def test_staged_regions_need_their_key_too(engines):
    # The provider never sees staged regions (writes go through bounce slots by rendezvous), so the
    # owner checks the region key itself: base and length alone are not enough.
    a, b = engines(timeout=5.0), engines(timeout=5.0)
    shared, secret = np.zeros(4096, np.uint8), np.zeros(4096, np.uint8)
    rx = b.register(shared, staged=True)
    ry = b.register(secret, staged=True)
    src = a.register(np.full(4096, 0xCD, np.uint8))
    d = decode(bytes(rx.descriptor))
    rng = np.random.default_rng(7)
    guesses = [d["region_key"] + k for k in range(1, 51)] + [int(x) for x in rng.integers(1, 1 << 63, 150, dtype=np.uint64)]
    forged = [forge(rx.descriptor, base=secret.ctypes.data, region_key=k) for k in guesses]
    assert _forged_writes_all_fail(a, src, forged) == len(forged)
    assert not secret.any()
    a.write(src, rx.descriptor, 64, imm=11).wait(10)
    b.imm_counter(11).wait(1, 10)
    assert (shared[:64] == 0xCD).all()
    del ry


def test_region_keys_are_random_distinct_and_never_reused(engines):
    e = engines()
    buf = np.zeros(1 << 16, np.uint8)
    keys, region_keys, live = [], [], []
    for i in range(1000):
        r = e.register(buf[(i % 16) * 4096:(i % 16 + 1) * 4096])
        d = decode(bytes(r.descriptor))
        keys.append(d["domains"][0]["key"])
        region_keys.append(d["region_key"])
        live.append(r)
        if i % 3 == 2:  # deregister some in between: their keys must never come back
            del live[0]
            gc.collect()
    for ks in (keys, region_keys):
        assert len(set(ks)) == 1000, "a key was reused"
        diffs = np.diff(np.array(ks, dtype=np.uint64).astype(np.float64))
        assert not np.any(np.abs(diffs) <= 1000), "keys close to each other: sequential or guessable"
        high = {k >> 40 for k in ks}
        assert len(high) > 900, "the high bits do not vary: keys are not random 64-bit values"
    del live
