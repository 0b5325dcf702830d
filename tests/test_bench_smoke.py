"""Smoke test of `python -m jax_garden.bench fabric --quick`.

Checks that the benchmark runs end to end (engine, raw libfabric, TCP; two processes each) and that
its JSON holds every expected row with positive numbers. Timing is never a pass/fail condition here:
these machines are too noisy for thresholds, and the benchmark reports its ratios instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jax_garden

QUICK_WRITES = [4096, 65536, 1 << 20]
QUICK_PAGED = [(16384, 256), (65536, 128)]


def _run_quick(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "fabric.json"
    env = dict(os.environ)
    # The benchmark and its worker processes must import the jax_garden under test.
    env["PYTHONPATH"] = os.pathsep.join([str(Path(jax_garden.__file__).parent.parent),
                                         *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-P", "-m", "jax_garden.bench", "fabric", "--quick", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc, json.loads(out.read_text())


@pytest.mark.timeout(600)
def test_fabric_bench_quick(tmp_path):
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    proc, result = _run_quick(tmp_path, *(["--plot", str(tmp_path / "fig" / "fabric.png")] if has_matplotlib else []))
    assert result["benchmark"] == "fabric"
    assert result["errors"] == []
    if has_matplotlib:  # --plot: the figure of latency and bandwidth against size
        png = (tmp_path / "fig" / "fabric.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    has_engine = importlib.util.find_spec("jax_garden.fabric") is not None
    names = ["raw", "tcp"] + (["engine d=1", "engine d=2"] if has_engine else [])
    rows = {(r["name"], r["test"], r["size"], r.get("pages")): r for r in result["rows"]}
    expected = [("imm", 0, None)] + [("write", s, None) for s in QUICK_WRITES] + [("paged", p, n) for p, n in QUICK_PAGED]
    for name in names:
        for test, size, pages in expected:
            row = rows.get((name, test, size, pages))
            assert row is not None, f"missing row {name} {test} {size} {pages}; rows: {sorted(rows)}"
            assert row["p50_us"] > 0 and row["p99_us"] >= row["p50_us"], row
            if test == "imm":
                assert row["gbps"] is None, row
            else:
                assert row["gbps"] > 0, row
            if name.startswith("engine"):
                assert row["domains"] == int(name.split("=")[1])
                assert row["bw_vs_raw"] is None if test == "imm" else row["bw_vs_raw"] > 0, row
                assert row["bw_vs_tcp"] is None if test == "imm" else row["bw_vs_tcp"] > 0, row
                if test != "paged":
                    assert row["lat_vs_raw"] > 0 and row["lat_vs_tcp"] > 0, row

    if has_engine:
        # The C++-loop engine row: latency rows only, with ratios to both baselines.
        for test, size, pages in expected:
            row = rows[("engine c++", test, size, pages)]
            if test == "paged":
                assert row["p50_us"] is None, row
            else:
                assert row["p50_us"] > 0 and row["lat_vs_raw"] > 0 and row["lat_vs_tcp"] > 0, row
        # The targets are reported (met or not) for every engine row they apply to.
        metrics = {(t["name"], t["metric"]) for t in result["targets"]}
        for name in ("engine d=1", "engine d=2"):
            assert (name, "p50 latency / raw") in metrics and (name, "bandwidth / raw") in metrics, result["targets"]
            assert (name, "p99 / p50 latency") in metrics, result["targets"]
        # The ipc path on host memory (two engines, one process): every row, moved and checked.
        for test, size, pages in expected:
            row = rows[("ipc 1 proc", test, size, pages)]
            assert row["p50_us"] > 0 and (test == "imm" or row["gbps"] > 0), row
            if test != "paged":
                assert row["lat_vs_raw"] > 0, row
        assert result["headline"]["ipc 1 proc write 4 KiB p50 latency us"] > 0, result["headline"]
    else:
        assert any("engine rows skipped" in n for n in result["notes"])

    assert result["host"]["raw_fabric"]["provider"].startswith("tcp")
    assert "lat/raw" in proc.stdout and "write 4 KiB" in proc.stdout
    # The headline: every target's ratio, under its name, first in the file.
    assert next(iter(result)) == "headline"
    for t in result["targets"]:
        assert result["headline"][f"{t['name']} {t['row']} {t['metric']}"] == t["value"]
    if has_engine:
        assert any(k.startswith("engine d=1 paged") for k in result["headline"]), result["headline"]


@pytest.mark.timeout(120)
def test_fabric_bench_rejects_bad_options(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(jax_garden.__file__).parent.parent)
    for bad in (["--sizes", "4Q"], ["--paged", "16K"], ["--rounds", "0"], ["--systems", "rdma"]):
        proc = subprocess.run([sys.executable, "-P", "-m", "jax_garden.bench", "fabric", *bad, "--out",
                               str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60, env=env,
                              cwd=tmp_path)
        assert proc.returncode != 0, bad
        assert not (tmp_path / "x.json").exists()


def test_harness_statistics_table_and_json(tmp_path):
    """The shared benchmark harness: nearest-rank and interpolated percentiles (numpy's), medians
    that skip missing values, ratios, aligned tables, JSON with the headline first."""
    import numpy as np

    from jax_garden.bench import _harness as h

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        v = rng.random(n).tolist()
        for q in (0.0, 0.5, 0.99, 1.0):
            assert h.percentile(v, q, interpolate=True) == pytest.approx(np.percentile(v, 100 * q), rel=1e-12)
            assert h.percentile(v, q) == sorted(v)[max(0, int(np.ceil(q * n)) - 1)]
    assert np.isnan(h.percentile([], 0.5))
    assert h.median([3.0, None, 1.0, 2.0]) == 2.0 and h.median([None]) is None
    assert h.ratio(3.0, 2.0) == 1.5 and h.ratio(None, 2.0) is None and h.ratio(1.0, 0.0) is None
    lines = h.format_table([("name", 6, "<"), ("", 0, ""), ("x", 5, ">")], [["ab", "", "1.5"], ["abcdefgh", "", "22"]])
    assert lines == ["name        x", "-" * 13, "ab        1.5", "abcdefgh     22"]  # padded, never cut
    out = h.write_json(tmp_path / "sub" / "r.json", {"rows": [(1, 2)], "headline": {"old": 1}}, {"a x": 2.5})
    data = json.loads(out.read_text())
    assert list(data) == ["headline", "rows"] and data["headline"] == {"a x": 2.5} and data["rows"] == [[1, 2]]


def test_moe_bench_summary_from_rows():
    """bench moe's ratios and headline from one run's rows (the GPU run itself is in
    .ci/gpu_verify.sh): speedup = ragged p50 / native p50, bandwidth against the best peer copy."""
    from jax_garden.bench import moe as bench_moe

    def phases(scale, gbps):
        return {p: {"p50_us": scale * f, "p99_us": 2 * scale * f, "n": 8, "gbps_p50": gbps}
                for p, f in (("dispatch", 1.0), ("combine", 2.0), ("round_trip", 3.0))}

    result = {"rows": [{"impl": "native", "mode": "decode", "dtype": "bf16", "phases": phases(10.0, 120.0)},
                       {"impl": "ragged_all_to_all", "mode": "decode", "dtype": "bf16", "phases": phases(500.0, 3.0)},
                       {"impl": "native", "mode": "prefill", "dtype": "fp8", "phases": phases(100.0, 150.0)}],
              "peer_copy": {"pair_0_to_1": {"gbps": 200.0}, "all_to_all_egress_per_gpu": {"gbps_mean": 300.0}},
              "ratios": {}, "errors": []}
    headline = bench_moe.summarize(result)
    assert headline == {"decode bf16 round_trip_speedup_vs_ragged": 50.0,
                        "decode bf16 dispatch_bw_vs_peer_copy": 0.4, "decode bf16 combine_bw_vs_peer_copy": 0.4,
                        "prefill fp8 dispatch_bw_vs_peer_copy": 0.5, "prefill fp8 combine_bw_vs_peer_copy": 0.5}
    decode = result["ratios"]["decode bf16"]
    assert decode["dispatch_speedup_vs_ragged"] == 50.0 and decode["target_round_trip_30x_ragged"] is True
    assert decode["target_dispatch_le_30us"] is True and decode["target_combine_le_40us"] is True
    assert result["ratios"]["prefill fp8"]["target_dispatch_60pct_peer_copy"] is False


@pytest.mark.timeout(300)
def test_moe_nodes_bench_quick(tmp_path):
    """`python -m jax_garden.bench moe --nodes 2 --quick` (small rows): the inter-node rows, the tcp
    wire rows and the in-process rows of the same run are all there, with positive numbers, the
    engine bytes that the wire row replays, and the headline ratios."""
    out = tmp_path / "moe_nodes.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(jax_garden.__file__).parent.parent),
                                         *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-P", "-m", "jax_garden.bench", "moe", "--nodes", "2", "--quick", "--hidden", "512",
           "--experts", "16", "--top-k", "4", "--tokens", "32", "--iters", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["nodes"] == 2 and result["dtypes"] == ["bf16"]
    rows = {r["impl"]: r for r in result["rows"]}
    assert set(rows) == {"internode", "tcp wire", "engine wire", "in-process reference", "internode, one node"}, \
        rows.keys()
    net = rows["internode"]
    assert net["nodes"] == 2 and net["node_size"] == 1
    for phase in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv", "dispatch", "combine",
                  "round_trip"):
        st = net["phases"][phase]
        assert st["p50_us"] > 0 and st["p99_us"] >= st["p50_us"] and st["n"] == 8, (phase, st)
    # Each step writes one dispatch and one combine message to the other node (and acks).
    assert net["phases"]["dispatch_send"]["engine_bytes_per_step"] > 0
    assert net["phases"]["combine_send"]["engine_bytes_per_step"] > 0
    assert net["phases"]["dispatch_send"]["engine_ops_per_step"] == 1.0
    assert net["phases"]["dispatch_recv"]["engine_ops_per_step"] == 1.0  # the free ack
    assert rows["tcp wire"]["bytes_per_peer"]["dispatch"] == int(net["phases"]["dispatch_send"]["engine_bytes_per_step"])
    assert rows["tcp wire"]["phases"]["round_trip"]["p50_us"] > 0
    assert rows["engine wire"]["bytes_per_peer"] == rows["tcp wire"]["bytes_per_peer"]
    assert rows["engine wire"]["phases"]["round_trip"]["n"] == 8
    assert rows["in-process reference"]["wall_us_per_step"] > 0
    assert rows["internode, one node"]["phases"]["dispatch_send"]["engine_bytes_per_step"] == 0  # no engine
    ratios = result["ratios"]["bf16"]
    assert ratios["round_trip_vs_tcp_wire"] > 0 and ratios["step_vs_in_process_reference"] > 0
    assert ratios["round_trip_vs_engine_wire"] > 0 and ratios["engine_wire_vs_tcp_wire"] > 0
    assert next(iter(result)) == "headline" and "bf16 round_trip_vs_tcp_wire" in result["headline"]
    assert "tcp wire" in proc.stdout and "internode" in proc.stdout
