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
    proc, result = _run_quick(tmp_path)
    assert result["benchmark"] == "fabric"
    assert result["errors"] == []

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
        # The two targets are reported (met or not) for every engine row they apply to.
        metrics = {(t["name"], t["metric"]) for t in result["targets"]}
        for name in ("engine d=1", "engine d=2"):
            assert (name, "p50 latency / raw") in metrics and (name, "bandwidth / raw") in metrics, result["targets"]
    else:
        assert any("engine rows skipped" in n for n in result["notes"])

    assert result["host"]["raw_fabric"]["provider"].startswith("tcp")
    assert "lat/raw" in proc.stdout and "write 4 KiB" in proc.stdout


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
