"""Set-up (.ci/setup.sh): it waits for the package manager's lock, bounded and saying who holds it
(.ci/wait_apt_lock.sh, checked here on a lock file of our own held the way apt holds its locks: an
fcntl lock), and a second run on a set-up checkout skips every step and says so."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WAIT = ROOT / ".ci" / "wait_apt_lock.sh"

HOLDER = """
import fcntl, sys, time
f = open(sys.argv[1], "w")
fcntl.lockf(f, fcntl.LOCK_EX)   # what apt and dpkg take on /var/lib/dpkg/lock-frontend
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""

needs_lslocks = pytest.mark.skipif(shutil.which("lslocks") is None, reason="lslocks (util-linux) not installed")


def _hold(path: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def _wait(lock: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_GARDEN_APT_LOCKS=f"{lock}:{lock}.other")
    return subprocess.run(["bash", str(WAIT), *args], capture_output=True, text=True, timeout=timeout, env=env)


@needs_lslocks
def test_waits_for_the_lock_then_goes_on(tmp_path):
    lock = tmp_path / "lock-frontend"
    holder = _hold(lock, 3.0)
    try:
        t0 = time.monotonic()
        r = _wait(lock, "60")
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0, r.stderr
    assert waited >= 1.5, (waited, r.stdout)
    assert "waiting for the package manager's lock" in r.stdout and f"holds {lock}" in r.stdout, r.stdout
    assert f"(pid {holder.pid})" in r.stdout, r.stdout
    assert "lock is free after" in r.stdout


@needs_lslocks
def test_gives_up_after_its_bound_with_a_message(tmp_path):
    lock = tmp_path / "lock-frontend"
    holder = _hold(lock, 30.0)
    try:
        t0 = time.monotonic()
        r = _wait(lock, "2")
        took = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1
    assert took < 15, took
    assert "still busy after 2 s" in r.stderr and f"holds {lock}" in r.stderr, r.stderr
    assert "JAX_GARDEN_APT_LOCK_WAIT_S" in r.stderr


def test_a_free_lock_returns_at_once(tmp_path):
    lock = tmp_path / "lock-frontend"
    lock.write_text("")
    r = _wait(lock, "60")
    assert r.returncode == 0 and r.stdout == "", (r.stdout, r.stderr)


def test_bad_arguments(tmp_path):
    r = _wait(tmp_path / "x", "soon")
    assert r.returncode == 2 and "whole number" in r.stderr
    r = subprocess.run(["bash", str(ROOT / ".ci" / "setup.sh"), "everything"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and "usage: bash .ci/setup.sh [serve|test]" in r.stderr


def test_second_run_skips_every_step():
    """In a checkout set up by .ci/setup.sh (CI runs it before these tests), running it again installs
    and builds nothing, and says so."""
    venv = ROOT / ".venv"
    if venv.is_symlink() or not (venv / ".jax_garden-build").exists():
        pytest.skip("this checkout was not set up by .ci/setup.sh (e.g. a developer tree on a shared venv)")
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / ".ci" / "setup.sh"), "test"], capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert "system packages present" in r.stdout
    assert ".venv has jax 0.11.2" in r.stdout
    assert "jax_garden is up to date" in r.stdout and "not rebuilding" in r.stdout
    assert "installing" not in r.stdout and "building" not in r.stdout.replace("not rebuilding", "")
    assert "about a minute" not in r.stdout
    assert took < 120, took
