"""Geometry of a paged KV cache."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from jax_garden import fabric


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Geometry of a paged KV cache. Per layer there is one K and one V array of shape
    ``(num_pages, kv_heads, page_tokens, head_dim)`` (``page_layout="HND"``, the default: a head
    slice of a page is contiguous) or ``(num_pages, page_tokens, kv_heads, head_dim)`` (``"NHD"``).
    Two caches exchange KV when every field but ``num_pages`` matches."""

    num_layers: int
    num_pages: int
    page_tokens: int
    kv_heads: int
    head_dim: int
    dtype: Any = "bfloat16"
    page_layout: str = "HND"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_pages", "page_tokens", "kv_heads", "head_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"KVLayout.{name} must be an int, got {type(v).__name__} {v!r}")
            if not 0 < int(v) < 1 << 31:
                raise ValueError(f"KVLayout.{name} must be in 1..2^31-1, got {v}")
            object.__setattr__(self, name, int(v))
        if self.num_layers > fabric.Watcher.num_slots:
            raise ValueError(f"KVLayout.num_layers must be <= {fabric.Watcher.num_slots} (one watcher slot per "
                             f"layer), got {self.num_layers}")
        try:
            import jax.numpy as jnp

            dt = np.dtype(jnp.dtype(self.dtype))
        except TypeError as e:
            raise TypeError(f"KVLayout.dtype: {e}") from None
        object.__setattr__(self, "dtype", dt.name)
        if self.page_layout not in ("HND", "NHD"):
            raise ValueError(f"KVLayout.page_layout must be 'HND' or 'NHD', got {self.page_layout!r}")

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    # np_dtype and array_shape are cached (the layout is frozen): the cache checks every array it
    # adopts against them, 2 x num_layers arrays per prefill step.
    @functools.cached_property
    def np_dtype(self) -> np.dtype:
        import jax.numpy as jnp

        return np.dtype(jnp.dtype(self.dtype))

    @property
    def head_axis(self) -> int:
        return 1 if self.page_layout == "HND" else 2

    @functools.cached_property
    def array_shape(self) -> tuple[int, int, int, int]:
        if self.page_layout == "HND":
            return (self.num_pages, self.kv_heads, self.page_tokens, self.head_dim)
        return (self.num_pages, self.page_tokens, self.kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one layer's K (or V), all heads."""
        return self.page_tokens * self.kv_heads * self.head_dim * self.itemsize

    @property
    def token_bytes(self) -> int:
        """KV bytes of one token over all layers (K and V)."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.itemsize

    def pages_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.page_tokens)

    def mismatches(self, other: "KVLayout") -> list[str]:
        """Fields (other than num_pages) in which two layouts differ, as 'name: a vs b'."""
        out = []
        for f in ("num_layers", "page_tokens", "kv_heads", "head_dim", "dtype", "page_layout"):
            a, b = getattr(self, f), getattr(other, f)
            if a != b:
                out.append(f"{f}: {a} vs {b}")
        return out

