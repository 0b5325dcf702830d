"""Where a publisher's or subscriber's rank and devices are, and the bootstrap keys of weights."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jax_garden.weights.layout import Layout


def bootstrap_key(name: str, rank: int) -> str:
    """The key under which subscriber ``rank`` of the job ``name`` publishes its contact."""
    return f"jax_garden/weights/{name}/subscriber/{rank}"


def default_rank(layout: Layout, rank: int | None, side: str) -> int:
    if rank is None:
        if layout.num_ranks == 1:
            return 0
        import jax

        return layout.rank_of_process(jax.process_index())
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank < layout.num_ranks:
        raise ValueError(f"{side} rank {rank} out of range: the plan's {side} side has {layout.num_ranks} ranks")
    return rank


def local_devices(layout: Layout, rank: int, devices: Sequence[Any] | None) -> list[Any]:
    """jax device of every local index of ``rank``: from the layout's device ids, else ``devices``,
    else this process's local devices in order."""
    import jax

    n = layout.locals_of(rank)
    if devices is not None:
        devices = list(devices)
        if len(devices) < n:
            raise ValueError(f"rank {rank} has {n} local devices in the plan; {len(devices)} devices given")
        return devices[:n]
    by_id = {d.id: d for d in jax.devices()}
    out: list[Any] = [None] * n
    for ti in range(len(layout.tensors)):
        for l in range(n):
            if out[l] is None:
                did = layout.device_id(ti, rank, l)
                if did is not None and did in by_id:
                    out[l] = by_id[did]
    local = jax.local_devices()
    for l in range(n):
        if out[l] is None:
            if l >= len(local):
                raise ValueError(f"rank {rank} has {n} local devices in the plan; this process has {len(local)}")
            out[l] = local[l]
    return out


def put_on(x: Any, device: Any) -> Any:
    import jax

    if hasattr(x, "devices") and x.devices() == {device}:
        return x
    return jax.device_put(x, device)


def registrable(arr: Any) -> Any:
    """``arr`` as a buffer the engine may register (a writable contiguous NumPy copy if needed)."""
    if isinstance(arr, np.ndarray):
        return np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()
    return arr
