"""MoE on the CPU reference only: checks at trace time (wrong types, shapes, values; named in
the message), runtime failures whose mechanics are the CPU reference's (a rank that never
arrives, two dispatches in flight, a closed context), the layout functions Python shares with
the native code, settings, and the example. The scenarios both backends run are in
tests/test_moe.py."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

import moe_reference as ref
import moe_scenarios as sc
from jax_garden import _jax_garden as native
from jax_garden import moe

BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
Case = ref.Case
CPU = sc.CPU


def mesh_of(r: int) -> Mesh:
    CPU.require(r)
    return CPU.mesh(r)


def spmd(mesh, fn, **kwargs):
    return sc.spmd(mesh, fn, **kwargs)


def stack(a: np.ndarray) -> jax.Array:
    """[R, T, ...] per-rank arrays -> global [R*T, ...] (sharded by shard_map's P('ep'))."""
    return jnp.asarray(a.reshape((-1,) + a.shape[2:]))


def _healthy_round_trip_on(r: int) -> None:
    sc.healthy_round_trip(CPU, r)


# ---------------------------------------------------------------------------------------------
# Sizes and layout: one definition (ffi/moe/layout.h), used by Python through the bindings.


def test_sizes_agree_between_python_native_and_reference():
    for args in [(1, 8, 2, 4, 1), (4, 128, 8, 64, 16), (8, 4096, 8, 32, 128), (3, 5, 7, 11, 13)]:
        want = ref.worst_case_recv_tokens(*args)
        assert moe.worst_case_recv_tokens(*args) == want
        assert native.moe.worst_case_recv_tokens(*args) == want
    cfg = moe.AllToAllConfig(num_experts=256, experts_per_token=8, hidden=7168, max_tokens=128,
                             expert_padding=16)
    assert cfg.recv_tokens(4) == 4 * 128 * 8 + 64 * 15 + 0 and cfg.recv_tokens(4) % 16 == 0
    shape = cfg._native_shape(4)
    assert (shape.num_ranks, shape.local_experts, shape.max_recv_tokens, shape.scale_cols) == \
        (4, 64, cfg.recv_tokens(4), 0)
    # The native shape check is the same rule set (the contexts run it too).
    bad = native.moe.MoeShape(num_ranks=2, num_experts=8, experts_per_token=9, hidden=32, max_tokens=4,
                              max_recv_tokens=16)
    with pytest.raises(ValueError, match=r"experts_per_token=9 exceeds num_experts=8"):
        bad.validate()
    with pytest.raises(ValueError, match=r"experts_per_token=9 exceeds num_experts=8"):
        native.moe.CpuAllToAll(bad, "bfloat16", "bfloat16", 1.0)


def test_traced_segments_match_native_layout():
    """RaggedAllToAll computes segments inside the program (moe._segments_traced); the native
    compute_segments is the definition. Random counts, with and without capacity overflow."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        n_l = int(rng.integers(1, 9))
        pad = int(rng.choice([1, 2, 4, 16]))
        counts = rng.integers(0, 40, size=n_l).astype(np.int32)
        if trial % 3 == 0:
            counts[rng.integers(0, n_l)] = 0
        worst = int(np.sum((counts + pad - 1) // pad * pad))
        m = pad * int(rng.integers(1, max(2, worst // pad + 3)))
        start, kept, dropped, used = native.moe.compute_segments(counts.tolist(), pad, m)
        t_start, t_kept = moe._segments_traced(jnp.asarray(counts), pad, m)
        assert np.asarray(t_start).tolist() == start, (counts, pad, m)
        assert np.asarray(t_kept).tolist() == kept, (counts, pad, m)
        assert dropped == int(counts.sum()) - sum(kept)
        assert used <= m and used % pad == 0
    # The NumPy reference (written from the semantics) keeps as many rows: R=2, E=4 (L=2),
    # padding 4, M=8, so rank 0's second expert loses rows.
    idx = np.array([[[0, 1], [0, 1], [0, 2]], [[1, 1], [0, 1], [1, 3]]], np.int32)
    plan = ref.plan(idx, np.array([3, 3]), 4, 4, 8)
    assert plan.dropped[0] > 0
    for d in range(2):
        counts = [int((idx == d * 2 + e).sum()) for e in range(2)]
        start, kept, dropped, _ = native.moe.compute_segments(counts, 4, 8)
        assert kept == plan.counts[d].tolist() and dropped == plan.dropped[d]
    for bm in (-5, 0, 3, 7, 99):
        assert native.moe.clamp_bound(bm, 7) == int(moe._clamp_bound_traced(jnp.int32(bm), 7)) == min(max(bm, 0), 7)


def test_bound_m_outside_int32_is_clamped():
    """bound_m is clamped to [0, T] as documented, whatever the Python integer (issue 9: 2**40
    raised OverflowError)."""
    case = Case(r=2, e=4, k=2, t=4, h=16)
    mesh = mesh_of(2)
    idx, w, _, x = case.inputs()
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        def run(bound_m):
            def body(x, i, w):
                ex, _, cnt = a2a.dispatch(x, i, w, bound_m=bound_m)
                return cnt, a2a.combine(ex, i, w, bound_m=bound_m, expert_counts=cnt)

            cnt, y = spmd(mesh, body)(stack(x.astype(BF16)), stack(idx), stack(w))
            return np.asarray(cnt), np.asarray(y, np.float32)

        full, empty = run(case.t), run(0)
        for big in (2 ** 40, np.int64(2 ** 40), 2 ** 31):
            got = run(big)
            np.testing.assert_array_equal(got[0], full[0])
            np.testing.assert_array_equal(got[1], full[1])
        for small in (-(2 ** 40), -1):
            got = run(small)
            np.testing.assert_array_equal(got[0], empty[0])
            np.testing.assert_array_equal(got[1], empty[1])
        assert full[0].sum() > 0 and not empty[0].any()


def test_quantize_fp8_saturates_infinities():
    """fp8 quantisation of non-finite input (docs/moe-ffi.md): amax over the finite values, so
    scales stay finite; +-inf become +-448 (+-448 * scale dequantised); NaN stays NaN; the other
    values of the block are quantised as if the non-finite ones were absent."""
    x = np.zeros((3, 8), np.float32)
    x[0] = [1, -2, np.inf, 3, 0.5, -np.inf, 0, 4]
    x[1] = [np.nan, 1, 2, 3, -4, 5, 6, 7]
    x[2] = [np.inf, -np.inf, np.inf, np.nan, np.inf, np.inf, np.inf, np.inf]
    for impl in (lambda v: moe.quantize_fp8(jnp.asarray(v), 4), lambda v: ref.quantize_fp8(v, 4)):
        q, s = impl(x)
        q, s = np.asarray(q).astype(np.float32), np.asarray(s)
        assert np.isfinite(s).all(), s
        # Row 0, block 0: finite amax 3 -> inf saturates to 448 = 448 * scale / scale.
        assert q[0, 2] == 448.0 and q[0, 5] == -448.0
        np.testing.assert_allclose(s[0], [3 / 448, 4 / 448], rtol=1e-6)
        assert np.isnan(q[1, 0]) and np.isfinite(q[1, 1:]).all()
        np.testing.assert_allclose(s[1], [3 / 448, 7 / 448], rtol=1e-6)
        # A block with no finite value but infinities: scale 1, infinities at +-448.
        assert s[2].tolist() == [1.0, 1.0] and q[2, 0] == 448.0 and q[2, 1] == -448.0
        assert np.isnan(q[2, 3])
    # Through dispatch (fp8 computed from f32 input): the same bits reach the expert rows.
    case = Case(r=2, e=4, k=2, t=4, h=64, fp8="computed", scale_block=32)
    mesh = mesh_of(2)
    idx, w, bm, xs = case.inputs()
    xs[0, 2, 5] = np.inf
    xs[1, 3, 40] = -np.inf
    with moe.AllToAll(case.config(), mesh, "ep") as a2a:
        ex, es, _ = spmd(mesh, lambda x, i, w: a2a.dispatch(x, i, w))(stack(xs), stack(idx), stack(w))
    es = np.asarray(es)
    assert np.isfinite(es).all()
    plan = ref.plan(idx, bm, case.e, case.pad, a2a.max_recv_tokens)
    want_q, want_s = ref.quantize_fp8(xs, case.scale_block)
    want_ex, want_es, _ = ref.dispatch(plan, want_q, want_s)
    np.testing.assert_array_equal(sc.bits(np.asarray(ex).reshape(want_ex.shape)), sc.bits(want_ex))
    np.testing.assert_array_equal(es.reshape(want_es.shape), want_es)
    assert (np.abs(np.asarray(ex).astype(np.float32)) == 448.0).sum() >= 2


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
    (dict(experts_per_token=9), ValueError, r"experts_per_token=9 exceeds num_experts=8"),
    (dict(hidden=2 ** 31), ValueError, r"hidden must be <= 2147483647, got 2147483648"),
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
    mesh2 = Mesh(np.array(CPU.devices()[:4]).reshape(2, 2), ("dp", "ep"))
    with pytest.raises(ValueError, match=r"other than 'ep' must have size 1.*'dp': 2"):
        moe.AllToAll(moe.AllToAllConfig(**CFG), mesh2, "ep")


def _good(fp8=False):
    t, k, h = CFG["max_tokens"], CFG["experts_per_token"], CFG["hidden"]
    return dict(x=jnp.zeros((t, h), jnp.float8_e4m3fn if fp8 else jnp.bfloat16),
                indices=jnp.zeros((t, k), jnp.int32), weights=jnp.zeros((t, k), jnp.float32),
                x_scale=jnp.ones((t, h // 16), jnp.float32) if fp8 else None)


@pytest.mark.parametrize("fp8, change, exc, match", [
    (False, dict(x=jnp.zeros((4, 16), jnp.bfloat16)), ValueError,
     r"AllToAll\.dispatch: x has shape \(4, 16\), expected \(4, 32\)"),
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
# Argument types and values (TypeError / ValueError, as in jax), settings.


@pytest.mark.parametrize("make, exc, match", [
    (lambda m, c: moe.AllToAll("cfg", m, "ep"), TypeError, r"AllToAll: cfg must be AllToAllConfig, got str"),
    (lambda m, c: moe.AllToAll(c, "mesh", "ep"), TypeError, r"AllToAll: mesh must be Mesh, got str"),
    (lambda m, c: moe.AllToAll(c, m, 0), TypeError, r"AllToAll: axis_name must be str, got int"),
    (lambda m, c: moe.AllToAll(c, m, "ep", timeout="5"), TypeError,
     r"AllToAll: timeout must be a number, got str '5'"),
    (lambda m, c: moe.AllToAll(c, m, "ep", timeout=-1), ValueError,
     r"AllToAll: timeout must be a finite number > 0, got -1.0"),
    (lambda m, c: moe.RaggedAllToAll(None, m, "ep"), TypeError,
     r"RaggedAllToAll: cfg must be AllToAllConfig, got NoneType"),
    (lambda m, c: moe.RaggedAllToAll(c, m, "ep", ragged_all_to_all=3), TypeError,
     r"ragged_all_to_all must be callable, got int"),
    (lambda m, c: moe.quantize_fp8(jnp.zeros((2, 8)), 0), ValueError,
     r"quantize_fp8: scale_block must be >= 1, got 0"),
    (lambda m, c: moe.quantize_fp8(jnp.zeros((2, 8)), 2.0), TypeError,
     r"quantize_fp8: scale_block must be an integer, got float 2.0"),
    (lambda m, c: moe.quantize_fp8(jnp.zeros((8,)), 2), ValueError, r"must be 2-D"),
    (lambda m, c: moe.worst_case_recv_tokens(-1, 4, 2, 2, 1), ValueError,
     r"worst_case_recv_tokens: num_ranks must be >= 1, got -1"),
    (lambda m, c: c.local_experts(3), ValueError, r"num_experts=8 is not divisible by the number of ranks R=3"),
])
def test_bad_arguments_raise_type_or_value_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make(mesh_of(2), moe.AllToAllConfig(**CFG))


def test_timeout_setting_is_read_when_an_alltoall_is_made(monkeypatch):
    """AllToAll(timeout=None) bounds its waits by the setting moe_timeout_s
    (JAX_GARDEN_MOE_TIMEOUT_S), read when the AllToAll is created; a malformed value is a
    ValueError naming the variable."""
    mesh = mesh_of(2)
    g = _good()
    monkeypatch.setenv("JAX_GARDEN_MOE_TIMEOUT_S", "zero")
    with pytest.raises(ValueError, match=r"JAX_GARDEN_MOE_TIMEOUT_S='zero' is not valid"):
        moe.AllToAll(moe.AllToAllConfig(**CFG), mesh, "ep")
    monkeypatch.setenv("JAX_GARDEN_MOE_TIMEOUT_S", "0.25")
    a2a = moe.AllToAll(moe.AllToAllConfig(**CFG), mesh, "ep")
    monkeypatch.delenv("JAX_GARDEN_MOE_TIMEOUT_S")

    def only_rank0(_):
        me = jax.lax.axis_index("ep")
        return jax.lax.cond(me == 0, lambda: a2a.dispatch(g["x"], g["indices"], g["weights"])[2],
                            lambda: jax.lax.pcast(jnp.zeros((4,), jnp.int32), "ep", to="varying"))

    with pytest.raises(jax.errors.JaxRuntimeError, match=r"timed out after 0.25 s"):
        jax.block_until_ready(spmd(mesh, only_rank0)(jnp.zeros((2,))))
    a2a.close()
    _healthy_round_trip_on(2)


def test_cuda_graphs_setting_is_read_per_call(monkeypatch):
    """The CUDA targets exist twice (with and without the command-buffer trait); AllToAll picks
    per call from the setting moe_cuda_graphs. The CPU targets have one name."""
    with moe.AllToAll(moe.AllToAllConfig(**CFG), mesh_of(2), "ep") as a2a:
        monkeypatch.setenv("JAX_GARDEN_MOE_CUDA_GRAPHS", "0")
        assert a2a._target("jg_moe_dispatch_send") == "jg_moe_dispatch_send"  # CPU: one target
        monkeypatch.setattr(a2a, "platform", "cuda")
        assert a2a._target("jg_moe_combine_recv") == "jg_moe_combine_recv_no_cuda_graph"
        monkeypatch.setenv("JAX_GARDEN_MOE_CUDA_GRAPHS", "1")
        assert a2a._target("jg_moe_combine_recv") == "jg_moe_combine_recv"
        monkeypatch.delenv("JAX_GARDEN_MOE_CUDA_GRAPHS")
        assert a2a._target("jg_moe_dispatch_recv") == "jg_moe_dispatch_recv"  # default: graphs on
    from jax_garden import _ffi

    if _ffi.built_with_cuda():
        cuda = set(_ffi.registered_targets()["CUDA"])
        for op in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv"):
            assert {f"jg_moe_{op}", f"jg_moe_{op}_no_cuda_graph"} <= cuda


def test_device_error_codes_come_from_the_native_enum():
    """The CUDA kernels' error codes are exported by the bindings (no copy in Python): timeouts
    are told apart by the native predicate, and the messages name the values."""
    from jax_garden import _moe_cuda

    codes = native.moe.DeviceError
    timeouts = {c for c in codes if native.moe.is_timeout_error(c)}
    assert timeouts == {codes.TIMEOUT_DISPATCH_DATA, codes.TIMEOUT_DISPATCH_FREE,
                        codes.TIMEOUT_COMBINE_DATA, codes.TIMEOUT_COMBINE_FREE,
                        codes.PEER_TIMED_OUT}  # a timeout in another node group, through the host proxy
    msg = native.moe.device_error_message(codes.MALFORMED_MESSAGE, 2, 3, 0, 999)
    assert msg.startswith("moe (CUDA): rank 0 received a malformed message from rank 2: its token count is 999")
    msg = native.moe.device_error_message(codes.COUNTS_MISMATCH, 3, 7, 1, 5)
    assert msg.startswith("moe (CUDA): combine_send on rank 1: expert_counts[3] = 7 but the last "
                          "dispatch received 5 rows")

    class FakeNative:  # what CudaContext reads of the native context
        id = 1

        def __init__(self, code):
            self.code = code

        def error(self):
            return int(self.code), native.moe.device_error_message(self.code, 1, 2, 0, 0)

        def close(self):
            pass

    for code, exc in ((codes.TIMEOUT_COMBINE_DATA, _moe_cuda.MoeTimeoutError),
                      (codes.PHASE_ORDER, _moe_cuda.MoeDeviceError)):
        ctx = _moe_cuda.CudaContext(FakeNative(code), {}, 2, 0, False, "")
        with pytest.raises(exc) as info:
            ctx.check()
        assert type(info.value) is exc and isinstance(info.value, moe.MoeDeviceError)
        assert ctx.error() == (code, FakeNative(code).error()[1])
        ctx.close()
    ok = _moe_cuda.CudaContext(FakeNative(codes.NONE), {}, 2, 0, False, "")
    ok.check()
    assert ok.error() == (codes.NONE, native.moe.device_error_message(0, 1, 2, 0, 0))
    ok.close()


# ---------------------------------------------------------------------------------------------
# Errors at run time: clear messages, never a hang; other contexts keep working.


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
    with pytest.raises(moe.MoeTimeoutError, match=r"timed out after 0.5 s waiting for dispatch_send"):
        a2a.check()
    a2a.close()
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
    mesh = mesh_of(2)
    got, want, _ = sc.round_trip(CPU, case, mesh, a2a)
    sc.assert_no_errors(sc.compare(got, want))
    a2a.close()
    a2a.close()  # idempotent
    assert native.moe.live_cpu_contexts() == live
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=rf"no live CPU AllToAll context with id {a2a.context_id}"):
        sc.round_trip(CPU, case, mesh, a2a)
    _healthy_round_trip_on(2)


# ---------------------------------------------------------------------------------------------
# RaggedAllToAll on XLA:CPU's own ragged_all_to_all (tests/test_moe.py uses the emulation).


def test_ragged_on_xla_cpu():
    """Uses the real jax.lax.ragged_all_to_all when XLA:CPU has it (it had not in jax 0.11.2)."""
    try:
        case = sc.CPU_RAGGED_CASES["R2"]
        mesh = mesh_of(case.r)
        rag = moe.RaggedAllToAll(case.config(), mesh, "ep")  # jax.lax.ragged_all_to_all itself
        got, want, _ = sc.round_trip(CPU, case, mesh, rag)
    except jax.errors.JaxRuntimeError as e:
        if "ragged-all-to-all" in str(e) and "not supported" in str(e):
            pytest.skip(f"XLA:CPU lacks ragged_all_to_all: {str(e).splitlines()[0]}")
        raise
    sc.assert_no_errors(sc.compare(got, want))


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
