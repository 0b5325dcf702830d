"""CUDA contexts of :class:`jax_garden.moe.AllToAll`: buffers allocated outside XLA, peers mapped,
sync flags. ``moe.AllToAll`` calls :func:`create_context` for GPU meshes; the FFI targets
(docs/moe-ffi.md, platform "CUDA") find the context by ``context_id``.

One node group (``node_size`` unset or R; R = 1, 2, 4 or 8 ranks per group, one NVLink domain):
the NVLink context. Two process layouts:
  * one process driving several GPUs: peers are mapped with peer access, pointers exchanged
    in-process;
  * one process per rank (``jax.distributed``), one GPU each or **several processes sharing one
    GPU** (``local_device_ids`` all 0): CUDA IPC handles of each rank's buffer are exchanged
    through the coordination service's key-value store (same-device IPC mappings work across
    processes; their kernels are time-sliced, and every wait is bounded and backs off).
Mesh axes other than ``axis_name`` form independent groups, each with its own ranks.

Node groups (``node_size`` < R): the proxy context (docs/moe-ffi.md, "Host proxy for GPUs"). Ranks
of one group write messages into each other's receive areas (peer access or CUDA IPC); between
groups the kernels hand the messages to a host proxy thread that posts them through this process's
TransferEngine (``InternodeConfig``: provider, domains, path). Bootstrap (:func:`_exchange`): each
rank's peer info and CUDA IPC handle, through the key-value store or ``InternodeConfig.bootstrap``.

Waits inside the kernels are bounded (``timeout`` seconds; default: the setting
``moe_timeout_s``, 30): a rank that never arrives sets a sticky error instead of hanging;
:meth:`CudaContext.check` raises it, and every later call of the context's FFI targets fails
with it. The error codes are the kernels' own (``_jax_garden.moe.DeviceError``).
"""

from __future__ import annotations

import itertools
import struct
import weakref
from typing import Any

import jax
import numpy as np

from jax_garden import _settings, _validate
from jax_garden import _jax_garden as _native
from jax_garden._service.bootstrap import Bootstrap

__all__ = ["available", "create_context", "CudaContext", "MoeDeviceError", "MoeTimeoutError"]

DeviceError = _native.moe.DeviceError  # the kernels' sticky error codes (nvlink_protocol.h)
_KERNELS = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")
_uid = itertools.count()  # same sequence in every process of an SPMD job: names KV keys
_KV_TIMEOUT_MS = 120_000


class MoeDeviceError(RuntimeError):
    """An error recorded by an AllToAll's native context (see the message): the CUDA kernels'
    sticky error word, or the CPU reference's first failed call. The context is unusable
    afterwards."""


class MoeTimeoutError(MoeDeviceError, TimeoutError):
    """A peer never arrived within the context's timeout."""


def available() -> bool:
    """True when the extension was built with the CUDA MoE kernels."""
    return bool(getattr(_native, "built_with_cuda", False)) and bool(_native.moe_cuda.available)


_SYNC_MODES = ("arrive", "flags", "legacy")


def _tuning() -> dict[str, Any]:
    """Kernel tuning knobs (benchmarks): bytes of a row one warp sends (512, 1024, 2048), blocks
    per multiprocessor (1, 2), the NVLink kernels' synchronisation (``arrive``, ``flags``,
    ``legacy``: bench moe --profile compares them), whether dispatch()/combine() run as one kernel
    each, and whether those are launched cooperatively, from the settings moe_chunk_bytes /
    moe_blocks_per_sm / moe_sync (moe_legacy_sync: ``legacy``) / moe_fused / moe_cooperative
    (unset: the kernels' defaults). The native context checks the values."""
    out: dict[str, Any] = {}
    for key, setting in (("chunk_bytes", "moe_chunk_bytes"), ("blocks_per_sm", "moe_blocks_per_sm")):
        value = _settings.get(setting)
        if value is not None:
            out[key] = value
    sync = "legacy" if _settings.get("moe_legacy_sync") else _settings.get("moe_sync").strip().lower()
    if sync not in _SYNC_MODES:
        raise ValueError(f"JAX_GARDEN_MOE_SYNC must be one of {', '.join(_SYNC_MODES)}, got {sync!r}")
    out["sync"] = sync
    out["fused"] = bool(_settings.get("moe_fused"))
    out["cooperative"] = bool(_settings.get("moe_cooperative"))
    return out


class CudaContext:
    """Owns the native context. ``context_id`` goes into the FFI calls; :meth:`close` frees it
    (executables compiled against it then fail with an unknown-context error, never crash)."""

    def __init__(self, native_ctx, ranks: dict[int, int], num_ranks: int, uid: int,
                 multiprocess: bool, report: str, node_size: int | None = None,
                 timeout: float = 30.0):
        self._ctx = native_ctx
        self.context_id = int(native_ctx.id)
        self.ranks = dict(ranks)  # local CUDA device (cuda_ordinal) -> rank
        self.num_ranks = num_ranks
        self.node_size = num_ranks if node_size is None else node_size  # < R: the proxy context
        self.kernel_report = report
        self._uid = uid
        self._multiprocess = multiprocess
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_native, native_ctx, uid, multiprocess,
                                           self.node_size < num_ranks, float(timeout))

    @property
    def proxied(self) -> bool:
        """True for node groups (the host proxy and a TransferEngine between them)."""
        return self.node_size < self.num_ranks

    def __repr__(self):
        return (f"CudaContext(id={self.context_id}, R={self.num_ranks}, node_size={self.node_size}, "
                f"local ranks={self.ranks}, closed={self._closed})")

    def close(self) -> None:
        """Waits for this process's devices (and, across processes, for every process to get
        here), then unmaps peers and frees the buffers. Idempotent."""
        self._closed = True
        self._finalizer()

    def check(self) -> None:
        """Raises the sticky error recorded by the kernels, if any (no device synchronisation:
        the error word lives in mapped host memory; call after the program finished):
        :class:`MoeTimeoutError` for a wait that ran out of time, else :class:`MoeDeviceError`."""
        code, msg = self._ctx.error()
        if code:
            raise (MoeTimeoutError if _native.moe.is_timeout_error(code) else MoeDeviceError)(msg)

    def error(self) -> tuple[Any, str]:
        """``(DeviceError, message)`` of the sticky error (``DeviceError.NONE, ""`` if none)."""
        code, msg = self._ctx.error()
        return DeviceError(code), msg

    def dropped_rows(self) -> list[int]:
        """Rows dropped for lack of max_recv_tokens space, per receiving rank, since creation,
        summed over groups. Ranks held by other processes read -1 (each process knows its own)."""
        out = [-1] * self.num_ranks
        for ordinal, rank in self.ranks.items():
            out[rank] = max(out[rank], 0) + int(self._ctx.dropped_rows(ordinal))
        return out

    def handler_calls(self) -> int:
        """FFI handler invocations so far, all local devices: a replay of a captured CUDA graph
        launches the kernels (the device generations advance) without calling the handler."""
        return int(self._ctx.handler_calls())

    def generations(self, ordinal: int) -> dict[str, int]:
        """Calls completed by each kernel on device ``ordinal``."""
        return dict(zip(_KERNELS, self._ctx.generations(ordinal)))

    def stamps(self, ordinal: int, n: int) -> dict[str, np.ndarray] | None:
        """NVLink context only (None otherwise): every device timestamp of the last ``n`` calls of
        each kernel on device ``ordinal``, ``{name: [n, 4] uint64}`` with the names of
        ``_jax_garden.moe_cuda.stamp_names`` (start, end, entry = the kernel's first instruction,
        waited, body = block 0's work done, last = the last block counted in). A fused kernel
        stamps both of its phase's slots (the send slot ends where the receive slot starts)."""
        if self.proxied:
            return None
        names = list(_native.moe_cuda.stamp_names)
        raw = np.asarray(self._ctx.stamps(ordinal, n), np.uint64).reshape(n, 4, len(names))
        return {name: raw[:, :, i] for i, name in enumerate(names) if not name.startswith("unused")}

    def timings(self, ordinal: int, n: int) -> np.ndarray:
        """Device timestamps (globaltimer, ns) of the last ``n`` calls of each phase on device
        ``ordinal``: ``[n, 4 (dispatch_send, dispatch_recv, combine_send, combine_recv), 2
        (first block start, last block end)]`` uint64; 0 where no such call happened. (A phase of
        the proxy context is several kernels: from its first kernel's start to its last's end.)"""
        return np.asarray(self._ctx.timings(ordinal, n), np.uint64).reshape(n, 4, 2)

    def proxy_posts(self, ordinal: int) -> dict[str, tuple[int, int]]:
        """Node groups only: ``{kind: (posts, bytes)}`` the host proxy of the rank on device
        ``ordinal`` posted so far (dispatch, dispatch free ack, combine, combine free ack)."""
        if not self.proxied:
            return {}
        kinds = ("dispatch", "dispatch_free", "combine", "combine_free")
        return dict(zip(kinds, zip(self._ctx.proxy_posts(ordinal), self._ctx.proxy_bytes(ordinal))))

    def describe(self) -> str:
        """Where the context stands (debugging a stall): per rank the calls completed; for node
        groups also every kernel's last generation entered and left, the proxy's ready, posted
        and arrived generations per peer, counters, writes in flight and the first failure."""
        if self.proxied:
            return self._ctx.describe()
        return "\n".join(f"rank {r} on device {o}: calls completed {self.generations(o)}"
                         for o, r in sorted(self.ranks.items()))


def _close_native(native_ctx, uid: int, multiprocess: bool, proxied: bool = False,
                  timeout: float = 30.0) -> None:
    try:
        if proxied:
            native_ctx.synchronize()
            if not native_ctx.error()[0]:
                native_ctx.drain(timeout)  # every message this process owes a peer was posted and landed
        if multiprocess:
            # No process may free its buffer while a peer's kernels (or engine) can still write into
            # it. A context that failed skips the barrier: its peers fail too (or time out here).
            boot = _bootstrap()
            if boot is not None and not (proxied and native_ctx.error()[0]):
                native_ctx.synchronize()
                boot.barrier(f"jax_garden_moe_cuda_{uid}_close", 60.0)
    except Exception:  # a dead peer: free anyway, nothing can write here any more
        pass
    native_ctx.close()


_ORDINALS: dict = {}


def cuda_ordinal(device: Any) -> int:
    """The CUDA device number of a jax GPU device in this extension's CUDA runtime (which sees
    every GPU of the host), found by asking the device itself: jax may renumber its devices
    (``jax.distributed.initialize(local_device_ids=...)``), so ``local_hardware_id`` is only a
    fallback."""
    key = (device.process_index, device.id)
    if key not in _ORDINALS:
        import jax.numpy as jnp

        call = jax.ffi.ffi_call("jg_moe_cuda_device_info", jax.ShapeDtypeStruct((2,), jnp.int32),
                                has_side_effect=True)
        try:
            out = jax.jit(call)(jax.device_put(np.zeros((1,), np.int32), device))
            _ORDINALS[key] = int(np.asarray(out)[1])
        except Exception:  # pragma: no cover - the helper target is part of this extension
            _ORDINALS[key] = int(device.local_hardware_id)
    return _ORDINALS[key]


def _groups(mesh, axis_name: str):
    """Yields (group key, rank, device) for every device of the mesh."""
    names = tuple(mesh.axis_names)
    ax = names.index(axis_name)
    devices = np.asarray(mesh.devices)
    for idx in np.ndindex(devices.shape):
        group = tuple(i for j, i in enumerate(idx) if j != ax)
        yield group, idx[ax], devices[idx]


def create_context(cfg: Any, mesh: jax.sharding.Mesh, axis_name: str, *,
                   timeout: float | None = None, node_size: int | None = None,
                   internode: Any = None) -> CudaContext:
    """Builds the CUDA context of ``cfg`` (an ``AllToAllConfig`` whose ``max_recv_tokens`` is
    resolved) over ``mesh`` axis ``axis_name``: the NVLink context for one node group
    (``node_size`` None or R), the proxy context for node groups of ``node_size`` ranks
    (``internode``: an ``InternodeConfig``, None for the defaults). Collective across processes:
    every process of the job must call it, in the same order as its other contexts."""
    if not available():
        raise RuntimeError("jax_garden was built without the CUDA MoE kernels "
                           "(rebuild with nvcc available, JAX_GARDEN_CUDA=ON)")
    _validate.check_instance("moe (CUDA): mesh", mesh, jax.sharding.Mesh)
    _validate.check_instance("moe (CUDA): axis_name", axis_name, str)
    if axis_name not in mesh.axis_names:
        raise ValueError(f"moe (CUDA): axis {axis_name!r} is not in the mesh axes "
                         f"{tuple(mesh.axis_names)}")
    num_ranks = int(mesh.shape[axis_name])
    if node_size is not None and node_size < num_ranks:
        timeout = _validate.check_float("moe (CUDA): timeout",
                                        _settings.get("moe_timeout_s") if timeout is None else timeout)
        return _create_proxy_context(cfg, mesh, axis_name, num_ranks, timeout, node_size, internode)
    max_ranks = int(_native.moe_cuda.max_ranks)
    if not 1 <= num_ranks <= max_ranks:
        raise ValueError(f"moe (CUDA): axis {axis_name!r} has {num_ranks} devices; the NVLink "
                         f"kernels support 1..{max_ranks} ranks (one node)")
    if cfg.max_recv_tokens is None:
        raise ValueError("moe (CUDA): create_context needs cfg.max_recv_tokens resolved "
                         "(AllToAll passes cfg.recv_tokens(R))")
    timeout = _validate.check_float("moe (CUDA): timeout",
                                    _settings.get("moe_timeout_s") if timeout is None else timeout)

    me = jax.process_index()
    placement = list(_groups(mesh, axis_name))
    for _, _, d in placement:
        if d.platform not in ("gpu", "cuda"):
            raise ValueError(f"moe (CUDA): device {d} is not a CUDA GPU")
    local = [(g, r, d) for g, r, d in placement if d.process_index == me]
    if not local:
        raise ValueError("moe (CUDA): no device of the mesh belongs to this process")
    by_pos = {(g, r): d for g, r, d in placement}

    ctx = _native.moe_cuda.NvlinkAllToAll(cfg._native_shape(num_ranks), np.dtype(cfg.dispatch_dtype).name,
                                          timeout_s=timeout, **_tuning())  # checks the shape
    uid = next(_uid)
    remote_needed = any(by_pos[(g, p)].process_index != me
                        for g, _, _ in local for p in range(num_ranks))
    try:
        ordinal_of = {d.id: cuda_ordinal(d) for _, _, d in local}
        for g, r, d in local:
            ctx.add_rank(ordinal_of[d.id], int(r))
        boot = None
        if remote_needed:
            boot = _bootstrap()
            if boot is None:
                raise RuntimeError("moe (CUDA): the mesh spans several processes but "
                                   "jax.distributed is not initialised (needed to exchange "
                                   "CUDA IPC handles)")
            for g, r, d in local:
                boot.publish(_key(uid, g, r), ctx.ipc_handle(ordinal_of[d.id]))
        for g, r, d in local:
            ordinal = ordinal_of[d.id]
            for p in range(num_ranks):
                peer = by_pos[(g, p)]
                if peer.process_index == me:
                    ctx.connect_local(ordinal, p, ordinal_of[peer.id])
                else:
                    # Peers reach this point at their own pace (imports, compiles): a wait of
                    # its own, not the kernels' timeout.
                    handle = boot.fetch(_key(uid, g, p), _KV_TIMEOUT_MS / 1000)
                    ctx.connect_ipc(ordinal, p, handle)
        report = ctx.finalize()
    except BaseException:
        ctx.close()
        raise
    ranks = {ordinal_of[d.id]: int(r) for _, r, d in local}
    return CudaContext(ctx, ranks, num_ranks, uid, remote_needed, report)


def _key(uid: int, group: tuple, rank: int) -> str:
    g = "_".join(map(str, group)) or "0"
    return f"jax_garden/moe_cuda/{uid}/{g}/{rank}/ipc"


# ---------------------------------------------------------------------------------------------
# Node groups: the proxy context


_PROVIDERS_WITH_TCP_NODE = ("tcp", "tcp;ofi_rxm")


def _create_proxy_context(cfg: Any, mesh: jax.sharding.Mesh, axis_name: str, num_ranks: int,
                          timeout: float, node_size: int, internode: Any) -> CudaContext:
    from jax_garden._moe_internode import InternodeConfig

    config = internode if internode is not None else InternodeConfig()
    others = {n: s for n, s in mesh.shape.items() if n != axis_name and s != 1}
    if others:
        raise ValueError(f"AllToAll on GPUs in node groups: mesh axes other than {axis_name!r} must have "
                         f"size 1, got {others}")
    if num_ranks % node_size:
        raise ValueError(f"AllToAll: node_size={node_size} does not divide the number of ranks R={num_ranks}")
    max_group = int(_native.moe_cuda.max_ranks)
    if node_size > max_group:
        raise ValueError(f"AllToAll on GPUs: node_size={node_size} exceeds {max_group} (one NVLink domain)")
    devices = list(np.asarray(mesh.devices).reshape(-1))  # rank order: the only axis > 1
    for d in devices:
        if d.platform not in ("gpu", "cuda"):
            raise ValueError(f"moe (CUDA): device {d} is not a CUDA GPU")
    me = jax.process_index()
    local = [(r, d) for r, d in enumerate(devices) if d.process_index == me]
    if not local:
        raise ValueError("moe (CUDA): no device of the mesh belongs to this process")
    provider = config.provider or ""
    node = config.node
    if node is None:
        node = _settings.get("tcp_node") if provider in _PROVIDERS_WITH_TCP_NODE else ""
    native = _native.moe_cuda.ProxyAllToAll(
        cfg._native_shape(num_ranks), np.dtype(cfg.dispatch_dtype).name, timeout_s=timeout,
        node_size=node_size, blocks_per_sm=_tuning().get("blocks_per_sm", 2), provider=provider,
        node=node, domains=config.domains, completion=config.completion,
        split_threshold=config.split_threshold, path=config.path)
    uid = next(_uid)
    local_ranks = {r for r, _ in local}
    try:
        ordinal_of = {d.id: cuda_ordinal(d) for _, d in local}
        for r, d in local:
            native.add_rank(ordinal_of[d.id], r)
        remote = [int(r) for r in native.remote_ranks()]
        infos = {}
        if remote:
            mine = {r: _pack_peer(bytes(native.peer_info(r)), bytes(native.ipc_handle(r))) for r, _ in local}
            infos = {r: _unpack_peer(b, r) for r, b in _exchange(uid, mine, remote, config).items()}
        for r in remote:
            native.connect_peer(infos[r][0])
        for r, _ in local:
            first = r // node_size * node_size
            for p in range(first, first + node_size):
                if p == r:
                    continue
                if p in local_ranks:
                    native.connect_local(r, p)
                else:
                    native.connect_ipc(r, p, infos[p][1])
        report = native.finalize()
    except BaseException:
        native.close()
        raise
    ranks = {ordinal_of[d.id]: int(r) for r, d in local}
    return CudaContext(native, ranks, num_ranks, uid, bool(remote), report, node_size=node_size,
                       timeout=timeout)


def _pack_peer(info: bytes, ipc: bytes) -> bytes:
    return struct.pack("<I", len(info)) + info + ipc


def _unpack_peer(blob: bytes, rank: int) -> tuple[bytes, bytes]:
    if len(blob) < 4:
        raise ValueError(f"moe (CUDA): bootstrap data of rank {rank} is truncated ({len(blob)} bytes)")
    (n,) = struct.unpack_from("<I", blob)
    if len(blob) < 4 + n:
        raise ValueError(f"moe (CUDA): bootstrap data of rank {rank} is truncated ({len(blob)} bytes, "
                         f"peer info of {n})")
    return blob[4:4 + n], blob[4 + n:]


def _exchange(uid: int, mine: dict[int, bytes], remote: list[int], config: Any) -> dict[int, bytes]:
    """The node groups' peer information (the same bootstrap as the CPU node groups)."""
    from jax_garden._moe_internode import exchange_peer_info

    return exchange_peer_info(f"jax_garden/moe_proxy/{uid}", mine, remote, config)[0]


def _bootstrap() -> Bootstrap | None:
    """jax.distributed's key-value store as the service floor's Bootstrap (None without it)."""
    try:
        return Bootstrap()
    except RuntimeError:
        return None
