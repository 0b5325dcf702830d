"""Host context of :class:`jax_garden.moe.AllToAll` across node groups (one CPU device per rank,
ranks in several processes): ``moe.AllToAll`` calls :func:`create_context` when the mesh spans
processes or a ``node_size`` is given on CPU. The native side is ``_jax_garden.moe.InternodeAllToAll``
(ffi/moe/internode_all_to_all.h; protocol: ffi/moe/internode_protocol.h, docs/moe-ffi.md).

Inside a node group (``node_size`` consecutive ranks, all in one process) ranks meet in memory as in
the CPU reference; between groups rows travel through a TransferEngine that the context owns (one
per process). Bootstrap: each process publishes what its ranks need to be reached (receive region
descriptors) through ``jax.distributed``'s key-value store, or through ``InternodeConfig.bootstrap``
when given. The FFI targets are the CPU reference's (same four names, same operands).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Any, Callable

import numpy as np

from jax_garden import _settings, _validate
from jax_garden import _jax_garden as _native
from jax_garden._service.bootstrap import Bootstrap

__all__ = ["InternodeConfig", "create_context", "detect_node_size"]

_KV_TIMEOUT_MS = 120_000
_uid = itertools.count()  # same sequence in every process of an SPMD job: names the KV keys
_PROVIDERS_WITH_TCP_NODE = ("tcp", "tcp;ofi_rxm")
_DEFAULT_SPLIT_THRESHOLD = 1 << 20


@dataclasses.dataclass(frozen=True)
class InternodeConfig:
    """How the ranks of different node groups reach each other (CPU ranks across processes, and GPU
    node groups through the host proxy).

    Attributes:
      provider: libfabric provider of the context's TransferEngine (``"tcp"``, ``"efa"``,
        ``"verbs"``, ...); None picks as ``fabric.TransferEngine`` does (efa > verbs > tcp).
      domains: NICs per engine (1..8); large writes are split across them.
      node: address to bind; None: for ``tcp`` the setting ``tcp_node`` (127.0.0.1), else the
        provider's choice.
      completion: ``"delivery"`` (default) or ``"transmit"`` (``fabric.TransferEngine``'s
        meaning). Receivers learn completion by counting imms either way; delivery lets
        ``close()`` know that every row this process wrote has landed.
      split_threshold: single writes at least this long are cut into one piece per domain.
      path: the engine's transport for the messages: ``"auto"`` (the engine picks: CUDA IPC between
        GPU buffers of one host, else the provider's RMA, staging GPU memory through host buffers
        when the provider cannot reach it), ``"fabric"``, ``"ipc"`` or ``"staged"`` (force one;
        e.g. ``"staged"`` moves GPU rows through the provider as a NIC would, on one host).
      bootstrap: None to exchange peer information through ``jax.distributed``'s key-value store;
        else a callable, called once per AllToAll in every process with ``{rank: bytes}`` of this
        process's ranks, that returns ``{rank: bytes}`` of every rank (an all-gather the caller
        provides, e.g. over its own sockets).
    """

    provider: str | None = None
    domains: int = 1
    node: str | None = None
    completion: str = "delivery"
    split_threshold: int = _DEFAULT_SPLIT_THRESHOLD
    path: str = "auto"
    bootstrap: Callable[[dict[int, bytes]], dict[int, bytes]] | None = None

    def __post_init__(self):
        if self.provider is not None:
            _validate.check_instance("InternodeConfig.provider", self.provider, str)
        object.__setattr__(self, "domains", _validate.check_int("InternodeConfig.domains", self.domains,
                                                                minimum=1, maximum=8))
        if self.node is not None:
            _validate.check_instance("InternodeConfig.node", self.node, str)
        _validate.check_choice("InternodeConfig.completion", self.completion, ("delivery", "transmit"))
        object.__setattr__(self, "split_threshold", _validate.check_positive_int(
            "InternodeConfig.split_threshold", self.split_threshold))
        _validate.check_choice("InternodeConfig.path", self.path, ("auto", "fabric", "ipc", "staged"))
        if self.bootstrap is not None and not callable(self.bootstrap):
            raise TypeError(f"InternodeConfig.bootstrap must be callable, got "
                            f"{type(self.bootstrap).__name__}")


def detect_node_size(process_of_rank: list[int]) -> int:
    """The node size the mesh suggests: the ranks each process holds when every process holds one
    contiguous block of equal size (one node group per process: the host analogue of one NVLink
    domain), else 1."""
    blocks = [len(list(g)) for _, g in itertools.groupby(process_of_rank)]
    if len(set(blocks)) == 1 and len(blocks) == len(set(process_of_rank)):
        return blocks[0]
    return 1


class HostContext:
    """What the two host contexts (the in-process CPU reference in moe.py and the inter-node one
    here) share: a native context in ``_ctx`` closed by ``_finalizer``, its recorded error and its
    dropped-row counts. A failed call fails that call and every later one with the same error."""

    _ctx: Any
    _finalizer: Any

    def close(self) -> None:
        self._finalizer()

    def check(self) -> None:
        from jax_garden._moe_cuda import MoeDeviceError, MoeTimeoutError

        message, timed_out = self._ctx.error()
        if message:
            raise (MoeTimeoutError if timed_out else MoeDeviceError)(message)

    def dropped_rows(self) -> list[int]:
        return list(self._ctx.dropped_rows())


class InternodeContext(HostContext):
    """Owns the native context; ``context_id`` goes into the FFI calls (docs/moe-ffi.md)."""

    def __init__(self, cfg: Any, num_ranks: int, timeout: float, node_size: int,
                 local_ranks: list[int], config: InternodeConfig):
        provider = config.provider or ""
        node = config.node
        if node is None:
            node = _settings.get("tcp_node") if provider in _PROVIDERS_WITH_TCP_NODE else ""
        native = _native.moe.InternodeAllToAll(
            cfg._native_shape(num_ranks), cfg.dispatch_dtype.name, cfg.combine_dtype.name, float(timeout),
            int(node_size), [int(r) for r in local_ranks], provider, node, config.domains,
            config.completion, config.split_threshold, config.path)
        self.node_size = node_size
        self.local_ranks = list(local_ranks)
        self._uid = next(_uid)
        self._kv = False
        try:
            if native.needs_engine:
                remote = list(native.remote_ranks())
                if remote:
                    mine = {r: bytes(native.peer_info(r)) for r in local_ranks}
                    infos = self._exchange(mine, remote, config)
                    for r in remote:
                        native.connect(infos[r])
            native.finalize()
        except BaseException:
            native.close()
            raise
        self._ctx = native
        self.context_id = int(native.id)
        self._finalizer = weakref.finalize(self, _close_native, native, self._uid, self._kv, float(timeout))

    def _exchange(self, mine: dict[int, bytes], remote: list[int], config: InternodeConfig) -> dict[int, bytes]:
        infos, self._kv = exchange_peer_info(_key(self._uid), mine, remote, config)
        return infos

    def timings(self, rank: int, n: int) -> np.ndarray:
        """Host timestamps (steady clock, ns) of the last ``n`` calls of each phase of local
        ``rank``: ``[n, 4 (dispatch_send, dispatch_recv, combine_send, combine_recv), 2 (start,
        end)]`` uint64; 0 where no such call happened."""
        return np.asarray(self._ctx.timings(int(rank), int(n)), np.uint64).reshape(n, 4, 2)

    def engine_bytes(self, rank: int) -> list[int]:
        """Bytes local ``rank`` wrote through the engine per phase so far."""
        return list(self._ctx.engine_bytes(int(rank)))

    def engine_ops(self, rank: int) -> list[int]:
        """Writes and signals local ``rank`` posted through the engine per phase so far."""
        return list(self._ctx.engine_ops(int(rank)))


def _close_native(native, uid: int, kv: bool, timeout: float) -> None:
    try:
        broken = bool(native.error()[0])
        if not broken:
            native.drain(timeout)  # every row this process wrote has been handed over (or landed)
            if kv:
                # No process closes its engine while a peer may still count on its writes. A
                # process that failed skips it (its peers fail too, or wait here at most `timeout`).
                Bootstrap().barrier(f"jax_garden_moe_internode_{uid}_close", timeout)
    except Exception:  # a dead peer: close anyway, nothing needs this process's writes any more
        pass
    native.close()


def create_context(cfg: Any, num_ranks: int, timeout: float, node_size: int, local_ranks: list[int],
                   config: InternodeConfig | None) -> InternodeContext:
    """The context of ``cfg`` (``max_recv_tokens`` resolved) for ranks ``local_ranks`` of this
    process. Collective: every process of the mesh calls it, in the same order as its other
    AllToAlls."""
    return InternodeContext(cfg, num_ranks, timeout, node_size, local_ranks, config or InternodeConfig())



def exchange_peer_info(namespace: str, mine: dict[int, bytes], remote: list[int],
                       config: "InternodeConfig") -> tuple[dict[int, bytes], bool]:
    """The bootstrap of node groups (CPU and GPU), in one place: an all-gather of ``{rank: bytes}``
    through ``config.bootstrap`` (a callable the caller provides) or jax.distributed's key-value store
    under ``namespace``. Returns the bytes of every rank in ``remote`` and whether the store was used."""
    if config.bootstrap is not None:
        got = config.bootstrap(dict(mine))
        if not isinstance(got, dict):
            raise TypeError(f"InternodeConfig.bootstrap must return a dict {{rank: bytes}}, got "
                            f"{type(got).__name__}")
        missing = [r for r in remote if r not in got]
        if missing:
            raise ValueError(f"InternodeConfig.bootstrap returned no peer info for ranks {missing}")
        return {r: _validate.check_bytes_like(f"bootstrap peer info of rank {r}", got[r]) for r in remote}, False
    try:
        boot = Bootstrap()
    except RuntimeError:
        raise RuntimeError("moe.AllToAll across processes: jax.distributed is not initialised (its "
                           "key-value store carries the peer information); initialise it or pass "
                           "InternodeConfig(bootstrap=...)") from None
    # Peers reach this point at their own pace (imports, compiles): a wait of its own.
    return boot.exchange(namespace, mine, remote, _KV_TIMEOUT_MS / 1000), True

def _key(uid: int) -> str:
    """The bootstrap namespace of context ``uid``: rank r's peer info is under ``<namespace>/r``."""
    return f"jax_garden/moe_internode/{uid}"
