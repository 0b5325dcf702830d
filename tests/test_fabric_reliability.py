"""Reliability of the TransferEngine when peers die, descriptors go stale or are forged (issue 9).

* a dead peer never stalls or fails traffic to live peers; ops toward it fail within the timeout
  and, once it is known dead, at once;
* a write into a deregistered region fails, naming the region; the writes in flight beside it
  either land (and are counted) or fail loudly, those failed by the connection reset saying they may
  have landed (only they may add to the count); the connection recovers;
* the ipc path (same process here, across processes in test_fabric_gpu.py) checks bounds and
  liveness against the owner's registrations;
* small points: bytes-like descriptors/addresses, no nanobind leak report at exit.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from descriptor_codec import forge
from fabric_group import run_group

PROVIDER = "tcp"


# ---------------------------------------------------------------------------------------------
# 1. A dead peer does not stall live peers


def _stream(eng, region, peers: dict, seconds: float, window: int, sizes: list[int], stats: dict) -> None:
    """Keeps up to `window` writes in flight toward each peer for `seconds`; records per peer the
    ops that completed, failed (with their errors) and how long each failure took, and how many
    completed while another peer had an op pending (progress beside a stalled peer)."""
    inflight = {p: [] for p in peers}
    end = time.monotonic() + seconds
    i = 0

    def reap(p, block: bool) -> None:
        keep = []
        others_pending = any(not t.done for q in peers if q != p for t, _ in inflight[q])
        for t, posted in inflight[p]:
            if not block and not t.done:
                keep.append((t, posted))
                continue
            try:
                t.wait(60)
                stats[p]["ok"] += 1
                stats[p]["ok_beside_pending"] += others_pending and not block
            except Exception as e:  # noqa: BLE001 - TransferError or TimeoutError: both are failures
                stats[p]["failed"] += 1
                stats[p]["errors"].add(f"{type(e).__name__}: {e}"[:300])
                stats[p]["fail_after"].append(time.monotonic() - posted)
        inflight[p] = keep

    while time.monotonic() < end:
        for p, desc in peers.items():
            reap(p, block=False)
            while len(inflight[p]) < window:
                n = sizes[i % len(sizes)]
                i += 1
                inflight[p].append((eng.write(region, desc, n, 0, (i * 4096) % (4 << 20), imm=7), time.monotonic()))
        time.sleep(0.0005)
    for p in peers:
        reap(p, block=True)


def _isolation_worker(rank: int, size: int, exchange):
    from jax_garden import fabric

    timeout = 2.0
    eng = fabric.TransferEngine(provider=PROVIDER, domains=2, timeout=timeout)
    dst = np.zeros(8 << 20, np.uint8)
    rd = eng.register(dst)
    infos = exchange((os.getpid(), bytes(rd.descriptor), bytes(eng.address)))
    if rank == 1:  # the victim
        time.sleep(600)
    if rank == 2:  # the live receiver: count what the writer says landed, then leave
        from conftest import adversary_quiet

        n_ok = int(eng.recv(120))
        eng.imm_counter(7).wait(n_ok, 60)
        # The writer's probe went on both connections after its last write completed: once both
        # probes are counted (and nothing is held back), every imm of those writes was too.
        eng.imm_counter(8).wait(2, 60)
        adversary_quiet(eng)
        extra = eng.imm_counter(7).credits
        eng.close()
        return {"counted": n_ok, "extra": extra}
    src = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8)
    rs = eng.register(src)
    r1, r2 = (fabric.MemoryDescriptor.from_bytes(infos[r][1]) for r in (1, 2))
    sizes = [4096, 65536, 262144, 16384]
    stats = {p: {"ok": 0, "failed": 0, "errors": set(), "fail_after": [], "ok_beside_pending": 0} for p in ("r1", "r2")}
    _stream(eng, rs, {"r1": r1, "r2": r2}, 1.5, 64, sizes, stats)  # both alive
    before = {p: dict(s, errors=set(s["errors"]), fail_after=list(s["fail_after"])) for p, s in stats.items()}
    os.kill(infos[1][0], signal.SIGKILL)
    killed = time.monotonic()
    _stream(eng, rs, {"r1": r1, "r2": r2}, 2.5 * timeout, 64, sizes, stats)  # r1 dead, still posted to
    after_kill = time.monotonic() - killed
    # Once known dead, an op toward it fails at once, before anything is posted.
    late = eng.write(rs, r1, 4096, imm=7)
    late_done_at_once = late.done
    try:
        late.wait(timeout * 3)
        late_error = None
    except (fabric.TransferError, TimeoutError) as e:
        late_error = f"{type(e).__name__}: {e}"
    n_ok = stats["r2"]["ok"]
    from conftest import adversary_quiet

    adversary_quiet(eng)
    eng.barrier([r2, r2], imm=8).wait(30)  # a probe on each of the 2 domains, behind every write
    eng.send(fabric.NetAddress.from_bytes(infos[2][2]), str(n_ok).encode()).wait(30)
    eng.close()
    return {"before": before, "stats": stats, "after_kill_s": after_kill, "late_done_at_once": late_done_at_once,
            "late_error": late_error, "r2_ok_before": before["r2"]["ok"], "timeout": timeout}


def test_dead_peer_does_not_stall_or_fail_live_peers():
    out = run_group(_isolation_worker, 3, timeout=120, expect_dead={1})
    w, r2 = out[0], out[2]
    s1, s2 = w["stats"]["r1"], w["stats"]["r2"]
    # live peer: no failure at all, every write counted there exactly once
    assert s2["failed"] == 0, s2["errors"]
    assert r2["counted"] == s2["ok"] and r2["extra"] == 0, r2
    # progress, not a rate: the live peer kept completing writes after the kill (every one posted
    # completed, above), and some while writes toward the dead peer were still pending
    b2 = w["before"]["r2"]
    assert s2["ok"] > b2["ok"], "no write to the live peer completed after the kill"
    assert s2["ok_beside_pending"] > b2["ok_beside_pending"], \
        "the live peer completed nothing while an op toward the dead peer was pending"
    # dead peer: its ops fail, each within the engine timeout (+ slack for a loaded machine)
    assert s1["failed"] > 0
    assert max(s1["fail_after"]) < w["timeout"] + 3.0, max(s1["fail_after"])
    # and once it is known dead, a new op fails at once with a reason
    assert w["late_done_at_once"], ("an op toward a peer known to be dead was posted", w["late_error"], sorted(s1["errors"])[:4])
    assert w["late_error"] and w["late_error"].startswith("TransferError") and "unreachable" in w["late_error"], \
        w["late_error"]
    rate_before = w["r2_ok_before"] / 1.5
    rate_after = (s2["ok"] - w["r2_ok_before"]) / w["after_kill_s"]
    print(f"\nlive peer: {rate_before:.0f} writes/s before the kill, {rate_after:.0f} after "
          f"({rate_after / rate_before:.2f}x); dead peer: {s1['failed']} ops failed, slowest after "
          f"{max(s1['fail_after']):.2f} s; errors: {sorted(s1['errors'])[:3]}")


# ---------------------------------------------------------------------------------------------
# 2. Stale descriptors


def test_write_into_deregistered_region_fails_and_nothing_is_lost_silently(engines):
    from jax_garden import fabric

    a, b = engines(timeout=3.0), engines(timeout=3.0)
    rs = a.register(np.ones(1 << 20, np.uint8))
    live = np.zeros(1 << 20, np.uint8)
    rl = b.register(live)
    ro = b.register(np.zeros(1 << 20, np.uint8))
    stale = ro.descriptor
    del ro
    gc.collect()
    time.sleep(0.2)  # the owner's worker unregisters asynchronously
    good = [a.write(rs, rl.descriptor, 4096, 0, (i % 256) * 4096, imm=1) for i in range(300)]
    bad = a.write(rs, stale, 4096, imm=2)
    good += [a.write(rs, rl.descriptor, 4096, 0, (i % 256) * 4096, imm=1) for i in range(300)]
    with pytest.raises(fabric.TransferError, match=r"(?s)region \[0x[0-9a-f]+, \+1048576\).*(no longer|deregistered)"):
        bad.wait(10)
    landed = 0
    errors = set()
    unknown = 0  # failed by the reset: they may have landed, the error says so
    for t in good:
        try:
            t.wait(10)
            landed += 1
        except fabric.TransferError as e:
            errors.add(str(e)[:200])
            unknown += "may not have landed" in str(e)
    # Every write reported successful was counted at the receiver. A write that failed because the
    # connection was reset may still have been applied before the reset (the receiver took it, its
    # completion was lost): only those may add to the count, and none is counted twice. Seen on a
    # loaded CI VM: 102 of 300 writes posted behind the stale one were applied and reported failed.
    if landed:
        b.imm_counter(1).wait(landed, 10)
    time.sleep(0.3)
    extra = b.imm_counter(1).credits
    assert extra <= unknown, f"{extra} imms beyond the {landed} successful writes, but only {unknown} writes " \
                             "failed with an unknown outcome"
    assert b.imm_counter(2).credits == 0  # the stale write itself was never applied
    # the connection recovers: a later write lands
    a.write(rs, rl.descriptor, 4096, 0, 0, imm=3).wait(10)
    b.imm_counter(3).wait(1, 10)
    assert live[:4096].all()
    print(f"\n{landed} of 600 good writes landed, {600 - landed} failed loudly ({extra} of them applied "
          f"before the reset): {sorted(errors)[:2]}")


def test_stale_descriptor_fails_fast_once_known(engines):
    # After a write found the region gone, the next op toward it fails before anything is posted.
    from jax_garden import fabric

    a, b = engines(timeout=3.0), engines(timeout=3.0)
    rs = a.register(np.ones(8192, np.uint8))
    ro = b.register(np.zeros(8192, np.uint8))
    stale = ro.descriptor
    del ro
    gc.collect()
    time.sleep(0.2)
    with pytest.raises(fabric.TransferError, match="no longer"):
        a.write(rs, stale, 4096, imm=2).wait(10)
    again = a.write(rs, stale, 4096, imm=2)
    assert again.done
    with pytest.raises(fabric.TransferError, match="no longer"):
        again.wait(1)


# ---------------------------------------------------------------------------------------------
# 3. The ipc path checks bounds and liveness


def test_ipc_path_refuses_a_forged_length_in_process(engines):
    a, b = engines(), engines()
    rs = a.register(np.arange(16384, dtype=np.uint8))
    arena = np.zeros(16384, np.uint8)  # the registered region is the first half of it
    rd = b.register(arena[:8192])
    forged = forge(rd.descriptor, length=16384)
    with pytest.raises(ValueError, match=r"destination bytes \[0, 12288\) run past the end of the region \(8192 bytes\)"):
        a.write(rs, forged, 12288, path="ipc").wait(10)
    assert not arena.any(), "the forged write touched memory"
    a.write(rs, rd.descriptor, 8192, path="ipc", imm=4).wait(10)  # the real bounds still work
    b.imm_counter(4).wait(1, 10)
    assert (arena[:8192] == np.arange(8192, dtype=np.uint8)).all() and not arena[8192:].any()


def test_ipc_path_refuses_a_deregistered_region_in_process(engines):
    from jax_garden import fabric

    a, b = engines(), engines()
    rs = a.register(np.ones(8192, np.uint8))
    buf = np.zeros(8192, np.uint8)
    rd = b.register(buf)
    stale = rd.descriptor
    del rd
    gc.collect()
    time.sleep(0.2)
    t = a.write(rs, stale, 4096, path="ipc", imm=5)
    with pytest.raises(fabric.TransferError, match="no longer"):
        t.wait(10)
    assert not buf.any(), "a write reached a deregistered region"
    for paged in (True, False):
        t = (a.write_paged(rs, stale, 1024, [0, 1], [2, 3], 1024, 1024, path="ipc") if paged
             else a.scatter(rs, [(stale, 64, 0, 0)], path="ipc"))
        with pytest.raises(fabric.TransferError, match="no longer"):
            t.wait(10)
    assert not buf.any()


# ---------------------------------------------------------------------------------------------
# 4. Small points


def test_descriptors_and_addresses_accept_any_bytes_like(engines):
    from jax_garden import fabric

    e = engines()
    r = e.register(np.zeros(4096, np.uint8))
    raw = bytes(r.descriptor)
    for b in (bytearray(raw), memoryview(raw), memoryview(bytearray(raw))):
        assert fabric.MemoryDescriptor.from_bytes(b) == r.descriptor
    a = bytes(e.address)
    for b in (bytearray(a), memoryview(a)):
        assert fabric.NetAddress.from_bytes(b) == e.address
    with pytest.raises(TypeError):
        fabric.MemoryDescriptor.from_bytes("not bytes")


def test_no_leak_report_at_exit_with_a_live_watcher():
    code = ("from jax_garden import fabric\n"
            "e = fabric.TransferEngine(provider='tcp')\n"
            "w = e.watcher(lambda s, o, n: None); s = w.slot(0)\n"
            "e2 = fabric.TransferEngine(provider='tcp'); w2 = e2.watcher(lambda s, o, n: None)\n"
            "e.close()\n")  # e2 and both watchers are still alive at exit
    p = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "leak" not in p.stderr, p.stderr
