"""Scenario bodies of the MoE suites, written once and run on every backend.

A backend is where the ranks of an AllToAll live: ``CPU`` (the reference context, R ranks as R
CPU devices of this process), ``CPU`` with a node topology (:func:`cpu_nodes`: the inter-node host
context, node groups of ``node_size`` ranks, rows between groups through the TransferEngine over
tcp; in this process or, in tests/test_moe_internode.py's workers, across processes), ``GPU``
(the CUDA NVLink kernels, R GPUs; in this process or, in tests/test_moe_gpu.py's workers, one
process per rank, several of them sharing a GPU when there are fewer GPUs than ranks) or GPU node
groups (:func:`gpu_nodes`: the proxy context, NVLink inside a group and the host proxy with a
TransferEngine between groups; in tests/test_moe_gpu.py's workers). tests/test_moe.py parametrizes every scenario by backend; the workers call the
same functions. Scenarios build their AllToAll through :meth:`Backend.all_to_all`. Scenario functions return a list
of mismatches (empty when everything matches) so that worker processes can report them; tests
assert that the list is empty. GPU-only modules are imported inside functions, so importing this
file needs no GPU.
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from typing import Callable

import numpy as np
import pytest

import moe_reference as ref

BF16 = ref.ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------
# Backends


@dataclasses.dataclass(frozen=True)
class Backend:
    """What differs between backends; everything else is the scenario's.

    name: "cpu", "cpu-nodes<N>" (node groups of N ranks, ``node_size``) or "gpu".
    platform: the jax platform whose devices form the mesh.
    errors_fail_program: True when a runtime error (wrong routing, counts) fails the program
      that hit it (CPU reference); False when the kernels record it and the program returns
      (CUDA: AllToAll.check() raises it, docs/moe-ffi.md "Errors").
    ragged_exact: True when RaggedAllToAll's combine is bitwise the reference's (the CPU
      all_gather emulation); on GPUs XLA may fuse multiply-add (last-bit differences).
    internode: True for node groups: the inter-node host context on CPU, the proxy context on
      GPUs (the engine on tcp, 127.0.0.1).
    node_size: its node_size (None: the default, one node group per process).
    domains: the engine's domains (tcp: loopback endpoints); a message is cut into one piece per
      domain.
    path: the engine's transport for the messages (InternodeConfig.path).
    """

    name: str
    platform: str
    errors_fail_program: bool
    ragged_exact: bool
    internode: bool = False
    node_size: int | None = None
    domains: int = 1
    path: str = "auto"

    def all_to_all(self, cfg, mesh, axis_name: str = "ep", **kwargs):
        """The AllToAll of this backend."""
        from jax_garden import moe

        if not self.internode:
            a2a = moe.AllToAll(cfg, mesh, axis_name, **kwargs)
        else:
            node_size = None if self.node_size is None else min(self.node_size, int(mesh.shape[axis_name]))
            kwargs.setdefault("node_size", node_size)
            kwargs.setdefault("internode", moe.InternodeConfig(provider="tcp", domains=self.domains,
                                                               path=self.path))
            a2a = moe.AllToAll(cfg, mesh, axis_name, **kwargs)
            # Never a silent fallback to the in-process reference or to one node group.
            if self.platform == "cpu":
                assert type(a2a._native).__name__ == "InternodeContext", a2a
            elif a2a.num_ranks > kwargs["node_size"]:
                assert a2a._native.proxied, a2a
            assert node_size is None or a2a.node_size == node_size, a2a
        CURRENT.append(a2a)  # what a stalled worker describes (tests/test_moe_gpu.py)
        del CURRENT[:-1]
        return a2a

    def require(self, r: int) -> None:
        """Skips the calling test unless this backend has ``r`` devices."""
        if self.platform == "gpu":
            from jax_garden import _moe_cuda

            if not _moe_cuda.available():
                pytest.skip("jax_garden built without the CUDA MoE kernels")
        have = len(self.devices())
        if have < r:
            pytest.skip(f"needs {r} {self.platform.upper()} devices, found {have}"
                        + (" (XLA_FLAGS is set in tests/conftest.py)" if self.platform == "cpu" else ""))

    def devices(self) -> list:
        import jax

        try:
            return list(jax.devices(self.platform))
        except RuntimeError:
            return []

    def mesh(self, r: int):
        from jax.sharding import Mesh

        return Mesh(np.array(self.devices()[:r]), ("ep",))

    def ragged_impl(self) -> Callable | None:
        """The ragged_all_to_all RaggedAllToAll uses here (XLA:CPU has none: the emulation)."""
        if self.platform == "cpu":
            from jax_garden import moe

            return moe.gather_ragged_all_to_all
        return None

    def quantize_fp8(self, x: np.ndarray, scale_block: int):
        """The fp8 data dispatch must deliver when it quantises ``x`` itself. On CPU the NumPy
        reference (so XLA:CPU must agree with it bit for bit); on GPU what the device computes."""
        if self.platform == "cpu":
            return ref.quantize_fp8(x, scale_block)
        import jax

        from jax_garden import moe

        q, s = jax.jit(lambda v: moe.quantize_fp8(v, scale_block))(x.reshape(-1, x.shape[-1]))
        return np.asarray(q).reshape(x.shape), np.asarray(s).reshape(x.shape[:-1] + (-1,))


CPU = Backend("cpu", "cpu", errors_fail_program=True, ragged_exact=True)
GPU = Backend("gpu", "gpu", errors_fail_program=False, ragged_exact=False)
CURRENT: list = []  # the AllToAll a scenario built last


def gpu_nodes(node_size: int, path: str = "auto") -> Backend:
    """GPU ranks in node groups of ``node_size`` (the proxy context): rows inside a group over
    NVLink (or CUDA IPC between processes sharing a GPU), between groups through the host proxy
    and a tcp TransferEngine whose ``path`` moves GPU memory (auto: CUDA IPC on one host; staged:
    through host bounce buffers and the provider, as a NIC would)."""
    return Backend(f"gpu-nodes{node_size}-{path}", "gpu", errors_fail_program=False, ragged_exact=False,
                   internode=True, node_size=node_size, path=path)


def cpu_nodes(node_size: int) -> Backend:
    """CPU ranks in node groups of ``node_size`` (capped at R): the inter-node host context. In
    one process a failing rank still fails the program (the program holds every rank)."""
    return Backend(f"cpu-nodes{node_size}", "cpu", errors_fail_program=True, ragged_exact=True,
                   internode=True, node_size=node_size)


CPU_NODES1 = cpu_nodes(1)  # every rank its own node: all rows through the engine
CPU_NODES2 = cpu_nodes(2)  # pairs: rows inside a pair in memory, between pairs through the engine
CPU_NODES8 = cpu_nodes(8)  # one node of all R ranks (R <= 8): the inter-node context, no engine
BACKENDS = {"cpu": CPU, "gpu": GPU, "cpu-nodes1": CPU_NODES1, "cpu-nodes2": CPU_NODES2,
            "cpu-nodes8": CPU_NODES8}


# ---------------------------------------------------------------------------------------------
# Cases


@dataclasses.dataclass
class GpuCase(ref.Case):
    """The shared case with GPU-friendly default sizes."""
    e: int = 32
    k: int = 4
    t: int = 32
    h: int = 256


Case = ref.Case

CPU_CASES = {
    "random-R1": Case(r=1, e=4, k=2),
    "random-R2": Case(r=2, e=8, k=2),
    "random-R4": Case(r=4, e=8, k=3),
    "random-R8": Case(r=8, e=16, k=2, t=6),
    "skewed-R4": Case(r=4, e=8, k=3, routing="skewed"),
    "bound-zero-R4": Case(r=4, e=8, k=2, bound="zero"),
    "bound-mixed-R4": Case(r=4, e=8, k=2, bound="mixed"),
    "bound-mixed-R8": Case(r=8, e=32, k=4, t=5, bound="mixed"),
    "pad16-R2": Case(r=2, e=8, k=2, pad=16),
    "pad16-R4-mixed": Case(r=4, e=16, k=3, pad=16, bound="mixed"),
    "K1-R4": Case(r=4, e=8, k=1),
    "K8-R2": Case(r=2, e=16, k=8),
    "K8-R8-pad16": Case(r=8, e=64, k=8, t=4, pad=16),
    "duplicate-experts-R2": Case(r=2, e=4, k=4, routing="duplicates"),
    "invalid-ids-R4": Case(r=4, e=8, k=2, routing="invalid"),
    "fp8-given-R2": Case(r=2, e=8, k=2, h=256, fp8="given", scale_block=128),
    "fp8-computed-R4-pad16": Case(r=4, e=8, k=3, h=192, fp8="computed", scale_block=64,
                                  pad=16, bound="mixed"),
    "fp8-given-R8": Case(r=8, e=16, k=2, t=4, h=128, fp8="given", scale_block=32),
    "H7168-bf16-R2": Case(r=2, e=8, k=2, t=8, h=7168),
    "H7168-fp8-R2": Case(r=2, e=8, k=2, t=8, h=7168, fp8="computed", scale_block=128),
    # M = 16 with padding 4 for up to 2*8*3 = 48 rows per rank: later experts lose rows.
    "overflow-R2": Case(r=2, e=4, k=3, pad=4, m=16, routing="skewed"),
}

GPU_RANKS = (1, 2, 4, 8)


def gpu_cases(r: int) -> dict[str, GpuCase]:
    """The CPU suite's cases, at GPU-friendly sizes, for ``r`` ranks."""
    e = 8 * r
    return {
        "random": GpuCase(r=r, e=e, k=4),
        "decode-size": GpuCase(r=r, e=256, k=8, t=128, h=7168, m=2 * 128 * 8),
        "skewed": GpuCase(r=r, e=e, k=3, routing="skewed"),
        "bound-zero": GpuCase(r=r, e=e, k=2, bound="zero"),
        "bound-mixed": GpuCase(r=r, e=e, k=3, bound="mixed"),
        "pad16": GpuCase(r=r, e=e, k=3, pad=16),
        "pad16-mixed": GpuCase(r=r, e=2 * e, k=3, pad=16, bound="mixed"),
        "K1": GpuCase(r=r, e=e, k=1),
        "K8": GpuCase(r=r, e=4 * e, k=8, t=16),
        "duplicates": GpuCase(r=r, e=e, k=4, routing="duplicates"),
        "invalid-ids": GpuCase(r=r, e=e, k=2, routing="invalid"),
        "fp8-given": GpuCase(r=r, e=e, k=2, h=256, fp8="given", scale_block=128),
        "fp8-computed-pad16": GpuCase(r=r, e=e, k=3, h=192, fp8="computed", scale_block=64,
                                      pad=16, bound="mixed"),
        "fp8-H7168": GpuCase(r=r, e=e, k=8, t=16, h=7168, fp8="given", scale_block=128),
        "odd-hidden": GpuCase(r=r, e=e, k=2, h=100),            # rows not a multiple of 16 bytes
        "multi-chunk": GpuCase(r=r, e=e, k=2, h=1544, t=24),     # 3088-byte rows: 2 chunks + tail
        "overflow": GpuCase(r=r, e=max(4, r), k=3, pad=4, m=16, routing="skewed", t=8),
    }


CPU_RAGGED_CASES = {
    "R2": Case(r=2, e=8, k=2),
    "R4-pad16-mixed-invalid": Case(r=4, e=16, k=3, pad=16, bound="mixed", routing="invalid"),
    "R4-overflow": Case(r=4, e=8, k=3, pad=4, m=24, routing="skewed"),
    "R2-fp8-computed": Case(r=2, e=4, k=2, h=64, fp8="computed", scale_block=32),
    "R8-K8": Case(r=8, e=16, k=8, t=4, h=16),
}


def gpu_ragged_cases(r: int) -> dict[str, GpuCase]:
    return {"random": GpuCase(r=r, e=8 * r, k=4, h=512, bound="mixed", pad=16),
            "fp8": GpuCase(r=r, e=8 * r, k=2, h=256, fp8="given", scale_block=128)}


def determinism_case(backend: Backend, r: int) -> Case:
    if backend.platform == "cpu":
        return Case(r=r, e=4 * r, k=8, t=8, h=64, bound="mixed")
    return GpuCase(r=r, e=8 * r, k=8, t=16, h=512, bound="mixed", pad=16)


# ---------------------------------------------------------------------------------------------
# Arrays across ranks and processes


def global_array(mesh, a: np.ndarray):
    """[R, ...] numpy -> global array [R*n, ...] sharded over 'ep' (works across processes)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    flat = np.ascontiguousarray(a.reshape((-1,) + a.shape[2:]) if a.ndim >= 2 else a)
    return jax.make_array_from_callback(flat.shape, NamedSharding(mesh, P("ep")),
                                        lambda index: flat[index])


def local_rows(arr, r: int) -> dict[int, np.ndarray]:
    """Global array sharded over ranks on axis 0 -> {rank: this process's rows of that rank}."""
    out = {}
    n = arr.shape[0] // r
    for shard in arr.addressable_shards:
        start = shard.index[0].start or 0
        out[start // n] = np.asarray(shard.data)
    return out


def spmd(mesh, fn, **kwargs):
    import jax
    from jax.sharding import PartitionSpec as P

    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), **kwargs))


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


# ---------------------------------------------------------------------------------------------
# Round trips and comparison


_FN_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# FFI calls of one round_trip program per rank: dispatch() and combine() are one call each.
CALLS_PER_ROUND_TRIP = 2


def round_trip(backend: Backend, case: Case, mesh, a2a, impl=None, expert_ys=None):
    """One program: dispatch, then combine of an independent random expert_y (ordered after the
    dispatch through expert_counts). Returns ({rank: got}, {rank: want}, plan) for the ranks of
    this process; ``impl`` (default ``a2a``) may be a RaggedAllToAll."""
    impl = impl or a2a
    idx, w, bm, x = case.inputs()
    m = a2a.max_recv_tokens
    if expert_ys is None:
        rng = np.random.default_rng(case.seed + 1)
        expert_ys = rng.normal(size=(case.r, m, case.h)).astype(BF16)
    if case.fp8 == "given":
        xq, xs = ref.quantize_fp8(x, case.scale_block)
        xin = {"x": global_array(mesh, xq), "x_scale": global_array(mesh, xs)}
    elif case.fp8 == "computed":
        xq, xs = backend.quantize_fp8(x, case.scale_block)
        xin = {"x": global_array(mesh, x)}  # f32: quantised inside dispatch
    else:
        xq, xs = x.astype(BF16), None
        xin = {"x": global_array(mesh, xq)}

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

        fn = _FN_CACHE[impl][case.fp8] = spmd(mesh, body)
    out = fn(xin, global_array(mesh, idx), global_array(mesh, w), global_array(mesh, bm),
             global_array(mesh, expert_ys))
    got = {key: local_rows(v, case.r) for key, v in out.items()}
    plan = ref.plan(idx, bm, case.e, case.pad, m)
    ex, es, cnt = ref.dispatch(plan, xq, xs)
    y = ref.combine(plan, expert_ys, w)
    ranks = sorted(got["ex"])
    got_r = {rk: {key: got[key][rk] for key in got} for rk in ranks}
    want_r = {rk: {"ex": ex[rk], "cnt": cnt[rk], "y": y[rk],
                   **({"es": es[rk]} if es is not None else {})}
              for rk in ranks}
    return got_r, want_r, plan


def compare(got: dict, want: dict, exact_y: bool = True) -> list[str]:
    """Mismatches (empty when equal), naming rank, output and first differing position. cnt, ex
    and es compare bitwise; y by value (+0 == -0), exactly unless ``exact_y`` is False."""
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
        if a.shape != b.shape:
            errors.append(f"rank {rank}: y shape {a.shape} != {b.shape}")
            continue
        if exact_y:
            ok = np.array_equal(a, b)
        else:  # ragged on GPUs: XLA may fuse multiply-add: allow bf16 rounding of f32 differences
            tol = 2.0 ** -7 * np.abs(b) + 1e-3 * (float(np.abs(b).max(initial=0.0)) + 1.0)
            ok = bool((np.abs(a - b) <= tol).all())
        if not ok:
            bad = np.argwhere(a != b)
            errors.append(f"rank {rank}: y differs at {len(bad)} positions, first "
                          f"{tuple(bad[0])}: got {a[tuple(bad[0])]} want {b[tuple(bad[0])]}")
    return errors


# ---------------------------------------------------------------------------------------------
# Scenarios


def run_case(backend: Backend, name: str, case: Case, mesh) -> list[str]:
    """Native round trip against the reference: outputs, dropped rows, no recorded error; a case
    named *overflow* must drop rows, and no rank ever keeps more than M rows."""
    from jax_garden import moe

    with backend.all_to_all(case.config(), mesh, "ep") as a2a:
        got, want, plan = round_trip(backend, case, mesh, a2a)
        errors = [f"{name}: {e}" for e in compare(got, want)]
        try:
            a2a.check()
        except moe.MoeDeviceError as e:
            errors.append(f"{name}: recorded error: {e}")
        dropped = a2a.dropped_rows()
        for rank in got:
            if dropped[rank] != int(plan.dropped[rank]):
                errors.append(f"{name}: rank {rank} dropped {dropped[rank]} rows, reference "
                              f"drops {int(plan.dropped[rank])}")
            if int(np.asarray(got[rank]["cnt"]).sum()) > a2a.max_recv_tokens:
                errors.append(f"{name}: rank {rank} kept more than M={a2a.max_recv_tokens} rows")
    if "overflow" in name and int(plan.dropped.sum()) == 0:
        errors.append(f"{name}: the case must drop rows")
    # The cases themselves: skewed routing lands on the owners of the picked experts only, and
    # bound_m = 0 routes nothing.
    cnt = np.stack([w["cnt"] for w in want.values()])
    if case.routing == "skewed":
        owners = {((kk * 5 + 3) % case.e) // (case.e // case.r) for kk in range(case.k)}
        receiving = {rk for rk, w in want.items() if w["cnt"].sum() > 0}
        if receiving != owners & set(want):
            errors.append(f"{name}: skewed rows land on ranks {sorted(receiving)}, expected "
                          f"{sorted(owners & set(want))}")
    if case.bound == "zero" and (cnt.any() or any(np.asarray(g["y"], np.float32).any()
                                                  for g in got.values())):
        errors.append(f"{name}: bound_m = 0 must route nothing and return zeros")
    return errors


def run_same_bits_as_reference(backend: Backend, name: str, case: Case, mesh,
                               reference: Backend | None = None) -> list[str]:
    """The backend's round trip and the in-process CPU reference's (or ``reference``'s: on GPUs
    the NVLink context) on the same inputs (same expert_y): every output bit for bit equal, and
    the same dropped rows. (Both also match the NumPy reference, in run_case; this compares the
    two implementations directly.)"""
    reference = reference or CPU
    rng = np.random.default_rng(case.seed + 1)
    with reference.all_to_all(case.config(), mesh, "ep") as ref_a2a:
        eys = rng.normal(size=(case.r, ref_a2a.max_recv_tokens, case.h)).astype(BF16)
        want, _, _ = round_trip(reference, case, mesh, ref_a2a, expert_ys=eys)
        want_dropped = ref_a2a.dropped_rows()
    with backend.all_to_all(case.config(), mesh, "ep") as a2a:
        got, _, _ = round_trip(backend, case, mesh, a2a, expert_ys=eys)
        dropped = a2a.dropped_rows()
    errors = []
    for rank in sorted(want):
        for key in want[rank]:
            a, b = np.asarray(got[rank][key]), np.asarray(want[rank][key])
            if a.shape != b.shape or not np.array_equal(bits(a), bits(b)):
                errors.append(f"{name}: rank {rank} {key} differs from the {reference.name} reference's")
        if dropped[rank] != want_dropped[rank]:
            errors.append(f"{name}: rank {rank} dropped {dropped[rank]} rows, the {reference.name} reference "
                          f"{want_dropped[rank]}")
    return errors


def run_determinism(backend: Backend, case: Case, mesh, runs: int = 3) -> list[str]:
    """The same round trip ``runs`` times on one AllToAll: bitwise identical outputs."""
    with backend.all_to_all(case.config(), mesh, "ep") as a2a:
        results = [round_trip(backend, case, mesh, a2a)[0] for _ in range(runs)]
    errors = []
    for i, run in enumerate(results[1:], 1):
        for rank in run:
            for key in ("ex", "cnt", "y"):
                if not np.array_equal(bits(run[rank][key]), bits(results[0][rank][key])):
                    errors.append(f"determinism: run {i} rank {rank} {key} differs from run 0")
    return errors


def run_ragged(backend: Backend, name: str, case: Case, mesh) -> list[str]:
    """AllToAll and RaggedAllToAll on the same inputs: both give the reference's dispatch and
    combine (RaggedAllToAll's y within bf16 rounding where XLA may fuse multiply-add)."""
    from jax_garden import moe

    with backend.all_to_all(case.config(), mesh, "ep") as a2a:
        native, want, _ = round_trip(backend, case, mesh, a2a)
        ragged_impl = moe.RaggedAllToAll(case.config(), mesh, "ep",
                                         ragged_all_to_all=backend.ragged_impl())
        ragged, _, _ = round_trip(backend, case, mesh, a2a, impl=ragged_impl)
    return ([f"{name} (native vs reference): {e}" for e in compare(native, want)]
            + [f"{name} (ragged vs reference): {e}"
               for e in compare(ragged, want, exact_y=backend.ragged_exact)])


def run_combine_in_k_order(backend: Backend, r: int) -> list[str]:
    """Values where f32 summation order is visible after rounding to bf16: per token the k = 0, 1,
    2 rows hold 1, 2^27, -2^27 (weights 1). In k order (1 + 2^27) - 2^27 = 0 (2^27 + 1 rounds to
    2^27 in f32); any other order leaves 1 (or -1)."""
    case = Case(r=r, e=2 * r, k=3, t=4, h=16)
    idx, w, bm, x = case.inputs()
    w[:] = 1.0
    mesh = backend.mesh(r)
    plan = ref.plan(idx, bm, case.e)
    values = np.array([1.0, 2.0 ** 27, -(2.0 ** 27)], np.float32)
    eys = np.zeros((case.r, plan.max_recv_tokens, case.h), BF16)
    for s, t, kk in zip(*np.nonzero(plan.row >= 0)):
        eys[plan.dest[s, t, kk], plan.row[s, t, kk]] = values[kk]
    errors = []
    if ref.combine(plan, eys, w).astype(np.float32).any():
        errors.append("the reference does not sum in k order")
    with backend.all_to_all(case.config(), mesh, "ep") as a2a:
        def body(x, idx, w, ey):
            _, _, cnt = a2a.dispatch(x, idx, w)
            return a2a.combine(ey, idx, w, expert_counts=cnt)

        y = spmd(mesh, body)(global_array(mesh, x.astype(BF16)), global_array(mesh, idx),
                             global_array(mesh, w), global_array(mesh, eys))
        for rank, yr in local_rows(y, r).items():  # this process's ranks
            if np.asarray(yr, np.float32).any():
                errors.append(f"combine is not summed in k order on rank {rank}: "
                              f"{np.count_nonzero(np.asarray(yr, np.float32))} non-zero values")
    return errors


# Calls of each layer of run_mixed_calls: (dispatch, combine), "split" = the two halves called
# explicitly, "one" = dispatch() / combine() (one kernel each on CUDA where the context fuses them).
MIXED_CALLS = (("one", "split"), ("split", "one"), ("one", "one"), ("split", "split"), ("one", "one"))


def run_mixed_calls(backend: Backend, r: int, h: int, bound_m: list[int]) -> list[str]:
    """dispatch()/combine() and the split halves in any mix on one AllToAll (MIXED_CALLS, one
    layer each, in one program): the same results as the reference, layer after layer; on CUDA
    the fused kernels and the split ones keep one protocol."""
    return run_split_phases_with_layers(backend, r, h, bound_m, calls=MIXED_CALLS)


def run_split_phases_with_layers(backend: Backend, r: int, h: int, bound_m: list[int],
                                 layers: int = 3, calls: tuple | None = None) -> list[str]:
    """dispatch_send/recv and combine_send/recv called explicitly, with expert work between the
    halves, ``layers`` layers in one program (scan) on one AllToAll (generations advance inside
    the program), against the reference iterated; the counts of every layer too. ``calls``: per
    layer (dispatch, combine) as "split" or "one" (see MIXED_CALLS), the layers unrolled."""
    import jax
    import jax.numpy as jnp

    from jax_garden import moe

    e, k, t = 8, 2, 6
    cfg = moe.AllToAllConfig(num_experts=e, experts_per_token=k, hidden=h, max_tokens=t,
                             expert_padding=4)
    mesh = backend.mesh(r)
    rng = np.random.default_rng(7)
    idx, w = ref.random_routing(rng, r, t, k, e)
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    bm = np.array(bound_m, np.int32)
    x = rng.normal(size=(r, t, h)).astype(BF16)
    scale = np.arange(1, e + 1, dtype=np.float32) / 4  # expert j multiplies by scale[j]

    with backend.all_to_all(cfg, mesh, "ep") as a2a:
        def body(x, idx, w, bm):
            bm = bm[0]
            me = jax.lax.axis_index("ep")
            local = jax.lax.dynamic_slice(jnp.asarray(scale), (me * a2a.num_local_experts,),
                                          (a2a.num_local_experts,))

            def layer(x, style):
                if style[0] == "split":
                    sent = a2a.dispatch_send(x, idx, w, bound_m=bm)
                    expert_x, _, counts = a2a.dispatch_recv(sent)
                else:
                    expert_x, _, counts = a2a.dispatch(x, idx, w, bound_m=bm)
                # Scale of the expert owning each row, from the segment layout.
                padded = (counts + cfg.expert_padding - 1) // cfg.expert_padding * cfg.expert_padding
                seg = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(a2a.max_recv_tokens),
                                       side="right")
                f = local[jnp.minimum(seg, a2a.num_local_experts - 1)]
                expert_y = (expert_x.astype(jnp.float32) * f[:, None]).astype(jnp.bfloat16)
                if style[1] == "split":
                    back = a2a.combine_send(expert_y, counts)
                    return a2a.combine_recv(back, idx, w, bound_m=bm), counts
                return a2a.combine(expert_y, idx, w, bound_m=bm, expert_counts=counts), counts

            if calls is None:
                return jax.lax.scan(lambda x, _: layer(x, ("split", "split")), x, None, length=layers)
            all_counts = []
            for style in calls:
                x, counts = layer(x, style)
                all_counts.append(counts)
            return x, jnp.stack(all_counts)

        y, counts = spmd(mesh, body)(global_array(mesh, x), global_array(mesh, idx),
                                     global_array(mesh, w), global_array(mesh, bm))
        y, counts = local_rows(y, r), local_rows(counts, r)  # this process's ranks
        a2a.check()

    errors = []
    layers = layers if calls is None else len(calls)
    want = ref.scaled_expert_layers(idx, bm, w, x, e, r, cfg.expert_padding, scale, layers)
    # Per rank, scan stacks the counts of each layer: [R * layers, L] globally.
    want_counts = np.repeat(ref.plan(idx, bm, e, cfg.expert_padding).counts[:, None], layers, axis=1)
    for rank in sorted(y):
        got = np.asarray(y[rank]).astype(np.float32)
        if not np.array_equal(got, want[rank].astype(np.float32)):
            errors.append(f"rank {rank}: y differs from the reference at "
                          f"{np.count_nonzero(got != want[rank].astype(np.float32))} positions")
        if not np.array_equal(np.asarray(counts[rank]), want_counts[rank]):
            errors.append(f"rank {rank}: counts {np.asarray(counts[rank]).tolist()} != "
                          f"{want_counts[rank].tolist()}")
    return errors


def run_separate_programs(backend: Backend) -> list[str]:
    """dispatch and combine in two programs (the first without shard_map's varying-axes checks),
    with and without expert_counts (the issue's signature)."""
    case = Case(r=2, e=4, k=2, pad=16, bound="mixed")
    mesh = backend.mesh(case.r)
    idx, w, bm, x = case.inputs()
    g = lambda a: global_array(mesh, a)  # noqa: E731
    errors = []
    with backend.all_to_all(case.config(), mesh, "ep") as a2a:
        disp = spmd(mesh, lambda x, i, w, b: a2a.dispatch(x, i, w, bound_m=b[0]), check_vma=False)
        comb = spmd(mesh, lambda ey, c, i, w, b: a2a.combine(ey, i, w, b[0], expert_counts=c))
        xb = x.astype(BF16)
        ex, es, cnt = disp(g(xb), g(idx), g(w), g(bm))
        if es is not None:
            errors.append("bf16 dispatch returned an expert_scale")
        y = comb(ex, cnt, g(idx), g(w), g(bm))  # expert_y = expert_x
        plan = ref.plan(idx, bm, case.e, case.pad)
        want_ex, _, _ = ref.dispatch(plan, xb)
        want_y = ref.combine(plan, want_ex, w).astype(np.float32)
        got_y = local_rows(y, case.r)  # this process's ranks
        if any(not np.array_equal(np.asarray(v, np.float32), want_y[rank]) for rank, v in got_y.items()):
            errors.append("combine in a second program differs from the reference")
        comb2 = spmd(mesh, lambda ey, i, w, b: a2a.combine(ey, i, w, b[0]))
        disp(g(xb), g(idx), g(w), g(bm))
        y2 = local_rows(comb2(ex, g(idx), g(w), g(bm)), case.r)
        if any(not np.array_equal(np.asarray(y2[rank], np.float32), np.asarray(v, np.float32))
               for rank, v in got_y.items()):
            errors.append("combine without expert_counts differs from combine with them")
        a2a.check()
    return errors


def expect_runtime_error(backend: Backend, a2a, run: Callable[[], object], pattern: str) -> None:
    """``run`` breaks the AllToAll's contract: on a backend whose errors fail the program, the
    program raises it; otherwise the program returns and the kernels recorded it. Either way
    ``a2a.check()`` raises it afterwards, matching ``pattern``."""
    import jax

    from jax_garden import moe

    if backend.errors_fail_program:
        with pytest.raises(jax.errors.JaxRuntimeError, match=pattern):
            jax.block_until_ready(run())
    else:
        try:
            np.asarray(jax.block_until_ready(run()))
        except jax.errors.JaxRuntimeError as e:  # a later rank's handler may see it first
            assert re.search(pattern, str(e)), e
    with pytest.raises(moe.MoeDeviceError, match=pattern):
        a2a.check()


def healthy_round_trip(backend: Backend, r: int) -> None:
    """A fresh AllToAll on the same devices still works after another one failed (and its
    successful run replaces the failed program's runtime token, which jax would re-raise at
    exit)."""
    case = Case(r=r, e=2 * r, k=2, t=4, h=16)
    errors = run_case(backend, "healthy", case, backend.mesh(r))
    assert not errors, "\n".join(errors)


def other_routing_pattern(backend: Backend, case: Case, given: int, routed: int) -> str:
    """The error of combine_recv on rank 1 when indices[3, 1] differs from the dispatch's."""
    if backend.platform == "cpu":
        return (rf"combine_recv \(rank 1\): indices\[3, 1\] = {given} but the matching dispatch "
                rf"routed it to expert {routed}")
    return (rf"combine_recv on rank 1: indices entry {3 * case.k + 1} \(flat t\*K\+k\) = {given} "
            rf"but the matching dispatch routed it to expert {routed}")


def run_combine_with_other_routing(backend: Backend, case: Case) -> None:
    """combine with indices other than the dispatch's (one entry of rank 1 changed) is an error
    naming the entry and both values; other AllToAlls keep working."""
    mesh = backend.mesh(case.r)
    idx, w, bm, x = case.inputs()
    other = idx.copy()
    other[1, 3, 1] = (other[1, 3, 1] + 1) % case.e
    g = lambda a: global_array(mesh, a)  # noqa: E731
    with backend.all_to_all(case.config(), mesh, "ep", timeout=5) as a2a:
        def body(x, i, i2, w):
            ex, _, c = a2a.dispatch(x, i, w)
            return a2a.combine(ex, i2, w, expert_counts=c)

        f = spmd(mesh, body)
        expect_runtime_error(backend, a2a, lambda: f(g(x.astype(BF16)), g(idx), g(other), g(w)),
                             other_routing_pattern(backend, case, other[1, 3, 1], idx[1, 3, 1]))
    healthy_round_trip(backend, case.r)


def run_wrong_expert_counts(backend: Backend, case: Case) -> None:
    """combine_send with expert_counts other than the dispatch's is an error naming the expert,
    the value given and the rows received."""
    mesh = backend.mesh(case.r)
    idx, w, bm, x = case.inputs()
    g = lambda a: global_array(mesh, a)  # noqa: E731
    with backend.all_to_all(case.config(), mesh, "ep", timeout=5) as a2a:
        disp = spmd(mesh, lambda x, i, w, b: a2a.dispatch(x, i, w, bound_m=b[0]))
        comb = spmd(mesh, lambda ey, c, i, w, b: a2a.combine(ey, i, w, b[0], expert_counts=c + 1))
        ex, _, cnt = disp(g(x.astype(BF16)), g(idx), g(w), g(bm))
        expect_runtime_error(backend, a2a, lambda: comb(ex, cnt, g(idx), g(w), g(bm)),
                             r"expert_counts\[\d+\] = \d+ but the last dispatch received \d+")
    healthy_round_trip(backend, case.r)


def assert_no_errors(errors: list[str]) -> None:
    assert not errors, "\n".join(errors)

