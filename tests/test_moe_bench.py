"""The MoE benchmark's own logic, on CPU (the GPU runs are .ci/gpu_verify.sh's): the NumPy oracle it
checks every rung against (jax_garden/bench/_moe_oracle.py) equals the test suite's reference; the
period / slowest / fastest statistics from device stamps; the headline and the goals of the ladder
and the profile; the plot; the --nodes GPU summary (the proxy's added time over engine writes)."""

from __future__ import annotations

import numpy as np
import pytest

import moe_reference as ref


@pytest.mark.parametrize("case", [
    ref.Case(r=2, e=8, k=2),
    ref.Case(r=4, e=16, k=3, pad=16, bound="mixed", routing="invalid"),
    ref.Case(r=2, e=4, k=3, pad=4, m=16, routing="skewed"),   # capacity drops
    ref.Case(r=4, e=8, k=4, routing="duplicates", bound="mixed"),
    ref.Case(r=1, e=8, k=8, t=3),
])
def test_oracle_equals_the_reference(case):
    from jax_garden.bench import _moe_oracle as oracle

    idx, w, bm, x = case.inputs()
    p = ref.plan(idx, bm, case.e, case.pad, case.m)
    row, dest, counts = oracle.plan(idx, bm, case.e, case.pad, p.max_recv_tokens)
    assert np.array_equal(row, p.row) and np.array_equal(counts, p.counts)
    assert np.array_equal(dest[row >= 0], p.dest[row >= 0])
    xb = x.astype(ref.ml_dtypes.bfloat16)
    want_ex, _, _ = ref.dispatch(p, xb)
    got_ex = oracle.dispatch(row, dest, xb, p.max_recv_tokens)
    assert np.array_equal(got_ex.view(np.uint16), want_ex.view(np.uint16))
    ey = np.random.default_rng(3).normal(size=want_ex.shape).astype(ref.ml_dtypes.bfloat16)
    assert np.array_equal(oracle.combine(row, dest, ey, w).view(np.uint16), ref.combine(p, ey, w).view(np.uint16))


def _stamps(iters, start0, gap, durations):
    """[iters, 4, 2] stamps: pair i starts at start0 + i*gap; kernels back to back."""
    s = np.zeros((iters, 4, 2), np.int64)
    for i in range(iters):
        t = start0 + i * gap
        for k, d in enumerate(durations):
            s[i, k] = (t, t + d)
            t += d + 100
    return s


def test_period_and_slowest_fastest_rank_from_stamps():
    from jax_garden.bench import moe_ladder

    stamps = {0: _stamps(30, 1_000_000, 40_000, [3000, 4000, 2000, 5000]),
              1: _stamps(30, 1_000_500, 40_000, [6000, 4000, 2000, 5000])}
    rows = moe_ladder.stamps_rows(stamps)
    assert rows["period"]["p50_us"] == pytest.approx(40.0)
    assert rows["period"]["n"] == 2 * (30 - moe_ladder.DROP - 1)
    # dispatch = dispatch_recv end - dispatch_send start = d0 + 100 + d1
    assert rows["dispatch"]["slowest_rank_us"] == pytest.approx(10.1)
    assert rows["dispatch"]["fastest_rank_us"] == pytest.approx(7.1)
    assert rows["combine"]["slowest_rank_us"] == rows["combine"]["fastest_rank_us"] == pytest.approx(7.1)
    assert rows["dispatch_send"]["n"] == 2 * (30 - moe_ladder.DROP)
    with pytest.raises(RuntimeError, match="missing device timestamps"):
        moe_ladder.stamps_rows({0: np.zeros((30, 4, 2), np.int64)})


def _row(shape, tokens, disp, comb, variant=None, period=None, errors=()):
    ph = {k: {"p50_us": v, "p99_us": v, "n": 10, "slowest_rank_us": v, "fastest_rank_us": v}
          for k, v in (("dispatch", disp), ("combine", comb), ("period", period or disp + comb))}
    for k in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv"):
        ph[k] = {"p50_us": 1.0, "p99_us": 1.0, "n": 10}
    row = {"shape": shape, "tokens": tokens, "dtype": "bf16", "ranks": 1, "phases": ph, "oracle_errors": list(errors)}
    if variant is not None:
        row["variant_name"] = variant
    return row


def test_ladder_and_profile_headline_and_goals(tmp_path, capsys):
    from jax_garden.bench import moe as bench_moe
    from jax_garden.bench import moe_ladder

    old, new = moe_ladder.OLD, moe_ladder.NEW
    result = {"ladder": [_row("256x8", 1, 6.0, 7.0), _row("256x8", 128, 11.0, 13.0),
                         _row("384x6", 128, 12.0, 14.0, errors=["oracle: rank 0 ex differs"])],
              "profile": [_row("256x8", 1, 17.0, 18.0, old), _row("256x8", 1, 6.0, 7.0, new),
                          _row("256x8", 1, 12.0, 13.0, "arrive-split"),
                          _row("256x8", 128, 22.0, 25.0, old), _row("256x8", 128, 9.5, 12.5, new)],
              "kernel_floor": {"graph": {"p50_us": 1.5, "command_buffers": {"moe_calls": 4, "in_command_buffers": 4}},
                               "host": {"p50_us": 5.0}},
              "baselines": [], "ranks": 1, "device": "test"}
    result["profile"][1]["kernels"] = {"dispatch_send": {"gap": 1.0, "launch to launch": 3.25, "total": 2.0}}
    h = bench_moe.summarize_ladder(result)
    assert h["ladder 256x8 bf16 EP1 128tok period_us"] == 24.0
    assert h["ladder oracle ok"] is False
    # old/new: the previous version's synchronisation against the default (not the split variant)
    assert h["profile EP1 1tok dispatch old/new"] == pytest.approx(17.0 / 6.0)
    assert h["profile EP1 1tok dispatch_us"] == 6.0
    assert h["goal EP1 128tok dispatch <= 10us"] is True and h["goal EP1 128tok combine <= 12us"] is False
    assert h["goal EP1 1tok <= 8us per phase"] is True
    assert h["empty kernel floor graph_us"] == 1.5 and h["empty kernel floor host_us"] == 5.0
    bench_moe.print_ladder(result)
    out = capsys.readouterr().out
    assert "1.50 us launch to launch in a CUDA graph (4/4 calls in command buffers)" in out
    # the kernel table: launch to launch 3.25 against the 1.5 floor
    line = next(x for x in out.splitlines() if x.startswith(new) and "dispatch_send" in x)
    assert line.split()[3:6] == ["1.0", "3.2", "1.8"]
    png = moe_ladder.plot(result, str(tmp_path / "ladder.png"))
    assert png is not None and (tmp_path / "ladder.png").stat().st_size > 1000


def _kernel_stamps(iters, entry0, period, kernels):
    """{stamp: [iters, 4]} of a chain whose pair i enters its first kernel at entry0 + i*period;
    kernels: per kernel (gap before it, prologue, wait, work, epilogue) in ns."""
    out = {name: np.zeros((iters, 4), np.int64) for name in ("start", "end", "entry", "waited", "body", "last")}
    for i in range(iters):
        t = entry0 + i * period
        for k, (gap, pro, wait, work, epi) in enumerate(kernels):
            if k > 0:
                t += gap
            out["entry"][i, k] = t
            out["start"][i, k] = t + pro
            out["waited"][i, k] = t + pro + wait
            out["body"][i, k] = t + pro + wait + work
            out["end"][i, k] = out["last"][i, k] = t + pro + wait + work + epi
            t = out["end"][i, k]
    return out


def test_kernel_breakdown_from_device_stamps():
    from jax_garden.bench import moe_ladder

    kernels = [(0, 500, 1000, 2000, 1500), (1400, 300, 200, 4000, 800), (1200, 300, 100, 1000, 700),
               (1300, 400, 300, 1500, 600)]
    one_pair = sum(sum(k) for k in kernels)
    rows = moe_ladder.kernel_rows({0: _kernel_stamps(30, 10_000, one_pair + 2500, kernels)})
    ds, dr = rows["dispatch_send"], rows["dispatch_recv"]
    assert (ds["prologue"], ds["wait"], ds["work"], ds["epilogue"], ds["total"]) == pytest.approx((0.5, 1.0, 2.0, 1.5, 5.0))
    assert ds["gap"] == pytest.approx(2.5)  # after the previous pair's combine_recv
    assert dr["gap"] == pytest.approx(1.4)
    assert dr["launch to launch"] == pytest.approx(5.0 + 1.4)
    assert rows["combine_recv"]["total"] == pytest.approx(2.8)
    with pytest.raises(RuntimeError, match="missing device timestamps"):
        moe_ladder.kernel_rows({0: {k: np.zeros((30, 4), np.int64) for k in ("start", "end", "entry")}})


def test_profile_variants_set_and_restore_the_settings(monkeypatch):
    """A variant's settings are in the environment while its AllToAll is created, and the caller's
    come back afterwards (a forced legacy sync is left alone by a variant that sets none)."""
    import os

    from jax_garden.bench import moe_ladder

    monkeypatch.setenv("JAX_GARDEN_MOE_LEGACY_SYNC", "1")
    monkeypatch.setenv("JAX_GARDEN_MOE_FUSED", "1")
    monkeypatch.delenv("JAX_GARDEN_MOE_SYNC", raising=False)
    env = ("JAX_GARDEN_MOE_SYNC", "JAX_GARDEN_MOE_FUSED", "JAX_GARDEN_MOE_COOPERATIVE", "JAX_GARDEN_MOE_LEGACY_SYNC")
    seen = moe_ladder._with_settings(moe_ladder.VARIANTS["fused-plain-launch"],
                                     lambda: {k: os.environ.get(k) for k in env})
    assert seen == {"JAX_GARDEN_MOE_SYNC": "arrive", "JAX_GARDEN_MOE_FUSED": "1",
                    "JAX_GARDEN_MOE_COOPERATIVE": "0", "JAX_GARDEN_MOE_LEGACY_SYNC": None}
    assert {k: os.environ.get(k) for k in env} == {"JAX_GARDEN_MOE_SYNC": None, "JAX_GARDEN_MOE_FUSED": "1",
                                                  "JAX_GARDEN_MOE_COOPERATIVE": None,
                                                  "JAX_GARDEN_MOE_LEGACY_SYNC": "1"}
    assert moe_ladder._with_settings({}, lambda: os.environ.get("JAX_GARDEN_MOE_LEGACY_SYNC")) == "1"
    assert moe_ladder.OLD in moe_ladder.VARIANTS and moe_ladder.NEW in moe_ladder.VARIANTS


def test_command_buffer_report_reads_optimized_hlo():
    from jax_garden.bench import moe_ladder

    hlo = """HloModule m
%command_buffer (p0: u32[2]) -> u32[2] {
  %p0 = u32[2]{0} parameter(0)
  ROOT %c = u32[2]{0} custom-call(%p0), custom_call_target="jg_moe_dispatch", api_version=API_VERSION_TYPED_FFI
}
%body (p: u32[2]) -> u32[2] {
  %p = u32[2]{0} parameter(0)
  %call = u32[2]{0} call(%p), to_apply=%command_buffer
  ROOT %c2 = u32[2]{0} custom-call(%call), custom_call_target="jg_moe_combine", api_version=API_VERSION_TYPED_FFI
}
"""
    assert moe_ladder.command_buffer_report(hlo) == {"moe_calls": 2, "in_command_buffers": 1,
                                                     "command_buffer_computations": 1}


def test_nodes_gpu_summary_reports_the_proxys_added_time():
    from jax_garden.bench import moe_nodes_gpu

    def row(impl, disp, comb):
        return {"impl": impl, "tokens": 128, "phases": {"dispatch": {"p50_us": disp}, "combine": {"p50_us": comb},
                                                       "period": {"p50_us": disp + comb}}}

    result = {"nodes": 2, "rows": [row("node groups (proxy, path auto)", 40.0, 60.0),
                                   row("one node (NVLink context, CUDA IPC)", 20.0, 30.0),
                                   row("engine writes (same bytes)", 30.0, 40.0)], "ratios": {}}
    h = moe_nodes_gpu.summarize(result)
    r = result["ratios"]["128"]
    assert r["dispatch_added_over_engine_writes_us"] == 10.0 and r["goal_dispatch_added_le_15us"] is True
    assert r["combine_added_over_engine_writes_us"] == 20.0 and r["goal_combine_added_le_15us"] is False
    assert r["dispatch_vs_one_node"] == 2.0
    assert h["nodes2 128tok period us"] == 100.0 and h["nodes oracle ok"] is True
