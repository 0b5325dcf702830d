"""The examples show what they claim: the serving example's TTFT columns add up to the TTFT and it says
its weights are random; the weight-push example shows the served model change with every version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(example: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-P", str(ROOT / "examples" / example), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.timeout(330)
def test_serving_table_adds_up_and_says_the_weights_are_random():
    r = _run("disaggregated_serving.py", "--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    header = next(line for line in r.stdout.splitlines() if "TTFT ms =" in line)
    assert header.split("=")[1].split("+") and "wait" in header, header
    num = r"\s*([\d.]+)\s*"
    row = re.compile(rf"^\s*(\d+)\s+(\d+){num}={num}\+{num}\+{num}\+{num}\+{num}$")
    rows = [m for line in r.stdout.splitlines() if (m := row.match(line))]
    assert len(rows) == 3, r.stdout  # --quick: 3 requests
    for m in rows:
        ttft, *parts = map(float, m.groups()[2:])
        # Each part is printed rounded (0.1 ms, tail 0.01 ms): the sum is off by at most their rounding.
        assert sum(parts) == pytest.approx(ttft, abs=0.3), m.group(0)
        assert all(p >= 0 for p in parts), m.group(0)
    assert "random weights" in r.stdout and "noise, not text" in r.stdout
    ids = [line for line in r.stdout.splitlines() if line.startswith("request ") and ": ok: " in line]
    assert len(ids) == 3 and all(re.fullmatch(r"request \d: ok: (\d+ ?)+", line) for line in ids), ids


@pytest.mark.timeout(330)
def test_weight_push_shows_the_served_model_change_per_version():
    r = _run("rl_weight_push.py", "--quick")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+((?:\d+ )+) \((\d+)/(\d+) follow")
    rows = [m for line in r.stdout.splitlines() if (m := row.match(line))]
    assert [int(m.group(1)) for m in rows] == [0, 1, 2], r.stdout  # version 0 = the initial weights
    trainer = [float(m.group(2)) for m in rows]
    served = [float(m.group(3)) for m in rows]
    tokens = [m.group(6).split() for m in rows]
    follow = [int(m.group(7)) for m in rows]
    assert trainer[0] > trainer[1] > trainer[2], trainer  # training works
    for t, s in zip(trainer, served):  # the served weights are the trained ones (fp8 MLP: close, not equal)
        assert s == pytest.approx(t, rel=0.05, abs=0.02), (trainer, served)
    assert tokens[-1] != tokens[0] and follow[-1] > follow[0], rows  # the served model changed behaviour
    assert "bf16 bitwise: ok" in r.stdout and "fp8 within bound: ok" in r.stdout
