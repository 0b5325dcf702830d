"""Fabric benchmark: the TransferEngine against raw libfabric and a plain TCP stream, same run.

``python -m jax_garden.bench fabric [--sizes 4K,64K,1M,16M,256M] [--rounds 5] [--domains 1,2] ...``

Two processes on 127.0.0.1 per system: a client (the writer) and a server (the target). Systems:

* ``engine``  jax_garden.fabric.TransferEngine (provider tcp), once per ``--domains`` value and
              ``--completion`` mode (``delivery``: the engine's default, a write completes once
              placed at the target; rows marked ``tx``: ``completion="transmit"``);
* ``raw``     ``jax_garden/bin/raw_fabric_bench``: one endpoint, fi_writemsg + FI_REMOTE_CQ_DATA,
              busy-polled CQ (ffi/baselines/raw_fabric_bench.cc), with the same completion mode
              (``raw dc``: FI_DELIVERY_COMPLETE on every write; ``raw``: the provider's default);
* ``tcp``     a Python socket stream (sendall / recv_into into a preallocated buffer);
* ``ipc``     the engine's ipc path on host memory: two engines in ONE process (the ipc path takes
              host memory only within a process; across processes it is GPU memory), writes with
              ``path="ipc"``: memcpy on the caller's thread, imm delivered through the destination
              engine's shared-memory mailbox, no network. Same protocol with the answer written back
              the same way; one thread drives both ends, so a latency sample is the whole per-op host
              cost of the path (both directions' submit, delivery and take), halved. This is the CPU
              row of the ipc path's per-op cost: a regression there shows on any machine.

Every system runs the same plan with the same protocol:

* latency (``lat``): one write at a time; the target waits for its arrival (imm counter / remote
  CQ entry / full recv), then answers with an imm-only write (tcp: 8 bytes); a sample is post ->
  answer seen, with the write's local completion also reaped. Reported as **half the round trip**
  (p50 / p99, µs). The ``imm`` row is the same with no payload (write_imm / 0-byte write).
* bandwidth (``bw``): COUNT writes of SIZE, at most ``--window`` in flight; the target counts all
  arrivals and answers once; GB/s = COUNT*SIZE / (first post -> answer seen), 1 GB = 1e9 B.
* paged (``paged``): PAGES pages of PAGE bytes at random page slots on both sides (one imm per
  page); per op: post -> target saw every page and answered. Reported as op time p50 / p99 (µs,
  whole round trip) and GB/s from the p50 op time.

Rounds interleave the systems (rotating their order) and each number is the median over rounds
(the best round is kept too), because loopback on these VMs switches between a fast and a slow
state per process pair; on the 2-vCPU machines the state follows where the processes run (raw
libfabric with the target pinned to vCPU 1: fast; to vCPU 0: slow). ``--pin SERVER:CLIENT``
fixes the placement for every system, at the price of putting all of a process's threads (the
engine's worker included) on its CPUs.

Ratios are engine/raw (against the raw row of the same completion mode) and engine/tcp; the
headline also reports what delivery completion costs the engine (delivery / transmit). The targets (bandwidth >= 0.9x raw for writes
>= 1 MiB, latency <= 1.3x raw at 4 KiB) are reported, never enforced. The first op of each lat
and paged test is verified at sampled byte positions, so every system provably moves the bytes
it is timed on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jax_garden._interpreter import python_command
from jax_garden.bench import _plot, figures
from jax_garden.bench._harness import (BenchError, Child, Progress, child_env, description, median, percentile,
                                       print_table, ratio, write_json)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

IMM_DATA = 0x1D47A
IMM_ACK = 0xAC4
_ACK = struct.pack("<Q", IMM_ACK)

DEFAULT_SIZES = "4K,64K,1M,16M,256M"
DEFAULT_PAGED = "16K:4096,64K:2048"


# ---------------------------------------------------------------------------------------- plan


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": KiB, "M": MiB, "G": GiB}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "KMG" else t
    try:
        value = int(digits) * mult
    except ValueError:
        raise ValueError(f"bad size {text!r}: expected e.g. 4096, 4K, 1M, 256M") from None
    if value <= 0:
        raise ValueError(f"bad size {text!r}: must be > 0")
    return value


def parse_paged(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        page, sep, count = item.partition(":")
        if not sep or not count.isdigit() or int(count) <= 0:
            raise ValueError(f"bad paged spec {item!r}: expected PAGE:COUNT, e.g. 16K:4096")
        out.append((parse_size(page), int(count)))
    return out


def fmt_size(n: int) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def build_plan(sizes: list[int], paged: list[tuple[int, int]], iters: int, bw_bytes: int, paged_iters: int,
               window: int) -> list[dict]:
    """The test list all systems run, in order. Iteration counts shrink with size (bounded bytes)."""
    plan: list[dict] = [{"kind": "lat", "size": 0, "iters": iters, "warmup": max(1, min(20, iters // 10))}]
    for s in sizes:
        n = max(5, min(iters, (512 * MiB) // s))
        plan.append({"kind": "lat", "size": s, "iters": n, "warmup": max(1, min(20, n // 10))})
    for s in sizes:
        plan.append({"kind": "bw", "size": s, "count": max(4, min(20000, bw_bytes // s)), "window": window})
    for page, pages in paged:
        plan.append({"kind": "paged", "page": page, "pages": pages, "iters": paged_iters, "window": window})
    return plan


def plan_buffer_bytes(plan: list[dict]) -> int:
    n = 4096
    for t in plan:
        n = max(n, 2 * t["page"] * t["pages"] if t["kind"] == "paged" else t["size"])
    return n


def raw_plan_string(plan: list[dict]) -> str:
    items = []
    for t in plan:
        if t["kind"] == "lat":
            items.append(f"lat:{t['size']}:{t['iters']}:{t['warmup']}")
        elif t["kind"] == "bw":
            items.append(f"bw:{t['size']}:{t['count']}:{t['window']}")
        else:
            items.append(f"paged:{t['page']}:{t['pages']}:{t['iters']}:{t['window']}")
    return ";".join(items)


def page_slots(pages: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PAGES distinct slots out of 2*PAGES on each side: scattered like KV-cache pages."""
    rng = np.random.default_rng(seed)
    return (rng.permutation(2 * pages)[:pages].astype(np.uint32), rng.permutation(2 * pages)[:pages].astype(np.uint32))


# ------------------------------------------------------------------------------ data pattern
# 64-bit word w holds mix(w) (the same mix as raw_fabric_bench); targets check sampled bytes.

_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(w: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = w.astype(np.uint64) + _M1
        x = (x ^ (x >> np.uint64(30))) * _M2
        x = (x ^ (x >> np.uint64(27))) * _M3
        return x ^ (x >> np.uint64(31))


def fill_pattern(buf: np.ndarray) -> None:
    words = buf.size // 8
    chunk = 8 * MiB  # words per step: bounded temporaries
    w = buf[: words * 8].view(np.uint64)
    for start in range(0, words, chunk):
        w[start : start + chunk] = _mix(np.arange(start, min(words, start + chunk), dtype=np.uint64))
    tail = np.arange(words * 8, buf.size, dtype=np.uint64)
    buf[words * 8 :] = pattern_bytes(tail)


def pattern_bytes(pos: np.ndarray) -> np.ndarray:
    pos = pos.astype(np.uint64)
    return ((_mix(pos >> np.uint64(3)) >> (np.uint64(8) * (pos & np.uint64(7)))) & np.uint64(0xFF)).astype(np.uint8)


def check_bytes(buf: np.ndarray, dst_off: np.ndarray | int, src_off: np.ndarray | int, n: int, what: str) -> None:
    """Checks buf[dst_off + i] == pattern(src_off + i) at sampled i (offsets may be arrays of pages)."""
    if n == 0:
        return
    idx = np.unique(np.concatenate([np.arange(0, n, 4093, dtype=np.uint64), np.array([n - 1], np.uint64)]))
    dst = (np.asarray(dst_off, np.uint64).reshape(-1, 1) + idx).ravel()
    src = (np.asarray(src_off, np.uint64).reshape(-1, 1) + idx).ravel()
    got, want = buf[dst.astype(np.int64)], pattern_bytes(src)
    bad = np.nonzero(got != want)[0]
    if bad.size:
        i = int(bad[0])
        raise RuntimeError(f"{what}: data mismatch at destination byte {int(dst[i])}: got {int(got[i]):#04x}, "
                           f"expected {int(want[i]):#04x} ({bad.size} of {dst.size} sampled bytes wrong)")


# --------------------------------------------------------------------------- control channel


class Control:
    """Length-prefixed messages and barriers between the two workers (never inside timed loops)."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(struct.pack("<I", len(payload)) + payload)

    def recv(self) -> bytes:
        (n,) = struct.unpack("<I", self._exact(4))
        return self._exact(n)

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"control channel closed by the peer ({len(out)} of {n} bytes)")
            out += chunk
        return bytes(out)

    def barrier(self) -> None:
        self.sock.sendall(b"\xb7")
        got = self._exact(1)
        if got != b"\xb7":
            raise ConnectionError(f"control channel: barrier byte {got!r}, expected b'\\xb7'")


def _listen_and_announce(timeout: float) -> socket.socket:
    ls = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"event": "listening", "port": ls.getsockname()[1]}), flush=True)
    ls.settimeout(timeout)
    conn, _ = ls.accept()
    ls.close()
    return conn


def _set_kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    # Blocking socket with kernel-side timeouts: no poll() before every recv (what settimeout adds),
    # so the stream is timed as a plain blocking socket user would see it, yet never hangs.
    sock.settimeout(None)
    tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


# ------------------------------------------------------------------------------ TCP baseline

_IOV_MAX = 1024


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"tcp: peer closed the stream after {got} of {n} bytes")
        got += k


def _vec_io(op: Callable[[list[memoryview]], int], views: list[memoryview], what: str) -> None:
    """Runs sendmsg / recvmsg_into over a list of buffers (IOV_MAX at a time), resuming partial I/O."""
    i, off = 0, 0
    while i < len(views):
        batch = [views[i][off:]] + views[i + 1 : i + _IOV_MAX]
        moved = op(batch)
        if moved == 0:
            raise ConnectionError(f"tcp: peer closed the stream during {what}")
        while moved > 0:
            rest = len(views[i]) - off
            if moved >= rest:
                moved -= rest
                i, off = i + 1, 0
            else:
                off += moved
                moved = 0


def _tcp_worker(role: str, plan: list[dict], ctl: Control, timeout: float, seed: int) -> None:
    sock = ctl.sock
    _set_kernel_timeouts(sock, timeout)
    buf = np.zeros(plan_buffer_bytes(plan), np.uint8)
    mv = memoryview(buf)
    ack = bytearray(8)
    ackv = memoryview(ack)
    imm_only = memoryview(bytearray(_ACK))
    if role == "client":
        fill_pattern(buf)
    for ti, t in enumerate(plan):
        if role == "server":
            buf[: 2 * t["page"] * t["pages"] if t["kind"] == "paged" else t["size"]] = 0
        ctl.barrier()
        if t["kind"] == "lat":
            size = t["size"]
            payload = mv[:size] if size else imm_only  # a stream needs some byte to carry "imm only"
            if role == "client":
                samples = []
                for i in range(t["warmup"] + t["iters"]):
                    t0 = time.perf_counter_ns()
                    sock.sendall(payload)
                    _recv_exact(sock, ackv)
                    t1 = time.perf_counter_ns()
                    if i >= t["warmup"]:
                        samples.append(t1 - t0)
                _emit({"kind": "lat", "size": size, "iters": t["iters"], "rtt_ns": samples})
            else:
                into = mv[:size] if size else memoryview(bytearray(8))
                for i in range(t["warmup"] + t["iters"]):
                    _recv_exact(sock, into)
                    sock.sendall(_ACK)
                    if i == 0:
                        check_bytes(buf, 0, 0, size, "tcp lat")
        elif t["kind"] == "bw":
            size, count = t["size"], t["count"]
            if role == "client":
                payload = mv[:size]
                t0 = time.perf_counter_ns()
                for _ in range(count):
                    sock.sendall(payload)
                _recv_exact(sock, ackv)
                t1 = time.perf_counter_ns()
                _emit({"kind": "bw", "size": size, "count": count, "window": t["window"], "elapsed_ns": t1 - t0})
            else:
                into = mv[:size]
                for _ in range(count):
                    _recv_exact(sock, into)
                sock.sendall(_ACK)
        else:
            page, pages = t["page"], t["pages"]
            src, dst = page_slots(pages, seed + ti)
            if role == "client":
                views = [mv[int(s) * page : (int(s) + 1) * page] for s in src]
                def one_op() -> None:
                    _vec_io(sock.sendmsg, views, "paged send")
                    _recv_exact(sock, ackv)

                _time_paged_ops(t, one_op, ctl)
            else:
                views = [mv[int(d) * page : (int(d) + 1) * page] for d in dst]
                recv = lambda b: sock.recvmsg_into(b)[0]  # noqa: E731
                for it in range(t["iters"] + 1):
                    _vec_io(recv, views, "paged recv")
                    sock.sendall(_ACK)
                    if it == 0:
                        check_bytes(buf, dst.astype(np.uint64) * page, src.astype(np.uint64) * page, page, "tcp paged")
                        ctl.barrier()
    ctl.barrier()


# ----------------------------------------------------------------------------- engine worker


def _engine_worker(role: str, plan: list[dict], ctl: Control, timeout: float, seed: int, domains: int,
                   completion: str = "delivery",
                   cxx_loop: bool = False) -> None:
    """The engine's side of every test. cxx_loop: latency tests only, driven by the engine's C++
    ping-pong loop (same protocol, no Python per iteration) to separate the engine's own cost from
    the Python call path; the other tests are left to the Python rows."""
    from jax_garden import fabric

    buf = np.zeros(plan_buffer_bytes(plan), np.uint8)
    if role == "client":
        fill_pattern(buf)
    with fabric.TransferEngine(provider="tcp", domains=domains, completion=completion) as eng:
        region = eng.register(buf)
        ctl.send(bytes(region.descriptor))
        peer = fabric.MemoryDescriptor.from_bytes(ctl.recv())
        # Expected arrivals per op from the one accounting function, with the writer's domain count.
        per_write = {t["size"]: fabric.imm_writes("write", domains=domains, length=t["size"])
                     for t in plan if t["kind"] in ("lat", "bw") and t["size"]}
        per_write[0] = fabric.imm_writes("imm", domains=domains)
        counter = eng.imm_counter(IMM_ACK if role == "client" else IMM_DATA)
        if role == "client":
            _emit({"event": "engine", "provider": eng.provider, "domains": eng.num_domains,
                   "split_threshold": eng.split_threshold})
        for ti, t in enumerate(plan):
            if role == "server":
                buf[: 2 * t["page"] * t["pages"] if t["kind"] == "paged" else t["size"]] = 0
            ctl.barrier()
            if cxx_loop:
                if t["kind"] == "lat":
                    rtt = eng._native.ping_pong(region._native, peer, t["size"], IMM_DATA, IMM_ACK, t["warmup"],
                                                t["iters"], role == "client", float(timeout))
                    if role == "client":
                        _emit({"kind": "lat", "size": t["size"], "iters": t["iters"], "rtt_ns": list(rtt)})
                    elif t["size"]:
                        check_bytes(buf, 0, 0, t["size"], "engine c++ lat")
                continue
            if t["kind"] == "lat":
                size = t["size"]
                if role == "client":
                    samples = []
                    for i in range(t["warmup"] + t["iters"]):
                        t0 = time.perf_counter_ns()
                        if size:
                            tr = eng.write(region, peer, size, imm=IMM_DATA)
                        else:
                            tr = eng.write_imm(peer, IMM_DATA)
                        counter.wait(1, timeout=timeout)
                        tr.wait(timeout=timeout)
                        t1 = time.perf_counter_ns()
                        if i >= t["warmup"]:
                            samples.append(t1 - t0)
                    _emit({"kind": "lat", "size": size, "iters": t["iters"], "rtt_ns": samples})
                else:
                    need = per_write[size]
                    acks = []
                    for i in range(t["warmup"] + t["iters"]):
                        counter.wait(need, timeout=timeout)
                        acks.append(eng.write_imm(peer, IMM_ACK))
                        if i == 0:
                            check_bytes(buf, 0, 0, size, "engine lat")
                    for a in acks:
                        a.wait(timeout=timeout)
            elif t["kind"] == "bw":
                size, count, window = t["size"], t["count"], t["window"]
                if role == "client":
                    pending: list = []
                    head = 0
                    t0 = time.perf_counter_ns()
                    for _ in range(count):
                        if len(pending) - head >= window:
                            pending[head].wait(timeout=timeout)
                            head += 1
                        pending.append(eng.write(region, peer, size, imm=IMM_DATA))
                    counter.wait(1, timeout=timeout)
                    for tr in pending[head:]:
                        tr.wait(timeout=timeout)
                    t1 = time.perf_counter_ns()
                    _emit({"kind": "bw", "size": size, "count": count, "window": window, "elapsed_ns": t1 - t0})
                else:
                    counter.wait(count * per_write[size], timeout=timeout + 60)
                    eng.write_imm(peer, IMM_ACK).wait(timeout=timeout)
            else:
                page, pages = t["page"], t["pages"]
                src, dst = page_slots(pages, seed + ti)
                if role == "client":
                    def one_op() -> None:
                        tr = eng.write_paged(region, peer, page, src, dst, page, page, imm=IMM_DATA)
                        counter.wait(1, timeout=timeout)
                        tr.wait(timeout=timeout)

                    _time_paged_ops(t, one_op, ctl)
                else:
                    need = fabric.imm_writes("paged", domains=domains, pages=pages)
                    for it in range(t["iters"] + 1):
                        counter.wait(need, timeout=timeout)
                        eng.write_imm(peer, IMM_ACK).wait(timeout=timeout)
                        if it == 0:
                            check_bytes(buf, dst.astype(np.uint64) * page, src.astype(np.uint64) * page, page,
                                        "engine paged")
                            ctl.barrier()
        ctl.barrier()


def _time_paged_ops(t: dict, one_op: Callable[[], None], ctl: Control) -> None:
    """Writer side of a paged test: one untimed op (then a barrier, while the target checks the
    bytes), then t["iters"] timed ops, each posted -> answered; emits the samples."""
    samples = []
    for it in range(t["iters"] + 1):
        t0 = time.perf_counter_ns()
        one_op()
        t1 = time.perf_counter_ns()
        if it > 0:
            samples.append(t1 - t0)
        else:
            ctl.barrier()
    _emit({"kind": "paged", "page": t["page"], "pages": t["pages"], "iters": t["iters"], "window": t["window"],
           "op_ns": samples})


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _worker_main(args: argparse.Namespace) -> int:
    plan = json.loads(args.worker_plan)
    if args.worker_system == "ipc":  # one process, both ends
        from jax_garden.bench.fabric_ipc import ipc_worker

        ipc_worker(plan, args.timeout, args.seed, _emit)
        return 0
    if args.worker == "server":
        sock = _listen_and_announce(args.timeout)
    else:
        sock = socket.create_connection(("127.0.0.1", args.worker_port), timeout=args.timeout)
    ctl = Control(sock, args.timeout)
    try:
        if args.worker_system == "tcp":
            _tcp_worker(args.worker, plan, ctl, args.timeout, args.seed)
        else:
            _engine_worker(args.worker, plan, ctl, args.timeout, args.seed, args.worker_domains, args.worker_completion,
                           cxx_loop=args.worker_system == "engine-cxx")
    finally:
        sock.close()
    return 0


# ------------------------------------------------------------------------- process pairs


def parse_pin(text: str | None) -> tuple[str, str] | None:
    """``--pin SERVER:CLIENT`` CPU lists (taskset syntax, e.g. ``1:0``), checked against this host."""
    if not text:
        return None
    server, sep, client = text.partition(":")
    cpus = os.sched_getaffinity(0)
    for part in (server, client):
        try:
            wanted = {c for r in part.split(",") for c in _cpu_range(r)}
        except ValueError:
            wanted = set()
        if not sep or not wanted or not wanted <= cpus:
            raise ValueError(f"bad --pin {text!r}: expected SERVER:CLIENT CPU lists within {sorted(cpus)}, e.g. 1:0")
    if shutil.which("taskset") is None:
        raise ValueError("--pin needs the taskset program (util-linux)")
    return server, client


def _cpu_range(r: str) -> range:
    lo, _, hi = r.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def run_pair(server_cmd: list[str], client_cmd: Callable[[int], list[str]], name: str, timeout: float,
             env: dict[str, str] | None = None, pin: tuple[str, str] | None = None) -> list[dict]:
    """Starts the server, then the client on the announced port; returns the client's result records."""
    deadline = time.monotonic() + timeout
    if pin:
        server_cmd = ["taskset", "-c", pin[0], *server_cmd]
        client_cmd = (lambda inner: lambda port: ["taskset", "-c", pin[1], *inner(port)])(client_cmd)
    server = Child(server_cmd, f"{name} server", env)
    client = None
    try:
        first = json.loads(server.line(timeout=min(timeout, 120)))
        if first.get("event") != "listening":
            raise BenchError(f"{name} server: expected a 'listening' record first, got {first}")
        client = Child(client_cmd(int(first["port"])), f"{name} client", env)
        try:
            lines = client.finish(deadline)
        except BenchError as e:
            # A dying server takes the client down with it; its own message is the useful one.
            if server.proc.poll() not in (None, 0):
                raise BenchError(f"{e}; {name} server exited with status {server.proc.returncode}: "
                                 f"{server.stderr_tail()}") from None
            raise
        server.finish(deadline)
        return [json.loads(l) for l in lines if l.strip().startswith("{")]
    finally:
        for c in (client, server):
            if c is not None:
                c.kill()


def run_single(cmd: list[str], name: str, timeout: float, env: dict[str, str] | None = None,
               pin: tuple[str, str] | None = None) -> list[dict]:
    """One child that is both ends (the ipc system); its result records."""
    if pin:
        cmd = ["taskset", "-c", pin[1], *cmd]
    child = Child(cmd, name, env)
    try:
        lines = child.finish(time.monotonic() + timeout)
        return [json.loads(l) for l in lines if l.strip().startswith("{")]
    finally:
        child.kill()


def raw_binary() -> Path:
    import jax_garden

    return Path(jax_garden.__file__).parent / "bin" / "raw_fabric_bench"


def _python_cmd() -> list[str]:
    return python_command("-m", "jax_garden.bench", "fabric")


def run_system(system: str, plan: list[dict], args: argparse.Namespace, domains: int = 1,
               completion: str = "delivery") -> list[dict]:
    if system == "raw":
        binary = raw_binary()
        if not binary.exists():
            raise BenchError(f"raw baseline binary not found at {binary} (build the project first)")
        common = ["--plan", raw_plan_string(plan), "--seed", str(args.seed), "--timeout", str(args.timeout)]
        common += ["--delivery-complete"] if completion == "delivery" else []
        return run_pair([str(binary), "--role", "server", *common],
                        lambda port: [str(binary), "--role", "client", "--port", str(port), *common],
                        "raw_fabric_bench", args.timeout, pin=args.pin_cpus)
    common = ["--worker-system", system, "--worker-plan", json.dumps(plan), "--worker-domains", str(domains),
              "--worker-completion", completion, "--seed", str(args.seed), "--timeout", str(args.timeout)]
    env = child_env()
    if system == "ipc":
        return run_single([*_python_cmd(), "--worker", "single", *common], "ipc worker", args.timeout, env,
                          pin=args.pin_cpus)
    return run_pair([*_python_cmd(), "--worker", "server", *common],
                    lambda port: [*_python_cmd(), "--worker", "client", "--worker-port", str(port), *common],
                    f"{system} worker", args.timeout, env, pin=args.pin_cpus)


# ------------------------------------------------------------------------------- statistics


def metrics_from_records(records: list[dict]) -> dict[tuple, dict]:
    """Per row key: p50_us, p99_us, gbps (None where the test does not define it)."""
    rows: dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") == "lat":
            key = ("imm", 0) if r["size"] == 0 else ("write", r["size"])
            half = [x / 2 / 1e3 for x in r["rtt_ns"]]
            rows.setdefault(key, {}).update(p50_us=percentile(half, 0.5), p99_us=percentile(half, 0.99))
        elif r.get("kind") == "bw":
            rows.setdefault(("write", r["size"]), {})["gbps"] = r["count"] * r["size"] / r["elapsed_ns"]
        elif r.get("kind") == "paged":
            op = [x / 1e3 for x in r["op_ns"]]
            p50 = percentile(op, 0.5)
            rows[("paged", r["page"], r["pages"])] = {"p50_us": p50, "p99_us": percentile(op, 0.99),
                                                       "gbps": r["page"] * r["pages"] / (p50 * 1e3)}
    return rows


def row_order(plan: list[dict]) -> list[tuple]:
    keys = [("imm", 0)]
    keys += [("write", t["size"]) for t in plan if t["kind"] == "lat" and t["size"]]
    keys += [("paged", t["page"], t["pages"]) for t in plan if t["kind"] == "paged"]
    return keys


def row_label(key: tuple) -> str:
    if key[0] == "imm":
        return "imm only"
    if key[0] == "write":
        return f"write {fmt_size(key[1])}"
    return f"paged {fmt_size(key[1])} x{key[2]}"


# ------------------------------------------------------------------------------------- main


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jax_garden.bench fabric", description=description(__doc__))
    p.add_argument("--sizes", default=None, help=f"single-write sizes (default {DEFAULT_SIZES})")
    p.add_argument("--paged", default=None, help=f"paged tests PAGE:COUNT,... (default {DEFAULT_PAGED})")
    p.add_argument("--iters", type=int, default=None, help="latency iterations per size (default 1000, fewer for big sizes)")
    p.add_argument("--bw-bytes", default=None, help="bytes per bandwidth test (default 1G, count capped at 20000)")
    p.add_argument("--paged-iters", type=int, default=None, help="timed ops per paged test (default 10)")
    p.add_argument("--window", type=int, default=64, help="writes in flight in bandwidth and paged tests (default 64)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median reported (default 5)")
    p.add_argument("--domains", default="1,2", help="engine domain counts, one engine row each (default 1,2)")
    p.add_argument("--systems", default="engine,engine-cxx,raw,tcp,ipc",
                   help="subset of engine,engine-cxx,raw,tcp,ipc (default all; ipc: the engine's ipc path on host "
                        "memory, two engines in one process; engine-cxx: latency rows from the "
                        "engine's C++ ping-pong loop, d=1)")
    p.add_argument("--quick", action="store_true", help="small plan for CI smoke tests")
    p.add_argument("--no-gpu", action="store_true",
                   help="on a GPU machine, skip the fabric-gpu rows that otherwise run after these")
    p.add_argument("--completion", default="delivery,transmit",
                   help="engine completion modes to run, each against the raw loop with the same semantics "
                        "(default delivery,transmit)")
    p.add_argument("--out", "--json", dest="out", default="bench_results/fabric.json", help="JSON output path")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="also draw p50 latency and bandwidth against write size, one line per system, into PATH "
                        "(PNG; needs matplotlib)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per system run (default 300)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--pin", default=None,
                   help="pin server and client to CPU lists SERVER:CLIENT (e.g. 1:0); default: no pinning")
    # Internal: the worker processes this harness starts.
    p.add_argument("--worker", choices=("server", "client", "single"), help=argparse.SUPPRESS)
    p.add_argument("--worker-system", choices=("engine", "engine-cxx", "tcp", "ipc"), help=argparse.SUPPRESS)
    p.add_argument("--worker-completion", choices=("delivery", "transmit"), default="delivery", help=argparse.SUPPRESS)
    p.add_argument("--worker-plan", help=argparse.SUPPRESS)
    p.add_argument("--worker-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--worker-domains", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.worker:
        return _worker_main(args)
    try:
        _plot.check(args.plot)  # before minutes of measuring
    except _plot.PlotUnavailable as e:
        raise SystemExit(f"fabric benchmark: {e}") from None

    quick = args.quick
    try:
        sizes = [parse_size(s) for s in (args.sizes or ("4K,64K,1M" if quick else DEFAULT_SIZES)).split(",") if s.strip()]
        paged = parse_paged(args.paged or ("16K:256,64K:128" if quick else DEFAULT_PAGED))
        bw_bytes = parse_size(args.bw_bytes) if args.bw_bytes else (16 * MiB if quick else GiB)
        domain_counts = [int(d) for d in args.domains.split(",") if d.strip()]
        args.pin_cpus = parse_pin(args.pin)
    except ValueError as e:
        raise SystemExit(f"fabric benchmark: {e}") from None
    iters = args.iters if args.iters is not None else (50 if quick else 1000)
    paged_iters = args.paged_iters if args.paged_iters is not None else (3 if quick else 10)
    rounds = args.rounds if args.rounds is not None else (1 if quick else 5)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    completions = [c.strip() for c in args.completion.split(",") if c.strip()]
    if not completions or set(completions) - {"delivery", "transmit"}:
        raise SystemExit(f"--completion: expected delivery and/or transmit, got {args.completion!r}")
    if not sizes:
        raise SystemExit("--sizes must list at least one size")
    for name, value in (("--iters", iters), ("--paged-iters", paged_iters), ("--rounds", rounds), ("--window", args.window)):
        if value <= 0:
            raise SystemExit(f"{name} must be > 0, got {value}")
    if not domain_counts or min(domain_counts) <= 0:
        raise SystemExit(f"--domains must list positive counts, got {args.domains!r}")
    if unknown := set(systems) - {"engine", "engine-cxx", "raw", "tcp", "ipc"}:
        raise SystemExit(f"--systems: unknown {sorted(unknown)}; choose from engine, engine-cxx, raw, tcp, ipc")
    plan = build_plan(sizes, paged, iters, bw_bytes, paged_iters, args.window)
    notes: list[str] = []
    cpus = os.cpu_count() or 1
    if (load := os.getloadavg()[0]) > 0.5 * cpus:
        # Every system busy-polls; other work on a small machine shifts all numbers (ratios less so).
        notes.append(f"machine busy at start: 1-min load {load:.1f} on {cpus} CPUs; numbers are not from a quiet host")

    # Run units: (label, system, domains, completion). Engine rows need jax_garden.fabric; without
    # it the baselines still run and the report says why the engine rows are missing.
    units: list[tuple[str, str, int, str]] = []
    mark = {"delivery": "", "transmit": " tx"}
    if "engine" in systems or "engine-cxx" in systems:
        if importlib.util.find_spec("jax_garden.fabric") is None:
            notes.append("engine rows skipped: jax_garden.fabric is not in this build")
        else:
            for c in completions:
                if "engine" in systems:
                    units += [(f"engine d={d}{mark[c]}", "engine", d, c) for d in domain_counts]
                if "engine-cxx" in systems:
                    units.append((f"engine c++{mark[c]}", "engine-cxx", 1, c))
    if "raw" in systems:
        units += [(RAW_LABEL[c], "raw", 1, c) for c in completions]
    if "tcp" in systems:
        units.append(("tcp", "tcp", 1, "transmit"))
    if "ipc" in systems and importlib.util.find_spec("jax_garden.fabric") is not None:
        units.append(("ipc 1 proc", "ipc", 1, "delivery"))

    per_round: dict[str, list[dict[tuple, dict]]] = {label: [] for label, _, _, _ in units}
    errors: list[str] = []
    info: dict[str, Any] = {}
    progress = Progress()  # stderr
    progress.line(f"fabric benchmark: {len(units)} systems x {rounds} rounds, buffer "
                  f"{fmt_size(plan_buffer_bytes(plan))}")
    load_seen: list[float] = []
    for r in range(rounds):
        order = units[r % len(units):] + units[: r % len(units)]  # rotate so no system always runs first
        for label, system, domains, completion in order:
            t0 = time.monotonic()
            load_seen.append(os.getloadavg()[0])
            try:
                records = run_system(system, plan, args, domains, completion)
            except Exception as e:  # noqa: BLE001 - reported, the other systems still run
                errors.append(f"round {r + 1} {label}: {e}")
                progress.line(f"  round {r + 1} {label}: FAILED: {e}")
                continue
            for rec in records:
                if rec.get("event") == "fabric":
                    info["raw_fabric"] = {k: v for k, v in rec.items() if k != "event"}
                elif rec.get("event") == "engine":
                    info.setdefault("engine", {})[label] = {k: v for k, v in rec.items() if k != "event"}
            per_round[label].append(metrics_from_records(records))
            progress.line(f"  round {r + 1} {label}: {time.monotonic() - t0:.1f} s")

    result = summarize(plan, units, per_round)
    result.update(
        benchmark="fabric",
        config={"sizes": sizes, "paged": paged, "iters": iters, "bw_bytes": bw_bytes, "paged_iters": paged_iters,
                "window": args.window, "rounds": rounds, "domains": domain_counts, "systems": systems,
                "completions": completions,
                "quick": quick, "seed": args.seed, "pin": args.pin, "plan": plan},
        host={"hostname": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(), **info},
        errors=errors, notes=notes, elapsed_s=round(progress.elapsed(), 1),
        loadavg_1min={"start": load_seen[0] if load_seen else None, "max": max(load_seen, default=None),
                      "end": os.getloadavg()[0]},
        method={
            "lat": "ping-pong, one write at a time; half of (post -> target's imm-only answer seen), us",
            "imm": "same with no payload (write_imm / 0-byte fi_writemsg / 8-byte TCP message)",
            "bw": "COUNT writes, <= window in flight; COUNT*SIZE / (first post -> target saw all, answered); GB = 1e9 B",
            "paged": "one op = PAGES page writes (one imm each, random slots; raw: <= window in flight, engine: its own "
                     "per-domain limit, tcp: one gathered sendmsg stream); op time = post -> answered; GB/s at p50",
            "rounds": "systems interleaved with rotating order; median over rounds of each metric",
        },
    )
    print_report(result)
    out = write_json(args.out, result, headline(result))
    print(f"wrote {out}", file=sys.stderr)
    if args.plot:
        note = figures.note("fabric", argv, f"{platform.node()}, {os.cpu_count()} CPUs, 1-min load "
                            f"{result['loadavg_1min']['start']:.1f} at start")
        print(f"wrote {figures.fabric(result, args.plot, note)}", file=sys.stderr)
    return 1 if errors else 0


RAW_LABEL = {"delivery": "raw dc", "transmit": "raw"}


def summarize(plan: list[dict], units: list[tuple[str, str, int, str]], per_round: dict[str, list[dict]]) -> dict:
    rows = []
    medians: dict[tuple[str, tuple], dict] = {}
    for key in row_order(plan):
        for label, system, domains, completion in units:
            rounds = [rm.get(key, {}) for rm in per_round[label]]
            m = {f: median([x.get(f) for x in rounds]) for f in ("p50_us", "p99_us", "gbps")}
            # Best round too: loopback here is bimodal per process pair (see the module docstring).
            p50s = [x["p50_us"] for x in rounds if x.get("p50_us") is not None]
            bws = [x["gbps"] for x in rounds if x.get("gbps") is not None]
            m["p50_us_best"] = min(p50s, default=None)
            m["gbps_best"] = max(bws, default=None)
            medians[(label, key)] = m
            rows.append({"test": key[0], "size": key[1], **({"pages": key[2]} if key[0] == "paged" else {}),
                         "label": row_label(key), "system": system, "name": label, "completion": completion,
                         **({"domains": domains} if system.startswith("engine") else {}), **m,
                         "rounds": rounds})
    targets = []
    for row in rows:
        if not (row["system"].startswith("engine") or row["system"] == "ipc"):
            continue
        key = (row["test"], row["size"], row["pages"]) if row["test"] == "paged" else (row["test"], row["size"])
        for base in ("raw", "tcp"):
            # engine rows are compared with the raw loop of the same completion semantics
            b = medians.get((RAW_LABEL[row["completion"]] if base == "raw" else base, key))
            if b is None:
                continue
            row[f"lat_vs_{base}"] = ratio(row["p50_us"], b["p50_us"]) if row["test"] != "paged" else None
            row[f"bw_vs_{base}"] = ratio(row["gbps"], b["gbps"])
            row[f"bw_best_vs_{base}"] = ratio(row["gbps_best"], b["gbps_best"])
        if row["system"] == "ipc":
            continue  # the same-host path: reported against raw loopback, no target of its own here
        if row["test"] == "write" and row["size"] >= MiB and row.get("bw_vs_raw") is not None:
            targets.append({"name": row["name"], "row": row["label"], "metric": "bandwidth / raw",
                            "value": row["bw_vs_raw"], "target": ">= 0.9", "met": row["bw_vs_raw"] >= 0.9})
        if row["test"] == "write" and row["size"] == 4 * KiB and row.get("lat_vs_raw") is not None:
            targets.append({"name": row["name"], "row": row["label"], "metric": "p50 latency / raw",
                            "value": row["lat_vs_raw"], "target": "<= 1.2", "met": row["lat_vs_raw"] <= 1.2})
            if row["system"] == "engine" and row.get("p99_us") and row.get("p50_us"):
                tail = row["p99_us"] / row["p50_us"]
                targets.append({"name": row["name"], "row": row["label"], "metric": "p99 / p50 latency",
                                "value": tail, "target": "<= 2", "met": tail <= 2})
    return {"rows": rows, "targets": targets}


def _f(v: float | None, width: int, prec: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{prec}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def headline(result: dict) -> dict[str, float]:
    """The key same-run ratios: every engine row's value for the targets (bandwidth / raw
    for writes >= 1 MiB, p50 latency / raw at 4 KiB) and the paged bandwidth / raw."""
    out = {f"{t['name']} {t['row']} {t['metric']}": t["value"] for t in result["targets"]}
    for row in result["rows"]:  # the ipc path's per-op host cost (one process, host memory)
        if row["system"] == "ipc" and row["test"] == "write" and row["size"] == 4 * KiB and row.get("p50_us"):
            out[f"{row['name']} {row['label']} p50 latency us"] = row["p50_us"]
            if row.get("lat_vs_raw") is not None:
                out[f"{row['name']} {row['label']} p50 latency / raw"] = row["lat_vs_raw"]
    for row in result["rows"]:
        if row["system"].startswith("engine") and row["test"] == "paged" and row.get("bw_vs_raw") is not None:
            out[f"{row['name']} {row['label']} bandwidth / raw"] = row["bw_vs_raw"]
    # What delivery completion costs: the engine's delivery rows against its transmit rows.
    by_name = {(r["name"], r["label"]): r for r in result["rows"]}
    for row in result["rows"]:
        tx = by_name.get((row["name"] + " tx", row["label"]))
        if row["system"] == "engine" and row["completion"] == "delivery" and tx and row["test"] == "write":
            if row["size"] == 4 * KiB and row.get("p50_us") and tx.get("p50_us"):
                out[f"{row['name']} {row['label']} latency delivery / transmit"] = row["p50_us"] / tx["p50_us"]
            if row["size"] >= MiB and row.get("gbps") and tx.get("gbps"):
                out[f"{row['name']} {row['label']} bandwidth delivery / transmit"] = row["gbps"] / tx["gbps"]
    return out


TABLE_COLUMNS = [("test", 20, "<"), ("system", 11, "<"), ("p50 us", 9, ">"), ("p99 us", 9, ">"), ("GB/s", 6, ">"),
                 ("best", 6, ">"), ("", 0, ""), ("lat/raw", 7, ">"), ("bw/raw", 6, ">"), ("best", 6, ">"),
                 ("", 0, ""), ("lat/tcp", 7, ">"), ("bw/tcp", 6, ">")]


def print_report(result: dict) -> None:
    cells = []
    last = None
    for row in result["rows"]:
        label = row["label"] if row["label"] != last else ""
        last = row["label"]
        cells.append([label, row["name"], _f(row["p50_us"], 9, 1), _f(row["p99_us"], 9, 1), _f(row["gbps"], 6, 2),
                      _f(row["gbps_best"], 6, 2), "", _x(row.get("lat_vs_raw")), _x(row.get("bw_vs_raw")),
                      _x(row.get("bw_best_vs_raw")), "", _x(row.get("lat_vs_tcp")), _x(row.get("bw_vs_tcp"))])
    print_table(TABLE_COLUMNS, cells)
    print("latency: half round trip (write -> target's imm-only answer); paged: whole op round trip; "
          "GB/s: many writes in flight (paged: at p50 op time); medians over rounds, 'best': best round")
    for t in result["targets"]:
        print(f"target {t['name']} {t['row']}: {t['metric']} = {t['value']:.2f} (target {t['target']}): "
              f"{'met' if t['met'] else 'MISSED'}")
    for n in result.get("notes", []):
        print(f"note: {n}")
    for e in result.get("errors", []):
        print(f"error: {e}")


if __name__ == "__main__":
    sys.exit(main())
