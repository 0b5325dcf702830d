"""The errors of jax_garden.kv."""

from __future__ import annotations


class OutOfPages(RuntimeError):
    """The allocator (or the request slots) cannot satisfy a reservation right now."""


class BufferMovedError(RuntimeError):
    """XLA placed a cache array somewhere else than its registered buffer (or the cache's arrays
    were donated and never committed): remote writes would land outside the cache."""


class StreamError(RuntimeError):
    """A prefill stream failed or was cancelled (the message says which and why)."""
