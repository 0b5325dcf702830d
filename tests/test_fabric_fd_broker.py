"""The fd broker (ffi/fabric/core/fd_broker.h) that offers GPU memory made by cuMemCreate (XLA's
buffers) to same-host processes, and the descriptor format of such regions. The broker moves file
descriptors, so CPU tests exercise it with memfds across real processes; mapping the GPU memory
itself needs GPUs (tests/test_fabric_gpu.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

import jax_garden
from jax_garden import fabric
from jax_garden._jax_garden import fabric as native
from descriptor_codec import decode, encode

CHILD = r"""
import os, sys
from jax_garden import fabric
from jax_garden._jax_garden import fabric as native
nonce, key, timeout = int(sys.argv[1], 16), int(sys.argv[2], 16), float(sys.argv[3])
try:
    fd = native._fd_broker_fetch(nonce, key, timeout)
except fabric.TransferError as e:
    print("ERROR", e, flush=True)
    sys.exit(0)
data = os.pread(fd, 64, 0)
os.close(fd)
print("OK", data.hex(), flush=True)
"""


def _fetch_in_child(nonce: int, key: int, timeout: float = 5.0) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(jax_garden.__file__).parent.parent),
                                         *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-P", "-c", CHILD, f"{nonce:x}", f"{key:x}", str(timeout)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _memfd(content: bytes) -> int:
    fd = os.memfd_create("jax_garden_test")
    os.write(fd, content)
    return fd


def test_broker_hands_a_registered_fd_to_another_process_and_only_by_its_key():
    content = os.urandom(64)
    fd = _memfd(content)
    key = int.from_bytes(os.urandom(8), "little") | 1
    try:
        native._fd_broker_add(key, os.dup(fd))  # the broker owns the duplicate
        got = _fetch_in_child(native.process_nonce(), key)
        assert got == "OK " + content.hex(), got  # the same file: the child read what we wrote
        wrong = _fetch_in_child(native.process_nonce(), key ^ 0xFF)
        assert wrong.startswith("ERROR") and f"has no region with key {key ^ 0xFF:x}" in wrong, wrong
    finally:
        native._fd_broker_remove(key)
        os.close(fd)
    gone = _fetch_in_child(native.process_nonce(), key)  # removed: refused like a stale descriptor
    assert gone.startswith("ERROR") and "deregistered, or a stale descriptor" in gone, gone


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a process as another user needs root")
def test_broker_refuses_processes_of_another_user():
    """The broker's abstract socket is reachable by every process of the network namespace: it hands
    fds only to its own user, whatever key is asked for."""
    fd = _memfd(os.urandom(64))
    key = int.from_bytes(os.urandom(8), "little") | 1
    try:
        native._fd_broker_add(key, os.dup(fd))
        r, w = os.pipe()
        with warnings.catch_warnings():  # the child runs no thread of ours: one request, then _exit
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child becomes nobody (no exec: the interpreter is already loaded), then asks
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    native._fd_broker_fetch(native.process_nonce(), key, 5.0)
                    msg = b"OK"
                except fabric.TransferError as e:
                    msg = b"ERROR " + str(e).encode()
                os.write(w, msg)
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            other = f.read().decode()
        os.waitpid(pid, 0)
        assert other.startswith("ERROR") and "serves only processes of its own user" in other, other
        assert _fetch_in_child(native.process_nonce(), key).startswith("OK")  # its own user still gets it
    finally:
        native._fd_broker_remove(key)
        os.close(fd)


def test_fetch_from_a_process_without_a_broker_fails_at_once():
    nonce = int.from_bytes(os.urandom(8), "little")
    t0 = time.monotonic()
    with pytest.raises(fabric.TransferError, match="cannot reach the fd broker of process .*the owner process is gone"):
        native._fd_broker_fetch(nonce, 1, 5.0)
    assert time.monotonic() - t0 < 2.0


def test_fetch_from_a_silent_broker_times_out():
    """A process that accepts the connection and never answers: the fetch fails after its timeout."""
    nonce = int.from_bytes(os.urandom(8), "little")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind("\0" + f"jax_garden.fd.{nonce:016x}")
    srv.listen(1)
    held = []
    accepter = threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True)
    accepter.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(fabric.TransferError, match=r"did not answer within 0.5 s"):
            native._fd_broker_fetch(nonce, 7, 0.5)
        assert 0.4 < time.monotonic() - t0 < 3.0
    finally:
        accepter.join(5)
        for c in held:
            c.close()
        srv.close()


def _vmm_descriptor(engines, **fields) -> bytes:
    eng = engines()
    import numpy as np

    d = decode(bytes(eng.register(np.zeros(4096, np.uint8)).descriptor))
    d.update(kind=1, device=0, flags=d["flags"] | 2 | 4, ipc_range_bytes=16 << 20, ipc_offset=1 << 20,
             pci_bus_id=b"0000:19:00.0")
    d["base"] = max(d["base"], 1 << 20)
    d.update(fields)
    return encode(d)


def test_vmm_descriptors_round_trip_and_are_checked(engines):
    raw = _vmm_descriptor(engines)
    desc = fabric.MemoryDescriptor.from_bytes(raw)
    assert desc.is_cuda and desc.has_ipc_handle and bytes(desc) == raw
    assert decode(bytes(desc))["ipc_range_bytes"] == 16 << 20
    with pytest.raises(ValueError, match=r"does not fit its VMM range of 0x1000000 bytes"):
        fabric.MemoryDescriptor.from_bytes(_vmm_descriptor(engines, ipc_offset=(16 << 20) - 100))
    d = decode(raw)
    d["flags"] &= ~2  # the VMM bit without an IPC export
    d.pop("ipc_range_bytes"), d.pop("ipc_offset"), d.pop("pci_bus_id")
    with pytest.raises(ValueError, match="marks a VMM range but carries no IPC export"):
        fabric.MemoryDescriptor.from_bytes(encode(d))
