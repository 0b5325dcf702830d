"""MoE on the CUDA NVLink kernels, what only GPUs have: the process layouts, CUDA graphs, the
mapping of devices to ranks, and how kernel-recorded errors surface. The round-trip scenarios
(bit for bit against the NumPy reference tests/moe_reference.py and against
``jax.lax.ragged_all_to_all``) run on GPUs from tests/test_moe.py, on 1, 2, 4 and 8 GPUs of this
process; here they also run with one process per rank:

* one process driving all GPUs (peer access), in this pytest process;
* one process per rank (``jax.distributed`` on 127.0.0.1, CUDA IPC handles through its key-value
  store): this file run as a script (``--worker``), one child per rank. With fewer GPUs than ranks
  the processes share GPUs (``local_device_ids`` = rank mod GPUs: same-device IPC mappings, kernels
  time-sliced), so one GPU checks every rank count; with one GPU per rank it is the deployment
  layout. Only ``jax.lax.ragged_all_to_all`` (NCCL) refuses two ranks on one GPU: those cases skip
  there;

plus a run under XLA command buffers (CUDA graphs), the timeout path (a missing peer becomes an
error, not a hang) and sticky-error reporting. Node groups (the host proxy between NVLink domains)
are in tests/test_moe_gpu_nodes.py. Marker ``gpu``; skipped without CUDA GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time

# Children and this process share the GPUs: no process may grab 75% of every GPU up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import moe_reference as ref  # noqa: E402
import moe_scenarios as sc  # noqa: E402
from fabric_group import free_port, run_scripts  # noqa: E402

pytestmark = pytest.mark.gpu

CHILD_TIMEOUT_S = float(os.environ.get("JG_MOE_GPU_CHILD_TIMEOUT_S", "150"))
GPU = sc.GPU
Case = sc.GpuCase


def _gpu_count() -> int:
    return len(GPU.devices())


def _require(n: int) -> None:
    GPU.require(n)


def mesh_of(r: int):
    return GPU.mesh(r)


def round_trip(case: Case, mesh, a2a, impl=None):
    return sc.round_trip(GPU, case, mesh, a2a, impl)


_global = sc.global_array
_local_rows = sc.local_rows
_spmd = sc.spmd
compare = sc.compare


# ---------------------------------------------------------------------------------------------
# Layout (a): one process, several GPUs (the scenarios are in tests/test_moe.py).


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
    """One process per rank (sharing the GPU when there is one); process 1 never runs the
    program: process 0's kernels give up after the timeout, record which rank never arrived, and
    the program returns."""
    gpus = _ranks_layout(2)
    import jax_garden  # noqa: F401

    port = free_port()
    argvs = [["--worker", "timeout", str(port), "2", str(i), str(gpus)] for i in range(2)]
    env = _child_env()
    # Compilation must not wait for the idle process (XLA shards autotuning across processes).
    env["XLA_FLAGS"] += " --xla_gpu_shard_autotuning=false"
    errors = _report(_run_children(argvs, env, CHILD_TIMEOUT_S))
    assert not errors, "\n".join(errors)


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


# The kernels' variants (settings read when an AllToAll is created): every one must give the same
# bits. (name, settings, fused kernels expected)
SYNC_VARIANTS = [
    ("arrive-fused", {"JAX_GARDEN_MOE_SYNC": "arrive", "JAX_GARDEN_MOE_FUSED": "1"}, True),
    ("arrive-fused-plain-launch", {"JAX_GARDEN_MOE_SYNC": "arrive", "JAX_GARDEN_MOE_FUSED": "1",
                                   "JAX_GARDEN_MOE_COOPERATIVE": "0"}, True),
    ("arrive-split", {"JAX_GARDEN_MOE_SYNC": "arrive", "JAX_GARDEN_MOE_FUSED": "0"}, False),
    ("flags", {"JAX_GARDEN_MOE_SYNC": "flags"}, False),
    ("legacy", {"JAX_GARDEN_MOE_LEGACY_SYNC": "1"}, False),
]


@pytest.mark.parametrize("name, settings, fused", SYNC_VARIANTS, ids=[v[0] for v in SYNC_VARIANTS])
def test_sync_variants_give_the_same_bits(name, settings, fused, monkeypatch):
    """Each synchronisation of the NVLink kernels (release arrivals, the previous flags, the first
    version) and dispatch()/combine() as one fused kernel or two: the reference's bits, capacity
    drops included, the split halves and the one-call forms mixed on one AllToAll; the context
    says which kernels it runs."""
    r = min(2, max(1, _gpu_count()))
    _require(r)
    from jax_garden import moe

    for env in ("JAX_GARDEN_MOE_SYNC", "JAX_GARDEN_MOE_FUSED", "JAX_GARDEN_MOE_COOPERATIVE",
                "JAX_GARDEN_MOE_LEGACY_SYNC"):
        monkeypatch.delenv(env, raising=False)
    for env, value in settings.items():
        monkeypatch.setenv(env, value)
    mesh = mesh_of(r)
    cases = sc.gpu_cases(r)
    errors = []
    for case_name in ("decode-size", "overflow"):  # every case runs on the default in tests/test_moe.py
        errors += sc.run_case(GPU, f"{name} {case_name}", cases[case_name], mesh)
    errors += [f"{name} mixed calls: {e}" for e in sc.run_mixed_calls(GPU, r, 64, [6, 3][:r])]
    with moe.AllToAll(cases["random"].config(), mesh, "ep") as a2a:
        ctx = a2a._native._ctx
        want_sync = "legacy" if "JAX_GARDEN_MOE_LEGACY_SYNC" in settings else settings["JAX_GARDEN_MOE_SYNC"]
        assert ctx.sync == want_sync
        for ordinal in a2a._native.ranks:
            grids = list(ctx.grids(ordinal))
            assert (grids[4] > 0 and grids[5] > 0) == fused, grids
    assert not errors, "\n".join(errors)


def test_fused_kernel_stamps_cover_the_phase():
    """The device stamps of a fused dispatch/combine: the send half's slot ends where the receive
    half's begins, block 0's stamps in order (entry <= start <= waited <= body: one thread's
    clock), each half ending after it started, and timings() (start, end) spans the phase: what
    bench moe --profile reads."""
    _require(1)
    from jax_garden import moe

    mesh = mesh_of(1)
    case = sc.gpu_cases(1)["random"]
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        assert list(a2a._native._ctx.grids(next(iter(a2a._native.ranks))))[4] > 0, "not fused"
        for seed in range(3):
            round_trip(dataclasses.replace(case, seed=seed), mesh, a2a)
        a2a.check()
        ordinal = next(iter(a2a._native.ranks))
        st = {k: v.astype(np.int64) for k, v in a2a._native.stamps(ordinal, 3).items()}
        t = a2a._native.timings(ordinal, 3).astype(np.int64)
    for name in ("entry", "start", "waited", "body", "end"):
        assert (st[name] > 0).all(), (name, st[name])
    order = ("entry", "start", "waited", "body")
    for a, b in zip(order, order[1:]):
        assert (st[a] <= st[b]).all(), (a, b, st[a], st[b])
    assert (st["start"] < st["end"]).all(), (st["start"], st["end"])
    for send, recv in ((0, 1), (2, 3)):  # the receive half starts where the send half ended
        assert (st["end"][:, send] == st["entry"][:, recv]).all()
    assert (t[:, :, 0] == st["start"]).all() and (t[:, :, 1] == st["end"]).all()


def test_node_group_arguments_on_gpus():
    """node_size = R (or unset) is one NVLink domain (the NVLink context); a node_size that does not
    divide R and internode= without node_size are clear errors. (Node groups themselves run in
    tests/test_moe_gpu_nodes.py, across processes.)"""
    _require(2)
    from jax_garden import moe

    mesh = mesh_of(2)
    case = Case(r=2, e=8, k=2)
    with pytest.raises(ValueError, match=r"node_size=3 exceeds the number of ranks R=2"):
        moe.AllToAll(case.config(), mesh, "ep", node_size=3)
    with pytest.raises(ValueError, match=r"internode= needs node_size"):
        moe.AllToAll(case.config(), mesh, "ep", internode=moe.InternodeConfig(provider="tcp"))
    with moe.AllToAll(case.config(), mesh, "ep", node_size=2) as a2a:  # one NVLink domain: as before
        assert (a2a.platform, a2a.num_nodes) == ("cuda", 1)
        assert not a2a._native.proxied


# ---------------------------------------------------------------------------------------------
# Layout (b) and command buffers: child processes running this file with --worker.


def _run_children(argvs: list[list[str]], env: dict, timeout: float) -> list[tuple[int, str]]:
    """Runs this file with each argv (own process groups, always reaped): (rc, output) each."""
    return run_scripts([[sys.executable, os.path.abspath(__file__), *argv] for argv in argvs], env, timeout)


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


def _ranks_layout(r: int) -> int:
    """GPUs the r processes use: one each when there are enough, else they share all there are
    (process i on GPU i mod n). Skips the calling test without a GPU."""
    _require(1)
    if r == 8 and _gpu_count() < 8:
        pytest.skip("8 processes sharing fewer GPUs: covered by 2 and 4 processes (time)")
    return min(r, _gpu_count())


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_one_process_per_rank(r):
    """Every case with one process per rank, CUDA IPC handles via jax.distributed's KV store; the
    processes share GPUs when there are fewer than r (bit for bit the same results)."""
    gpus = _ranks_layout(r)
    import jax_garden  # noqa: F401  (for _child_env)

    port = free_port()
    argvs = [["--worker", "multiprocess", str(port), str(r), str(i), str(gpus), "native"] for i in range(r)]
    errors = _report(_run_children(argvs, _child_env(), CHILD_TIMEOUT_S))
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
@pytest.mark.parametrize("sync", ["flags", "arrive-split"])
def test_one_process_per_rank_other_synchronisations(sync):
    """The previous synchronisation (flags) and release arrivals with two kernels per phase, with
    2 processes (sharing the GPU when there is one): every case, bit for bit."""
    gpus = _ranks_layout(2)
    import jax_garden  # noqa: F401

    env = _child_env()
    env["JAX_GARDEN_MOE_SYNC"] = "flags" if sync == "flags" else "arrive"
    env["JAX_GARDEN_MOE_FUSED"] = "0"
    port = free_port()
    argvs = [["--worker", "multiprocess", str(port), "2", str(i), str(gpus), "native"] for i in range(2)]
    errors = _report(_run_children(argvs, env, CHILD_TIMEOUT_S))
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
@pytest.mark.parametrize("r", [2, 4])
def test_ragged_baseline_one_process_per_gpu(r):
    """moe.RaggedAllToAll (jax.lax.ragged_all_to_all, NCCL) against the native kernels and the
    reference, one process per GPU. NCCL refuses two ranks on one GPU, so this needs r GPUs."""
    _require(1)
    if _gpu_count() < r:
        pytest.skip(f"needs {r} GPUs, found {_gpu_count()}: NCCL (ragged_all_to_all) refuses two ranks on "
                    f"one GPU (\"Duplicate GPU detected\"); the native cases run with shared GPUs in "
                    f"test_one_process_per_rank")
    import jax_garden  # noqa: F401

    port = free_port()
    argvs = [["--worker", "multiprocess", str(port), str(r), str(i), str(r), "ragged"] for i in range(r)]
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


def _worker_multiprocess(port: int, r: int, i: int, gpus: int, what: str) -> list[str]:
    import jax

    # Process i uses GPU i mod gpus: the processes share GPUs when there are fewer than r.
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=r,
                               process_id=i, local_device_ids=[i % gpus],
                               initialization_timeout=120)
    assert jax.process_count() == r and len(jax.local_devices()) == 1
    mesh = mesh_of(r)
    errors = []
    t0 = time.monotonic()
    scenarios = []
    if what == "native":
        for name, case in sc.gpu_cases(r).items():
            scenarios.append((name, lambda name=name, case=case: sc.run_case(GPU, name, case, mesh)))
        scenarios.append(("determinism", lambda: sc.run_determinism(GPU, sc.determinism_case(GPU, r), mesh)))
        bound_m = [6 - (j % 4) for j in range(r)]
        scenarios.append(("mixed calls", lambda: sc.run_mixed_calls(GPU, r, 64, bound_m)))
    else:
        scenarios += [(f"ragged {name}", lambda name=name, case=case: sc.run_ragged(GPU, name, case, mesh))
                      for name, case in sc.gpu_ragged_cases(r).items()]
    for what_, run in scenarios:
        _progress(f"{what_} ({time.monotonic() - t0:.1f}s)")
        try:
            errors += run()
        except Exception as e:  # report and go on: the other cases still say something
            errors.append(f"{what_}: {type(e).__name__}: {e}")
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
        fn = sc._FN_CACHE[a2a][case0.fp8]
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
        if calls >= sc.CALLS_PER_ROUND_TRIP * len(ordinals) * replays:
            errors.append(f"replays: the FFI handler ran {calls} times for {replays} replays of "
                          f"{sc.CALLS_PER_ROUND_TRIP} calls on {len(ordinals)} devices: no CUDA graph captured our calls")
        code, msg = a2a._native.error()
        if code:
            errors.append(f"sticky error {code}: {msg}")
    return errors


def _worker_timeout(port: int, r: int, i: int, gpus: int) -> list[str]:
    import jax

    from jax_garden import _moe_cuda, moe

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=r,
                               process_id=i, local_device_ids=[i % gpus], initialization_timeout=120)
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
            errors = _worker_multiprocess(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), argv[5])
        elif mode == "timeout":
            errors = _worker_timeout(int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
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
