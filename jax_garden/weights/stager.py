"""The stager: gathers (and quantizes) a chunk's pieces into a registered staging slot, in the
destination's row-major order. ``StagingRing`` is the bounded ring of slots of one device.

``HOST_STAGING`` (module attribute, default True): CPU devices stage through NumPy slots; False
makes them use the jax in-place scheme that GPUs use (tests exercise both on CPU)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from jax_garden import fabric
from jax_garden.weights.fp8 import FP8_MAX, INV_FP8_MAX, interleave
from jax_garden.weights.layout import slices
from jax_garden.weights.plan import KIND_COPY, KIND_SCALE, Chunk, stage_groups

HOST_STAGING = True  # CPU devices stage through NumPy slots (False: the jax in-place scheme, as on GPUs)


def _jax_block_scale(region: Any, block: tuple) -> tuple[Any, Any]:
    """(region padded and split into blocks, float32 scales) of a region (any float dtype)."""
    import jax.numpy as jnp

    split, pad = interleave(region.shape, block)
    xs = (jnp.pad(region, pad) if any(p for _, p in pad) else region).reshape(split)
    amax = jnp.max(jnp.abs(xs), axis=tuple(range(1, 2 * region.ndim, 2))) if region.ndim else jnp.abs(xs)
    amax = amax.astype(jnp.float32)
    scale = jnp.where(amax > 0, amax * INV_FP8_MAX, jnp.float32(1.0)).astype(jnp.float32)
    return xs, scale


def _jax_piece_bytes(src: Any, start: Sequence[Any], key: tuple) -> Any:
    import jax.numpy as jnp
    from jax import lax

    kind, _sshape, _sdtype, ext, _ddtype, block, region_ext, crop = key
    if kind == KIND_COPY:
        piece = lax.dynamic_slice(src, start, ext) if ext else src
    else:
        # The block maxima come from the source dtype (|x| and max are exact in any float format),
        # so no float32 copy of the region is made; the quantize is one fused elementwise pass.
        region = lax.dynamic_slice(src, start, region_ext) if region_ext else src
        xs, scale = _jax_block_scale(region, block)
        if kind == KIND_SCALE:
            piece = scale
        else:
            inv = jnp.float32(1.0) / scale
            sb = inv.reshape(tuple(v for n in scale.shape for v in (n, 1)))
            q = jnp.clip(xs.astype(jnp.float32) * sb, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
            q = q.reshape(tuple(n * b for n, b in zip(scale.shape, block)))
            piece = lax.slice(q, crop, tuple(c + e for c, e in zip(crop, ext))) if ext else q
    return lax.bitcast_convert_type(piece, jnp.uint8).reshape(-1)


_STAGE_FNS: dict[tuple, Any] = {}
_STAGE_LOCK = threading.Lock()


def _stage_fn(key: tuple, n: int) -> Any:
    """One jitted call that writes n same-geometry pieces into a donated staging slot in place."""
    with _STAGE_LOCK:
        fn = _STAGE_FNS.get((key, n))
        if fn is None:
            import jax
            from jax import lax

            nd = len(key[1])

            def stage(slot, srcs, starts, offs):
                for i in range(n):
                    b = _jax_piece_bytes(srcs[i], tuple(starts[i, d] for d in range(nd)), key)
                    slot = lax.dynamic_update_slice(slot, b, (offs[i],))
                return slot

            fn = jax.jit(stage, donate_argnums=(0,))
            _STAGE_FNS[(key, n)] = fn
        return fn


_BYTES_FNS: dict[tuple, Any] = {}


def _bytes_fn(key: tuple, n: int) -> Any:
    """One jitted call returning the bytes of n same-geometry pieces, concatenated (host staging
    of transformed pieces: the slot itself is NumPy memory)."""
    with _STAGE_LOCK:
        fn = _BYTES_FNS.get((key, n))
        if fn is None:
            import jax
            import jax.numpy as jnp

            nd = len(key[1])

            def pieces(srcs, starts):
                return jnp.concatenate([_jax_piece_bytes(srcs[i], tuple(starts[i, d] for d in range(nd)), key)
                                        for i in range(n)])

            fn = _BYTES_FNS[(key, n)] = jax.jit(pieces)
        return fn


class StagingRing:
    """``slots`` registered staging buffers of ``slot_bytes`` on one device, reused round robin;
    a slot is refilled only after every write from it completed (the staging bound).

    Device memory (GPU): the slots are jax arrays, filled in place by jitted calls that donate
    them. Host memory (CPU devices): the slots are NumPy arrays; plain pieces are copied with
    NumPy (XLA's CPU gather runs at a fraction of memcpy speed), transformed pieces are computed by
    a jitted call and copied in. ``host=False`` forces the device scheme on CPU (tests)."""

    def __init__(self, engine: fabric.TransferEngine, device: Any, slots: int, slot_bytes: int,
                 host: bool | None = None):
        import jax
        import jax.numpy as jnp

        self.device = device
        self.host = (getattr(device, "platform", "cpu") == "cpu" and HOST_STAGING) if host is None else host
        self.arrays: list[Any] = []
        self.regions = []
        for _ in range(slots):
            if self.host:
                a = np.zeros(slot_bytes, np.uint8)
            else:
                a = jax.device_put(jnp.zeros(slot_bytes, jnp.uint8), device)
                a.block_until_ready()
            self.arrays.append(a)
            self.regions.append(engine.register(a))
        self.pointers = [r.base for r in self.regions]
        self.busy: list[list] = [[] for _ in range(slots)]  # (dst rank, Transfer) per slot
        self.next = 0
        self.slot_bytes = slot_bytes
        # Host time spent dispatching the jitted stage calls (device scheme), apart from waiting for them.
        self.dispatch_seconds = 0.0
        self.dispatch_calls = 0
        self._prepared: dict[int, tuple[Chunk, list]] = {}

    def acquire(self, on_done: Callable[[int, Any], None]) -> int:
        k = self.next
        self.next = (k + 1) % len(self.arrays)
        for r, t in self.busy[k]:
            on_done(r, t)
        self.busy[k] = []
        return k

    def stage(self, k: int, chunk: Chunk, srcs: dict) -> None:
        if self.host:
            self._stage_host(k, chunk, srcs)
        else:
            self._stage_device(k, chunk, srcs)

    def view(self, k: int) -> np.ndarray:
        """The slot's bytes as NumPy (a copy for device slots)."""
        return np.asarray(self.arrays[k])

    def _stage_calls(self, chunk: Chunk) -> list[tuple[Any, list, Any, Any]]:
        """A chunk's stage calls (jitted fn, source keys, piece starts and slot offsets already on the
        device), built at the chunk's first push: later pushes only dispatch."""
        hit = self._prepared.get(id(chunk))
        if hit is not None and hit[0] is chunk:
            return hit[1]
        import jax

        calls = []
        for key, idx in stage_groups(chunk):
            items = [chunk.items[i] for i in idx]
            starts = np.array([it.g.region_lo for it in items], np.int32).reshape(len(items), len(key[1]))
            offs = np.array([chunk.offsets[i] for i in idx], np.int32)
            calls.append((_stage_fn(key, len(idx)), [(it.src_tensor, it.src_local) for it in items],
                          jax.device_put(starts, self.device), jax.device_put(offs, self.device)))
        self._prepared[id(chunk)] = (chunk, calls)  # holds the chunk: its id is not reused meanwhile
        return calls

    def _stage_host(self, k: int, chunk: Chunk, srcs: dict) -> None:
        slot = self.arrays[k]
        for key, idx in stage_groups(chunk):
            items = [chunk.items[i] for i in idx]
            if key[0] == KIND_COPY:
                for i, it in zip(idx, items):
                    src = np.asarray(srcs[(it.src_tensor, it.src_local)])
                    off, n = chunk.offsets[i], it.g.nbytes
                    np.copyto(slot[off:off + n].view(src.dtype).reshape(it.g.ext), src[slices(it.g.region_lo, it.g.ext)])
            else:
                starts = np.array([it.g.region_lo for it in items], np.int32).reshape(len(items), len(key[1]))
                out = np.asarray(_bytes_fn(key, len(items))(tuple(srcs[(it.src_tensor, it.src_local)] for it in items),
                                                            starts))
                n = items[0].g.nbytes
                for j, i in enumerate(idx):
                    off = chunk.offsets[i]
                    slot[off:off + n] = out[j * n:(j + 1) * n]

    def _stage_device(self, k: int, chunk: Chunk, srcs: dict) -> None:
        slot = self.arrays[k]
        t0 = time.perf_counter()
        calls = self._stage_calls(chunk)
        for fn, keys, starts, offs in calls:
            slot = fn(slot, tuple(srcs[key] for key in keys), starts, offs)
        self.dispatch_seconds += time.perf_counter() - t0
        self.dispatch_calls += len(calls)
        slot.block_until_ready()
        if slot.unsafe_buffer_pointer() != self.pointers[k]:
            # The registered memory is no longer this slot's: never write from it.
            raise RuntimeError("weights: XLA did not update the staging slot in place (donation refused); "
                               "cannot stage into registered memory on this backend")
        self.arrays[k] = slot
