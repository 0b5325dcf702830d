"""The one place for jax-version shims."""

from __future__ import annotations

import jax

try:  # jax >= 0.6 moved shard_map to the top level
    shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map  # type: ignore[no-redef]


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def distributed_client():
    """The coordination-service client of ``jax.distributed`` (key-value store, barriers), or
    None when ``jax.distributed.initialize`` was not called. Private jax API (stable through
    0.11): ``jax._src.distributed.global_state.client``."""
    try:
        from jax._src import distributed as _distributed
    except ImportError:  # pragma: no cover - moved in a later jax
        return None
    return getattr(getattr(_distributed, "global_state", None), "client", None)


def settle_effects() -> list[Exception]:
    """Waits for every dispatched program with side effects (``jax.effects_barrier``), returns
    the errors of those that failed, and forgets them. ``jax.effects_barrier`` re-raises the first
    failed program's error and keeps it, so after an expected failure jax would report it again
    at every later barrier, and at interpreter exit ("Exception ignored in atexit callback").
    Private jax API (``jax._src.dispatch.runtime_tokens``, stable through 0.11)."""
    try:
        from jax._src import dispatch
    except ImportError:  # pragma: no cover - moved in a later jax
        jax.effects_barrier()
        return []
    tokens = dispatch.runtime_tokens
    errors = []
    for token in [*tokens.current_tokens.values(), *tokens.output_runtime_tokens.values()]:
        try:
            token.block_until_ready()
        except jax.errors.JaxRuntimeError as e:
            errors.append(e)
    tokens.clear()
    return errors
