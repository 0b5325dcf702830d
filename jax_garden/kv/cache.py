"""A paged KV cache whose per-layer K and V arrays stay at stable, registered addresses."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Sequence

import numpy as np

from jax_garden import fabric
from jax_garden.kv.allocator import PageAllocator
from jax_garden.kv.errors import BufferMovedError
from jax_garden.kv.layout import KVLayout

log = logging.getLogger("jax_garden.kv")


class PagedKVCache:
    """Per layer K and V ``jax.Array``s of ``layout.array_shape`` whose buffers are registered with
    ``engine`` and must stay where they are.

    ``devices``: the cache is sharded over KV heads across these devices (one equal head slice each,
    ``kv_heads % len(devices) == 0``); default: the first device. :attr:`sharding` is the
    ``NamedSharding`` to use in your jitted steps.

    **Lifetime rule (donation).** XLA owns the buffers; jax_garden registers them once. A jitted step
    that updates the cache must donate it (``donate_argnums``) so XLA writes the outputs in place, and
    hand the outputs back with :meth:`commit`, which checks that every output buffer is the registered
    one (``unsafe_buffer_pointer``). If XLA moved a buffer, ``commit`` raises :class:`BufferMovedError`:
    when the old arrays are still alive (nothing was donated) the cache keeps them and stays usable;
    when they were donated (their memory may be reused by XLA) the cache is marked broken, every
    pending request of a :class:`DecodeSide` on it is cancelled (fenced) and every stream of a
    :class:`PrefillSide` on it fails, and further use raises. Remote writes only ever target pages
    that no step reads or writes (pages of PENDING requests), so they never race with XLA.
    """

    def __init__(self, engine: fabric.TransferEngine, layout: KVLayout, *, devices: Sequence[Any] | None = None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if not isinstance(engine, fabric.TransferEngine):
            raise TypeError(f"engine must be a fabric.TransferEngine, got {type(engine).__name__}")
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a kv.KVLayout, got {type(layout).__name__}")
        devices = list(devices) if devices is not None else [jax.devices()[0]]
        if not devices:
            raise ValueError("devices must not be empty")
        if layout.kv_heads % len(devices):
            raise ValueError(f"{len(devices)} devices do not divide kv_heads={layout.kv_heads}: the cache is "
                             "sharded over KV heads, one equal slice per device")
        self.engine, self.layout = engine, layout
        self.num_shards = len(devices)
        self.mesh = Mesh(np.array(devices, dtype=object), ("kv_heads",))
        spec = [None] * 4
        spec[layout.head_axis] = "kv_heads"
        self.sharding = NamedSharding(self.mesh, PartitionSpec(*spec))
        make = jax.jit(lambda: jnp.zeros(layout.array_shape, layout.np_dtype), out_shardings=self.sharding)
        self._arrays: list[list[Any]] = [[make(), make()] for _ in range(layout.num_layers)]
        self._regions: list[list[list[fabric.MemoryRegion]]] = []
        self._bases: list[list[list[int]]] = []
        for pair in self._arrays:
            regs, bases = [], []
            for arr in pair:
                shards = self._shards(arr)
                regs.append([engine.register(s.data) for s in shards])
                bases.append([s.data.unsafe_buffer_pointer() for s in shards])
            self._regions.append(regs)
            self._bases.append(bases)
        self.shard_bytes = self._regions[0][0][0].length
        self.is_cuda = self._regions[0][0][0].is_cuda
        self.allocator = PageAllocator(layout.num_pages)
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._listeners: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def _shards(self, arr: Any) -> list[Any]:
        axis = self.layout.head_axis
        return sorted(arr.addressable_shards, key=lambda s: s.index[axis].start or 0)

    # -- arrays ------------------------------------------------------------------------------------
    @property
    def k(self) -> list[Any]:
        """The K arrays, one per layer (a new list; pass it to your step and commit its outputs)."""
        return [p[0] for p in self._arrays]

    @property
    def v(self) -> list[Any]:
        return [p[1] for p in self._arrays]

    @property
    def broken(self) -> str | None:
        """Why the cache can no longer be used (None while it can)."""
        return self._broken

    def region(self, layer: int, kind: int, shard: int) -> fabric.MemoryRegion:
        """The registered buffer of one shard of layer ``layer``'s K (kind 0) or V (kind 1)."""
        return self._regions[layer][kind][shard]

    def host_view(self, layer: int, kind: int, shard: int = 0) -> np.ndarray:
        """A writable uint8 NumPy view of one registered host buffer (layer, K=0/V=1, shard): raw access
        behind XLA's back, for inspection and tests. GPU caches raise ValueError."""
        import ctypes

        r = self._regions[layer][kind][shard]
        if r.is_cuda:
            raise ValueError("host_view: the cache lives in GPU memory")
        return np.ctypeslib.as_array((ctypes.c_uint8 * r.length).from_address(r.base))

    def descriptors(self) -> list[bytes]:
        """Descriptor bytes of every registered buffer, ordered layer, kind (K, V), shard."""
        return [bytes(r.descriptor) for regs in self._regions for kind in regs for r in kind]

    def _pointers(self, arr: Any) -> list[int]:
        return [s.data.unsafe_buffer_pointer() for s in self._shards(arr)]

    def commit(self, k: Sequence[Any], v: Sequence[Any]) -> None:
        """Adopt the outputs of a donated step (per layer K and V). Raises BufferMovedError if any
        buffer is not the registered one (see the class docstring for what happens then)."""
        self._check_usable()
        k, v = list(k), list(v)
        L = self.layout.num_layers
        if len(k) != L or len(v) != L:
            raise ValueError(f"commit: expected {L} K and {L} V arrays, got {len(k)} and {len(v)}")
        moved = []
        for layer in range(L):
            for kind, arr in enumerate((k[layer], v[layer])):
                if not hasattr(arr, "addressable_shards"):
                    raise TypeError(f"commit: layer {layer} {'KV'[kind]} is a {type(arr).__name__}, not a jax.Array")
                if tuple(arr.shape) != self.layout.array_shape or np.dtype(arr.dtype) != self.layout.np_dtype:
                    raise ValueError(f"commit: layer {layer} {'KV'[kind]} has shape {tuple(arr.shape)} {arr.dtype}, "
                                     f"the cache holds {self.layout.array_shape} {self.layout.dtype}")
                if arr.is_deleted():
                    raise ValueError(f"commit: layer {layer} {'KV'[kind]} was deleted (donated to another step)")
                ptrs = self._pointers(arr)
                if ptrs != self._bases[layer][kind]:
                    moved.append(f"layer {layer} {'KV'[kind]}: registered "
                                 f"{[hex(p) for p in self._bases[layer][kind]]}, got {[hex(p) for p in ptrs]}")
        if not moved:
            for layer in range(L):
                self._arrays[layer] = [k[layer], v[layer]]
            return
        detail = "; ".join(moved[:3]) + (f" (+{len(moved) - 3} more)" if len(moved) > 3 else "")
        if any(a.is_deleted() for pair in self._arrays for a in pair):
            self._mark_broken(f"XLA moved donated cache buffers ({detail}); the registered memory may be reused "
                              "by XLA, so the cache can no longer receive remote writes")
            raise BufferMovedError(self._broken)
        raise BufferMovedError(f"commit: outputs are not at the registered buffers ({detail}); the cache keeps "
                               "its registered arrays. Donate the cache arguments of the step "
                               "(jax.jit(..., donate_argnums=...)) so XLA updates them in place")

    def check(self) -> None:
        """Raise BufferMovedError unless every array is alive and at its registered buffer."""
        self._check_usable()
        for layer, pair in enumerate(self._arrays):
            for kind, arr in enumerate(pair):
                if arr.is_deleted():
                    raise BufferMovedError(f"layer {layer} {'KV'[kind]} was donated to a step whose outputs were "
                                           "not committed: call cache.commit(k, v) with the step's outputs")
                if self._pointers(arr) != self._bases[layer][kind]:
                    self._mark_broken(f"layer {layer} {'KV'[kind]} is no longer at its registered buffer")
                    raise BufferMovedError(self._broken)

    def block_until_ready(self) -> None:
        import jax

        jax.block_until_ready([a for pair in self._arrays for a in pair if not a.is_deleted()])

    def _check_usable(self) -> None:
        if self._broken:
            raise BufferMovedError(f"the cache is broken: {self._broken}")

    def _mark_broken(self, why: str) -> None:
        with self._lock:
            if self._broken:
                return
            self._broken = why
            listeners = list(self._listeners)
        log.error("kv cache broken: %s", why)
        for side in listeners:
            try:
                side._cache_broken(why)
            except Exception:  # noqa: BLE001 - every listener gets its chance
                log.exception("kv: cache-broken listener failed")

    def __repr__(self) -> str:
        lay = self.layout
        return (f"PagedKVCache({lay.num_layers} layers x {lay.num_pages} pages of {lay.page_tokens} tokens, "
                f"{lay.kv_heads} heads x {lay.head_dim} {lay.dtype} {lay.page_layout}, {self.num_shards} shard(s))")
