"""Objects still open at interpreter exit are closed quietly (jax_garden/_lifetime.py): no nanobind leak
report after an uncaught exception with engines, KV sides and weights publishers/subscribers open,
while a reference that is really leaked still shows up in that report."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A process that opens one of everything, connects a weights publisher to its subscriber and keeps a
# KV request pending, then dies of an uncaught exception. LEAK=1 also leaks one reference for real.
SCRIPT = textwrap.dedent("""
    import ctypes, sys
    from jax_garden import fabric, kv, weights
    from jax_garden.weights import TensorSpec as T

    eng = fabric.TransferEngine(provider="tcp")
    other = fabric.TransferEngine(provider="tcp")
    layout = kv.KVLayout(num_layers=2, num_pages=8, page_tokens=4, kv_heads=2, head_dim=8)
    dec = kv.DecodeSide(kv.PagedKVCache(eng, layout))
    pre = kv.PrefillSide(kv.PagedKVCache(other, layout))
    req = dec.reserve(8)
    dec.send_ticket(pre.contact, req, b"prompt")           # pending: nobody streams it
    spec = {"w": T((64, 32), "float32", None)}
    plan = weights.Plan(weights.Layout.from_pytree(spec), weights.Layout.from_pytree(spec), chunk_bytes=4096)
    sub = weights.Subscriber(plan, spec)
    pub = weights.Publisher(plan, staging_bytes=4 * 4096)
    pub.connect([sub.address])
    watcher = eng.watcher(lambda slot, old, new: None)
    if sys.argv[1] == "leak":
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(other._native))  # a reference nobody gives back
    print("opened", flush=True)
    raise RuntimeError("an error the script never handles")
""")


def _run(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-c", SCRIPT, mode], capture_output=True, text=True, timeout=180)


def test_open_objects_are_closed_quietly_at_exit():
    r = _run("plain")
    assert "opened" in r.stdout, r.stderr[-3000:]
    assert r.returncode == 1
    assert "RuntimeError: an error the script never handles" in r.stderr
    assert "nanobind: leaked" not in r.stderr, r.stderr[-3000:]
    # Nothing but the traceback: no log records or warnings from the closes at exit.
    tail = r.stderr[r.stderr.index("RuntimeError: an error the script never handles"):]
    assert tail.strip() == "RuntimeError: an error the script never handles", tail


def test_a_real_leak_still_shows_in_nanobinds_report():
    r = _run("leak")
    assert "opened" in r.stdout, r.stderr[-3000:]
    assert "nanobind: leaked" in r.stderr, r.stderr[-3000:]
    assert "jax_garden._jax_garden.fabric.Engine" in r.stderr


def test_close_order_and_registration():
    from jax_garden import _lifetime

    closed: list[str] = []

    class Thing:
        def __init__(self, name: str, group: int):
            self.name = name
            _lifetime.close_at_exit(self, group)

        def close(self) -> None:
            closed.append(self.name)
            _lifetime.closed(self)

    class Failing(Thing):
        def close(self) -> None:
            raise RuntimeError("close failed")

    engine = Thing("engine", _lifetime.ENGINE)
    first = Thing("first service", _lifetime.SERVICE)
    second = Thing("second service", _lifetime.SERVICE)
    done = Thing("closed service", _lifetime.SERVICE)
    done.close()
    gone = Thing("collected service", _lifetime.SERVICE)
    bounded = Thing("bounded", _lifetime.SERVICE)
    _lifetime.closed(bounded)
    _lifetime.close_at_exit(bounded, how=lambda t: closed.append(f"{t.name} (how)"))
    failing = Failing("failing", _lifetime.SERVICE)
    del gone
    mine = {engine, first, second, done, bounded, failing}
    order = [obj for obj, _ in _lifetime.open_objects() if obj in mine]
    assert order == [failing, bounded, second, first, engine]  # services newest first, engines last
    closed.clear()
    saved = dict(_lifetime._open)
    try:
        with _lifetime._lock:  # only this test's objects: the session's own engines stay open
            for key in [k for k, (_, ref, _) in _lifetime._open.items() if ref() not in mine]:
                del _lifetime._open[key]
        _lifetime._close_open_objects()  # what atexit runs; the failing close is swallowed
    finally:
        with _lifetime._lock:
            _lifetime._open.update({k: v for k, v in saved.items() if v[1]() not in mine})
    assert closed == ["bounded (how)", "second service", "first service", "engine"]


def test_engine_close_unregisters():
    from jax_garden import _lifetime, fabric

    eng = fabric.TransferEngine(provider="tcp")
    assert any(obj is eng for obj, _ in _lifetime.open_objects())
    eng.close()
    assert not any(obj is eng for obj, _ in _lifetime.open_objects())
