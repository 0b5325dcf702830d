"""MoE dispatch/combine on the CPU reference (R ranks = R CPU devices of this process), checked
against the NumPy reference in tests/moe_reference.py."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import moe_reference as ref
from jax_garden import _jax_garden as native
from jax_garden import moe

BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn


def mesh_of(r: int, axis: str = "ep") -> Mesh:
    if len(jax.devices()) < r:
        pytest.skip(f"needs {r} CPU devices (XLA_FLAGS is set in tests/conftest.py)")
    return Mesh(np.array(jax.devices()[:r]), (axis,))


def stack(a: np.ndarray) -> jax.Array:
    """[R, T, ...] per-rank arrays -> global [R*T, ...] (sharded by shard_map's P('ep'))."""
    return jnp.asarray(a.reshape((-1,) + a.shape[2:]))


def unstack(a, r: int) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape((r, -1) + a.shape[1:])


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def spmd(mesh, fn, **kwargs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), **kwargs))


Case = ref.Case


def native_round_trip(case: Case, a2a=None, expert_ys=None):
    """One program: dispatch then combine of independent random expert_y (ordered by passing
    expert_counts). Returns native outputs, reference outputs, the plan and the AllToAll."""
    cfg = case.config()
    mesh = mesh_of(case.r)
    a2a = a2a or moe.AllToAll(cfg, mesh, "ep")
    idx, w, bm, x = case.inputs()
    rng = np.random.default_rng(case.seed + 1)
    m = a2a.max_recv_tokens
    if expert_ys is None:
        expert_ys = rng.normal(size=(case.r, m, case.h)).astype(BF16)

    if case.fp8 == "given":
        xq, xs = ref.quantize_fp8(x, case.scale_block)
        xin = {"x": stack(xq), "x_scale": stack(xs)}
    elif case.fp8 == "computed":
        xq, xs = ref.quantize_fp8(x, case.scale_block)
        xin = {"x": stack(x)}  # f32: quantised inside dispatch
    else:
        xq, xs = x.astype(BF16), None
        xin = {"x": stack(xq)}

    def body(xin, idx, w, bm, ey):
        ex, es, cnt = a2a.dispatch(xin["x"], idx, w, x_scale=xin.get("x_scale"), bound_m=bm[0])
        y = a2a.combine(ey, idx, w, bm[0], expert_counts=cnt)
        return {"ex": ex, "es": es, "cnt": cnt, "y": y}

    out = spmd(mesh, body)(xin, stack(idx), stack(w), jnp.asarray(bm), stack(expert_ys))
    got = {k: (None if v is None else unstack(v, case.r)) for k, v in out.items()}
    plan = ref.plan(idx, bm, case.e, case.pad, m)
    ex, es, cnt = ref.dispatch(plan, xq, xs)
    want = {"ex": ex, "es": es, "cnt": cnt, "y": ref.combine(plan, expert_ys, w)}
    return got, want, plan, a2a


def assert_same(got, want):
    np.testing.assert_array_equal(got["cnt"], want["cnt"])
    np.testing.assert_array_equal(bits(got["ex"]), bits(want["ex"]))
    if want["es"] is None:
        assert got["es"] is None
    else:
        np.testing.assert_array_equal(got["es"], want["es"])
    # Values (so +0 and -0 compare equal), exact: same f32 operations in the same order.
    np.testing.assert_array_equal(got["y"].astype(np.float32), want["y"].astype(np.float32))


CASES = {
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
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_matches_reference(name):
    case = CASES[name]
    got, want, plan, a2a = native_round_trip(case)
    with a2a:
        assert_same(got, want)
        assert a2a.dropped_rows() == [0] * case.r  # worst-case M never drops
    if case.routing == "skewed":  # all rows on the ranks owning experts 3, 0, 5
        assert set(np.nonzero(want["cnt"].sum(axis=1))[0]) == {0, 1, 2}
    if case.bound == "zero":
        assert not want["cnt"].any() and not got["y"].astype(np.float32).any()


def test_combine_adds_in_k_order():
    """Values where f32 summation order is visible after rounding to bf16: per token the k = 0, 1, 2
    rows hold 1, 2^27, -2^27 (weights 1). In k order (1 + 2^27) - 2^27 = 0 (2^27 + 1 rounds to
    2^27 in f32); any other order leaves 1 (or -1)."""
    case = Case(r=4, e=8, k=3, t=4, h=16)
    idx, w, bm, x = case.inputs()
    w[:] = 1.0
    mesh = mesh_of(case.r)
    plan = ref.plan(idx, bm, case.e)
    values = np.array([1.0, 2.0 ** 27, -(2.0 ** 27)], np.float32)
    eys = np.zeros((case.r, plan.max_recv_tokens, case.h), BF16)
    for s, t, kk in zip(*np.nonzero(plan.row >= 0)):
        eys[plan.dest[s, t, kk], plan.row[s, t, kk]] = values[kk]
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        def body(x, idx, w, ey):
            _, _, cnt = a2a.dispatch(x, idx, w)
            return a2a.combine(ey, idx, w, expert_counts=cnt)

        y = spmd(mesh, body)(stack(x.astype(BF16)), stack(idx), stack(w), stack(eys))
    want = ref.combine(plan, eys, w)
    assert not want.astype(np.float32).any()  # the reference sums in k order too
    np.testing.assert_array_equal(unstack(y, case.r).astype(np.float32), 0.0)


def test_overflow_drops_rows_and_counts_them():
    # M = 16 with padding 4 for up to 2*8*3 = 48 rows per rank: later experts lose rows.
    case = Case(r=2, e=4, k=3, pad=4, m=16, routing="skewed")
    got, want, plan, a2a = native_round_trip(case)
    with a2a:
        assert plan.dropped.sum() > 0, "the case must overflow"
        assert_same(got, want)
        assert a2a.dropped_rows() == plan.dropped.tolist()
        assert (got["cnt"].sum(axis=1) <= 16).all()


def test_determinism_bitwise():
    case = Case(r=8, e=32, k=8, t=8, h=64, bound="mixed")
    mesh = mesh_of(case.r)
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        runs = [native_round_trip(case, a2a)[0] for _ in range(3)]
        for run in runs[1:]:
            for key in ("ex", "cnt", "y"):
                np.testing.assert_array_equal(bits(run[key]), bits(runs[0][key]))


def test_split_phases_with_expert_compute_and_layers():
    """dispatch_send/recv and combine_send/recv called explicitly, with work between the halves,
    three layers in one program (scan) on one AllToAll, against the reference iterated."""
    r, e, k, t, h, layers = 4, 8, 2, 6, 16, 3
    cfg = moe.AllToAllConfig(num_experts=e, experts_per_token=k, hidden=h, max_tokens=t,
                             expert_padding=4)
    mesh = mesh_of(r)
    rng = np.random.default_rng(7)
    idx, w = ref.random_routing(rng, r, t, k, e)
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    bm = np.array([6, 3, 0, 5], np.int32)
    x = rng.normal(size=(r, t, h)).astype(BF16)
    scale = np.arange(1, e + 1, dtype=np.float32) / 4  # expert j multiplies by scale[j]

    with moe.AllToAll(cfg, mesh, "ep") as a2a:
        def body(x, idx, w, bm):
            bm = bm[0]
            me = jax.lax.axis_index("ep")
            local = jax.lax.dynamic_slice(jnp.asarray(scale), (me * a2a.num_local_experts,),
                                          (a2a.num_local_experts,))

            def layer(x, _):
                sent = a2a.dispatch_send(x, idx, w, bound_m=bm)
                expert_x, expert_scale, counts = a2a.dispatch_recv(sent)
                # Scale of the expert owning each row, from the segment layout.
                padded = (counts + cfg.expert_padding - 1) // cfg.expert_padding * cfg.expert_padding
                ends = jnp.cumsum(padded)
                seg = jnp.searchsorted(ends, jnp.arange(a2a.max_recv_tokens), side="right")
                f = local[jnp.minimum(seg, a2a.num_local_experts - 1)]
                expert_y = (expert_x.astype(jnp.float32) * f[:, None]).astype(jnp.bfloat16)
                back = a2a.combine_send(expert_y, counts)
                y = a2a.combine_recv(back, idx, w, bound_m=bm)
                return y, counts

            return jax.lax.scan(layer, x, None, length=layers)

        y, counts = spmd(mesh, body)(stack(x), stack(idx), stack(w), jnp.asarray(bm))

    want = ref.scaled_expert_layers(idx, bm, w, x, e, r, cfg.expert_padding, scale, layers)
    np.testing.assert_array_equal(unstack(y, r).astype(np.float32), want.astype(np.float32))
    # Per rank, scan stacks the counts of each layer: [R * layers, L] globally.
    np.testing.assert_array_equal(np.asarray(counts).reshape(r, layers, -1),
                                  np.repeat(ref.plan(idx, bm, e, cfg.expert_padding).counts[:, None], layers, axis=1))


def test_dispatch_and_combine_in_separate_programs():
    case = Case(r=2, e=4, k=2, pad=16, bound="mixed")
    mesh = mesh_of(case.r)
    idx, w, bm, x = case.inputs()
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        # Also without shard_map's varying-axes checks (results carry no varying axes then).
        disp = spmd(mesh, lambda x, i, w, b: a2a.dispatch(x, i, w, bound_m=b[0]), check_vma=False)
        comb = spmd(mesh, lambda ey, c, i, w, b: a2a.combine(ey, i, w, b[0], expert_counts=c))
        xb = x.astype(BF16)
        ex, es, cnt = disp(stack(xb), stack(idx), stack(w), jnp.asarray(bm))
        assert es is None
        y = comb(ex, cnt, stack(idx), stack(w), jnp.asarray(bm))  # expert_y = expert_x
        plan = ref.plan(idx, bm, case.e, case.pad)
        want_ex, _, _ = ref.dispatch(plan, xb)
        want_y = ref.combine(plan, want_ex, w)
        np.testing.assert_array_equal(unstack(y, 2).astype(np.float32), want_y.astype(np.float32))
        # combine without expert_counts (the signature) works too.
        comb2 = spmd(mesh, lambda ey, i, w, b: a2a.combine(ey, i, w, b[0]))
        disp(stack(xb), stack(idx), stack(w), jnp.asarray(bm))
        y2 = comb2(ex, stack(idx), stack(w), jnp.asarray(bm))
        np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y, np.float32))


def test_sizes_agree_between_python_native_and_reference():
    for args in [(1, 8, 2, 4, 1), (4, 128, 8, 64, 16), (8, 4096, 8, 32, 128), (3, 5, 7, 11, 13)]:
        want = ref.worst_case_recv_tokens(*args)
        assert moe.worst_case_recv_tokens(*args) == want
        assert native.moe.worst_case_recv_tokens(*args) == want
    cfg = moe.AllToAllConfig(num_experts=256, experts_per_token=8, hidden=7168, max_tokens=128,
                             expert_padding=16)
    assert cfg.recv_tokens(4) == 4 * 128 * 8 + 64 * 15 + 0 and cfg.recv_tokens(4) % 16 == 0


# ---------------------------------------------------------------------------------------------
# Errors: at trace time, naming the wrong value.

CFG = dict(num_experts=8, experts_per_token=2, hidden=32, max_tokens=4)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(hidden=100, dispatch_dtype=jnp.float8_e4m3fn, scale_block=128), ValueError,
     r"hidden=100 is not divisible by scale_block=128"),
    (dict(dispatch_dtype=jnp.float8_e4m3fn), ValueError, r"needs scale_block"),
    (dict(scale_block=16), ValueError, r"scale_block=16 is only meaningful for float8"),
    (dict(dispatch_dtype=jnp.float32), TypeError, r"dispatch_dtype must be .* got float32"),
    (dict(combine_dtype=jnp.float16), TypeError, r"combine_dtype must be bfloat16, got float16"),
    (dict(expert_padding=16, max_recv_tokens=40), ValueError,
     r"max_recv_tokens=40 is not a multiple of expert_padding=16"),
    (dict(num_experts=0), ValueError, r"num_experts must be >= 1, got 0"),
    (dict(hidden="32"), TypeError, r"hidden must be an integer, got str '32'"),
    (dict(max_tokens=True), TypeError, r"max_tokens must be an integer, got bool True"),
])
def test_bad_config_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        moe.AllToAllConfig(**{**CFG, **kwargs})


def test_bad_mesh_rejected():
    mesh = mesh_of(4)
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by the number of ranks R=4"):
        moe.AllToAll(moe.AllToAllConfig(**{**CFG, "num_experts": 6}), mesh, "ep")
    with pytest.raises(ValueError, match=r"axis 'expert' is not in the mesh axes \('ep',\)"):
        moe.AllToAll(moe.AllToAllConfig(**CFG), mesh, "expert")
    mesh2 = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("dp", "ep"))
    with pytest.raises(ValueError, match=r"other than 'ep' must have size 1.*'dp': 2"):
        moe.AllToAll(moe.AllToAllConfig(**CFG), mesh2, "ep")


def _good(fp8=False):
    t, k, h = CFG["max_tokens"], CFG["experts_per_token"], CFG["hidden"]
    return dict(x=jnp.zeros((t, h), jnp.float8_e4m3fn if fp8 else jnp.bfloat16),
                indices=jnp.zeros((t, k), jnp.int32), weights=jnp.zeros((t, k), jnp.float32),
                x_scale=jnp.ones((t, h // 16), jnp.float32) if fp8 else None)


@pytest.mark.parametrize("fp8, change, exc, match", [
    (False, dict(x=jnp.zeros((4, 16), jnp.bfloat16)), ValueError,
     r"dispatch_send: x has shape \(4, 16\), expected \(4, 32\)"),
    (False, dict(x=jnp.zeros((4, 32), jnp.float32)), TypeError,
     r"x has dtype float32, expected bfloat16"),
    (False, dict(indices=jnp.zeros((4, 2), jnp.int16)), TypeError,
     r"indices has dtype int16, expected int32"),
    (False, dict(indices=jnp.zeros((4, 3), jnp.int32)), ValueError,
     r"indices has shape \(4, 3\), expected \(4, 2\)"),
    (False, dict(weights=jnp.zeros((4, 2), jnp.bfloat16)), TypeError,
     r"weights has dtype bfloat16, expected float32"),
    (False, dict(x_scale=jnp.ones((4, 2), jnp.float32)), ValueError,
     r"x_scale is only for float8_e4m3fn dispatch"),
    (False, dict(bound_m=jnp.float32(3)), TypeError, r"bound_m has dtype float32, expected int32"),
    (False, dict(bound_m=jnp.zeros((2,), jnp.int32)), ValueError,
     r"bound_m must be a scalar, got shape \(2,\)"),
    (True, dict(x_scale=jnp.ones((4, 3), jnp.float32)), ValueError,
     r"x_scale has shape \(4, 3\), expected \(4, 2\)"),
    (True, dict(x_scale=None), TypeError, r"x has dtype float8_e4m3fn.*pass its x_scale"),
    (True, dict(x=jnp.zeros((4, 32), jnp.int8), x_scale=None), TypeError,
     r"x has dtype int8, expected float32 or float16 or bfloat16"),
])
def test_bad_dispatch_operands_rejected(fp8, change, exc, match):
    cfg = moe.AllToAllConfig(**CFG, **(dict(dispatch_dtype=jnp.float8_e4m3fn, scale_block=16)
                                       if fp8 else {}))
    mesh = mesh_of(2)
    with moe.AllToAll(cfg, mesh, "ep") as a2a:
        args = {**_good(fp8), **change}

        def body(_):
            a2a.dispatch(**args)
            return _

        with pytest.raises(exc, match=match):
            spmd(mesh, body)(jnp.zeros((2,)))


def test_bad_combine_operands_and_context_rejected():
    mesh = mesh_of(2)
    with moe.AllToAll(moe.AllToAllConfig(**CFG), mesh, "ep") as a2a:
        m = a2a.max_recv_tokens
        g = _good()

        def trace(fn):
            spmd(mesh, lambda _: (fn(), _)[1])(jnp.zeros((2,)))

        with pytest.raises(ValueError, match=rf"expert_y has shape \({m - 1}, 32\), expected \({m}, 32\)"):
            trace(lambda: a2a.combine(jnp.zeros((m - 1, 32), jnp.bfloat16), g["indices"], g["weights"]))
        with pytest.raises(TypeError, match=r"expert_y has dtype float32, expected bfloat16"):
            trace(lambda: a2a.combine(jnp.zeros((m, 32), jnp.float32), g["indices"], g["weights"]))
        with pytest.raises(ValueError, match=r"expert_counts has shape \(3,\), expected \(4,\)"):
            trace(lambda: a2a.combine_send(jnp.zeros((m, 32), jnp.bfloat16),
                                           jnp.zeros((3,), jnp.int32)))
        with pytest.raises(TypeError, match=r"send_done has dtype int32, expected uint32"):
            trace(lambda: a2a.dispatch_recv(jnp.zeros((1,), jnp.int32)))
        # Outside shard_map, and inside one over another axis size.
        with pytest.raises(ValueError, match=r"must be called inside jax.shard_map over mesh axis 'ep'"):
            jax.jit(lambda x: a2a.dispatch(x, g["indices"], g["weights"]))(g["x"])
        mesh4 = mesh_of(4)
        with pytest.raises(ValueError, match=r"axis 'ep' has size 4 here, but the AllToAll was built for R=2"):
            spmd(mesh4, lambda _: (a2a.dispatch(g["x"], g["indices"], g["weights"]), _)[1])(
                jnp.zeros((4,)))


# ---------------------------------------------------------------------------------------------
# Errors at run time: clear messages, never a hang; other contexts keep working.


def _healthy_round_trip_on(r):
    """A fresh AllToAll on the same devices still works (and its successful run replaces the
    failed program's runtime token, which jax would re-raise at exit)."""
    got, want, _, a2a = native_round_trip(Case(r=r, e=2 * r, k=2, t=4, h=16))
    with a2a:
        assert_same(got, want)


def test_missing_rank_times_out_and_poisons_context():
    mesh = mesh_of(2)
    g = _good()
    a2a = moe.AllToAll(moe.AllToAllConfig(**CFG), mesh, "ep", timeout=0.5)

    def only_rank0(_):
        me = jax.lax.axis_index("ep")
        c = jax.lax.cond(me == 0, lambda: a2a.dispatch(g["x"], g["indices"], g["weights"])[2],
                         lambda: jax.lax.pcast(jnp.zeros((4,), jnp.int32), "ep", to="varying"))
        return c

    f = spmd(mesh, only_rank0)
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"jg_moe_dispatch_recv \(rank 0\): timed out after 0.5 s waiting for "
                             r"dispatch_send #1 of ranks \[1\]"):
        jax.block_until_ready(f(jnp.zeros((2,))))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"unusable after an earlier error"):
        jax.block_until_ready(f(jnp.zeros((2,))))
    a2a.close()
    _healthy_round_trip_on(2)


def test_combine_with_other_routing_fails():
    case = Case(r=2, e=4, k=2)
    mesh = mesh_of(2)
    idx, w, bm, x = case.inputs()
    other = idx.copy()
    other[1, 3, 1] = (other[1, 3, 1] + 1) % case.e
    with moe.AllToAll(case.config(), mesh, "ep", timeout=5) as a2a:
        def body(x, i, i2, w):
            ex, _, c = a2a.dispatch(x, i, w)
            return a2a.combine(ex, i2, w, expert_counts=c)

        with pytest.raises(jax.errors.JaxRuntimeError,
                           match=rf"combine_recv \(rank 1\): indices\[3, 1\] = {other[1, 3, 1]} but "
                                 rf"the matching dispatch routed it to expert {idx[1, 3, 1]}"):
            jax.block_until_ready(spmd(mesh, body)(stack(x.astype(BF16)), stack(idx),
                                                   stack(other), stack(w)))
    _healthy_round_trip_on(2)


def test_two_dispatches_in_flight_on_one_context_fail():
    mesh = mesh_of(2)
    g = _good()
    with moe.AllToAll(moe.AllToAllConfig(**CFG), mesh, "ep", timeout=5) as a2a:
        def body(_):
            s1 = a2a.dispatch_send(g["x"], g["indices"], g["weights"])
            # The second send depends on the first token, so it runs before any recv.
            s2 = a2a.dispatch_send(g["x"] + s1[0].astype(jnp.bfloat16), g["indices"], g["weights"])
            return a2a.dispatch_recv(s2)[2]

        with pytest.raises(jax.errors.JaxRuntimeError,
                           match=r"dispatch_send \(rank \d\): called again before dispatch_recv"):
            jax.block_until_ready(spmd(mesh, body)(jnp.zeros((2,))))
    _healthy_round_trip_on(2)


def test_closed_context_fails_cleanly():
    case = Case(r=2, e=4, k=2, t=4, h=16)
    gc.collect()  # finalise AllToAlls other tests dropped, so the counts below are ours
    live = native.moe.live_cpu_contexts()
    a2a = moe.AllToAll(case.config(), mesh_of(2), "ep")
    assert native.moe.live_cpu_contexts() == live + 1
    got, want, _, _ = native_round_trip(case, a2a)
    assert_same(got, want)
    a2a.close()
    a2a.close()  # idempotent
    assert native.moe.live_cpu_contexts() == live
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=rf"no live CPU AllToAll context with id {a2a.context_id}"):
        native_round_trip(case, a2a)
    _healthy_round_trip_on(2)


# ---------------------------------------------------------------------------------------------
# RaggedAllToAll: same semantics on jax.lax.ragged_all_to_all.

RAGGED = {
    "R2": Case(r=2, e=8, k=2),
    "R4-pad16-mixed-invalid": Case(r=4, e=16, k=3, pad=16, bound="mixed", routing="invalid"),
    "R4-overflow": Case(r=4, e=8, k=3, pad=4, m=24, routing="skewed"),
    "R2-fp8-computed": Case(r=2, e=4, k=2, h=64, fp8="computed", scale_block=32),
    "R8-K8": Case(r=8, e=16, k=8, t=4, h=16),
}


def ragged_round_trip(case: Case, impl):
    cfg = case.config()
    mesh = mesh_of(case.r)
    rag = moe.RaggedAllToAll(cfg, mesh, "ep", ragged_all_to_all=impl)
    idx, w, bm, x = case.inputs()
    m = rag.max_recv_tokens
    eys = np.random.default_rng(case.seed + 1).normal(size=(case.r, m, case.h)).astype(BF16)
    xin = x if case.fp8 == "computed" else x.astype(BF16)

    def body(x, idx, w, bm, ey):
        ex, es, cnt = rag.dispatch(x, idx, w, bound_m=bm[0])
        return {"ex": ex, "es": es, "cnt": cnt, "y": rag.combine(ey, idx, w, bm[0])}

    out = spmd(mesh, body)(stack(xin), stack(idx), stack(w), jnp.asarray(bm), stack(eys))
    got = {k: (None if v is None else unstack(v, case.r)) for k, v in out.items()}
    plan = ref.plan(idx, bm, case.e, case.pad, m)
    xq, xs = ref.quantize_fp8(x, case.scale_block) if case.fp8 else (xin, None)
    ex, es, cnt = ref.dispatch(plan, xq, xs)
    return got, {"ex": ex, "es": es, "cnt": cnt, "y": ref.combine(plan, eys, w)}


@pytest.mark.parametrize("name", list(RAGGED))
def test_ragged_implementation_matches_reference(name):
    """XLA:CPU has no ragged_all_to_all, so this checks RaggedAllToAll's offsets and layout with
    an all_gather emulation; the GPU suite runs it on the real collective."""
    got, want = ragged_round_trip(RAGGED[name], moe.gather_ragged_all_to_all)
    assert_same(got, want)


def test_ragged_on_xla_cpu():
    """Uses the real jax.lax.ragged_all_to_all when XLA:CPU has it (it had not in jax 0.11.2)."""
    try:
        got, want = ragged_round_trip(RAGGED["R2"], None)
    except jax.errors.JaxRuntimeError as e:
        if "ragged-all-to-all" in str(e) and "not supported" in str(e):
            pytest.skip(f"XLA:CPU lacks ragged_all_to_all: {str(e).splitlines()[0]}")
        raise
    assert_same(got, want)


# ---------------------------------------------------------------------------------------------
# The native layer checks what it is given even when moe.py's checks are bypassed.


def test_native_handlers_reject_bad_operands():
    mesh = mesh_of(2)
    t, k, h = CFG["max_tokens"], CFG["experts_per_token"], CFG["hidden"]
    with moe.AllToAll(moe.AllToAllConfig(**CFG), mesh, "ep", timeout=5) as a2a:
        def send(x, rank):
            call = jax.ffi.ffi_call("jg_moe_dispatch_send", jax.ShapeDtypeStruct((1,), jnp.uint32),
                                    has_side_effect=True)
            return call(x, jnp.zeros((t, 0), jnp.float32), jnp.zeros((t, k), jnp.int32),
                        jnp.zeros((t, k), jnp.float32), jnp.int32(t), rank,
                        context_id=np.uint64(a2a.context_id))

        wrong_x = spmd(mesh, lambda _: send(jnp.zeros((t, h), jnp.float32), jnp.int32(0)))
        with pytest.raises(jax.errors.JaxRuntimeError,
                           match=r"jg_moe_dispatch_send \(rank 0\): x has dtype float32, expected "
                                 r"bfloat16"):
            jax.block_until_ready(wrong_x(jnp.zeros((2,))))
    with moe.AllToAll(moe.AllToAllConfig(**CFG), mesh, "ep", timeout=5) as a2a:
        bad_rank = spmd(mesh, lambda _: send(jnp.zeros((t, h), jnp.bfloat16), jnp.int32(7)))
        with pytest.raises(jax.errors.JaxRuntimeError,
                           match=r"rank operand 7 is outside \[0, 2\)"):
            jax.block_until_ready(bad_rank(jnp.zeros((2,))))
    _healthy_round_trip_on(2)


def test_example_moe_layer_runs_and_matches_dense():
    """examples/moe_layer.py on all 8 CPU devices (bf16 and fp8 dispatch)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "moe_layer.py"
    spec = importlib.util.spec_from_file_location("moe_layer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    base = ["--tokens", "8", "--hidden", "128", "--ffn", "64", "--experts", "16", "--top-k", "3"]
    assert example.main(base) == 0
    assert example.main(base + ["--fp8", "--expert-padding", "4"]) == 0
