"""MoE across node groups on GPUs: the proxy context (docs/moe-ffi.md, "Host proxy for GPUs"), one
process per rank (``jax.distributed`` on 127.0.0.1). Inside a node group ranks write into each
other's receive areas (CUDA IPC; processes may share one GPU), between groups the kernels hand
messages to a host proxy thread that posts them through a TransferEngine (tcp), which moves GPU
memory by its own path: CUDA IPC on one host ("auto"), or through host bounce buffers and the
provider as a NIC would ("staged").

With fewer GPUs than ranks the processes share GPUs (process i on GPU i mod n): one GPU checks every
layout, bit for bit; with one GPU per rank the same tests run unchanged. Layouts: 2x1 and 4x1
(every rank its own node group) and 2x2 (pairs of ranks share a group), the scenarios of
tests/moe_scenarios.py against the NumPy reference and, on the same inputs, against the NVLink
context (one node group), under CUDA graphs, and a rank killed mid-step. The proxy itself (records,
counting, aborts) is tested on CPU in tests/test_moe_proxy.py.

Every worker dumps where it stands (the context's describe(): kernels entered and left, ready,
posted and arrived generations, counters, failure) when a case stalls, and stops after the first
timeout. Marker ``gpu``; skipped without CUDA GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time

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
KERNEL_TIMEOUT_S = 10.0  # the AllToAll timeout in the workers: a protocol bug costs 10 s, not 30
STALL_S = 20.0           # a case that runs this long dumps the context's state
KILL_TIMEOUT_S = 3.0

# Subsets keep the whole file within its time budget; 2x1 runs every case.
SMALL_CASES = ["random", "bound-mixed", "pad16-mixed", "invalid-ids", "fp8-computed-pad16", "overflow"]
LAYOUTS = {
    # name: (ranks, node_size, engine path, cases, extra scenarios, CUDA graphs)
    "2x1-auto": (2, 1, "auto", "all", ["same-bits", "determinism", "split-phases", "k-order"], False),
    "4x1-staged": (4, 1, "staged", SMALL_CASES[:4], ["determinism"], False),
    "2x2-auto-graphs": (4, 2, "auto", SMALL_CASES[:3] + ["duplicates"], ["graph-replays", "same-bits"], True),
}


# ---------------------------------------------------------------------------------------------
# Parent side


def _gpus(r: int) -> int:
    sc.GPU.require(1)
    return min(r, len(sc.GPU.devices()))


def _child_env(graphs: bool = False) -> dict:
    import jax_garden

    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(jax_garden.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg, HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["XLA_FLAGS"] = "--xla_gpu_shard_autotuning=false"
    if graphs:
        env["XLA_FLAGS"] += " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
    env["JAX_GARDEN_MOE_TIMEOUT_S"] = str(KERNEL_TIMEOUT_S)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(mode: str, r: int, args: dict, env: dict, expect_dead: frozenset = frozenset()) -> list[dict]:
    port = free_port()
    gpus = _gpus(r)
    argvs = [[sys.executable, os.path.abspath(__file__), "--worker", mode, str(port), str(r), str(i), str(gpus),
              json.dumps(args)] for i in range(r)]
    results = run_scripts(argvs, env, CHILD_TIMEOUT_S)
    reports, problems = [], []
    for i, (rc, out) in enumerate(results):
        m = re.findall(r"^RESULT (.*)$", out, re.M)
        if not m:
            reports.append(None)
            if i not in expect_dead:
                problems.append(f"process {i}: exit code {rc}, no report; output tail:\n{out[-8000:]}")
            continue
        rep = json.loads(m[-1])
        if rep["errors"]:
            rep["errors"].append(f"(process {i} output tail:\n{out[-6000:]})")
        reports.append(rep)
    assert not problems, "\n".join(problems)
    return reports


def _assert_clean(reports: list) -> None:
    errors = [f"process {i}: {e}" for i, rep in enumerate(reports) if rep for e in rep["errors"]]
    assert not errors, "\n".join(errors)


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_node_groups_probe():
    """The smallest layout first (2 processes, every rank its own node group, two cases): the
    quickest signal that the kernels, the proxy and the engine agree."""
    reports = _run("nodes", 2, {"node_size": 1, "path": "auto", "cases": ["random", "bound-mixed"], "extra": []},
                   _child_env())
    _assert_clean(reports)
    assert all(rep["ran"] == 2 for rep in reports), reports


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_node_groups(layout):
    """The scenarios bit for bit against the NumPy reference (and, "same-bits", the NVLink
    context on the same inputs) with node groups across processes."""
    r, node_size, path, cases, extra, graphs = LAYOUTS[layout]
    reports = _run("nodes", r, {"node_size": node_size, "path": path, "cases": cases, "extra": extra},
                   _child_env(graphs))
    _assert_clean(reports)
    n_cases = len(sc.gpu_cases(r)) if cases == "all" else len(cases)
    assert all(rep["ran"] == n_cases + len(extra) for rep in reports), reports
    assert all(rep["proxied"] for rep in reports), reports


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_rank_killed_mid_step_is_an_error_on_every_other_rank():
    """Three processes (node groups of one rank) finish a dispatch; process 2 is then killed
    (SIGKILL) before the combine. The combine on ranks 0 and 1 records an error naming rank 2
    within the timeout (their own wait, or the reason the first survivor sent), check() raises it,
    and the next call is refused at once with it."""
    reports = _run("kill", 3, {"victim": 2, "timeout": KILL_TIMEOUT_S}, _child_env(), expect_dead=frozenset({2}))
    assert reports[2] is None, "the killed process reported"
    _assert_clean(reports)
    for rep in reports[:2]:
        assert rep["combine_s"] < KILL_TIMEOUT_S + 30, rep  # liveness, not speed
        assert rep["again_s"] < 30, rep


# ---------------------------------------------------------------------------------------------
# Workers


def _progress(msg: str) -> None:
    print(f"[{os.getpid()}] {msg}", flush=True)


def _init(port: int, r: int, i: int, gpus: int):
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=r, process_id=i,
                               local_device_ids=[i % gpus], initialization_timeout=120)
    assert jax.process_count() == r and len(jax.local_devices()) == 1
    return jax


class _Watchdog:
    """Prints the last AllToAll's describe() when a step runs longer than STALL_S."""

    def __init__(self, what: str):
        self.what = what
        self.timer = threading.Timer(STALL_S, self._dump)
        self.timer.daemon = True

    def _dump(self):
        _progress(f"STALL: {self.what} runs for more than {STALL_S:.0f} s; where it stands:")
        try:
            print(sc.CURRENT[-1]._native.describe() if sc.CURRENT else "(no AllToAll yet)", flush=True)
        except Exception as e:  # noqa: BLE001 - a debugging aid
            print(f"(describe failed: {e})", flush=True)

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def _graph_replays(backend, r: int, mesh) -> list[str]:
    """Under command buffers: a new routing every step is still right, and replays of the same
    executable run the kernels (device generations advance) without the FFI handler."""
    import jax

    errors = []
    case0 = sc.GpuCase(r=r, e=8 * r, k=4, t=32, h=512, pad=16, bound="mixed")
    with backend.all_to_all(case0.config(), mesh, "ep") as a2a:
        for step in range(3):
            case = dataclasses.replace(case0, seed=100 + step)
            got, want, _ = sc.round_trip(backend, case, mesh, a2a)
            errors += [f"graph step {step}: {e}" for e in sc.compare(got, want)]
        idx, w, bm, x = case0.inputs()
        ey = np.zeros((r, a2a.max_recv_tokens, case0.h), ref.ml_dtypes.bfloat16)
        args = ({"x": sc.global_array(mesh, x.astype(ref.ml_dtypes.bfloat16))}, sc.global_array(mesh, idx),
                sc.global_array(mesh, w), sc.global_array(mesh, bm), sc.global_array(mesh, ey))
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
            errors.append(f"replays: the FFI handler ran {calls} times for {replays} replays: no CUDA graph "
                          f"captured our calls")
        code, msg = a2a._native.error()
        if code:
            errors.append(f"sticky error {code}: {msg}")
    return errors


def _worker_nodes(port: int, r: int, i: int, gpus: int, args: dict) -> dict:
    _init(port, r, i, gpus)
    backend = sc.gpu_nodes(int(args["node_size"]), args["path"])
    mesh = sc.GPU.mesh(r)
    cases = sc.gpu_cases(r)
    names = list(cases) if args["cases"] == "all" else list(args["cases"])
    extra = {
        "same-bits": lambda: sum((sc.run_same_bits_as_reference(backend, n, cases[n], mesh, reference=sc.GPU)
                                  for n in ("random", "fp8-computed-pad16")), []),
        "determinism": lambda: sc.run_determinism(backend, sc.determinism_case(sc.GPU, r), mesh),
        "split-phases": lambda: sc.run_split_phases_with_layers(backend, r, 256, [6, 3, 0, 5][:r] + [6] * max(0, r - 4)),
        "k-order": lambda: sc.run_combine_in_k_order(backend, r),
        "graph-replays": lambda: _graph_replays(backend, r, mesh),
    }
    steps = [(n, lambda n=n: sc.run_case(backend, n, cases[n], mesh)) for n in names]
    steps += [(e, extra[e]) for e in args["extra"]]
    errors, ran, proxied = [], 0, True
    t0 = time.monotonic()
    for what, run in steps:
        _progress(f"{backend.name}: {what} ({time.monotonic() - t0:.1f}s)")
        try:
            with _Watchdog(what):
                step_errors = run()
            ran += 1
            proxied = proxied and bool(sc.CURRENT) and sc.CURRENT[-1]._native.proxied
        except Exception as e:  # report and go on (the other cases still say something) ...
            step_errors = [f"{what}: {type(e).__name__}: {e}"]
        errors += step_errors
        if any("timed out" in e for e in step_errors):  # ... unless a wait timed out: so would the rest
            if sc.CURRENT:
                print(sc.CURRENT[-1]._native.describe(), flush=True)
            errors.append("stopping after the first timeout")
            break
    _progress(f"done ({time.monotonic() - t0:.1f}s)")
    return {"errors": errors, "ran": ran, "proxied": proxied}


def _worker_kill(port: int, r: int, i: int, gpus: int, args: dict) -> dict:
    jax = _init(port, r, i, gpus)
    from jax_garden import _compat, moe

    victim, timeout = int(args["victim"]), float(args["timeout"])
    names_victim = re.compile(rf"\brank {victim}\b|ranks \[(\d+, )*{victim}(, \d+)*\]")
    mesh = sc.GPU.mesh(r)
    case = sc.GpuCase(r=r, e=4 * r, k=2, t=8, h=64)
    idx, w, bm, x = case.inputs()
    g = lambda a: sc.global_array(mesh, a)  # noqa: E731
    errors = []
    a2a = moe.AllToAll(case.config(), mesh, "ep", timeout=timeout, node_size=1,
                       internode=moe.InternodeConfig(provider="tcp"))
    disp = sc.spmd(mesh, lambda x, i, w: a2a.dispatch(x, i, w))
    comb = sc.spmd(mesh, lambda ey, c, i, w: a2a.combine(ey, i, w, expert_counts=c))
    ex, _, cnt = disp(g(x.astype(ref.ml_dtypes.bfloat16)), g(idx), g(w))
    jax.block_until_ready((ex, cnt))
    a2a.check()
    client = _compat.distributed_client()
    client.wait_at_barrier("moe_gpu_kill_test_dispatched", 60_000)  # every dispatch completed
    if i == victim:
        _progress("dying mid-step")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # let it die
    t0 = time.monotonic()
    try:
        # The kernels record the failure and return (zeros from the waits that gave up); the next
        # call or check() raises it (docs/moe-ffi.md, "Errors").
        jax.block_until_ready(comb(ex, cnt, g(idx), g(w)))
    except jax.errors.JaxRuntimeError as e:
        _progress(f"combine failed: {str(e)[:300]}")
    combine_s = time.monotonic() - t0
    try:
        a2a.check()
        errors.append(f"check() raised nothing although rank {victim} died")
    except moe.MoeDeviceError as e:
        _progress(f"check(): {e}")
        if not names_victim.search(str(e)):
            errors.append(f"check() does not name rank {victim}: {e}")
    t0 = time.monotonic()
    try:
        jax.block_until_ready(disp(g(x.astype(ref.ml_dtypes.bfloat16)), g(idx), g(w)))
        errors.append("a call after the failure succeeded")
    except jax.errors.JaxRuntimeError as e:
        if not names_victim.search(str(e)):
            errors.append(f"the next call did not repeat the recorded reason: {e}")
    again_s = time.monotonic() - t0
    a2a.close()  # failed: no close barrier with the dead process
    _compat.settle_effects()
    survivors = [p for p in range(r) if p != victim]
    return {"errors": errors, "combine_s": combine_s, "again_s": again_s, "exit": True,
            "exit_after": [p for p in survivors if p != i] if i == 0 else []}


def _worker_main(argv: list[str]) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(max(10.0, CHILD_TIMEOUT_S - 20), exit=False)  # a hang shows where
    mode, port, r, i, gpus, args = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), json.loads(argv[5])
    _progress(f"worker {mode} {i}/{r} on {gpus} GPU(s): {args}")
    workers = {"nodes": _worker_nodes, "kill": _worker_kill}
    try:
        report = workers[mode](port, r, i, gpus, args)
    except BaseException as e:  # noqa: BLE001 - report everything
        import traceback

        traceback.print_exc()
        report = {"errors": [f"worker failed: {type(e).__name__}: {e}"]}
    print("RESULT " + json.dumps(report), flush=True)
    if report.get("exit"):
        # A peer is dead: jax.distributed's shutdown barrier at exit would wait for it. Leave
        # without it, the coordinator after the others.
        try:
            from jax_garden import _compat

            client = _compat.distributed_client()
            client.key_value_set(f"moe_gpu_test_exit/{i}", "1")
            for j in report.get("exit_after", []):
                client.blocking_key_value_get(f"moe_gpu_test_exit/{j}", 30_000)
        finally:
            os._exit(0)


def _debug_main(argv: list[str]) -> int:
    """``python tests/test_moe_gpu_nodes.py --debug R NODE_SIZE PATH CASE[,CASE...]``: runs those
    scenarios with R worker processes (sharing the GPUs) and prints every worker's whole output,
    including, when a step stalls, where each context stands (kernels entered/left per
    generation, ready/posted/arrived generations per peer, counters, writes in flight)."""
    r, node_size, path, cases = int(argv[0]), int(argv[1]), argv[2], argv[3].split(",")
    from jax_garden._jax_garden import fabric as native_fabric

    gpus = max(1, min(r, int(native_fabric.gpu_device_count())))
    port = free_port()
    args = {"node_size": node_size, "path": path, "cases": cases, "extra": []}
    argvs = [[sys.executable, os.path.abspath(__file__), "--worker", "nodes", str(port), str(r), str(i), str(gpus),
              json.dumps(args)] for i in range(r)]
    failed = False
    for i, (rc, out) in enumerate(run_scripts(argvs, _child_env(), CHILD_TIMEOUT_S)):
        print(f"===== process {i}: exit code {rc} =====\n{out}", flush=True)
        m = re.findall(r"^RESULT (.*)$", out, re.M)
        failed |= rc != 0 or not m or bool(json.loads(m[-1])["errors"])
    return 1 if failed else 0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2:])
    sys.exit(0)
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--debug":
    sys.exit(_debug_main(sys.argv[2:]))
