"""TransferEngine with GPU memory (marker ``gpu``; skipped without a CUDA GPU and a CUDA build).

Across processes on one host with the ``tcp`` provider (no GPUDirect NIC here): GPU->GPU takes the
CUDA IPC path, GPU<->host and forced GPU->GPU staging go through pinned bounce buffers. Contents
are read back and imm counts checked exactly. Faults: a sender killed mid-copy (its receiver's
waits fail within the timeout and it keeps working), a receiver killed mid-copy (the sender's ops
fail within the timeout and it keeps working). jit programs signal after computing and wait before
consuming, on the GPU stream, in both directions between two processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share the GPUs

import signal
import time

import numpy as np
import pytest

from fabric_group import gpu_count, run_group

PROVIDER = "tcp"


NGPU = gpu_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NGPU < 1, reason="needs a CUDA GPU and a CUDA build")]
two_gpus = pytest.mark.skipif(NGPU < 2, reason="needs 2 GPUs")


class DevBuf:
    """A plain cudaMalloc buffer (what an IPC handle exports exactly), filled and read from numpy."""

    def __init__(self, device: int, nbytes: int):
        from jax_garden._jax_garden import fabric as native

        self.native, self.device, self.nbytes = native, device, nbytes
        self.ptr = native.gpu_alloc(device, nbytes)

    def upload(self, arr: np.ndarray, offset: int = 0) -> None:
        arr = np.ascontiguousarray(arr)
        self.native.gpu_memcpy(self.ptr + offset, arr.ctypes.data, arr.nbytes)

    def download(self, nbytes: int | None = None, offset: int = 0) -> np.ndarray:
        out = np.empty(self.nbytes - offset if nbytes is None else nbytes, np.uint8)
        self.native.gpu_memcpy(out.ctypes.data, self.ptr + offset, out.nbytes)
        return out

    def free(self) -> None:
        self.native.gpu_free(self.ptr)


def _data(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).integers(0, 256, n, dtype=np.uint8)


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---- every op GPU -> GPU across processes ---------------------------------------------------------

def _gpu_ops_worker(rank: int, size: int, exchange, path):
    from jax_garden import fabric
    from jax_garden._jax_garden import fabric as native

    dev = rank % native.gpu_device_count()
    eng = fabric.TransferEngine(provider=PROVIDER, domains=2, staging_chunk_bytes=1 << 20)
    n, page, npages = 8 << 20, 16 << 10, 256
    src = DevBuf(dev, n)
    src.upload(_data(rank, n))
    dst_n = n + npages * page + 65536
    dst = DevBuf(dev, dst_n)
    dst.upload(np.zeros(dst_n, np.uint8))
    rs, rd = eng.register((src.ptr, n), memory="cuda"), eng.register((dst.ptr, dst_n), memory="cuda")
    assert rs.is_cuda and rs.device == dev and rd.descriptor.is_cuda and rd.descriptor.device == dev
    assert rd.descriptor.has_ipc_handle, "a cudaMalloc buffer must export a CUDA IPC handle"
    assert rd.is_staged and rd.registration == "staged"  # tcp has no FI_HMEM
    peers = exchange(bytes(rd.descriptor))
    descs = [fabric.MemoryDescriptor.from_bytes(d) for d in peers]
    right, left = (rank + 1) % size, (rank - 1) % size
    others = [r for r in range(size) if r != rank]
    assert eng.path_for(rs, descs[right], path) == (path or "ipc")
    mapped = eng.staging_stats()["ipc_mappings"]
    assert eng.prepare(rs, descs[right], path) == (path or "ipc")
    # prepare maps the peer's allocation now (ipc), not at the first write; the staged path maps nothing
    assert eng.staging_stats()["ipc_mappings"] == mapped + (path is None), (mapped, eng.staging_stats())
    t0 = time.monotonic()
    ts = [eng.write(rs, descs[right], n, imm=10, path=path)]
    pages = np.arange(npages)
    ts.append(eng.write_paged(rs, descs[right], page, pages[::-1], pages, 2 * page, page, dst_offset=n, imm=20,
                              path=path))
    slot = 65536 // size
    ts.append(eng.scatter(rs, [(descs[o], slot - 1, o * 1000, n + npages * page + rank * slot) for o in others],
                          imm=30, sharding="bytes", path=path))
    for t in ts:
        t.wait(60)
    eng.imm_counter(10).wait(fabric.imm_writes("write", domains=2, length=n, split_threshold=eng.split_threshold), 60)
    eng.imm_counter(20).wait(npages, 60)
    eng.imm_counter(30).wait(len(others) * 2, 60)
    elapsed = time.monotonic() - t0
    got = dst.download()
    want = _data(left, n)
    np.testing.assert_array_equal(got[:n], want)
    for i in range(npages):
        s = (npages - 1 - i) * 2 * page
        np.testing.assert_array_equal(got[n + i * page:n + (i + 1) * page], want[s:s + page])
    for o in others:
        off = n + npages * page + o * slot
        np.testing.assert_array_equal(got[off:off + slot - 1], _data(o, n)[rank * 1000:rank * 1000 + slot - 1])
    time.sleep(0.05)
    totals = [eng.imm_counter(i).total for i in (10, 20, 30)]
    exchange(None)
    stats = eng.staging_stats()
    eng.close()
    src.free()
    dst.free()
    return totals, stats, elapsed


@pytest.mark.adversarial
@pytest.mark.parametrize("path", [None, "staged"], ids=["ipc", "tcp-staged"])
def test_gpu_every_op_across_processes(path):
    out = run_group(_gpu_ops_worker, 2, path, exchanges=2, timeout=180)
    for rank, (totals, stats, elapsed) in out.items():
        assert totals == [2, 256, 2], (rank, totals)
        if path is None:
            assert stats["ipc_mappings"] >= 1 and stats["inbound"] == 0 and stats["outbound"] == 0, stats
            # the imm records were stored by the copies' stream (no event polled, no host hand-off)
            assert stats["ipc_stream_records"] == 3 and stats["ipc_event_records"] == 0, stats
        else:
            assert stats["recv_slots_free"] == stats["recv_slots"] > 0, stats
            assert stats["send_buffers_free"] == stats["send_buffers"] > 0, stats


# ---- the ipc path's copy kernel (single writes and a scatter's run in one launch) -------------------

MiB = 1 << 20
# (source offset, destination misalignment, length, whether an engine with ipc_copy_kernel_bytes=16 MiB
# sends it as its copy kernel: 16-byte aligned and at most 16 MiB)
KERNEL_CASES = [(0, 0, 16, True), (16, 32, 48, True), (0, 0, 64 << 10, True), (32, 16, MiB + 16, True),
                (0, 0, 16 * MiB, True), (0, 0, 16 * MiB + 16, False), (3, 5, 1000, False), (16, 7, 4096, False),
                (0, 0, 8, False)]


def _kernel_layout():
    """Each case's destination offset, with a 4 KiB gap of zeros after each (a stray byte shows)."""
    offs, cur = [], 0
    for _src, mis, n, _k in KERNEL_CASES:
        offs.append(cur + mis)
        cur = (cur + mis + n + 4096 + 4095) // 4096 * 4096
    return offs, cur + 64 * 1024


def _copy_kernel_worker(rank: int, size: int, exchange, kernel_bytes):
    """Rank 0 writes every case into rank 1 (one imm each), then a scatter of 8 aligned targets (one
    launch) and one of 9 (more pieces than a launch takes), over several rounds with new source
    bytes each round; rank 1 checks every byte of its buffer after each round's imms."""
    from jax_garden import fabric

    eng = fabric.TransferEngine(provider=PROVIDER, ipc_copy_kernel_bytes=kernel_bytes)
    offs, dst_n = _kernel_layout()
    src_n = 17 * MiB
    buf = DevBuf(0, src_n if rank == 0 else dst_n)
    buf.upload(np.zeros(buf.nbytes, np.uint8))
    region = eng.register((buf.ptr, buf.nbytes), memory="cuda")
    peer = fabric.MemoryDescriptor.from_bytes(exchange(bytes(region.descriptor))[1 - rank])
    scatter_base = offs[-1] + 8192
    rounds, mismatches = 4, []
    for r in range(rounds):
        data = _data(100 + r, src_n)
        if rank == 0:
            buf.upload(data)
            assert eng.path_for(region, peer) == "ipc"
            ts = [eng.write(region, peer, n, src_offset=so, dst_offset=do, imm=40 + i)
                  for i, ((so, _m, n, _k), do) in enumerate(zip(KERNEL_CASES, offs))]
            for k, count in enumerate((8, 9)):
                base = scatter_base + k * 32 * 1024
                ts.append(eng.scatter(region, [(peer, 1024, 2048 * j, base + 2048 * j) for j in range(count)],
                                      imm=60 + k))
            for t in ts:
                t.wait(60)
        else:
            # this round's imms (a wait takes the credits it waited for): one per write, one per target
            want_imms = [(40 + i, 1) for i in range(len(KERNEL_CASES))] + [(60, 8), (61, 9)]
            short = []
            for imm, n in want_imms:
                try:
                    eng.imm_counter(imm).wait(n, 30)
                except TimeoutError:
                    short.append((imm, eng.imm_counter(imm).credits, n))
            assert not short, f"round {r}: imms missing after 30 s, (imm, credits, wanted): {short}"
            want = np.zeros(dst_n, np.uint8)
            for (so, _m, n, _k), do in zip(KERNEL_CASES, offs):
                want[do:do + n] = data[so:so + n]
            for k, count in enumerate((8, 9)):
                base = scatter_base + k * 32 * 1024
                for j in range(count):
                    want[base + 2048 * j:base + 2048 * j + 1024] = data[2048 * j:2048 * j + 1024]
            got = buf.download()
            bad = np.flatnonzero(got != want)
            if bad.size:
                mismatches.append((r, int(bad[0]), int(bad.size)))
        exchange(None)
    stats = eng.staging_stats()
    eng.close()
    buf.free()
    return {"stats": stats, "mismatches": mismatches, "rounds": rounds}


@pytest.mark.parametrize("kernel_bytes", [16 * MiB, None], ids=["copy-kernel", "default-driver-copy"])
def test_gpu_copy_kernel_writes_land_exactly(kernel_bytes):
    """Every byte lands, no byte outside, before its imm is counted, whether the opt-in copy kernel
    or the driver's copy (the default) carried it; the kernel takes exactly the aligned writes up to
    its limit."""
    out = run_group(_copy_kernel_worker, 2, kernel_bytes, exchanges=5, timeout=180)
    assert out[1]["mismatches"] == [], out[1]["mismatches"]
    stats, rounds = out[0]["stats"], out[0]["rounds"]
    per_round = len(KERNEL_CASES) + 2  # every write, and each scatter's run toward its one destination
    assert stats["ipc_stream_records"] == per_round * rounds, stats
    eligible = sum(k for *_x, k in KERNEL_CASES) + 1  # the 8-target scatter; not the 9-target one
    assert stats["ipc_kernel_records"] == (eligible * rounds if kernel_bytes else 0), stats


def test_gpu_in_process_engines_and_jax_arrays():
    import jax
    import jax.numpy as jnp

    from jax_garden import fabric

    devs = jax.devices("gpu")
    a = fabric.TransferEngine(provider=PROVIDER)
    b = fabric.TransferEngine(provider=PROVIDER)
    try:
        n = 1 << 20
        x = jax.device_put(jnp.arange(n // 4, dtype=jnp.float32), devs[0])
        y = jax.device_put(jnp.zeros(n // 4, jnp.float32), devs[-1])
        x.block_until_ready()
        y.block_until_ready()
        rx, ry = a.register(x), b.register(y)
        assert rx.is_cuda and ry.is_cuda and ry.device == devs[-1].local_hardware_id
        path = a.path_for(rx, ry.descriptor)
        assert path == "ipc", path  # same process: pointers map directly
        a.write(rx, ry.descriptor, n, imm=3).wait(30)
        b.imm_counter(3).wait(1, 30)
        np.testing.assert_array_equal(np.asarray(y), np.arange(n // 4, dtype=np.float32))
        # a raw buffer on the same GPU through forced staging, and GPU -> host
        buf = DevBuf(devs[0].local_hardware_id, n)
        rbuf = b.register((buf.ptr, n), memory="cuda")
        a.write(rx, rbuf.descriptor, n, imm=4, path="staged").wait(30)
        b.imm_counter(4).wait(1, 30)
        np.testing.assert_array_equal(buf.download().view(np.float32), np.arange(n // 4, dtype=np.float32))
        host = np.zeros(n, np.uint8)
        rh = b.register(host)
        assert a.path_for(rx, rh.descriptor) == "staged"
        a.write(rx, rh.descriptor, n, imm=5).wait(30)
        b.imm_counter(5).wait(1, 30)
        np.testing.assert_array_equal(host.view(np.float32), np.arange(n // 4, dtype=np.float32))
        del rbuf
        buf.free()
    finally:
        a.close()
        b.close()


def test_gpu_scatter_mixing_ipc_and_staged_targets():
    """One scatter whose targets take different paths (a GPU buffer: ipc; host memory: staged): one
    job, every target lands, every imm counted once."""
    from jax_garden import fabric

    a = fabric.TransferEngine(provider=PROVIDER)
    b = fabric.TransferEngine(provider=PROVIDER)
    n = 1 << 20
    src, gdst = DevBuf(0, n), DevBuf(0, n)
    try:
        src.upload(_data(7, n))
        gdst.upload(np.zeros(n, np.uint8))
        hdst = np.zeros(n, np.uint8)
        rs = a.register((src.ptr, n), memory="cuda")
        rg, rh = b.register((gdst.ptr, n), memory="cuda"), b.register(hdst)
        assert a.path_for(rs, rg.descriptor) == "ipc" and a.path_for(rs, rh.descriptor) == "staged"
        targets = [(rg.descriptor, 4096, 0, 0), (rh.descriptor, 8192, 4096, 100), (rg.descriptor, 1000, 20000, 9000)]
        a.scatter(rs, targets, imm=12).wait(60)
        b.imm_counter(12).wait(3, 60)
        got, want = gdst.download(), _data(7, n)
        np.testing.assert_array_equal(got[:4096], want[:4096])
        np.testing.assert_array_equal(got[9000:10000], want[20000:21000])
        np.testing.assert_array_equal(hdst[100:8292], want[4096:12288])
        time.sleep(0.05)
        assert b.imm_counter(12).total == 3
        del rs, rg, rh
    finally:
        a.close()
        b.close()
        src.free()
        gdst.free()


def _pinned_worker(rank: int, size: int, exchange):
    """Rank 0 hides GPU 1 from itself (CUDA_VISIBLE_DEVICES, before CUDA starts); rank 1 owns a buffer
    on GPU 1: rank 0's writes work, staged, and it is told why."""
    if rank == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    from jax_garden import fabric

    eng = fabric.TransferEngine(provider=PROVIDER)
    n = 1 << 20
    buf = DevBuf(1 if rank == 1 else 0, n)
    buf.upload(_data(rank, n) if rank == 0 else np.zeros(n, np.uint8))
    region = eng.register((buf.ptr, n), memory="cuda")
    peer = fabric.MemoryDescriptor.from_bytes(exchange(bytes(region.descriptor))[1 - rank])
    out = {}
    if rank == 0:
        out["path"], out["why"] = eng.path_for(region, peer, why=True)
        eng.write(region, peer, n, imm=3).wait(60)
    else:
        eng.imm_counter(3).wait(1, 60)
        out["equal"] = bool((buf.download() == _data(0, n)).all())
    exchange(None)
    eng.close()
    buf.free()
    return out


@two_gpus
def test_gpu_pinned_process_takes_staged_and_says_why():
    out = run_group(_pinned_worker, 2, exchanges=2, timeout=120)
    assert out[1]["equal"], out
    assert out[0]["path"] == "staged" and "not visible" in out[0]["why"], out


# ---- GPU <-> host across processes ----------------------------------------------------------------

def _gpu_host_worker(rank: int, size: int, exchange):
    from jax_garden import fabric

    eng = fabric.TransferEngine(provider=PROVIDER, staging_chunk_bytes=256 << 10, staging_slots=4)
    n = 5 << 20  # more than the 1 MiB pools: slots are reused
    if rank == 0:  # the GPU side
        src, dst = DevBuf(0, n), DevBuf(0, n)
        src.upload(_data(0, n))
        dst.upload(np.zeros(n, np.uint8))
        rs, rd = eng.register((src.ptr, n), memory="cuda"), eng.register((dst.ptr, n), memory="cuda")
    else:  # the host side
        src, dst = _data(1, n), np.zeros(n, np.uint8)
        rs, rd = eng.register(src), eng.register(dst)
    peer = fabric.MemoryDescriptor.from_bytes(exchange(bytes(rd.descriptor))[1 - rank])
    assert eng.path_for(rs, peer) == "staged"
    eng.write(rs, peer, n, imm=7).wait(60)
    eng.imm_counter(7).wait(1, 60)
    got = dst.download() if rank == 0 else dst
    np.testing.assert_array_equal(got, _data(1 - rank, n))
    exchange(None)
    eng.close()
    return True


def test_gpu_to_host_and_host_to_gpu():
    assert run_group(_gpu_host_worker, 2, exchanges=2, timeout=120) == {0: True, 1: True}


def _xla_buffer_worker(rank: int, size: int, exchange, vmm: bool | None, allocator: str):
    """Rank 1 registers a jax array (XLA's allocator: cuMemCreate memory with the default and
    platform allocators, a memory pool with cuda_async; no legacy IPC handle either way); rank 0
    writes into it from a cudaMalloc buffer on its own GPU."""
    if vmm is not None:
        os.environ["JAX_GARDEN_VMM_IPC"] = "1" if vmm else "0"
    if allocator != "default":
        os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = allocator
    import jax
    import jax.numpy as jnp

    from jax_garden import fabric

    eng = fabric.TransferEngine(provider=PROVIDER)
    n = 3 << 20
    if rank == 1:
        arr = jax.device_put(jnp.zeros(n, jnp.uint8), jax.local_devices()[-1])  # GPU 1 when there are two
        arr.block_until_ready()
        rd = eng.register(arr)
        info = (bytes(rd.descriptor), rd.registration_note)
    else:
        src = DevBuf(0, n)
        src.upload(_data(5, n))
        rs = eng.register((src.ptr, n), memory="cuda")
        info = None
    peer = exchange(info)[1]
    result = {}
    if rank == 0:
        desc = fabric.MemoryDescriptor.from_bytes(peer[0])
        result["ipc_kind"] = desc.ipc_kind
        result["note"] = peer[1]
        result["path"], result["why"] = eng.path_for(rs, desc, why=True)
        eng.write(rs, desc, n - 4096, src_offset=4096, dst_offset=0, imm=11).wait(60)
    else:
        eng.imm_counter(11).wait(fabric.imm_writes("write", domains=1, length=n - 4096), 60)
        got = np.asarray(jnp.copy(arr))
        result["equal"] = bool((got[:n - 4096] == _data(5, n)[4096:]).all() and not got[n - 4096:].any())
    exchange(None)
    eng.close()
    return result


@pytest.mark.parametrize("vmm,allocator,want", [
    (None, "default", "ipc"),        # VMM IPC is on by default
    (False, "default", "staged"),    # JAX_GARDEN_VMM_IPC=0
    (None, "platform", "ipc"),       # cuMemCreate too
    (None, "cuda_async", "staged"),  # pool memory: not exportable, staged with a reason
], ids=["vmm-default", "vmm-off", "platform", "cuda-async"])
def test_gpu_write_into_an_xla_buffer_of_another_process(vmm, allocator, want):
    """Into a jax array of another process: the ipc path through the owner's exported VMM fd (on by
    default), staged where the memory cannot be exported, and path_for says why."""
    out = run_group(_xla_buffer_worker, 2, vmm, allocator, exchanges=2, timeout=180)
    assert out[1]["equal"], out
    assert out[0]["path"] == want, out
    if want == "ipc":
        assert out[0]["ipc_kind"] == "vmm", out
    else:
        assert out[0]["ipc_kind"] == "none" and "no CUDA IPC handle" in out[0]["why"], out
        assert "IPC" in out[0]["note"], out  # the owner's region says why it offers no ipc path


# ---- faults -----------------------------------------------------------------------------------------

def _killed_sender(rank: int, size: int, exchange):
    from jax_garden import fabric
    from jax_garden._jax_garden import fabric as native

    timeout = 2.0
    ngpu = native.gpu_device_count()
    eng = fabric.TransferEngine(provider=PROVIDER, timeout=timeout)
    n = 256 << 20
    if rank == 1:  # the victim: keeps copying into rank 0's GPU until killed
        src = DevBuf(1 % ngpu, n)
        rs = eng.register((src.ptr, n), memory="cuda")
        infos = exchange((os.getpid(), b""))
        peer = fabric.MemoryDescriptor.from_bytes(infos[0][1])
        while True:
            ts = [eng.write(rs, peer, n, imm=1) for _ in range(4)]
            for t in ts:
                t.wait(60)
    dst = DevBuf(0, n)
    rd = eng.register((dst.ptr, n), memory="cuda")
    infos = exchange((os.getpid(), bytes(rd.descriptor)))
    c = eng.imm_counter(1)
    _wait_for(lambda: c.total >= 2, 60, "copies from the victim")
    os.kill(infos[1][0], signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(0.2)
    got = c.total
    try:
        c.wait(got + 1000, timeout)  # what the dead peer would have sent never comes
        raise AssertionError("a dead sender's imms arrived")
    except TimeoutError:
        pass
    failed_after = time.monotonic() - killed
    # the survivor keeps working: its GPU memory, its engine, IPC from another engine
    other = fabric.TransferEngine(provider=PROVIDER)
    src2 = DevBuf(0, 1 << 20)
    src2.upload(_data(5, 1 << 20))
    r2 = other.register((src2.ptr, 1 << 20), memory="cuda")
    other.write(r2, rd.descriptor, 1 << 20, imm=2).wait(30)
    eng.imm_counter(2).wait(1, 30)
    np.testing.assert_array_equal(dst.download(1 << 20), _data(5, 1 << 20))
    other.close()
    eng.close()
    return failed_after


def test_gpu_killed_sender_mid_copy():
    out = run_group(_killed_sender, 2, timeout=180, expect_dead={1})
    assert out[0] < 2.0 + 5, out


def _killed_receiver(rank: int, size: int, exchange):
    from jax_garden import fabric
    from jax_garden._jax_garden import fabric as native

    timeout = 2.0
    ngpu = native.gpu_device_count()
    eng = fabric.TransferEngine(provider=PROVIDER, timeout=timeout)
    n = 256 << 20
    if rank == 1:  # the victim receiver
        dst = DevBuf(1 % ngpu, n)
        rd = eng.register((dst.ptr, n), memory="cuda")
        exchange((os.getpid(), bytes(rd.descriptor)))
        time.sleep(600)
    src = DevBuf(0, n)
    rs = eng.register((src.ptr, n), memory="cuda")
    infos = exchange((os.getpid(), b""))
    peer = fabric.MemoryDescriptor.from_bytes(infos[1][1])
    first = eng.write(rs, peer, n, imm=1)
    first.wait(60)  # the path works while the peer lives
    pending = [eng.write(rs, peer, n, imm=1) for _ in range(32)]
    os.kill(infos[1][0], signal.SIGKILL)
    killed = time.monotonic()
    failures = 0
    for t in pending:  # copies racing the kill: each completes or fails, none hangs
        try:
            t.wait(60)
        except (fabric.TransferError, TimeoutError):
            failures += 1
    pending_after = time.monotonic() - killed
    time.sleep(0.5)  # the peer is gone now
    late = [eng.write(rs, peer, 4096, imm=1) for _ in range(2)]
    t_late = time.monotonic()
    late_failed = 0
    for t in late:
        try:
            t.wait(60)
        except (fabric.TransferError, TimeoutError):
            late_failed += 1
    late_after = time.monotonic() - t_late
    # the sender keeps working with a live engine
    other = fabric.TransferEngine(provider=PROVIDER)
    dst2 = DevBuf(0, 1 << 20)
    rd2 = other.register((dst2.ptr, 1 << 20), memory="cuda")
    src.upload(_data(6, 1 << 20))
    eng.write(rs, rd2.descriptor, 1 << 20, imm=2).wait(30)
    other.imm_counter(2).wait(1, 30)
    np.testing.assert_array_equal(dst2.download(), _data(6, 1 << 20))
    other.close()
    eng.close()
    return dict(failures=failures, pending_after=pending_after, late_failed=late_failed, late_after=late_after)


def test_gpu_killed_receiver_mid_copy():
    out = run_group(_killed_receiver, 2, timeout=180, expect_dead={1})[0]
    assert out["late_failed"] == 2, out  # ops toward the dead peer fail ...
    assert out["late_after"] < 2.0 + 5, out  # ... within the timeout
    assert out["pending_after"] < 2.0 + (256 << 20) / 200e6 + 10, out


# ---- jit ops on the GPU stream ------------------------------------------------------------------------

def test_gpu_jit_signal_in_stream_order_and_stalled_wait_released():
    import jax
    import jax.numpy as jnp

    from jax_garden import fabric

    assert "jg_fabric_signal" in fabric._ffi.registered_targets().get("CUDA", [])
    eng = fabric.TransferEngine(provider=PROVIDER, timeout=1.0)
    try:
        fired = {}
        w = eng.watcher(lambda slot, old, new: fired.setdefault(slot, (new, time.monotonic())))
        s_static, s_traced = w.slot(0), w.slot(1)
        dev = jax.devices("gpu")[0]
        x = jax.device_put(jnp.ones((4096, 4096), jnp.float32) / 4096, dev)

        @jax.jit
        def produce(x):
            y = x
            for _ in range(80):
                y = jnp.tanh(y @ x) + x
            y = fabric.signal(s_static, 7, y)
            return fabric.signal(s_traced, (y[0, 0] * 0).astype(jnp.uint32) + 9, y)

        produce(x).block_until_ready()  # compile and warm up
        fired.clear()
        for s in (s_static, s_traced):
            s.store(0)
        time.sleep(0.1)
        fired.clear()
        t0 = time.monotonic()
        out = produce(x)
        t_dispatch = time.monotonic()
        out.block_until_ready()
        t_done = time.monotonic()
        _wait_for(lambda: len(fired) == 2, 5, "both signals")
        assert fired[0][0] == 7 and fired[1][0] == 9, fired
        # stored by the stream after the compute, not by the host at dispatch
        assert fired[0][1] > t_dispatch and fired[0][1] > t0 + 0.5 * (t_done - t0), (t0, t_dispatch, t_done, fired)

        # a wait whose imms never come: the stream is released after the timeout, the error is kept
        c = eng.imm_counter(77)
        zeros = jax.device_put(jnp.zeros(4, jnp.float32), dev)
        f = jax.jit(lambda v: fabric.wait(c, 2, v, timeout=0.5) + 1).lower(zeros).compile()
        t0 = time.monotonic()
        res = f(zeros)
        assert time.monotonic() - t0 < 0.4  # the host did not block
        res.block_until_ready()
        assert time.monotonic() - t0 < 10
        np.testing.assert_array_equal(np.asarray(res), np.ones(4))
        with pytest.raises(fabric.TransferError, match="stream was released"):
            eng.check()
        eng.check()  # reported once
        with pytest.raises(fabric.TransferError, match="stream was released"):
            c.wait(0, 1)
        # a traced count cannot be reserved at enqueue time
        g = jax.jit(lambda v, k: fabric.wait(c, k, v))
        with pytest.raises(Exception, match="static count"):
            g(jnp.zeros(4), jnp.int32(1)).block_until_ready()
        from jax_garden import _compat

        assert any("static count" in str(e) for e in _compat.settle_effects())  # not re-raised at exit
    finally:
        eng.close()


def _jit_pingpong(rank: int, size: int, exchange):
    import jax
    import jax.numpy as jnp

    from jax_garden import fabric
    from jax_garden._jax_garden import fabric as native

    ngpu = native.gpu_device_count()
    dev = jax.devices("gpu")[rank % ngpu]
    eng = fabric.TransferEngine(provider=PROVIDER)
    n = 1 << 20  # float32 elements
    payload = (np.arange(n, dtype=np.float32) + 1000 * rank)
    src = DevBuf(dev.local_hardware_id, 4 * n)
    src.upload(payload.view(np.uint8))
    rs = eng.register((src.ptr, 4 * n), memory="cuda")
    inbox = jax.device_put(jnp.zeros(n, jnp.float32), dev)
    inbox.block_until_ready()
    rin = eng.register(inbox)
    counter = eng.imm_counter(50)
    infos = exchange(bytes(rin.descriptor))
    peer = fabric.MemoryDescriptor.from_bytes(infos[1 - rank])
    sent = []

    def on_signal(slot, old, new):  # the producer's program reached its signal: ship the data
        if new:
            sent.append(eng.write(rs, peer, 4 * n, imm=50))

    slot = eng.watcher(on_signal).slot(0)
    x = jax.device_put(jnp.ones((2048, 2048), jnp.float32) / 2048, dev)

    @jax.jit
    def produce(x, k):
        y = x
        for _ in range(20):
            y = jnp.tanh(y @ x)
        return fabric.signal(slot, k, y)  # after computing y (k: a traced value, stored by a kernel)

    @jax.jit
    def consume(box):
        box = fabric.wait(counter, 1, box)  # before consuming what the peer wrote
        return box * 2.0

    produce(x, jnp.uint32(0)).block_until_ready()  # compile; the slot stays 0: nothing is sent
    consume_out = None
    results = {}
    for turn in range(2):  # turn 0: rank 0 produces, rank 1 consumes; turn 1: the other way
        producer = turn
        if rank != producer:
            t0 = time.monotonic()
            consume_out = consume(inbox)  # enqueued; the stream waits on the GPU
            results[f"dispatch_s_{turn}"] = time.monotonic() - t0
        exchange(("ready", turn))
        if rank == producer:
            produce(x, jnp.uint32(turn + 1)).block_until_ready()
        else:
            got = np.asarray(consume_out)
            np.testing.assert_array_equal(got, 2 * (np.arange(n, dtype=np.float32) + 1000 * (1 - rank)))
        exchange(("done", turn))
    for t in sent:
        t.wait(30)
    time.sleep(0.05)
    results["imms"] = counter.total
    exchange(None)
    eng.close()
    src.free()
    return results


def test_gpu_jit_signal_then_wait_both_directions():
    out = run_group(_jit_pingpong, 2, exchanges=6, timeout=240)
    for rank, r in out.items():
        # one write per turn the peer produced
        assert r["imms"] == 1, (rank, r)
        for k, v in r.items():
            if k.startswith("dispatch_s_"):
                assert v < 5.0, (rank, r)  # enqueueing the wait never blocked on the peer
