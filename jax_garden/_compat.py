"""The one place for jax-version shims: every jax API that moved or changed between versions, and
every private jax API jax_garden reads, is reached through here (written against jax 0.11)."""

from __future__ import annotations

from typing import Any, Iterable

import jax

try:  # jax >= 0.6 moved shard_map to the top level
    shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map  # type: ignore[no-redef]


def jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def typeof(x: Any) -> Any:
    """The abstract value (shape, dtype, manual-axes type) of an array, tracer or Python scalar."""
    if not isinstance(x, jax.Array):
        x = jax.numpy.asarray(x)
    try:
        return jax.typeof(x)
    except AttributeError:  # pragma: no cover - jax < 0.6
        return jax.core.get_aval(x)


def varying_axes(x: Any) -> frozenset:
    """The manual mesh axes over which ``x`` varies inside ``shard_map`` (empty outside it, or
    under ``check_vma=False``). jax 0.11 keeps them in ``aval.mat.varying``; earlier versions in
    ``aval.vma``."""
    aval = typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))  # pragma: no cover - jax < 0.11


def cast_varying(x: jax.Array, axes: Iterable[str]) -> jax.Array:
    """``x`` typed as varying over ``axes`` too (no data movement)."""
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying")


def varying_result(struct: jax.ShapeDtypeStruct, axes: frozenset) -> jax.ShapeDtypeStruct:
    """A result type for ``jax.ffi.ffi_call`` inside ``shard_map`` that varies over ``axes``
    (``ffi_call`` would otherwise type a per-rank result as equal on every rank)."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.ShapeDtypeStruct(
        struct.shape, struct.dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=axes),
        sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


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
