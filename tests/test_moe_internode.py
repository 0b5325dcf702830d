"""MoE across processes on CPU: the ranks of an AllToAll live in 2-4 processes (one or two CPU
devices each, ``jax.distributed`` on 127.0.0.1), node groups of ``node_size`` ranks meet in a
process's memory, rows between groups travel through the TransferEngine over tcp.

* The shared scenarios (tests/moe_scenarios.py: bf16, fp8 given and computed, padding, capacity
  drops, bound_m, duplicates, invalid ids, wide rows, split phases in a scanned program, separate
  programs, k-order, determinism) run in every process, bit for bit against the NumPy reference,
  for node splits 2x1, 2x2, 4x1 (nodes x ranks per node: 2 processes x 1 device, 2 processes x 2
  devices with node_size 2 and 1, 4 processes x 1 device). The 1xR splits (one node) and the same
  bits as the in-process CPU reference are in tests/test_moe.py (cpu-nodes backends).
* A rank killed mid-step (between dispatch and combine) becomes an error on every other rank
  within the timeout; the AllToAll then refuses further use with the recorded reason.
* A rank whose call fails (wrong routing) tells the other processes, which fail with its reason.
* The explicit bootstrap (``InternodeConfig(bootstrap=...)``) and the rule that a node group lives
  in one process.

Workers are this file run as a script (``--worker``); the parent kills and reaps every child, pass
or fail. In-process checks of the protocol pieces are at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import moe_reference as ref  # noqa: E402
import moe_scenarios as sc  # noqa: E402
from fabric_group import free_port, run_scripts  # noqa: E402

CHILD_TIMEOUT_S = 240.0
KILL_TIMEOUT_S = 3.0  # the AllToAll timeout of the kill test (liveness: asserts allow far more)

R2_CASES = ["random-R2", "pad16-R2", "K8-R2", "duplicate-experts-R2", "fp8-given-R2",
            "H7168-fp8-R2", "overflow-R2"]
R4_CASES = ["random-R4", "skewed-R4", "bound-zero-R4", "bound-mixed-R4", "pad16-R4-mixed", "K1-R4",
            "invalid-ids-R4", "fp8-computed-R4-pad16"]


# ---------------------------------------------------------------------------------------------
# Parent side


def _child_env(devices: int) -> dict:
    import jax_garden

    env = dict(os.environ)
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(jax_garden.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg, HERE] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_processes(mode: str, procs: int, devices: int, args: dict, timeout: float = CHILD_TIMEOUT_S,
                  expect_dead: set[int] = frozenset()) -> list[dict]:
    """Runs ``procs`` workers (``devices`` CPU devices each) in ``mode``; returns their reports
    ({"errors": [...], ...}) by process index. Every child is killed and reaped whatever happens.
    A process in ``expect_dead`` may end without a report."""
    port = free_port()
    argvs = [[sys.executable, os.path.abspath(__file__), "--worker", mode, str(port), str(procs), str(i),
              json.dumps(args)] for i in range(procs)]
    results = run_scripts(argvs, _child_env(devices), timeout)
    reports, problems = [], []
    for i, (rc, out) in enumerate(results):
        m = re.findall(r"^RESULT (.*)$", out, re.M)
        if not m:
            reports.append(None)
            if i not in expect_dead:
                problems.append(f"process {i}: exit code {rc}, no report; output tail:\n{out[-5000:]}")
            continue
        reports.append(json.loads(m[-1]))
    assert not problems, "\n".join(problems)
    return reports


def _assert_clean(reports: list[dict]) -> None:
    errors = [f"process {i}: {e}" for i, rep in enumerate(reports) if rep for e in rep["errors"]]
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------------------------------------
# Tests (each spawns its processes)


@pytest.mark.adversarial
@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_two_nodes_of_one_rank():
    """2x1: two processes, one CPU device each: every row between the ranks goes through tcp.
    Also the explicit bootstrap, and a node group that would span processes is refused."""
    reports = run_processes("scenarios", 2, 1, {"node_sizes": [None], "cases": R2_CASES,
                                                "extra": ["separate", "bootstrap", "split-group"]})
    _assert_clean(reports)
    assert all(rep["ran"] == len(R2_CASES) + 3 for rep in reports), reports


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_two_nodes_of_two_ranks_and_four_nodes_in_two_processes():
    """2x2 (node_size 2: the pair of each process meets in memory, pairs talk over tcp) and 4x1
    in the same two processes (node_size 1: the ranks of one process talk over tcp too)."""
    reports = run_processes("scenarios", 2, 2, {"node_sizes": [None, 1], "cases": R4_CASES,
                                                "extra": ["split-phases", "k-order", "determinism"]})
    _assert_clean(reports)
    assert all(rep["ran"] == 2 * (len(R4_CASES) + 3) for rep in reports), reports
    assert all(rep["node_sizes"] == [2, 1] for rep in reports), reports


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_four_nodes_of_one_rank():
    """4x1: four processes, one device each."""
    reports = run_processes("scenarios", 4, 1, {"node_sizes": [None], "cases": R4_CASES[:5],
                                                "extra": ["split-phases"]})
    _assert_clean(reports)
    assert all(rep["ran"] == 5 + 1 for rep in reports), reports


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_rank_killed_mid_step_is_an_error_on_every_other_rank():
    """Three processes finish a dispatch together; process 2 is then killed (SIGKILL) before the
    combine. The combine fails on ranks 0 and 1 within the timeout, naming rank 2 (directly, or
    through the reason the first rank to notice sent), check() reports it, and a further call is
    refused at once with the recorded reason."""
    reports = run_processes("kill", 3, 1, {"victim": 2, "timeout": KILL_TIMEOUT_S}, expect_dead={2})
    assert reports[2] is None, "the killed process reported"
    _assert_clean(reports)
    for rep in reports[:2]:
        # Liveness, not speed: the bound is the timeout plus generous slack for a loaded machine.
        assert rep["combine_s"] < KILL_TIMEOUT_S + 30, rep
        assert rep["again_s"] < 30, rep


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_failing_rank_tells_the_other_processes():
    """Rank 1's combine gets other indices than its dispatch: its program fails with the routing
    error; rank 0 (another process, whose program may have succeeded) fails its next call with
    rank 1's reason, and both check()s report it."""
    reports = run_processes("propagate", 2, 1, {})
    _assert_clean(reports)


# ---------------------------------------------------------------------------------------------
# In-process checks of the protocol pieces


def test_imm_values_carry_kind_generation_and_ranks():
    from jax_garden import _jax_garden as native

    m = native.moe
    seen = set()
    for kind in range(5):
        for gen in (1, 2, 8, 9, 1 << 33):
            for src, dst in ((0, 1), (5, 3), (m.internode_max_ranks - 1, 0)):
                imm = m.internode_imm(kind, gen, src, dst)
                assert 0 <= imm < 1 << 32
                assert m.internode_parse_imm(imm) == (kind, gen % 8, src, dst)
                seen.add((imm, kind, gen % 8, src, dst))
    assert len({s[0] for s in seen}) == len(seen)  # distinct fields, distinct imms
    # Generations 8 apart share a value: the free acks keep peers within one generation.
    assert m.internode_imm(1, 3, 2, 1) == m.internode_imm(1, 11, 2, 1)
    assert m.internode_parse_imm(12345) is None  # not one of ours
    with pytest.raises(ValueError, match=r"kind must be in \[0, 5\)"):
        m.internode_imm(5, 1, 0, 1)
    with pytest.raises(ValueError, match=r"ranks must be in \[0, 2048\)"):
        m.internode_imm(0, 1, m.internode_max_ranks, 0)


@pytest.mark.adversarial
@pytest.mark.parametrize("name", ["H7168-fp8-R2", "overflow-R2", "fp8-computed-R4-pad16"])
def test_engines_with_two_domains(name):
    """Senders with 2 domains cut every message into 2 pieces (2 imms); receivers count what
    fabric.imm_writes says for the sender's domains (in one process, every rank its own node).
    Ten round trips on one AllToAll wrap the 3 generation bits of the imms: a miscount would
    leave credits that a later generation takes (a stale or torn message, an error) or wait for
    imms that never come (a timeout)."""
    case = sc.CPU_CASES[name]
    backend = sc.Backend("cpu-nodes1-d2", "cpu", errors_fail_program=True, ragged_exact=True,
                         internode=True, node_size=1, domains=2)
    backend.require(case.r)
    mesh = backend.mesh(case.r)
    sc.assert_no_errors(sc.run_case(backend, name, case, mesh))
    sc.assert_no_errors(sc.run_determinism(backend, case, mesh, runs=10))


def test_detect_node_size():
    from jax_garden import _moe_internode

    assert _moe_internode.detect_node_size([0, 0, 1, 1]) == 2
    assert _moe_internode.detect_node_size([0, 1, 2, 3]) == 1
    assert _moe_internode.detect_node_size([0, 0, 0, 0]) == 4
    assert _moe_internode.detect_node_size([0, 0, 0, 1]) == 1  # unequal blocks
    assert _moe_internode.detect_node_size([0, 1, 0, 1]) == 1  # a process in two places


def test_node_topology_arguments_are_checked():
    from jax_garden import moe

    sc.CPU.require(4)
    mesh = sc.CPU.mesh(4)
    cfg = ref.Case(r=4, e=8, k=2).config()
    with pytest.raises(ValueError, match=r"node_size=3 does not divide the number of ranks R=4"):
        moe.AllToAll(cfg, mesh, "ep", node_size=3)
    with pytest.raises(ValueError, match=r"node_size=8 exceeds the number of ranks R=4"):
        moe.AllToAll(cfg, mesh, "ep", node_size=8)
    with pytest.raises(TypeError, match=r"node_size must be an integer"):
        moe.AllToAll(cfg, mesh, "ep", node_size="2")
    with pytest.raises(TypeError, match=r"internode must be InternodeConfig"):
        moe.AllToAll(cfg, mesh, "ep", node_size=2, internode={"provider": "tcp"})
    with pytest.raises(ValueError, match=r"InternodeConfig.completion must be one of"):
        moe.InternodeConfig(completion="soon")
    with pytest.raises(ValueError, match=r"InternodeConfig.domains must be <= 8"):
        moe.InternodeConfig(domains=9)
    with pytest.raises(TypeError, match=r"InternodeConfig.bootstrap must be callable"):
        moe.InternodeConfig(bootstrap="kv")
    with moe.AllToAll(cfg, mesh, "ep", node_size=2, internode=moe.InternodeConfig(provider="tcp")) as a2a:
        assert (a2a.node_size, a2a.num_nodes, a2a.platform) == (2, 2, "cpu")
        assert "nodes=2x2" in repr(a2a)
    with moe.AllToAll(cfg, mesh, "ep") as a2a:  # no topology asked for: the CPU reference
        assert (a2a.node_size, a2a.num_nodes) == (4, 1)
        assert type(a2a._native).__name__ == "_CpuContext"


def test_peer_info_is_checked_before_use():
    """connect() parses what the bootstrap delivered field by field: garbage, another shape, a
    rank of this process are errors naming the problem."""
    from jax_garden import _jax_garden as native

    cfg = ref.Case(r=4, e=8, k=2).config()
    shape = cfg._native_shape(4)
    make = lambda ranks, shp=shape: native.moe.InternodeAllToAll(  # noqa: E731
        shp, "bfloat16", "bfloat16", 5.0, 2, ranks, "tcp", "127.0.0.1", 1, "delivery", 1 << 20)
    a, b = make([0, 1]), make([2, 3])
    try:
        assert a.remote_ranks() == [2, 3] and a.needs_engine
        with pytest.raises(ValueError, match=r"peer info is truncated|wrong magic"):
            a.connect(b"garbage!")
        info = bytearray(b.peer_info(2))
        info[20] ^= 0xFF
        with pytest.raises(ValueError, match=r"corrupt: checksum"):
            a.connect(bytes(info))
        with pytest.raises(ValueError, match=r"rank 0 is held by this process"):
            a.connect(make([0, 1]).peer_info(0))
        other = make([2, 3], ref.Case(r=4, e=8, k=2, h=64).config()._native_shape(4))
        with pytest.raises(ValueError, match=r"rank 2 was created with shape \(.*H=64.*\) but this process "
                                             r"uses \(.*H=32.*\)"):
            a.connect(other.peer_info(2))
        other.close()
        with pytest.raises(ValueError, match=r"no peer info for ranks \[2, 3\]"):
            a.finalize()
        with pytest.raises(ValueError, match=r"node group 1 \(ranks 2\.\.3\) is split between processes"):
            make([0, 1, 2])
        # Two contexts in this process, reaching each other as if they were two processes.
        a.connect(b.peer_info(2))
        a.connect(b.peer_info(3))
        b.connect(a.peer_info(0))
        b.connect(a.peer_info(1))
        a.finalize()
        b.finalize()
        assert a.id and b.id and a.id != b.id
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------
# Worker side


def _progress(msg: str) -> None:
    print(f"[{os.getpid()}] {msg}", flush=True)


def _init(port: int, procs: int, i: int):
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=procs, process_id=i,
                               initialization_timeout=120)
    return jax


def _worker_scenarios(port: int, procs: int, i: int, args: dict) -> dict:
    jax = _init(port, procs, i)
    r = len(jax.devices())
    mesh = sc.CPU.mesh(r)
    errors, ran, node_sizes = [], 0, []
    t0 = time.monotonic()
    for ns in args["node_sizes"]:
        # None: the default, one node group per process. A rank fails its own program; peers
        # learn it when they next wait, not in the same program (errors_fail_program=False; the
        # scenarios that expect a program to fail run in one process, in test_moe.py).
        backend = sc.Backend(f"cpu-procs-nodes{ns}", "cpu", errors_fail_program=False, ragged_exact=True,
                             internode=True, node_size=ns)
        with backend.all_to_all(ref.Case(r=r, e=2 * r, k=2).config(), mesh, "ep") as probe:
            node_sizes.append(probe.node_size)
            if probe.num_nodes < 2:
                errors.append(f"node_size {ns}: {probe!r} has a single node group")
        for name in args["cases"]:
            _progress(f"node_size {ns}: case {name} ({time.monotonic() - t0:.1f}s)")
            try:
                errors += sc.run_case(backend, name, sc.CPU_CASES[name], mesh)
                ran += 1
            except Exception as e:  # report and go on: the other cases still say something
                errors.append(f"{name}: {type(e).__name__}: {e}")
        extras = {
            "split-phases": lambda: sc.run_split_phases_with_layers(backend, r, 16, [6, 3, 0, 5][:r]),
            "k-order": lambda: sc.run_combine_in_k_order(backend, r),
            "determinism": lambda: sc.run_determinism(backend, sc.determinism_case(backend, r), mesh),
            "separate": lambda: sc.run_separate_programs(backend),
            "bootstrap": lambda: _explicit_bootstrap(mesh, r),
            "split-group": lambda: _split_group_refused(mesh, r),
        }
        for what in args.get("extra", []):
            _progress(f"node_size {ns}: {what} ({time.monotonic() - t0:.1f}s)")
            try:
                errors += [f"{what}: {e}" for e in extras[what]()]
                ran += 1
            except Exception as e:
                errors.append(f"{what}: {type(e).__name__}: {e}")
    _progress(f"done ({time.monotonic() - t0:.1f}s)")
    return {"errors": errors, "ran": ran, "node_sizes": node_sizes}


def _explicit_bootstrap(mesh, r: int) -> list[str]:
    """InternodeConfig(bootstrap=...): the caller's all-gather (here over the coordination
    service's key-value store, under our own keys) replaces the built-in exchange."""
    import jax

    from jax_garden import _compat, moe

    client = _compat.distributed_client()
    calls = []

    def gather(mine: dict) -> dict:
        calls.append(sorted(mine))
        for rank, info in mine.items():
            client.key_value_set(f"test_bootstrap/{rank}", info.hex())
        return {rank: bytes.fromhex(client.blocking_key_value_get(f"test_bootstrap/{rank}", 60_000))
                for rank in range(r)}

    case = ref.Case(r=r, e=2 * r, k=2, h=16)
    cfg = moe.InternodeConfig(provider="tcp", bootstrap=gather)
    backend = sc.Backend("cpu-bootstrap", "cpu", errors_fail_program=False, ragged_exact=True, internode=True)
    errors = []
    with moe.AllToAll(case.config(), mesh, "ep", node_size=1, internode=cfg) as a2a:
        got, want, _ = sc.round_trip(backend, case, mesh, a2a)
        errors += sc.compare(got, want)
    mine = [d.id for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if len(calls) != 1 or len(calls[0]) != len(mine):
        errors.append(f"bootstrap was called with {calls}, expected once with this process's ranks")
    return errors


def _split_group_refused(mesh, r: int) -> list[str]:
    from jax_garden import moe

    try:
        moe.AllToAll(ref.Case(r=r, e=2 * r, k=2).config(), mesh, "ep", node_size=r,
                     internode=moe.InternodeConfig(provider="tcp"))
    except ValueError as e:
        if re.search(r"node group 0 \(ranks 0\.\.\d+\) is split between processes", str(e)):
            return []
        return [f"unexpected message: {e}"]
    return ["a node group spanning processes was accepted"]


def _worker_kill(port: int, procs: int, i: int, args: dict) -> dict:
    jax = _init(port, procs, i)

    from jax_garden import _compat, moe

    victim, timeout = int(args["victim"]), float(args["timeout"])
    # "ranks [2]" (a wait that timed out), "rank 2" (a write that failed), possibly inside the
    # reason another survivor sent.
    names_victim = re.compile(rf"ranks \[(\d+, )*{victim}(, \d+)*\]|rank {victim}\b")
    r = len(jax.devices())
    mesh = sc.CPU.mesh(r)
    case = ref.Case(r=r, e=2 * r, k=2, h=16)
    idx, w, bm, x = case.inputs()
    g = lambda a: sc.global_array(mesh, a)  # noqa: E731
    errors = []
    a2a = moe.AllToAll(case.config(), mesh, "ep", timeout=timeout, internode=moe.InternodeConfig(provider="tcp"))
    disp = sc.spmd(mesh, lambda x, i, w: a2a.dispatch(x, i, w))
    comb = sc.spmd(mesh, lambda ey, c, i, w: a2a.combine(ey, i, w, expert_counts=c))
    ex, _, cnt = disp(g(x.astype(ref.ml_dtypes.bfloat16)), g(idx), g(w))
    jax.block_until_ready((ex, cnt))
    client = _compat.distributed_client()
    client.wait_at_barrier("moe_kill_test_dispatched", 60_000)  # every dispatch completed
    if i == victim:
        _progress("dying mid-step")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # let it die
    t0 = time.monotonic()
    try:
        jax.block_until_ready(comb(ex, cnt, g(idx), g(w)))
        errors.append("the combine succeeded although rank 2 died")
    except jax.errors.JaxRuntimeError as e:
        if not names_victim.search(str(e)):
            errors.append(f"the error does not name rank {victim}: {e}")
        _progress(f"combine failed as expected: {str(e)[:300]}")
    combine_s = time.monotonic() - t0
    try:
        a2a.check()
        errors.append("check() raised nothing")
    except moe.MoeDeviceError as e:
        if not names_victim.search(str(e)):
            errors.append(f"check() does not name rank {victim}: {e}")
    t0 = time.monotonic()
    try:
        jax.block_until_ready(disp(g(x.astype(ref.ml_dtypes.bfloat16)), g(idx), g(w)))
        errors.append("a call after the failure succeeded")
    except jax.errors.JaxRuntimeError as e:
        if "unusable after an earlier error" not in str(e) or not names_victim.search(str(e)):
            errors.append(f"the next call did not repeat the recorded reason: {e}")
    again_s = time.monotonic() - t0
    a2a.close()  # failed: no close barrier with the dead process
    _compat.settle_effects()
    # The coordinator (process 0) leaves last: the others' jax.distributed clients abort their
    # process when the coordination service goes away.
    survivors = [p for p in range(procs) if p != victim]
    return {"errors": errors, "combine_s": combine_s, "again_s": again_s, "exit": True,
            "exit_after": [p for p in survivors if p != i] if i == 0 else []}


def _worker_propagate(port: int, procs: int, i: int, args: dict) -> dict:
    jax = _init(port, procs, i)
    from jax_garden import _compat, moe

    r = len(jax.devices())
    mesh = sc.CPU.mesh(r)
    case = ref.Case(r=r, e=2 * r, k=2, h=16)
    idx, w, bm, x = case.inputs()
    other = idx.copy()
    other[1, 3, 1] = (other[1, 3, 1] + 1) % case.e
    g = lambda a: sc.global_array(mesh, a)  # noqa: E731
    xb = x.astype(ref.ml_dtypes.bfloat16)
    pattern = (rf"combine_recv \(rank 1\): indices\[3, 1\] = {other[1, 3, 1]} but the matching dispatch "
               rf"routed it to expert {idx[1, 3, 1]}")
    errors = []
    a2a = moe.AllToAll(case.config(), mesh, "ep", timeout=60, internode=moe.InternodeConfig(provider="tcp"))

    def body(x, i, i2, w):
        ex, _, c = a2a.dispatch(x, i, w)
        return a2a.combine(ex, i2, w, expert_counts=c)

    f = sc.spmd(mesh, body)
    try:
        jax.block_until_ready(f(g(xb), g(idx), g(other), g(w)))
        if i == 1:
            errors.append("rank 1's program succeeded with other indices")
    except jax.errors.JaxRuntimeError as e:
        if i == 1 and not re.search(pattern, str(e)):
            errors.append(f"rank 1 failed with an unexpected error: {e}")
    # The next call: rank 1 refuses at once; rank 0 waits for rank 1, which never sends, and fails
    # with the reason rank 1 sent (long before the 60 s timeout).
    t0 = time.monotonic()
    try:
        jax.block_until_ready(f(g(xb), g(idx), g(idx), g(w)))
        errors.append("the next call succeeded after rank 1 failed")
    except jax.errors.JaxRuntimeError as e:
        if not re.search(pattern, str(e)) or "unusable after an earlier error" not in str(e):
            errors.append(f"the next call failed without rank 1's reason: {e}")
        if i == 0 and "rank 1 failed:" not in str(e):
            errors.append(f"rank 0's error does not say that rank 1 failed: {e}")
    elapsed = time.monotonic() - t0
    if elapsed > 50:
        errors.append(f"the next call took {elapsed:.1f} s: the reason did not arrive, the timeout fired")
    try:
        a2a.check()
        errors.append("check() raised nothing")
    except moe.MoeTimeoutError as e:
        errors.append(f"check() reports a timeout: {e}")
    except moe.MoeDeviceError as e:
        if not re.search(pattern, str(e)):
            errors.append(f"check() does not report rank 1's reason: {e}")
    a2a.close()
    _compat.settle_effects()
    return {"errors": errors}


def _worker_main(argv: list[str]) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(CHILD_TIMEOUT_S - 20, exit=False)  # a hang shows where
    mode, port, procs, i, args = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), json.loads(argv[4])
    _progress(f"worker {mode} {i}/{procs}")
    workers = {"scenarios": _worker_scenarios, "kill": _worker_kill, "propagate": _worker_propagate}
    try:
        report = workers[mode](port, procs, i, args)
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
            client.key_value_set(f"moe_test_exit/{i}", "1")
            for j in report.get("exit_after", []):
                client.blocking_key_value_get(f"moe_test_exit/{j}", 30_000)
        finally:
            os._exit(0)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2:])
    sys.exit(0)
