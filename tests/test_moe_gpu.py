"""MoE dispatch/combine on the CUDA NVLink kernels, checked bit for bit against the NumPy
reference (tests/moe_reference.py) and against the ``jax.lax.ragged_all_to_all`` implementation
(moe.RaggedAllToAll), on 1, 2 and 4 GPUs in both process layouts:

* one process driving all GPUs (peer access), in this pytest process;
* one process per GPU (``jax.distributed`` on 127.0.0.1, CUDA IPC handles through its key-value
  store): this file run as a script (``--worker``), one child per GPU;

plus a run under XLA command buffers (CUDA graphs), the timeout path (a missing peer becomes an
error, not a hang) and sticky-error reporting. Marker ``gpu``; skipped without CUDA GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref

# Children and this process share the GPUs: no process may grab 75% of every GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import moe_reference as ref  # noqa: E402

pytestmark = pytest.mark.gpu

CHILD_TIMEOUT_S = float(os.environ.get("JG_MOE_GPU_CHILD_TIMEOUT_S", "150"))


# ---------------------------------------------------------------------------------------------
# Helpers shared by the in-process tests and the worker processes. GPU modules are imported
# inside functions so that collecting this file needs no GPU.


def _gpu_count() -> int:
    import jax

    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


def _require(n: int) -> None:
    from jax_garden import _moe_cuda

    if not _moe_cuda.available():
        pytest.skip("jax_garden built without the CUDA MoE kernels")
    have = _gpu_count()
    if have < n:
        pytest.skip(f"needs {n} CUDA GPUs, found {have}")


@dataclasses.dataclass
class Case(ref.Case):
    """The shared case with GPU-friendly default sizes."""
    e: int = 32
    k: int = 4
    t: int = 32
    h: int = 256


def cases_for(r: int) -> dict[str, Case]:
    """The CPU suite's cases, at GPU-friendly sizes, for ``r`` ranks."""
    e = 8 * r
    cases = {
        "random": Case(r=r, e=e, k=4),
        "decode-size": Case(r=r, e=256, k=8, t=128, h=7168, m=2 * 128 * 8),
        "skewed": Case(r=r, e=e, k=3, routing="skewed"),
        "bound-zero": Case(r=r, e=e, k=2, bound="zero"),
        "bound-mixed": Case(r=r, e=e, k=3, bound="mixed"),
        "pad16": Case(r=r, e=e, k=3, pad=16),
        "pad16-mixed": Case(r=r, e=2 * e, k=3, pad=16, bound="mixed"),
        "K1": Case(r=r, e=e, k=1),
        "K8": Case(r=r, e=4 * e, k=8, t=16),
        "duplicates": Case(r=r, e=e, k=4, routing="duplicates"),
        "invalid-ids": Case(r=r, e=e, k=2, routing="invalid"),
        "fp8-given": Case(r=r, e=e, k=2, h=256, fp8="given", scale_block=128),
        "fp8-computed-pad16": Case(r=r, e=e, k=3, h=192, fp8="computed", scale_block=64,
                                   pad=16, bound="mixed"),
        "fp8-H7168": Case(r=r, e=e, k=8, t=16, h=7168, fp8="given", scale_block=128),
        "odd-hidden": Case(r=r, e=e, k=2, h=100),            # rows not a multiple of 16 bytes
        "multi-chunk": Case(r=r, e=e, k=2, h=1544, t=24),     # 3088-byte rows: 2 chunks + tail
        "overflow": Case(r=r, e=max(4, r), k=3, pad=4, m=16, routing="skewed", t=8),
    }
    return cases


def _local_rows(arr, r: int) -> dict[int, np.ndarray]:
    """Global array sharded over ranks on axis 0 -> {rank: this process's rows of that rank}."""
    out = {}
    n = arr.shape[0] // r
    for shard in arr.addressable_shards:
        start = shard.index[0].start or 0
        out[start // n] = np.asarray(shard.data)
    return out


def _global(mesh, a: np.ndarray):
    """[R, ...] numpy -> global array [R*n, ...] sharded over 'ep' (works across processes)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    flat = np.ascontiguousarray(a.reshape((-1,) + a.shape[2:]) if a.ndim >= 2 else a)
    return jax.make_array_from_callback(flat.shape, NamedSharding(mesh, P("ep")),
                                        lambda index: flat[index])


def _spmd(mesh, fn):
    import jax
    from jax.sharding import PartitionSpec as P

    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))


def _quantized_on_device(x: np.ndarray, scale_block: int):
    """moe.quantize_fp8 as the GPU computes it (what dispatch does with computed scales)."""
    import jax
    from jax_garden import moe

    q, s = jax.jit(lambda v: moe.quantize_fp8(v, scale_block))(x.reshape(-1, x.shape[-1]))
    return np.asarray(q).reshape(x.shape), np.asarray(s).reshape(x.shape[:-1] + (-1,))


_FN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def round_trip(case: Case, mesh, a2a, impl=None):
    """One program: dispatch, then combine of an independent random expert_y (ordered after the
    dispatch through expert_counts). Returns ({rank: got}, {rank: want}, plan) for the ranks of
    this process; ``impl`` (default ``a2a``) may be a RaggedAllToAll."""
    impl = impl or a2a
    idx, w, bm, x = case.inputs()
    m = a2a.max_recv_tokens
    rng = np.random.default_rng(case.seed + 1)
    expert_ys = rng.normal(size=(case.r, m, case.h)).astype(ref.ml_dtypes.bfloat16)
    if case.fp8 == "given":
        xq, xs = ref.quantize_fp8(x, case.scale_block)
        xin = {"x": _global(mesh, xq), "x_scale": _global(mesh, xs)}
    elif case.fp8 == "computed":
        xq, xs = _quantized_on_device(x, case.scale_block)
        xin = {"x": _global(mesh, x)}  # f32: quantised inside dispatch
    else:
        xq, xs = x.astype(ref.ml_dtypes.bfloat16), None
        xin = {"x": _global(mesh, xq)}

    # One jitted function per implementation object: repeated calls (determinism, graph
    # replays) run the same executable on new buffers.
    fn = _FN_CACHE.setdefault(impl, {}).get(case.fp8)
    if fn is None:
        def body(xin, idx, w, bm, ey):
            ex, es, cnt = impl.dispatch(xin["x"], idx, w, x_scale=xin.get("x_scale"),
                                        bound_m=bm[0])
            y = impl.combine(ey, idx, w, bm[0], expert_counts=cnt)
            out = {"ex": ex, "cnt": cnt, "y": y}
            if es is not None:
                out["es"] = es
            return out

        fn = _FN_CACHE[impl][case.fp8] = _spmd(mesh, body)
    out = fn(xin, _global(mesh, idx), _global(mesh, w), _global(mesh, bm), _global(mesh, expert_ys))
    got = {key: _local_rows(v, case.r) for key, v in out.items()}
    plan = ref.plan(idx, bm, case.e, case.pad, m)
    ex, es, cnt = ref.dispatch(plan, xq, xs)
    y = ref.combine(plan, expert_ys, w)
    ranks = sorted(got["ex"])
    got_r = {rk: {key: got[key][rk] for key in got} for rk in ranks}
    want_r = {rk: {"ex": ex[rk], "cnt": cnt[rk], "y": y[rk], **({"es": es[rk]} if es is not None else {})}
              for rk in ranks}
    return got_r, want_r, plan


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def compare(got: dict, want: dict, exact_y: bool = True) -> list[str]:
    """Mismatches (empty when equal), naming rank, output and first differing position."""
    errors = []
    for rank in sorted(want):
        g, w = got[rank], want[rank]
        if set(g) != set(w):
            errors.append(f"rank {rank}: outputs {sorted(g)} != expected {sorted(w)}")
            continue
        for key in ("cnt", "ex", "es"):
            if key not in w:
                continue
            a, b = np.asarray(g[key]), np.asarray(w[key])
            if a.shape != b.shape:
                errors.append(f"rank {rank}: {key} shape {a.shape} != {b.shape}")
            elif not np.array_equal(bits(a), bits(b)):
                bad = np.argwhere(bits(a) != bits(b))
                errors.append(f"rank {rank}: {key} differs at {len(bad)} positions, first "
                              f"{tuple(bad[0])}: got {a[tuple(bad[0])]!r} want {b[tuple(bad[0])]!r}")
        a = np.asarray(g["y"]).astype(np.float32)
        b = np.asarray(w["y"]).astype(np.float32)
        if exact_y:
            ok = np.array_equal(a, b)
        else:  # ragged: XLA may fuse multiply-add: allow bf16 rounding of f32-level differences
            tol = 2.0 ** -7 * np.abs(b) + 1e-3 * (float(np.abs(b).max(initial=0.0)) + 1.0)
            ok = a.shape == b.shape and bool((np.abs(a - b) <= tol).all())
        if not ok:
            bad = np.argwhere(a != b)
            errors.append(f"rank {rank}: y differs at {len(bad)} positions, first "
                          f"{tuple(bad[0])}: got {a[tuple(bad[0])]} want {b[tuple(bad[0])]}")
    return errors


def run_case(name: str, case: Case, mesh) -> list[str]:
    """Native round trip vs the reference (+ dropped rows, sticky error); returns mismatches."""
    from jax_garden import moe

    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        got, want, plan = round_trip(case, mesh, a2a)
        errors = [f"{name}: {e}" for e in compare(got, want)]
        code, msg = a2a._native.error() if hasattr(a2a._native, "error") else (0, "")
        if code:
            errors.append(f"{name}: sticky error {code}: {msg}")
        dropped = a2a.dropped_rows()
        for rank in got:
            if dropped[rank] != int(plan.dropped[rank]):
                errors.append(f"{name}: rank {rank} dropped {dropped[rank]} rows, reference "
                              f"drops {int(plan.dropped[rank])}")
        if name == "overflow" and int(plan.dropped.sum()) == 0:
            errors.append("overflow: the case must drop rows")
    return errors


def run_determinism(mesh, r: int) -> list[str]:
    from jax_garden import moe

    case = Case(r=r, e=8 * r, k=8, t=16, h=512, bound="mixed", pad=16)
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        runs = [round_trip(case, mesh, a2a)[0] for _ in range(3)]
    errors = []
    for i, run in enumerate(runs[1:], 1):
        for rank in run:
            for key in ("ex", "cnt", "y"):
                if not np.array_equal(bits(run[rank][key]), bits(runs[0][rank][key])):
                    errors.append(f"determinism: run {i} rank {rank} {key} differs from run 0")
    return errors


def run_ragged_agreement(mesh, r: int) -> list[str]:
    """AllToAll and RaggedAllToAll (jax.lax.ragged_all_to_all) give the same dispatch and combine."""
    from jax_garden import moe

    errors = []
    for name, case in {"ragged-random": Case(r=r, e=8 * r, k=4, h=512, bound="mixed", pad=16),
                       "ragged-fp8": Case(r=r, e=8 * r, k=2, h=256, fp8="given",
                                          scale_block=128)}.items():
        with moe.AllToAll(case.config(), mesh, "ep") as a2a:
            native, want, _ = round_trip(case, mesh, a2a)
            ragged, _, _ = round_trip(case, mesh, a2a,
                                      impl=moe.RaggedAllToAll(case.config(), mesh, "ep"))
        errors += [f"{name} (native vs reference): {e}" for e in compare(native, want)]
        errors += [f"{name} (ragged vs native): {e}" for e in compare(ragged, native, exact_y=False)]
    return errors


def mesh_of(r: int):
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:r]), ("ep",))


# ---------------------------------------------------------------------------------------------
# Layout (a): one process, several GPUs.


@pytest.mark.parametrize("r", [1, 2, 4, 8])
@pytest.mark.parametrize("name", list(cases_for(1)))
def test_single_process_matches_reference(r, name):
    _require(r)
    case = cases_for(r)[name]
    errors = run_case(name, case, mesh_of(r))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_single_process_determinism(r):
    _require(r)
    errors = run_determinism(mesh_of(r), r)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_single_process_agrees_with_ragged_all_to_all(r):
    _require(r)
    errors = run_ragged_agreement(mesh_of(r), r)
    assert not errors, "\n".join(errors)


def test_device_ordinal_maps_to_rank():
    """XLA's DeviceOrdinal (handler side) must name the device the context gave each rank: the
    kernels check the rank operand (axis_index) against it and record a sticky error otherwise."""
    _require(2)
    import jax

    from jax_garden import moe

    from jax_garden import _moe_cuda

    mesh = mesh_of(2)
    case = Case(r=2, e=8, k=2)
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        assert a2a._native.ranks == {_moe_cuda.cuda_ordinal(d): i for i, d in enumerate(mesh.devices.flat)}
        round_trip(case, mesh, a2a)
        a2a._native.check()
        gens = {o: a2a._native.generations(o) for o in a2a._native.ranks}
    assert all(g == {"dispatch_send": 1, "dispatch_recv": 1, "combine_send": 1, "combine_recv": 1}
               for g in gens.values()), gens
    del jax


def test_split_phases_scan_of_layers():
    """dispatch_send/recv and combine_send/recv called explicitly, with expert work between the
    halves, three layers in a scan on one AllToAll (the generation counters advance on device)."""
    _require(2)
    import jax
    import jax.numpy as jnp

    from jax_garden import moe

    r, e, k, t, h, layers = 2, 8, 2, 6, 64, 3
    cfg = moe.AllToAllConfig(num_experts=e, experts_per_token=k, hidden=h, max_tokens=t,
                             expert_padding=4)
    mesh = mesh_of(r)
    rng = np.random.default_rng(7)
    idx, w = ref.random_routing(rng, r, t, k, e)
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    bm = np.array([6, 3], np.int32)
    x = rng.normal(size=(r, t, h)).astype(ref.ml_dtypes.bfloat16)
    scale = np.arange(1, e + 1, dtype=np.float32) / 4

    with moe.AllToAll(cfg, mesh, "ep") as a2a:
        def body(x, idx, w, bm):
            bm = bm[0]
            me = jax.lax.axis_index("ep")
            local = jax.lax.dynamic_slice(jnp.asarray(scale), (me * a2a.num_local_experts,),
                                          (a2a.num_local_experts,))

            def layer(x, _):
                sent = a2a.dispatch_send(x, idx, w, bound_m=bm)
                expert_x, _, counts = a2a.dispatch_recv(sent)
                padded = (counts + cfg.expert_padding - 1) // cfg.expert_padding * cfg.expert_padding
                seg = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(a2a.max_recv_tokens),
                                       side="right")
                f = local[jnp.minimum(seg, a2a.num_local_experts - 1)]
                expert_y = (expert_x.astype(jnp.float32) * f[:, None]).astype(jnp.bfloat16)
                back = a2a.combine_send(expert_y, counts)
                return a2a.combine_recv(back, idx, w, bound_m=bm), counts

            return jax.lax.scan(layer, x, None, length=layers)

        y, _ = _spmd(mesh, body)(_global(mesh, x), _global(mesh, idx), _global(mesh, w),
                                 _global(mesh, bm))
        y = np.asarray(y)
        a2a._native.check()

    want = ref.scaled_expert_layers(idx, bm, w, x, e, r, cfg.expert_padding, scale, layers)
    np.testing.assert_array_equal(y.reshape(r, t, h).astype(np.float32), want.astype(np.float32))


def test_recv_without_send_is_an_error_not_a_hang():
    """dispatch_recv with no dispatch_send: the phase order is reported, every wait is bounded
    (the program returns), and later calls fail with the recorded message.

    The contract (docs/moe-ffi.md, "Errors"): a kernel-recorded error is sticky and is raised at
    the latest by the next call on the AllToAll (and by ``check()``). With one process driving
    several GPUs it may already fail the call that recorded it: another rank's handler can see
    the error before the program ends. Either way the call returns in bounded time, and what it
    returns when it does not raise is zeros, never stale data."""
    _require(2)
    from jax_garden import _moe_cuda, moe

    mesh = mesh_of(2)
    case = Case(r=2, e=8, k=2)
    a2a = moe.AllToAll(case.config(), mesh, "ep", timeout=1.5)
    phase_error = r"dispatch_recv without a pending dispatch_send"
    try:
        recv = _spmd(mesh, lambda d: a2a.dispatch_recv(d)[2])
        token = _global(mesh, np.ones((2, 1), np.uint32))
        t0 = time.monotonic()
        try:
            counts, first_error = np.asarray(recv(token)), None
        except Exception as e:  # noqa: BLE001 - XlaRuntimeError/JaxRuntimeError by jax version
            counts, first_error = None, e
        elapsed = time.monotonic() - t0
        assert elapsed < 30, f"the failed call took {elapsed:.1f} s"
        if first_error is None:
            assert not counts.any(), "a dispatch_recv that failed must return zeros"
        else:
            assert re.search(phase_error, str(first_error)), first_error
        with pytest.raises(_moe_cuda.MoeDeviceError, match=phase_error):
            a2a._native.check()
        # A new executable calls the handler, which refuses the failed context. (A replay of a
        # CUDA graph captured before would not call the handler: check() is the way there.)
        recv2 = _spmd(mesh, lambda d: a2a.dispatch_recv(d)[0])
        with pytest.raises(Exception, match=r"dispatch_recv without a pending dispatch_send"):
            np.asarray(recv2(token))
    finally:
        a2a.close()


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_peer_that_never_arrives_times_out():
    """One process per GPU; process 1 never runs the program: process 0's kernels give up after
    the timeout, record which rank never arrived, and the program returns."""
    _require(2)
    import jax_garden  # noqa: F401

    port = _free_port()
    argvs = [["--worker", "timeout", str(port), "2", str(i)] for i in range(2)]
    env = _child_env()
    # Compilation must not wait for the idle process (XLA shards autotuning across processes).
    env["XLA_FLAGS"] += " --xla_gpu_shard_autotuning=false"
    errors = _report(_run_children(argvs, env, CHILD_TIMEOUT_S))
    assert not errors, "\n".join(errors)


def test_combine_with_other_routing_is_reported():
    _require(2)
    from jax_garden import _moe_cuda, moe

    mesh = mesh_of(2)
    case = Case(r=2, e=8, k=2)
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        idx, w, bm, x = case.inputs()
        other = (idx + 1) % case.e
        f = _spmd(mesh, lambda x, i, j, w, b: a2a.combine(a2a.dispatch(x, i, w, bound_m=b[0])[0],
                                                          j, w, bound_m=b[0]))
        np.asarray(f(_global(mesh, x.astype(ref.ml_dtypes.bfloat16)), _global(mesh, idx),
                     _global(mesh, other), _global(mesh, w), _global(mesh, bm)))
        with pytest.raises(_moe_cuda.MoeDeviceError,
                           match=r"combine_recv on rank \d: indices entry \d+ \(flat t\*K\+k\) = \d+ but "
                                 r"the matching dispatch routed it to expert \d+"):
            a2a._native.check()


def test_wrong_expert_counts_is_reported():
    _require(2)
    from jax_garden import _moe_cuda, moe

    mesh = mesh_of(2)
    case = Case(r=2, e=8, k=2)
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        idx, w, bm, x = case.inputs()
        xb = x.astype(ref.ml_dtypes.bfloat16)
        disp = _spmd(mesh, lambda x, i, w, b: a2a.dispatch(x, i, w, bound_m=b[0]))
        comb = _spmd(mesh, lambda ey, c, i, w, b: a2a.combine(ey, i, w, b[0], expert_counts=c + 1))
        gb = _global(mesh, bm)
        ex, _, cnt = disp(_global(mesh, xb), _global(mesh, idx), _global(mesh, w), gb)
        np.asarray(comb(ex, cnt, _global(mesh, idx), _global(mesh, w), gb))
        with pytest.raises(_moe_cuda.MoeDeviceError, match=r"expert_counts\[\d+\] = \d+ but the last dispatch received \d+"):
            a2a._native.check()


def test_closed_context_fails_cleanly():
    _require(1)
    from jax_garden import _compat, moe

    mesh = mesh_of(1)
    case = Case(r=1, e=8, k=2)
    a2a = moe.AllToAll(case.config(), mesh, "ep")
    idx, w, bm, x = case.inputs()
    f = _spmd(mesh, lambda x, i, w, b: a2a.dispatch(x, i, w, bound_m=b[0])[2])
    args = (_global(mesh, x.astype(ref.ml_dtypes.bfloat16)), _global(mesh, idx), _global(mesh, w),
            _global(mesh, bm))
    np.asarray(f(*args))
    a2a.close()
    # A new executable calls the handler: unknown id. The old one may replay a captured CUDA
    # graph without the handler: its kernels see the closed flag and touch no freed memory.
    g = _spmd(mesh, lambda x, i, w, b: a2a.dispatch(x, i, w, bound_m=b[0])[0])
    with pytest.raises(Exception, match=r"unknown context_id"):
        np.asarray(g(*args))
    try:
        out = np.asarray(f(*args))
    except Exception as e:  # refused by the handler: fine
        assert "unknown context_id" in str(e), e
    else:
        assert not out.any(), "a closed context's kernels must only write zeros"
    _compat.settle_effects()  # the expected failures are not reported again at exit


# ---------------------------------------------------------------------------------------------
# Layout (b) and command buffers: child processes running this file with --worker.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_children(argvs: list[list[str]], env: dict, timeout: float) -> list[tuple[int, str]]:
    """Starts every child (own process group), waits, kills whatever is left; (rc, output)."""
    procs = []
    outs = []
    try:
        for argv in argvs:
            f = tempfile.TemporaryFile(mode="w+")
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv],
                                          stdout=f, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
            outs.append(f)
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
    results = []
    for p, f in zip(procs, outs):
        f.seek(0)
        results.append((p.returncode, f.read()))
        f.close()
    return results


def _child_env() -> dict:
    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["jax_garden"].__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg, HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    # Not the CPU suite's forced host device count. Across processes XLA refuses the NCCL path
    # of ragged_all_to_all unless allowed (the baseline, not our kernels, needs it).
    env["XLA_FLAGS"] = "--xla_gpu_allow_ragged_all_to_all_nccl_send_recv_fallback=true"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _report(results) -> list[str]:
    errors = []
    for i, (rc, out) in enumerate(results):
        m = re.findall(r"^RESULT (.*)$", out, re.M)
        if rc != 0 or not m:
            errors.append(f"child {i}: exit code {rc}, output tail:\n{out[-6000:]}")
            continue
        errors += [f"child {i}: {e}" for e in json.loads(m[-1])["errors"]]
    return errors


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_one_process_per_gpu(r):
    """Every case with one process per GPU: CUDA IPC handles via jax.distributed's KV store."""
    _require(r)
    import jax_garden  # noqa: F401  (for _child_env)

    port = _free_port()
    argvs = [["--worker", "multiprocess", str(port), str(r), str(i)] for i in range(r)]
    errors = _report(_run_children(argvs, _child_env(), CHILD_TIMEOUT_S))
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
@pytest.mark.parametrize("graphs", ["default", "off"])
def test_dispatch_combine_without_bound_m(graphs):
    """The API's defaults (no bound_m: a constant operand) in a child process, so that a crash
    shows its output: pytest's fd capture swallowed it on the GPU machine, where the pytest
    process died silently in exactly the tests that omitted bound_m. "off" registers the
    targets without the command-buffer trait (JAX_GARDEN_MOE_CUDA_GRAPHS=0)."""
    _require(2)
    import jax_garden  # noqa: F401

    env = _child_env()
    if graphs == "off":
        env["JAX_GARDEN_MOE_CUDA_GRAPHS"] = "0"
    errors = _report(_run_children([["--worker", "defaults", "2"]], env, CHILD_TIMEOUT_S))
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_under_cuda_graphs():
    """XLA command buffers (CUDA graphs) on: every step with new routing and data is correct,
    and replays of the same executable run our kernels (device generations advance) without
    calling the FFI handler, i.e. from a captured graph."""
    n = min(4, max(1, _gpu_count()))
    _require(n)
    import jax_garden  # noqa: F401

    env = _child_env()
    env["XLA_FLAGS"] += " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
    errors = _report(_run_children([["--worker", "graphs", str(n)]], env, CHILD_TIMEOUT_S))
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------------
# Worker entry points.


def _worker_multiprocess(port: int, r: int, i: int) -> list[str]:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=r,
                               process_id=i, local_device_ids=[i],
                               initialization_timeout=120)
    assert jax.process_count() == r and len(jax.local_devices()) == 1
    mesh = mesh_of(r)
    errors = []
    t0 = time.monotonic()
    for name, case in cases_for(r).items():
        _progress(f"case {name} ({time.monotonic() - t0:.1f}s)")
        try:
            errors += run_case(name, case, mesh)
        except Exception as e:  # report and go on: the other cases still say something
            errors.append(f"{name}: {type(e).__name__}: {e}")
    for fn in (run_determinism, run_ragged_agreement):
        _progress(f"{fn.__name__} ({time.monotonic() - t0:.1f}s)")
        try:
            errors += fn(mesh, r)
        except Exception as e:
            errors.append(f"{fn.__name__}: {type(e).__name__}: {e}")
    _progress(f"done ({time.monotonic() - t0:.1f}s)")
    return errors


def _worker_graphs(n: int) -> list[str]:
    import jax

    from jax_garden import moe

    mesh = mesh_of(n)
    errors = []
    case0 = Case(r=n, e=8 * n, k=4, t=32, h=512, pad=16, bound="mixed")
    with moe.AllToAll(case0.config(), mesh, "ep") as a2a:
        for step in range(6):  # same executable, new routing and data every step
            case = dataclasses.replace(case0, seed=100 + step)
            got, want, _ = round_trip(case, mesh, a2a)
            errors += [f"graph step {step}: {e}" for e in compare(got, want)]
        # Replays on the same input arrays: a captured graph launches the kernels without the
        # handler (XLA calls it again only to re-record, e.g. when buffer addresses change).
        idx, w, bm, x = case0.inputs()
        ey = np.zeros((n, a2a.max_recv_tokens, case0.h), ref.ml_dtypes.bfloat16)
        args = ({"x": _global(mesh, x.astype(ref.ml_dtypes.bfloat16))}, _global(mesh, idx),
                _global(mesh, w), _global(mesh, bm), _global(mesh, ey))
        fn = _FN_CACHE[a2a][case0.fp8]
        jax.block_until_ready(fn(*args))
        ordinals = sorted(a2a._native.ranks)
        gens0 = [a2a._native.generations(o)["combine_recv"] for o in ordinals]
        calls0 = a2a._native.handler_calls()
        replays = 5
        for _ in range(replays):
            jax.block_until_ready(fn(*args))
        gens = [a2a._native.generations(o)["combine_recv"] - g for o, g in zip(ordinals, gens0)]
        calls = a2a._native.handler_calls() - calls0
        _progress(f"replays: kernel generations advanced by {gens}, handler calls {calls}")
        if gens != [replays] * len(ordinals):
            errors.append(f"replays: combine_recv ran {gens} times per device, expected {replays}")
        if calls >= 4 * len(ordinals) * replays:
            errors.append(f"replays: the FFI handler ran {calls} times for {replays} replays of 4 "
                          f"calls on {len(ordinals)} devices: no CUDA graph captured our calls")
        code, msg = a2a._native.error()
        if code:
            errors.append(f"sticky error {code}: {msg}")
    return errors


def _worker_timeout(port: int, r: int, i: int) -> list[str]:
    import jax

    from jax_garden import _moe_cuda, moe

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=r,
                               process_id=i, local_device_ids=[i], initialization_timeout=120)
    mesh = mesh_of(r)
    case = Case(r=r, e=4 * r, k=2)
    errors = []
    _progress("creating the AllToAll")
    a2a = moe.AllToAll(case.config(), mesh, "ep", timeout=1.5)
    try:
        if i == 0:  # the others never run the program
            _progress("running the round trip alone")
            t0 = time.monotonic()
            round_trip(case, mesh, a2a)
            elapsed = time.monotonic() - t0
            if elapsed > 60:
                errors.append(f"the program took {elapsed:.1f} s with a 1.5 s timeout")
            try:
                a2a._native.check()
                errors.append("no error recorded although rank 1 never sent")
            except _moe_cuda.MoeTimeoutError as e:
                if not re.search(r"rank 0 timed out waiting for dispatch data from rank 1", str(e)):
                    errors.append(f"unexpected message: {e}")
    finally:
        a2a.close()  # a barrier: process 1 waits here until process 0 is done
    return errors


def _progress(msg: str) -> None:
    print(f"[{os.getpid()}] {msg}", flush=True)


def _worker_defaults(n: int) -> list[str]:
    from jax_garden import moe

    mesh = mesh_of(n)
    case = Case(r=n, e=8 * n, k=3)
    idx, w, _, x = case.inputs()
    xb = x.astype(ref.ml_dtypes.bfloat16)
    errors = []
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        rng = np.random.default_rng(5)
        ey = rng.normal(size=(n, a2a.max_recv_tokens, case.h)).astype(ref.ml_dtypes.bfloat16)

        def body(x, i, w, ey):
            ex, _, cnt = a2a.dispatch(x, i, w)
            return {"ex": ex, "cnt": cnt, "y": a2a.combine(ey, i, w, expert_counts=cnt)}

        _progress("running dispatch/combine without bound_m")
        out = _spmd(mesh, body)(_global(mesh, xb), _global(mesh, idx), _global(mesh, w),
                                _global(mesh, ey))
        got = {key: _local_rows(v, n) for key, v in out.items()}
        _progress("compare")
        plan = ref.plan(idx, np.full(n, case.t, np.int32), case.e, case.pad, a2a.max_recv_tokens)
        ex, _, cnt = ref.dispatch(plan, xb)
        y = ref.combine(plan, ey, w)
        want = {rk: {"ex": ex[rk], "cnt": cnt[rk], "y": y[rk]} for rk in got["ex"]}
        errors += compare({rk: {k: got[k][rk] for k in got} for rk in got["ex"]}, want)
        code, msg = a2a._native.error() if hasattr(a2a._native, "error") else (0, "")
        if code:
            errors.append(f"sticky error {code}: {msg}")
    return errors


def _worker_main(argv: list[str]) -> int:
    import faulthandler

    # A hang shows where: every thread's stack before the parent kills this process.
    faulthandler.dump_traceback_later(max(10.0, CHILD_TIMEOUT_S - 20), exit=False)
    mode = argv[0]
    _progress(f"worker {argv}")
    try:
        if mode == "multiprocess":
            errors = _worker_multiprocess(int(argv[1]), int(argv[2]), int(argv[3]))
        elif mode == "timeout":
            errors = _worker_timeout(int(argv[1]), int(argv[2]), int(argv[3]))
        elif mode == "graphs":
            errors = _worker_graphs(int(argv[1]))
        elif mode == "defaults":
            errors = _worker_defaults(int(argv[1]))
        else:
            raise SystemExit(f"unknown worker mode {mode!r}")
    except Exception as e:
        import traceback

        traceback.print_exc()
        errors = [f"worker failed: {type(e).__name__}: {e}"]
    print("RESULT " + json.dumps({"errors": errors}), flush=True)
    return 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.exit(_worker_main(sys.argv[2:]))
