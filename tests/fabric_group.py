"""Runs a function in N spawned processes that each own a TransferEngine, after exchanging every
rank's address and region descriptor through the parent. Children are always reaped: on failure or
timeout the parent kills what is left."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import tempfile
import time
import traceback
from typing import Any, Callable

CHILD_TIMEOUT = 120.0


def gpu_count() -> int:
    """CUDA GPUs this build and machine can use (0 without a CUDA build or a GPU). Asks the native
    runtime, not jax, so that test collection initialises no backend. Only the test process asks
    CUDA (a spawned child imports its test module to find its worker, and need not start CUDA for
    that); children read the count their parent left in the environment."""
    # (While a spawned child unpickles its target, parent_process() is still None; its name is set.)
    if mp.current_process().name != "MainProcess" or mp.parent_process() is not None:
        return int(os.environ.get("JAX_GARDEN_TEST_NGPU", "0"))
    try:
        from jax_garden._jax_garden import fabric as native
    except Exception:  # noqa: BLE001 - no extension: no GPUs
        return 0
    n = native.gpu_device_count() if native.gpu_available() else 0
    os.environ["JAX_GARDEN_TEST_NGPU"] = str(n)
    return n


def use_gpu(index: int) -> None:
    """Choose the GPU this process's JAX uses (``index`` modulo the GPUs there are: on a one-GPU
    machine every process shares GPU 0), keeping every GPU visible to CUDA, so that the engine can
    map other processes' memory on any of them (the process model: never CUDA_VISIBLE_DEVICES).
    Call before the first use of jax in the process."""
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # processes share the GPUs
    os.environ.pop("XLA_FLAGS", None)
    os.environ.pop("JAX_PLATFORMS", None)
    import jax

    jax.config.update("jax_cuda_visible_devices", str(index % max(1, gpu_count())))


def _entry(fn: Callable, rank: int, size: int, board: Any, inbox: Any, results: Any, args: tuple) -> None:
    try:
        def exchange(info: Any) -> list:
            board.put((rank, info))
            return inbox.get(timeout=CHILD_TIMEOUT)

        out = fn(rank, size, exchange, *args)
        results.put((rank, "ok", out))
    except BaseException as e:  # report everything, including assertion failures
        results.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def run_group(fn: Callable, size: int, *args: Any, timeout: float = 90.0, exchanges: int = 1,
              expect_dead: set[int] | None = None, on_started: Callable | None = None) -> dict[int, Any]:
    """fn(rank, size, exchange, *args) -> result. `exchange(info)` returns the list of every rank's
    info (a barrier); call it exactly `exchanges` times. Returns {rank: result}; raises if any rank
    failed (ranks in expect_dead may vanish)."""
    ctx = mp.get_context("spawn")
    board, results = ctx.Queue(), ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(size)]
    procs = [ctx.Process(target=_entry, args=(fn, r, size, board, inboxes[r], results, args), daemon=True)
             for r in range(size)]
    for p in procs:
        p.start()
    finished = False
    early: list = []  # results that came while the parent waited for an exchange

    def board_get() -> tuple[int, Any]:
        # A rank that fails before its next exchange never posts to the board: look at the results
        # too, so that its error is raised at once instead of a timeout naming nothing.
        deadline = time.monotonic() + timeout
        while True:
            try:
                return board.get(timeout=0.2)
            except queue.Empty:
                pass
            try:
                rank, status, value = results.get_nowait()
            except queue.Empty:
                rank = None
            if rank is not None:
                if status == "error" and rank not in (expect_dead or ()):
                    raise AssertionError(f"rank {rank} failed before exchange: {value}")
                early.append((rank, status, value))
            if time.monotonic() > deadline:
                raise TimeoutError(f"exchange: not every rank posted within {timeout} s "
                                   f"(finished early: {sorted(r for r, _, _ in early)})")

    try:
        for _ in range(exchanges):
            infos: list[Any] = [None] * size
            for _ in range(size):
                rank, info = board_get()
                infos[rank] = info
            for box in inboxes:
                box.put(infos)
            if on_started is not None:
                on_started(procs)
                on_started = None
        out: dict[int, Any] = {}
        errors = []
        alive_needed = size - len(expect_dead or ())
        while len(out) + len(errors) < alive_needed:
            try:
                rank, status, value = early.pop() if early else results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"ranks {sorted(set(range(size)) - set(out))} did not finish in {timeout} s")
            (out.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}: {value}"))
        if errors:
            raise AssertionError("\n".join(errors))
        finished = True
        return out
    finally:
        for p in procs:
            p.join(timeout=5 if finished else 0.5)  # after a failure the others wait for nothing
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that was free a moment ago (for a child to listen on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scripts(argvs: list[list[str]], env: dict, timeout: float) -> list[tuple[int, str]]:
    """Starts every command (each in its own process group, output captured), waits for all under
    one deadline, kills whatever is left (the whole group) and reaps it: (return code, output) per
    command, whatever happened."""
    procs, outs = [], []
    try:
        for argv in argvs:
            f = tempfile.TemporaryFile(mode="w+")
            outs.append(f)
            procs.append(subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
    results = []
    for p, f in zip(procs, outs):
        f.seek(0)
        results.append((p.returncode, f.read()))
        f.close()
    return results
