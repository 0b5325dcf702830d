"""The host proxy of MoE across node groups on GPUs (ffi/moe/host_proxy.h), on CPU: each "rank" is a
HostProxy with its own TransferEngine (tcp on 127.0.0.1) over host memory standing in for its GPU
areas and its host-mapped control block; the tests write ready records and kernel error words as the
CUDA kernels would (proxy_protocol.h) and check what the proxies post, what lands, and the arrival
words the receive kernels wait on. The GPU half (kernels, CUDA IPC, the whole round trip) is in
tests/test_moe_gpu.py (marker gpu)."""

from __future__ import annotations

import time

import numpy as np
import pytest

DISPATCH, DISPATCH_FREE, COMBINE, COMBINE_FREE, ABORT = range(5)
SEND_BYTES = 1 << 16
RECV_BYTES = 1 << 16
ABORT_BYTES = 1024


def _native():
    from jax_garden import _jax_garden as native

    return native.moe


class Rank:
    """One rank: an engine, host areas standing in for the GPU ones, a control block, a proxy."""

    def __init__(self, rank: int, num_ranks: int, domains: int = 1, engine=None):
        """`engine`: share another rank's (ranks of one process share one engine and one proxy)."""
        from jax_garden import fabric

        m = _native()
        self.rank, self.num_ranks = rank, num_ranks
        self.layout = m.proxy_control_layout(num_ranks)
        self.owns_engine = engine is None
        self.engine = engine or fabric.TransferEngine(provider="tcp", domains=domains)
        self.send = np.zeros(SEND_BYTES, np.uint8)
        self.recv = np.zeros(RECV_BYTES, np.uint8)
        self.control = np.zeros(self.layout["bytes"], np.uint8)
        self.send_region = self.engine.register(self.send)
        self.recv_region = self.engine.register(self.recv)
        self.proxy = None

    def start(self, peers: list, node_size: int = 1, local: list | None = None, timeout: float = 10.0):
        """peers: by rank, the Rank objects of every rank; `local`: the ranks sharing this proxy."""
        m = _native()
        local = local or [self]
        ranks = [(r.rank, r.control.ctypes.data, r.send_region._native, r.recv.ctypes.data) for r in local]
        held = {r.rank for r in local}
        entries = []
        for p in peers:
            if p.rank in held and all(p.rank // node_size == r.rank // node_size for r in local):
                entries.append(None)
            else:
                entries.append((p.recv_region.descriptor, p.engine.num_domains, p.engine.split_threshold))
        self.proxy = m.HostProxy(self.engine._native, self.num_ranks, node_size, timeout, ranks, entries)
        self.proxy.start()
        return self

    # -- the kernels' side of the control block --

    def _ready_at(self, kind: int, peer: int) -> int:
        return self.layout["ready"] + (kind * self.num_ranks + peer) * self.layout["ready_record_bytes"]

    def publish(self, kind: int, peer: int, generation: int, nbytes: int = 0, src: int = 0, dst: int = 0):
        at = self._ready_at(kind, peer)
        self.control[at + 8:at + 32].view(np.int64)[:] = (nbytes, src, dst)  # fields first ...
        self.control[at:at + 4].view(np.uint32)[0] = generation            # ... then the generation

    def arrived(self, kind: int, peer: int) -> int:
        at = self.layout["arrived"] + (kind * self.num_ranks + peer) * 4
        return int(self.control[at:at + 4].view(np.uint32)[0])

    def abort_word(self) -> int:
        return int(self.control[self.layout["abort"]:self.layout["abort"] + 4].view(np.uint32)[0])

    def record_kernel_error(self, code: int, a: int, b: int, c: int = 0):
        at = self.layout["kernel_error"]
        self.control[at + 4:at + 20].view(np.int32)[:] = (a, b, self.rank, c)
        self.control[at:at + 4].view(np.int32)[0] = code

    def close(self):
        if self.proxy is not None:
            self.proxy.stop()
        if self.owns_engine:
            self.engine.close()


def _wait(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def pair():
    ranks = [Rank(0, 2), Rank(1, 2)]
    try:
        for r in ranks:
            r.start(ranks)
        yield ranks
    finally:
        for r in ranks:
            r.close()


@pytest.mark.adversarial
def test_messages_and_acks_cross_and_arrivals_count_whole_messages(pair):
    """Ten generations (the imms' 3 generation bits wrap) of dispatch and combine messages with
    their free acks between two proxies: every message lands where its record says, its arrival
    word advances only then, by exactly one generation, and the posts are counted."""
    a, b = pair
    rng = np.random.default_rng(0)
    for gen in range(1, 11):
        for kind, ack, src_at, dst_at in ((DISPATCH, DISPATCH_FREE, 4096, 8192), (COMBINE, COMBINE_FREE, 20480, 12288)):
            n = int(rng.integers(64, 4000))
            payload = rng.integers(0, 256, n, dtype=np.uint8)
            a.send[src_at:src_at + n] = payload
            assert b.arrived(kind, 0) == gen - 1
            a.publish(kind, 1, gen, n, src_at, dst_at)
            _wait(lambda: b.arrived(kind, 0) == gen, what=f"arrival of {kind} #{gen}")
            assert np.array_equal(b.recv[dst_at:dst_at + n], payload), f"kind {kind} #{gen} landed wrong"
            b.publish(ack, 0, gen)  # the receive kernel frees the slot
            _wait(lambda: a.arrived(ack, 1) == gen, what=f"ack {ack} #{gen}")
    assert a.proxy.posts(0) == [10, 0, 10, 0] and b.proxy.posts(0) == [0, 10, 0, 10]
    assert a.proxy.bytes(0)[DISPATCH] > 0 and b.proxy.bytes(0) == [0, 0, 0, 0]
    assert a.proxy.failure()[0] == 0 and b.proxy.failure()[0] == 0
    assert a.abort_word() == 0 and b.abort_word() == 0
    assert a.proxy.drain(5.0)
    assert "posted 10 arrived 0" in a.proxy.describe()


@pytest.mark.adversarial
def test_senders_with_two_domains_deliver_two_imms_per_message():
    """A sender with two domains cuts a message into two pieces (two imms): the receiver's proxy
    counts what internode_message_imms says for the sender's settings before it calls the message
    arrived."""
    ranks = [Rank(0, 2, domains=2), Rank(1, 2, domains=1)]
    try:
        for r in ranks:
            r.start(ranks)
        a, b = ranks
        assert _native().internode_message_imms(2, a.engine.split_threshold) == (2, 1)
        for gen in range(1, 10):
            a.send[:3000] = gen
            a.publish(DISPATCH, 1, gen, 3000, 0, 100)
            _wait(lambda: b.arrived(DISPATCH, 0) == gen, what=f"message #{gen}")
            assert (b.recv[100:3100] == gen).all()
            b.publish(DISPATCH_FREE, 0, gen)
            _wait(lambda: a.arrived(DISPATCH_FREE, 1) == gen, what=f"ack #{gen}")
    finally:
        for r in ranks:
            r.close()


def test_record_out_of_sequence_fails_and_tells_the_peer(pair):
    """A ready record that skips a generation is a protocol error: the proxy posts nothing, records
    it, sets its ranks' abort words and sends the reason to the other rank, whose proxy fails with
    'rank 0 failed: ...' and sets its abort word (its kernels stop waiting)."""
    a, b = pair
    a.publish(DISPATCH, 1, 2, 128, 0, 0)
    _wait(lambda: a.proxy.failure()[0] != 0, what="the protocol error")
    m = _native()
    code, peer, msg = a.proxy.failure()
    assert code == int(m.DeviceError.PROXY_PROTOCOL) and peer == 1, (code, peer, msg)
    assert "dispatch message #2 for rank 1 while #0 was the last one posted" in msg
    assert a.abort_word() == 1
    _wait(lambda: b.proxy.failure()[0] != 0, what="the peer to learn it")
    code, peer, msg = b.proxy.failure()
    assert code == int(m.DeviceError.PEER_FAILED) and peer == 0, (code, peer, msg)
    assert msg.startswith("rank 0 failed: moe (CUDA): rank 0: the kernels published dispatch message #2")
    assert b.abort_word() == 1
    assert a.proxy.posts(0) == [0, 0, 0, 0]


def test_kernel_timeout_is_sent_to_every_other_rank():
    """A kernel's sticky error (here: rank 0 timed out waiting for rank 2's combine) reaches the
    ranks of other processes as an abort: their proxies fail with the reason (a timeout: the code
    says so), and every abort word is set; the rank that recorded it keeps its own error (the
    proxy has none)."""
    ranks = [Rank(r, 3) for r in range(3)]
    try:
        for r in ranks:
            r.start(ranks)
        m = _native()
        ranks[0].record_kernel_error(int(m.DeviceError.TIMEOUT_COMBINE_DATA), 2, 1)
        for r in ranks[1:]:
            _wait(lambda r=r: r.proxy.failure()[0] != 0, what=f"rank {r.rank} to learn the timeout")
            code, peer, msg = r.proxy.failure()
            assert code == int(m.DeviceError.PEER_TIMED_OUT) and peer == 0, (code, peer, msg)
            assert "rank 0 failed: moe (CUDA): rank 0 timed out waiting for combine data from rank 2" in msg
            assert r.abort_word() == 1
        assert ranks[0].abort_word() == 1
        assert ranks[0].proxy.failure()[0] == 0
    finally:
        for r in ranks:
            r.close()


def test_message_outside_the_areas_is_refused(pair):
    """A record whose bytes run past the send area or the peer's receive area is refused before
    anything is posted."""
    a, b = pair
    a.publish(COMBINE, 1, 1, 4096, SEND_BYTES - 100, 0)
    _wait(lambda: a.proxy.failure()[0] != 0, what="the refusal")
    code, peer, msg = a.proxy.failure()
    assert code == int(_native().DeviceError.PROXY_PROTOCOL) and peer == 1
    assert "outside the send area" in msg
    assert a.proxy.posts(0) == [0, 0, 0, 0]
    assert b.arrived(COMBINE, 0) == 0


def test_ranks_of_one_node_group_are_not_proxied():
    """Two proxies of two ranks each (node groups of 2): records toward the rank of the same group
    are ignored (those rows move over NVLink), records toward the other group are posted; a rank
    of another process in the same group still gets abort messages."""
    ranks = [Rank(0, 4), None, Rank(2, 4), None]
    ranks[1] = Rank(1, 4, engine=ranks[0].engine)  # two "processes" of two ranks each
    ranks[3] = Rank(3, 4, engine=ranks[2].engine)
    try:
        ranks[0].start(ranks, node_size=2, local=ranks[0:2])
        ranks[2].start(ranks, node_size=2, local=ranks[2:4])
        ranks[0].send[:256] = 7
        ranks[0].publish(DISPATCH, 1, 1, 256, 0, 0)   # same node: not the proxy's
        ranks[0].publish(DISPATCH, 3, 1, 256, 0, 512)  # other node
        _wait(lambda: ranks[2].arrived(DISPATCH, 0) == 0 and
              _arrived_of(ranks[3], DISPATCH, 0) == 1, what="the message to rank 3")
        assert (ranks[3].recv[512:768] == 7).all()
        assert _arrived_of(ranks[1], DISPATCH, 0) == 0
        assert ranks[0].proxy.posts(0) == [1, 0, 0, 0]
    finally:
        for r in ranks:
            r.close()


def _arrived_of(rank: Rank, kind: int, peer: int) -> int:
    return rank.arrived(kind, peer)


def test_proxy_arguments_are_checked():
    m = _native()
    r0, r1 = Rank(0, 2), Rank(1, 2)
    try:
        with pytest.raises(ValueError, match=r"rank 1 is held elsewhere but has no peer entry"):
            m.HostProxy(r0.engine._native, 2, 1, 5.0,
                        [(0, r0.control.ctypes.data, r0.send_region._native, r0.recv.ctypes.data)], [None, None])
        with pytest.raises(ValueError, match=r"node_size 3 must divide R=2"):
            m.HostProxy(r0.engine._native, 2, 3, 5.0,
                        [(0, r0.control.ctypes.data, r0.send_region._native, r0.recv.ctypes.data)], [None, None])
        with pytest.raises(ValueError, match=r"local rank 2 outside \[0, 2\)"):
            m.HostProxy(r0.engine._native, 2, 1, 5.0,
                        [(2, r0.control.ctypes.data, r0.send_region._native, r0.recv.ctypes.data)], [None, None])
    finally:
        r0.close()
        r1.close()


class _FakeProxyContext:
    """Stands in for _jax_garden.moe_cuda.ProxyAllToAll (GPU only): records what the Python
    bootstrap asks of it."""

    def __init__(self, shape, dtype, **kwargs):
        self.kwargs, self.calls, self.local, self.id = kwargs, [], [], 7
        self.num_ranks = shape.num_ranks

    def add_rank(self, ordinal, rank):
        self.local.append(rank)
        self.calls.append(("add_rank", ordinal, rank))

    def remote_ranks(self):
        return [r for r in range(self.num_ranks) if r not in self.local]

    def peer_info(self, rank):
        return b"info%d" % rank

    def ipc_handle(self, rank):
        return bytes([rank]) * 64

    def connect_peer(self, info):
        self.calls.append(("peer", bytes(info)))

    def connect_local(self, rank, peer):
        self.calls.append(("local", rank, peer))

    def connect_ipc(self, rank, peer, handle):
        self.calls.append(("ipc", rank, peer, bytes(handle)))

    def finalize(self):
        self.calls.append(("finalize",))
        return "kernels"

    def error(self):
        return 0, ""

    def synchronize(self):
        pass

    def drain(self, timeout):
        self.calls.append(("drain",))
        return True

    def close(self):
        self.calls.append(("close",))


@pytest.mark.parametrize("held, node_size, want", [
    # process 0 holds ranks 0 and 1 of 4; groups of 2: its pair meets in place, the other pair by engine
    ([0, 1], 2, {("local", 0, 1), ("local", 1, 0), ("peer", b"info2"), ("peer", b"info3")}),
    # groups of 1: every other rank through the engine (the local ones as the engine's own peers)
    ([0, 1], 1, {("peer", b"info2"), ("peer", b"info3")}),
    # process 0 holds rank 0 only; groups of 2: rank 1 (another process) is mapped by CUDA IPC
    ([0], 2, {("ipc", 0, 1, bytes([1]) * 64), ("peer", b"info1"), ("peer", b"info2"), ("peer", b"info3")}),
])
def test_gpu_node_group_bootstrap_wiring(monkeypatch, held, node_size, want):
    """What _moe_cuda builds for node groups on GPUs, with the native context and the devices
    faked (the real ones need a GPU): every rank held elsewhere is connected for the engine, the
    ranks of a local rank's node group are mapped (peer access in this process, CUDA IPC from the
    bytes another process published), the bootstrap goes through InternodeConfig.bootstrap, and
    close drains the proxy before freeing."""
    import types

    from jax_garden import _jax_garden as native
    from jax_garden import _moe_cuda, moe

    made = []

    def fake(shape, dtype, **kwargs):
        made.append(_FakeProxyContext(shape, dtype, **kwargs))
        return made[-1]

    monkeypatch.setattr(native.moe_cuda, "ProxyAllToAll", fake, raising=False)
    monkeypatch.setattr(_moe_cuda, "cuda_ordinal", lambda d: d.id)
    devices = [types.SimpleNamespace(id=r, platform="gpu", process_index=0 if r in held else 1) for r in range(4)]
    mesh = types.SimpleNamespace(shape={"ep": 4}, axis_names=("ep",), devices=np.array(devices, dtype=object))
    published = {}

    def bootstrap(mine):
        published.update(mine)
        return {r: _moe_cuda._pack_peer(b"info%d" % r, bytes([r]) * 64) for r in range(4)}

    cfg = moe.AllToAllConfig(num_experts=8, experts_per_token=2, hidden=64, max_tokens=4, max_recv_tokens=64)
    ctx = _moe_cuda._create_proxy_context(cfg, mesh, "ep", 4, 5.0, node_size,
                                         moe.InternodeConfig(provider="tcp", path="staged", bootstrap=bootstrap))
    fake_ctx = made[0]
    assert fake_ctx.kwargs["node_size"] == node_size and fake_ctx.kwargs["path"] == "staged"
    assert fake_ctx.kwargs["node"] == "127.0.0.1" and fake_ctx.kwargs["timeout_s"] == 5.0
    assert sorted(published) == held
    assert all(_moe_cuda._unpack_peer(b, r) == (b"info%d" % r, bytes([r]) * 64) for r, b in published.items())
    connects = {c for c in fake_ctx.calls if c[0] in ("local", "ipc", "peer")}
    assert connects == want
    assert fake_ctx.calls[-1] == ("finalize",)
    assert ctx.proxied and ctx.node_size == node_size and ctx.ranks == {r: r for r in held}
    ctx.close()
    assert fake_ctx.calls[-2:] == [("drain",), ("close",)]


def test_peer_bootstrap_bytes_are_checked():
    from jax_garden import _moe_cuda

    assert _moe_cuda._unpack_peer(_moe_cuda._pack_peer(b"abc", b"h" * 64), 3) == (b"abc", b"h" * 64)
    with pytest.raises(ValueError, match=r"bootstrap data of rank 3 is truncated \(2 bytes\)"):
        _moe_cuda._unpack_peer(b"ab", 3)
    with pytest.raises(ValueError, match=r"truncated \(8 bytes, peer info of 100\)"):
        _moe_cuda._unpack_peer((100).to_bytes(4, "little") + b"abcd", 3)
