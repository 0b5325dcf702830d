"""A paged KV cache whose per-layer K and V arrays stay at stable, registered addresses."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Sequence

import numpy as np

from jax_garden import fabric
from jax_garden._validate import check_int
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
    :class:`PrefillSide` on it fails, and further use raises until :meth:`reregister` registers the
    buffers the arrays are in now. Remote writes only ever target pages that no step reads or writes
    (pages of PENDING requests), so they never race with XLA.

    **Reading the cache on the host.** :meth:`read` returns copies. A NumPy array obtained from a
    cache array (``np.asarray(cache.k[l])``) is, on CPU, a view of the registered memory: while it is
    alive XLA cannot update that buffer in place, so a step's outputs land elsewhere and ``commit``
    refuses them (the cache keeps its arrays; drop the view and run the step again).
    """

    def __init__(self, engine: fabric.TransferEngine, layout: KVLayout, *, devices: Sequence[Any] | None = None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if not isinstance(engine, fabric.TransferEngine):
            raise TypeError(f"engine must be a fabric.TransferEngine, got {type(engine).__name__}")
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a kv.KVLayout, got {type(layout).__name__}")
        if devices is not None and (isinstance(devices, (str, bytes)) or not hasattr(devices, "__iter__")):
            raise TypeError(f"devices must be a sequence of jax devices, got {type(devices).__name__}")
        devices = list(devices) if devices is not None else [jax.devices()[0]]
        if not devices:
            raise ValueError("devices must not be empty")
        if not all(isinstance(d, jax.Device) for d in devices):
            raise TypeError(f"devices must be jax devices, got {[type(d).__name__ for d in devices]}")
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
        self._register()
        self.shard_bytes = self._regions[0][0][0].length
        self.is_cuda = self._regions[0][0][0].is_cuda
        self.allocator = PageAllocator(layout.num_pages)
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._listeners: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def _register(self) -> None:
        """Register the buffers of the current arrays (every layer, K and V, shard)."""
        regions, bases = [], []
        for pair in self._arrays:
            regs, bs = [], []
            for arr in pair:
                shards = self._shards(arr)
                regs.append([self.engine.register(s.data) for s in shards])
                bs.append([s.data.unsafe_buffer_pointer() for s in shards])
            regions.append(regs)
            bases.append(bs)
        self._regions: list[list[list[fabric.MemoryRegion]]] = regions
        self._bases: list[list[list[int]]] = bases

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

    def _index(self, layer: Any, kind: Any, shard: Any) -> tuple[int, int, int]:
        return (check_int("layer", layer, maximum=self.layout.num_layers - 1),
                check_int("kind", kind, maximum=1), check_int("shard", shard, maximum=self.num_shards - 1))

    def region(self, layer: int, kind: int, shard: int) -> fabric.MemoryRegion:
        """The registered buffer of one shard of layer ``layer``'s K (kind 0) or V (kind 1)."""
        layer, kind, shard = self._index(layer, kind, shard)
        return self._regions[layer][kind][shard]

    def read(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of layer ``layer``'s K and V as NumPy arrays (every page; a fresh copy each call, so
        later remote writes show in the next read). The way to look at the cache from the host."""
        import jax
        import jax.numpy as jnp

        layer = check_int("layer", layer, maximum=self.layout.num_layers - 1)
        self._check_usable()
        k, v = self._arrays[layer]
        return tuple(np.asarray(jax.device_get(jnp.copy(a))) for a in (k, v))  # type: ignore[return-value]

    def host_view(self, layer: int, kind: int, shard: int = 0) -> np.ndarray:
        """A writable uint8 NumPy view of one registered host buffer (layer, K=0/V=1, shard): raw access
        behind XLA's back, for inspection and tests (while it is alive, XLA cannot update that buffer
        in place: drop it before the next step). GPU caches raise ValueError."""
        import ctypes

        r = self.region(layer, kind, shard)
        if r.is_cuda:
            raise ValueError("host_view: the cache lives in GPU memory")
        return np.ctypeslib.as_array((ctypes.c_uint8 * r.length).from_address(r.base))

    def descriptors(self) -> list[bytes]:
        """Descriptor bytes of every registered buffer, ordered layer, kind (K, V), shard."""
        return [bytes(r.descriptor) for regs in self._regions for kind in regs for r in kind]

    def _pointers(self, arr: Any) -> list[int]:
        if self.num_shards == 1 and len(arr.sharding.device_set) == 1:
            # One buffer: read it directly (addressable_shards builds Shard objects, ~8x the cost;
            # commit reads 2 x num_layers arrays on the prefill's critical path)
            return [arr.unsafe_buffer_pointer()]
        return [s.data.unsafe_buffer_pointer() for s in self._shards(arr)]

    def commit(self, k: Sequence[Any], v: Sequence[Any]) -> None:
        """Adopt the outputs of a donated step (per layer K and V). Raises BufferMovedError if any
        buffer is not the registered one (see the class docstring for what happens then)."""
        self._check_usable()
        for name, seq in (("k", k), ("v", v)):
            if isinstance(seq, (str, bytes)) or not hasattr(seq, "__iter__"):
                raise TypeError(f"commit: {name} must be a sequence of jax.Arrays (one per layer), got "
                                f"{type(seq).__name__}")
        k, v = list(k), list(v)
        L = self.layout.num_layers
        if len(k) != L or len(v) != L:
            raise ValueError(f"commit: expected {L} K and {L} V arrays, got {len(k)} and {len(v)}")
        moved = []  # (layer, kind, what)
        for layer in range(L):
            for kind, arr in enumerate((k[layer], v[layer])):
                self._check_array("commit", layer, kind, arr)
                ptrs = self._pointers(arr)
                if ptrs != self._bases[layer][kind]:
                    moved.append((layer, kind, f"layer {layer} {'KV'[kind]}: registered "
                                  f"{[hex(p) for p in self._bases[layer][kind]]}, got {[hex(p) for p in ptrs]}"))
        detail = "; ".join(m[2] for m in moved[:3]) + (f" (+{len(moved) - 3} more)" if len(moved) > 3 else "")
        if any(self._arrays[layer][kind].is_deleted() for layer, kind, _ in moved):
            self._mark_broken(f"XLA moved donated cache buffers ({detail}); the registered memory may be reused "
                              "by XLA, so the cache can no longer receive remote writes. Once its pending requests "
                              "ended, cache.reregister(k, v) with the step's outputs registers their buffers")
            raise BufferMovedError(self._broken)
        # Arrays updated in place are adopted; where XLA could not donate (the old array is alive and
        # still holds the registered buffer) the cache keeps the old array.
        stale = {(layer, kind) for layer, kind, _ in moved}
        for layer in range(L):
            self._arrays[layer] = [self._arrays[layer][kind] if (layer, kind) in stale else (k[layer], v[layer])[kind]
                                   for kind in (0, 1)]
        if moved:
            raise BufferMovedError(f"commit: {len(moved)} output(s) are not at the registered buffers ({detail}): "
                                   "XLA could not update them in place, so the cache keeps their previous contents "
                                   "(the step's update of those arrays is lost; the other arrays were adopted). "
                                   "Donate the cache arguments of the step (jax.jit(..., donate_argnums=...)) and keep "
                                   "no NumPy array obtained from a cache array alive: np.asarray(cache.k[l]) is a "
                                   "view of the cache's memory on CPU and stops XLA from reusing it; read with "
                                   "cache.read(layer), which copies")

    def check(self) -> None:
        """Raise BufferMovedError unless every array is alive. Each array was checked at its
        registered buffers when the cache adopted it (init, commit, reregister), and a jax.Array's
        buffers never change while it lives, so this is one ``is_deleted`` per array (reading the
        pointers again cost ~12 us per array: 0.8 ms of a stream's finish at 32 layers)."""
        self._check_usable()
        for layer, pair in enumerate(self._arrays):
            for kind, arr in enumerate(pair):
                if arr.is_deleted():
                    raise BufferMovedError(f"layer {layer} {'KV'[kind]} was donated to a step whose outputs were "
                                           "not committed: call cache.commit(k, v) with the step's outputs")

    def block_until_ready(self, layers: Sequence[int] | None = None) -> None:
        """Wait for the arrays of ``layers`` (default: every layer)."""
        import jax

        pairs = self._arrays if layers is None else [self._arrays[layer] for layer in layers]
        jax.block_until_ready([a for pair in pairs for a in pair if not a.is_deleted()])

    def reregister(self, k: Sequence[Any], v: Sequence[Any]) -> None:
        """Make a broken cache usable again without restarting: adopt ``k`` and ``v`` (per layer, e.g.
        the outputs whose buffers moved) wherever they are and register their buffers anew. Every
        DecodeSide on the cache gets a new cache id (tickets of the old registration are refused) and
        sends the new descriptors with its next ACCEPT. ``ValueError`` while a request or stream on the
        cache is still live (cancel them and wait for them to end first)."""
        k, v = list(k), list(v)
        L = self.layout.num_layers
        if len(k) != L or len(v) != L:
            raise ValueError(f"reregister: expected {L} K and {L} V arrays, got {len(k)} and {len(v)}")
        for layer in range(L):
            for kind, arr in enumerate((k[layer], v[layer])):
                self._check_array("reregister", layer, kind, arr)
                if not arr.sharding.is_equivalent_to(self.sharding, arr.ndim):
                    raise ValueError(f"reregister: layer {layer} {'KV'[kind]} is not sharded like the cache "
                                     f"({self.sharding})")
        with self._lock:
            listeners = list(self._listeners)
        busy = [why for side in listeners if (why := side._busy_with_cache())]
        if busy:
            raise ValueError(f"reregister: {busy[0]}; cancel them and wait until they ended")
        with self._lock:
            old = self._regions
            self._arrays = [[k[layer], v[layer]] for layer in range(L)]
            self._register()
            self._broken = None
        del old  # unregistered when dropped
        for side in listeners:
            side._cache_reregistered()

    def _check_array(self, what: str, layer: int, kind: int, arr: Any) -> None:
        import jax

        # (not hasattr(arr, "addressable_shards"): that builds the array's Shard objects)
        if not isinstance(arr, jax.Array):
            raise TypeError(f"{what}: layer {layer} {'KV'[kind]} is a {type(arr).__name__}, not a jax.Array")
        if tuple(arr.shape) != self.layout.array_shape or arr.dtype != self.layout.np_dtype:
            raise ValueError(f"{what}: layer {layer} {'KV'[kind]} has shape {tuple(arr.shape)} {arr.dtype}, "
                             f"the cache holds {self.layout.array_shape} {self.layout.dtype}")
        if arr.is_deleted():
            raise ValueError(f"{what}: layer {layer} {'KV'[kind]} was deleted (donated to another step)")

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
