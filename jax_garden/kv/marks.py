"""Layer marks: the jit op a prefill program calls after each layer's KV write, and the watcher
slots it stores into."""

from __future__ import annotations

from typing import Any

from jax_garden import fabric
from jax_garden._validate import check_int


class LayerMarks:
    """Watcher slots of a :class:`PrefillSide`, one per layer: :func:`mark_layer` stores a stream's
    token into slot ``layer`` once that layer's KV is in the source cache."""

    def __init__(self, watcher: fabric.Watcher, num_layers: int):
        self.watcher = watcher
        self.num_layers = num_layers
        self._slots = [watcher.slot(i) for i in range(num_layers)]

    def slot(self, layer: int) -> fabric.WatcherSlot:
        return self._slots[check_int("layer", layer, maximum=self.num_layers - 1)]


def mark_layer(marks: LayerMarks, layer: int, token: Any, *arrays: Any, axis_name: str | None = None) -> Any:
    """Inside the jitted prefill: "layer ``layer`` of the stream ``token`` is in the cache".

    Stores ``token`` (``jnp.uint32(stream.token)``, passed to the program as an argument so every
    request stores its own value, also under CUDA-graph replay) into the layer's watcher slot once
    every array in ``arrays`` (that layer's updated K and V source arrays) is computed. Returns
    ``arrays`` unchanged. On GPU the store is a one-thread kernel on the program's stream: no host
    sync.

    The mark depends on one element read from each array, not on the arrays themselves: passing the
    cache arrays through the signal op (an aliasing custom call) makes XLA update a temporary and
    copy it into the cache buffer at the end of the program, after the mark. With a scalar
    dependency XLA updates the donated buffer in place, so the data is in the registered buffer when
    the mark is stored (``tests/test_kv.py`` checks this at every mark). Keep the cache updates
    plain (``.at[pages].set`` / ``dynamic_update_slice`` on the donated arrays).

    For a head-sharded source cache call it inside ``shard_map`` with ``axis_name`` = the mesh axis
    of the heads: the scalars are summed over the axis (a tiny all-reduce), so the mark is stored
    only after every device wrote its slice.
    """
    import jax
    import jax.numpy as jnp

    if not isinstance(marks, LayerMarks):
        raise TypeError(f"mark_layer: marks must be PrefillSide.marks, got {type(marks).__name__}")
    slot = marks.slot(layer)
    if not arrays:
        raise ValueError("mark_layer: pass the layer's updated K/V arrays (the mark is ordered after them)")
    dep = sum(jnp.ravel(a)[0].astype(jnp.float32) for a in arrays)
    if axis_name is not None:
        dep = jax.lax.psum(dep, axis_name)
    stored = fabric.signal(slot, token, dep)
    # Whatever consumes the returned arrays (the next layer) runs after the store: without this XLA
    # may schedule the store late (the CPU runtime did, up to the end of the program), and the layer
    # would stream only at finish(). The barrier aliases its operands, so no copy.
    arrays = jax.lax.optimization_barrier((stored, tuple(arrays)))[1]
    return arrays[0] if len(arrays) == 1 else tuple(arrays)
