"""Expert-parallel MoE dispatch/combine as ``jax.jit`` primitives.

Usage (per rank, inside ``jax.jit(jax.shard_map(f, mesh=mesh, ...))`` over ``axis_name``)::

    cfg = moe.AllToAllConfig(num_experts=256, experts_per_token=8, hidden=7168, max_tokens=128)
    a2a = moe.AllToAll(cfg, mesh, axis_name="ep")        # outside jit
    expert_x, expert_scale, expert_counts = a2a.dispatch(x, indices, weights, bound_m=n)
    y = a2a.combine(expert_y, indices, weights, bound_m=n)

Semantics (docs/moe-ffi.md has the protocol). Per rank: ``x[T, H]``, ``indices[T, K]`` int32 global
expert ids, ``weights[T, K]`` f32, ``bound_m`` int32 scalar (tokens ``t >= bound_m`` are ignored and
their outputs are zero; values outside ``[0, T]`` are clamped). Rank ``r`` of ``R`` owns experts
``[r*E/R, (r+1)*E/R)``.

* ``dispatch`` returns ``expert_x[M, H]``: one segment per local expert, segment ``e`` starting at
  ``sum(round_up(expert_counts[e'], expert_padding) for e' < e)``; inside a segment rows are ordered
  by source rank, then token index, then ``k`` (a token that picks the same expert twice sends two
  rows). ``expert_counts[E/R]`` int32 is unpadded. Padding rows and rows after the last segment are
  zero. Routing entries whose expert id is outside ``[0, E)`` are ignored: they produce no row and
  contribute nothing to ``combine``.
* fp8 (``dispatch_dtype=jnp.float8_e4m3fn``, ``scale_block`` channels per f32 scale): dispatch also
  returns ``expert_scale[M, H/scale_block]``. Give ``x`` already in fp8 together with ``x_scale``,
  or give ``x`` in bf16/f16/f32 without ``x_scale`` and it is quantised here: per block,
  ``scale = amax * f32(1/448)`` (1 for an all-zero block) and ``x_fp8 = x / scale``, see
  :func:`quantize_fp8` (``±inf`` saturates to ``±448 * scale``, NaN stays NaN). For bf16 dispatch
  ``expert_scale`` is ``None``.
* ``combine`` returns ``y[T, H]`` (combine dtype) with
  ``y[t] = sum_k weights[t, k] * expert_y[row(t, k)]`` accumulated in f32 in ``k`` order, each
  product and sum rounded separately, then rounded once to the combine dtype: bitwise identical
  from run to run.
* Capacity: ``max_recv_tokens=None`` means the worst case ``round_up(R*T*K + L*(pad-1), pad)``, so
  nothing is ever dropped. With a smaller ``M``, segment ``e`` keeps its first
  ``min(count[e], M - start[e])`` rows in the order above and drops the rest; ``expert_counts``
  reports the rows kept, dropped rows contribute nothing to ``combine``, nothing is written out of
  bounds, and :meth:`AllToAll.dropped_rows` (outside jit) counts them.
* Split phases: ``dispatch_send`` returns a ``send_done`` token that ``dispatch_recv`` takes;
  ``combine_send`` takes the ``expert_counts`` of ``dispatch_recv`` and returns the token that
  ``combine_recv`` takes. One ``AllToAll`` has at most one dispatch and one combine in flight: use
  one ``AllToAll`` per micro-batch to overlap several.
* Errors: wrong argument types raise ``TypeError`` and wrong values ``ValueError`` when a call is
  traced (as in jax). At run time a failed wait or a broken call order fails the program, or, on
  CUDA, is recorded by the kernels and raised by :meth:`AllToAll.check` (:class:`MoeTimeoutError`,
  :class:`MoeDeviceError`) and by the next call at the latest (docs/moe-ffi.md).

:class:`RaggedAllToAll` computes the same dispatch/combine with ``jax.lax.ragged_all_to_all``
(GPU/TPU only: XLA:CPU has no ragged all-to-all). It is the baseline of the GPU benchmark and the
GPU tests.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_garden import _compat, _moe_internode, _settings
from jax_garden import _jax_garden as _native
from jax_garden import _validate
from jax_garden._moe_cuda import MoeDeviceError, MoeTimeoutError
from jax_garden._moe_internode import InternodeConfig

__all__ = [
    "AllToAllConfig",
    "AllToAll",
    "InternodeConfig",
    "RaggedAllToAll",
    "MoeDeviceError",
    "MoeTimeoutError",
    "quantize_fp8",
    "worst_case_recv_tokens",
    "gather_ragged_all_to_all",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INV_FP8_MAX = np.float32(1.0 / 448.0)
_BF16 = np.dtype(jnp.bfloat16)
_FP8 = np.dtype(jnp.float8_e4m3fn)
_DISPATCH_DTYPES = (_BF16, _FP8)
_COMBINE_DTYPES = (_BF16,)
_QUANTIZABLE = (np.dtype(np.float32), np.dtype(np.float16), _BF16)
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_LAYOUT = _native.moe  # ffi/moe/layout.h: the one definition of sizes and segments


def worst_case_recv_tokens(num_ranks: int, max_tokens: int, experts_per_token: int,
                           local_experts: int, expert_padding: int) -> int:
    """Receive rows that always suffice: all ``R*T*K`` rows on one rank, plus up to
    ``expert_padding - 1`` padding rows per local expert, rounded up to ``expert_padding``
    (``ffi/moe/layout.h``)."""
    args = {"num_ranks": num_ranks, "max_tokens": max_tokens, "experts_per_token": experts_per_token,
            "local_experts": local_experts, "expert_padding": expert_padding}
    args = {k: _validate.check_positive_int(f"worst_case_recv_tokens: {k}", x, maximum=_INT32_MAX)
            for k, x in args.items()}
    return int(_LAYOUT.worst_case_recv_tokens(**args))


@dataclasses.dataclass(frozen=True)
class AllToAllConfig:
    """Static description of one expert-parallel all-to-all (identical on every rank).

    Attributes:
      num_experts: E, global experts; must be divisible by the number of ranks.
      experts_per_token: K, routing entries per token (at most E).
      hidden: H, channels per token.
      max_tokens: T, static token rows per rank (the real count is ``bound_m``).
      dispatch_dtype: ``jnp.bfloat16`` or ``jnp.float8_e4m3fn`` (then ``scale_block`` is required).
      combine_dtype: ``jnp.bfloat16``.
      scale_block: channels per f32 scale for fp8 dispatch (128 is usual); must divide ``hidden``.
      expert_padding: each expert segment starts at a multiple of this.
      max_recv_tokens: M, receive rows per rank; ``None`` = worst case (nothing dropped). Must be a
        multiple of ``expert_padding``.

    Raises ``TypeError`` for a field of the wrong type (a non-integer size, a dtype that is not
    supported) and ``ValueError`` for a wrong value (a size < 1, ``experts_per_token >
    num_experts``, ``hidden`` not divisible by ``scale_block``, ...).
    """

    num_experts: int
    experts_per_token: int
    hidden: int
    max_tokens: int
    dispatch_dtype: Any = jnp.bfloat16
    combine_dtype: Any = jnp.bfloat16
    scale_block: int | None = None
    expert_padding: int = 1
    max_recv_tokens: int | None = None

    def __post_init__(self):
        def positive(name: str, value: Any) -> int:
            return _validate.check_positive_int(f"AllToAllConfig.{name}", value, maximum=_INT32_MAX)

        for name in ("num_experts", "experts_per_token", "hidden", "max_tokens", "expert_padding"):
            object.__setattr__(self, name, positive(name, getattr(self, name)))
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"AllToAllConfig: experts_per_token={self.experts_per_token} exceeds "
                             f"num_experts={self.num_experts}")
        try:
            dd = np.dtype(self.dispatch_dtype)
            cd = np.dtype(self.combine_dtype)
        except TypeError as e:
            raise TypeError(f"AllToAllConfig: not a dtype: {e}") from None
        if dd not in _DISPATCH_DTYPES:
            raise TypeError(f"AllToAllConfig.dispatch_dtype must be bfloat16 or float8_e4m3fn, "
                            f"got {dd.name}")
        if cd not in _COMBINE_DTYPES:
            raise TypeError(f"AllToAllConfig.combine_dtype must be bfloat16, got {cd.name}")
        object.__setattr__(self, "dispatch_dtype", dd)
        object.__setattr__(self, "combine_dtype", cd)
        if dd == _FP8:
            if self.scale_block is None:
                raise ValueError("AllToAllConfig: float8_e4m3fn dispatch needs scale_block "
                                 "(channels per f32 scale, usually 128)")
            sb = positive("scale_block", self.scale_block)
            if self.hidden % sb:
                raise ValueError(f"AllToAllConfig: hidden={self.hidden} is not divisible by "
                                 f"scale_block={sb}")
            object.__setattr__(self, "scale_block", sb)
        elif self.scale_block is not None:
            raise ValueError(f"AllToAllConfig: scale_block={self.scale_block} is only meaningful "
                             f"for float8_e4m3fn dispatch (dispatch_dtype is {dd.name})")
        if self.max_recv_tokens is not None:
            m = positive("max_recv_tokens", self.max_recv_tokens)
            if m % self.expert_padding:
                raise ValueError(f"AllToAllConfig: max_recv_tokens={m} is not a multiple of "
                                 f"expert_padding={self.expert_padding}")
            object.__setattr__(self, "max_recv_tokens", m)

    @property
    def is_fp8(self) -> bool:
        """True for float8_e4m3fn dispatch (with f32 scales)."""
        return self.dispatch_dtype == _FP8

    @property
    def scale_cols(self) -> int:
        """S: f32 scales per token row (``hidden / scale_block`` for fp8, else 0)."""
        return self.hidden // self.scale_block if self.is_fp8 else 0

    def local_experts(self, num_ranks: int) -> int:
        """L = E / R: experts owned by each of ``num_ranks`` ranks (ValueError if E % R != 0)."""
        num_ranks = _validate.check_positive_int("num_ranks", num_ranks, maximum=_INT32_MAX)
        if self.num_experts % num_ranks:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by the number of "
                             f"ranks R={num_ranks}")
        return self.num_experts // num_ranks

    def recv_tokens(self, num_ranks: int) -> int:
        """M for ``num_ranks`` ranks: ``max_recv_tokens`` or the worst case."""
        if self.max_recv_tokens is not None:
            return self.max_recv_tokens
        return worst_case_recv_tokens(num_ranks, self.max_tokens, self.experts_per_token,
                                      self.local_experts(num_ranks), self.expert_padding)

    def _native_shape(self, num_ranks: int):
        """The native ``MoeShape`` every implementation takes (M resolved for ``num_ranks``),
        checked by the native layer (ValueError naming the field)."""
        shape = _native.moe.MoeShape(
            num_ranks=num_ranks, num_experts=self.num_experts,
            experts_per_token=self.experts_per_token, hidden=self.hidden,
            max_tokens=self.max_tokens, max_recv_tokens=self.recv_tokens(num_ranks),
            expert_padding=self.expert_padding, scale_cols=self.scale_cols)
        shape.validate()
        return shape


def quantize_fp8(x: jax.Array, scale_block: int) -> tuple[jax.Array, jax.Array]:
    """Per-block fp8 e4m3 quantisation of ``x[T, H]``: for each block of ``scale_block`` channels,
    ``scale = amax * f32(1/448)`` (1 for a block whose finite values are all zero) and ``x_fp8 =
    x / scale`` (in f32, clipped to ±448, rounded to nearest even). Returns ``(x_fp8[T, H],
    scale[T, H/scale_block] f32)``; ``x_fp8 * scale`` ≈ ``x``.

    Non-finite inputs saturate: ``amax`` is taken over the block's finite values only, so the
    scale stays finite, ``±inf`` becomes ``±448`` (i.e. ``±448 * scale`` after dequantisation) and
    NaN stays NaN."""
    scale_block = _validate.check_positive_int("quantize_fp8: scale_block", scale_block)
    if len(np.shape(x)) != 2:
        raise ValueError(f"quantize_fp8: x must be 2-D [tokens, hidden], got shape {np.shape(x)}")
    t, h = np.shape(x)
    if h % scale_block:
        raise ValueError(f"quantize_fp8: hidden={h} is not divisible by scale_block={scale_block}")
    xb = jnp.asarray(x).astype(jnp.float32).reshape(t, h // scale_block, scale_block)
    amax = jnp.max(jnp.where(jnp.isfinite(xb), jnp.abs(xb), jnp.float32(0)), axis=-1)
    # A product with the f32 constant 1/448, not a division: XLA rewrites division by a constant
    # into this product anyway, and writing it out keeps every implementation bit-identical.
    scale = jnp.where(amax > 0, amax * _INV_FP8_MAX, jnp.float32(1.0))
    q = jnp.clip(xb / scale[..., None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return q.reshape(t, h), scale


# ---------------------------------------------------------------------------------------------
# Trace-time checks shared by AllToAll and RaggedAllToAll ("abstract evaluation": they name the
# wrong value and return nothing but normalised operands). Wrong dtypes are TypeErrors, wrong
# shapes and placements ValueErrors, as in jax.


def _check(op: str, name: str, x: Any, shape: tuple[int, ...], dtypes) -> None:
    a = _compat.typeof(x)
    dtypes = tuple(np.dtype(d) for d in (dtypes if isinstance(dtypes, tuple) else (dtypes,)))
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(a.shape)}, expected {tuple(shape)} "
                         f"(per-rank shapes, inside shard_map)")
    if np.dtype(a.dtype) not in dtypes:
        want = " or ".join(d.name for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {np.dtype(a.dtype).name}, expected {want}")


def _bound(op: str, cfg: AllToAllConfig, bound_m: Any) -> jax.Array:
    """bound_m as the int32 scalar operand. Every implementation clamps it to [0, T]
    (layout.h clamp_bound); a Python integer outside int32 is first saturated into int32, which
    the clamp maps to the same value."""
    if bound_m is None:
        return jnp.int32(cfg.max_tokens)
    if isinstance(bound_m, (int, np.integer)) and not isinstance(bound_m, (bool, np.bool_)):
        return jnp.int32(min(max(int(bound_m), _INT32_MIN), _INT32_MAX))
    a = _compat.typeof(bound_m)
    if tuple(a.shape) != ():
        raise ValueError(f"{op}: bound_m must be a scalar, got shape {tuple(a.shape)}")
    if np.dtype(a.dtype) != np.dtype(np.int32):
        raise TypeError(f"{op}: bound_m has dtype {np.dtype(a.dtype).name}, expected int32")
    return bound_m


def _rank(op: str, axis_name: str, num_ranks: int) -> jax.Array:
    try:
        size = jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(f"{op} must be called inside jax.shard_map over mesh axis "
                         f"{axis_name!r} (it is not bound here)") from None
    if size != num_ranks:
        raise ValueError(f"{op}: axis {axis_name!r} has size {size} here, but the AllToAll was "
                         f"built for R={num_ranks} ranks")
    return jax.lax.axis_index(axis_name).astype(jnp.int32)


def _routing(op: str, cfg: AllToAllConfig, indices: Any, weights: Any, bound_m: Any) -> jax.Array:
    t, k = cfg.max_tokens, cfg.experts_per_token
    _check(op, "indices", indices, (t, k), np.int32)
    _check(op, "weights", weights, (t, k), np.float32)
    return _bound(op, cfg, bound_m)


def _dispatch_input(op: str, cfg: AllToAllConfig, x: Any, x_scale: Any):
    """Returns (x in dispatch dtype, x_scale[T, S] f32), quantising when fp8 has no scales."""
    t, h, s = cfg.max_tokens, cfg.hidden, cfg.scale_cols
    if not cfg.is_fp8:
        if x_scale is not None:
            raise ValueError(f"{op}: x_scale is only for float8_e4m3fn dispatch "
                             f"(dispatch_dtype is {cfg.dispatch_dtype.name})")
        _check(op, "x", x, (t, h), cfg.dispatch_dtype)
        return x, jnp.zeros((t, 0), jnp.float32)
    if x_scale is None:
        if np.dtype(_compat.typeof(x).dtype) == _FP8:
            raise TypeError(f"{op}: x has dtype float8_e4m3fn but no x_scale: pass its x_scale "
                            f"[{t}, {s}] f32, or pass x in bf16/f16/f32 to quantise it here")
        _check(op, "x", x, (t, h), _QUANTIZABLE)
        return quantize_fp8(x, cfg.scale_block)
    _check(op, "x", x, (t, h), _FP8)
    _check(op, "x_scale", x_scale, (t, s), np.float32)
    return x, x_scale


# ---------------------------------------------------------------------------------------------
# The four FFI calls (docs/moe-ffi.md). ffi_call picks the "cpu" or "CUDA" registration of the
# same target name from the platform the program is lowered for.


def _ffi(target: str, results, context_id: int, *operands):
    """Calls ``target`` inside shard_map. ffi_call gives its results the varying manual axes of the
    result structs (none by default), which would type each rank's output as equal on every rank,
    so results are declared varying over the operands' axes (at least the AllToAll's, through
    ``rank``) and operands are cast to the same set, as ffi_call requires."""
    operands = [jnp.asarray(o) for o in operands]
    varying = [_compat.varying_axes(o) for o in operands]
    vma = frozenset().union(*varying)
    if vma:  # empty when shard_map runs with check_vma=False
        operands = [o if va == vma else _compat.cast_varying(o, vma - va)
                    for o, va in zip(operands, varying)]
        results = jax.tree.map(lambda r: _compat.varying_result(r, vma), results)
    call = jax.ffi.ffi_call(target, results, has_side_effect=True)
    return call(*operands, context_id=np.uint64(context_id))


_TOKEN = jax.ShapeDtypeStruct((1,), jnp.uint32)


class _CpuContext(_moe_internode.HostContext):
    """Native CPU reference context (ffi/moe/cpu_all_to_all), owned by an AllToAll."""

    def __init__(self, cfg: AllToAllConfig, num_ranks: int, timeout: float):
        native = _native.moe.CpuAllToAll(cfg._native_shape(num_ranks), cfg.dispatch_dtype.name,
                                         cfg.combine_dtype.name, float(timeout))
        self.context_id = int(native.id)
        self._ctx = native
        self._finalizer = weakref.finalize(self, native.close)


def _create_native_context(cfg: AllToAllConfig, mesh: jax.sharding.Mesh, axis_name: str,
                           num_ranks: int, timeout: float, node_size: int | None,
                           internode: InternodeConfig | None):
    """(platform, context, node_size) for the mesh: the CPU reference (every rank in this
    process, no node topology asked for), the inter-node host context (CPU ranks across processes
    or node groups), or the CUDA NVLink context."""
    platforms = {d.platform for d in mesh.devices.flat}
    if len(platforms) != 1:
        raise ValueError(f"AllToAll: the mesh mixes platforms {sorted(platforms)}")
    platform = platforms.pop()
    if platform == "cpu":
        others = {n: s for n, s in mesh.shape.items() if n != axis_name and s != 1}
        if others:
            raise ValueError(f"AllToAll on CPU: mesh axes other than {axis_name!r} must have size "
                             f"1 (the CPU contexts have one group of ranks), got {others}")
        devices = list(np.asarray(mesh.devices).reshape(-1))  # rank order: the only axis > 1
        process_of = [int(d.process_index) for d in devices]
        me = jax.process_index()
        local = [r for r, p in enumerate(process_of) if p == me]
        if not local:
            raise ValueError("AllToAll: no device of the mesh belongs to this process")
        if node_size is None and internode is None and len(local) == num_ranks:
            return platform, _CpuContext(cfg, num_ranks, timeout), num_ranks
        if node_size is None:
            node_size = _moe_internode.detect_node_size(process_of)
        if num_ranks % node_size:
            raise ValueError(f"AllToAll: node_size={node_size} does not divide the number of ranks "
                             f"R={num_ranks}")
        resolved = dataclasses.replace(cfg, max_recv_tokens=cfg.recv_tokens(num_ranks))
        return platform, _moe_internode.create_context(resolved, num_ranks, timeout, node_size, local,
                                                       internode), node_size
    if platform in ("gpu", "cuda"):
        if internode is not None and node_size is None:
            raise ValueError("AllToAll on GPUs: internode= needs node_size (the ranks of one NVLink "
                             "domain); without it every rank is one node group")
        if node_size is not None and num_ranks % node_size:
            raise ValueError(f"AllToAll: node_size={node_size} does not divide the number of ranks "
                             f"R={num_ranks}")
        if not bool(_native.built_with_cuda):
            raise RuntimeError("AllToAll on GPUs: jax_garden was built without CUDA "
                               "(rebuild with JAX_GARDEN_CUDA=ON)")
        # The CUDA implementation: returns an object with .context_id, .close(), .check() and
        # .dropped_rows(). It gets the config with max_recv_tokens resolved, so both sides agree
        # on M, and the same wait timeout. node_size < R: node groups through the host proxy.
        from jax_garden import _moe_cuda
        resolved = dataclasses.replace(cfg, max_recv_tokens=cfg.recv_tokens(num_ranks))
        ctx = _moe_cuda.create_context(resolved, mesh, axis_name, timeout=timeout, node_size=node_size,
                                       internode=internode)
        return "cuda", ctx, ctx.node_size
    raise ValueError(f"AllToAll: no MoE implementation for platform {platform!r}")


class AllToAll:
    """Native expert-parallel dispatch/combine over ``mesh`` axis ``axis_name``.

    Create it outside jit (it allocates the native context: receive buffers, peer mappings);
    call its methods inside ``jax.shard_map`` over ``axis_name``. ``timeout`` (seconds; default:
    the setting ``moe_timeout_s``, 30) bounds every wait: a rank that never arrives becomes an
    error naming the phase and the missing ranks, and the context is unusable afterwards. Close it
    with :meth:`close` (or a ``with`` block); executables that still reference it then fail
    cleanly.

    The context id is an attribute of the compiled program, so each AllToAll compiles its own
    executables, and every rank must run the same sequence of dispatch/combine calls on it.

    Node topology: ranks ``[g*node_size, (g+1)*node_size)`` form node group ``g``. Inside a
    group ranks move rows through shared memory (CPU: this process's memory, as the CPU
    reference; CUDA: NVLink); between groups through a TransferEngine (tcp, efa, verbs; see
    :class:`InternodeConfig`), with the same layout and the same bits whatever the split. On CPU
    a mesh whose ranks live in several processes (``jax.distributed``) uses node groups, by default
    one per process (``node_size`` = the ranks each process holds, when every process holds one
    contiguous block, else 1); a group must live in one process. Creating such an AllToAll is
    collective: every process creates it, in the same order. Across processes a rank's failure
    fails its own program; its peers fail at their next wait (the failing rank tells them), and
    :meth:`check` reports the error once this process learned it. On GPUs ``node_size`` defaults
    to R (one NVLink domain); ``node_size < R`` puts a host proxy and a TransferEngine between the
    groups (docs/moe-ffi.md, "Host proxy for GPUs"); processes of one group map each other's
    buffers with CUDA IPC, several processes may share one GPU.

    Attributes:
      config: the :class:`AllToAllConfig`.
      mesh, axis_name: where the ranks are; ``num_ranks`` = R, the size of that axis.
      num_local_experts: L = E / R.
      max_recv_tokens: M, receive rows per rank (the config's, or the worst case).
      platform: ``"cpu"`` (the reference or the inter-node host context) or ``"cuda"`` (the
        NVLink kernels, or node groups through the host proxy).
      node_size, num_nodes: the node topology (``node_size == num_ranks``: one group).
      context_id: the id of the native context in the compiled programs.
    """

    def __init__(self, cfg: AllToAllConfig, mesh: jax.sharding.Mesh, axis_name: str = "ep", *,
                 timeout: float | None = None, node_size: int | None = None,
                 internode: InternodeConfig | None = None):
        _validate.check_instance("AllToAll: cfg", cfg, AllToAllConfig)
        _validate.check_instance("AllToAll: mesh", mesh, jax.sharding.Mesh)
        _validate.check_instance("AllToAll: axis_name", axis_name, str)
        if axis_name not in mesh.axis_names:
            raise ValueError(f"AllToAll: axis {axis_name!r} is not in the mesh axes "
                             f"{tuple(mesh.axis_names)}")
        if timeout is None:
            timeout = _settings.get("moe_timeout_s")
        timeout = _validate.check_float("AllToAll: timeout", timeout)
        if node_size is not None:
            node_size = _validate.check_positive_int("AllToAll: node_size", node_size)
        if internode is not None:
            _validate.check_instance("AllToAll: internode", internode, InternodeConfig)
        self.config = cfg
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_ranks = int(mesh.shape[axis_name])
        self.num_local_experts = cfg.local_experts(self.num_ranks)
        self.max_recv_tokens = cfg.recv_tokens(self.num_ranks)
        if node_size is not None and node_size > self.num_ranks:
            raise ValueError(f"AllToAll: node_size={node_size} exceeds the number of ranks "
                             f"R={self.num_ranks}")
        self.platform, self._native, self.node_size = _create_native_context(
            cfg, mesh, axis_name, self.num_ranks, timeout, node_size, internode)
        self.num_nodes = self.num_ranks // self.node_size
        self.context_id = int(self._native.context_id)

    def __repr__(self) -> str:
        return (f"AllToAll({self.config}, R={self.num_ranks}, axis={self.axis_name!r}, "
                f"M={self.max_recv_tokens}, platform={self.platform!r}, "
                f"nodes={self.num_nodes}x{self.node_size}, id={self.context_id})")

    def close(self) -> None:
        """Waits for dispatched programs to finish (they may still be running: jax dispatches
        asynchronously), then releases the native context. Idempotent."""
        _compat.settle_effects()  # a failed program's outputs carry its error already
        self._native.close()

    def __enter__(self) -> AllToAll:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self) -> None:
        """Raises the error that made this AllToAll unusable, if any (outside jit, after the
        program finished): :class:`MoeTimeoutError` when a peer never arrived, else
        :class:`MoeDeviceError`. On CUDA the kernels record errors without synchronising with the
        host, so this is where a program that returned learns about them (docs/moe-ffi.md)."""
        self._native.check()

    def dropped_rows(self) -> list[int]:
        """Rows dropped for lack of ``max_recv_tokens`` space, per receiving rank, since creation
        (host-side, outside jit; run after the program finished). Always zeros when
        ``max_recv_tokens`` is the worst case. Ranks held by other processes read -1."""
        return list(self._native.dropped_rows())

    def _target(self, name: str) -> str:
        # The setting is read when a call is traced (a jitted function keeps what it traced).
        if self.platform == "cuda" and not _settings.get("moe_cuda_graphs"):
            return name + "_no_cuda_graph"
        return name

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch_send(self, x: jax.Array, indices: jax.Array, weights: jax.Array,
                      x_scale: jax.Array | None = None, bound_m: jax.Array | int | None = None
                      ) -> jax.Array:
        """First half of :meth:`dispatch`: hands this rank's tokens over. Returns ``send_done``
        (uint32[1]) for :meth:`dispatch_recv`."""
        op = "AllToAll.dispatch_send"
        cfg = self.config
        x, x_scale = _dispatch_input(op, cfg, x, x_scale)
        bound_m = _routing(op, cfg, indices, weights, bound_m)
        rank = _rank(op, self.axis_name, self.num_ranks)
        return _ffi(self._target("jg_moe_dispatch_send"), _TOKEN, self.context_id,
                    x, x_scale, indices, weights, bound_m, rank)

    def dispatch_recv(self, send_done: jax.Array
                      ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """Second half of :meth:`dispatch`: returns ``(expert_x[M, H], expert_scale[M, S] or None,
        expert_counts[E/R] int32)``."""
        op = "AllToAll.dispatch_recv"
        cfg = self.config
        _check(op, "send_done", send_done, (1,), np.uint32)
        rank = _rank(op, self.axis_name, self.num_ranks)
        m, s = self.max_recv_tokens, cfg.scale_cols
        expert_x, expert_scale, counts = _ffi(
            self._target("jg_moe_dispatch_recv"),
            (jax.ShapeDtypeStruct((m, cfg.hidden), cfg.dispatch_dtype),
             jax.ShapeDtypeStruct((m, s), jnp.float32),
             jax.ShapeDtypeStruct((self.num_local_experts,), jnp.int32)),
            self.context_id, send_done, rank)
        return expert_x, (expert_scale if cfg.is_fp8 else None), counts

    def dispatch(self, x: jax.Array, indices: jax.Array, weights: jax.Array,
                 x_scale: jax.Array | None = None, bound_m: jax.Array | int | None = None
                 ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """Sends every (token, k) to the rank owning expert ``indices[t, k]``.

        Returns ``(expert_x[M, H], expert_scale[M, H/scale_block] f32 or None, expert_counts[E/R]
        int32)`` in the layout described in the module docstring.

        One call (``jg_moe_dispatch``): on CUDA one kernel where the context can (the setting
        ``moe_fused``), the same results as :meth:`dispatch_send` then :meth:`dispatch_recv`.
        """
        op = "AllToAll.dispatch"
        cfg = self.config
        x, x_scale = _dispatch_input(op, cfg, x, x_scale)
        bound_m = _routing(op, cfg, indices, weights, bound_m)
        rank = _rank(op, self.axis_name, self.num_ranks)
        m, s = self.max_recv_tokens, cfg.scale_cols
        expert_x, expert_scale, counts, _ = _ffi(
            self._target("jg_moe_dispatch"),
            (jax.ShapeDtypeStruct((m, cfg.hidden), cfg.dispatch_dtype),
             jax.ShapeDtypeStruct((m, s), jnp.float32),
             jax.ShapeDtypeStruct((self.num_local_experts,), jnp.int32), _TOKEN),
            self.context_id, x, x_scale, indices, weights, bound_m, rank)
        return expert_x, (expert_scale if cfg.is_fp8 else None), counts

    # -- combine -------------------------------------------------------------------------------

    def combine_send(self, expert_y: jax.Array, expert_counts: jax.Array | None = None
                     ) -> jax.Array:
        """First half of :meth:`combine`: sends ``expert_y[M, H]`` (combine dtype, rows in the
        layout of the last dispatch) back. Pass the ``expert_counts`` dispatch returned: it orders
        this call after the dispatch and is checked against it. Without it (all -1 is sent) the
        order comes only from ``expert_y`` depending on ``expert_x``. Returns ``send_done``."""
        op = "AllToAll.combine_send"
        cfg = self.config
        _check(op, "expert_y", expert_y, (self.max_recv_tokens, cfg.hidden), cfg.combine_dtype)
        if expert_counts is None:
            expert_counts = jnp.full((self.num_local_experts,), -1, jnp.int32)
        _check(op, "expert_counts", expert_counts, (self.num_local_experts,), np.int32)
        rank = _rank(op, self.axis_name, self.num_ranks)
        return _ffi(self._target("jg_moe_combine_send"), _TOKEN, self.context_id, expert_y,
                    expert_counts, rank)

    def combine_recv(self, send_done: jax.Array, indices: jax.Array, weights: jax.Array,
                     bound_m: jax.Array | int | None = None) -> jax.Array:
        """Second half of :meth:`combine`: returns ``y[T, H]`` (combine dtype). ``indices`` and
        ``bound_m`` must be those of the matching dispatch."""
        op = "AllToAll.combine_recv"
        cfg = self.config
        _check(op, "send_done", send_done, (1,), np.uint32)
        bound_m = _routing(op, cfg, indices, weights, bound_m)
        rank = _rank(op, self.axis_name, self.num_ranks)
        return _ffi(self._target("jg_moe_combine_recv"),
                    jax.ShapeDtypeStruct((cfg.max_tokens, cfg.hidden), cfg.combine_dtype),
                    self.context_id, send_done, indices, weights, bound_m, rank)

    def combine(self, expert_y: jax.Array, indices: jax.Array, weights: jax.Array,
                bound_m: jax.Array | int | None = None, expert_counts: jax.Array | None = None
                ) -> jax.Array:
        """``y[t] = sum_k weights[t, k] * expert_y[row(t, k)]`` in f32, k order, for ``t < bound_m``
        (zero rows after), where ``row(t, k)`` is where the last dispatch put (t, k).

        One call (``jg_moe_combine``): on CUDA one kernel where the context can (the setting
        ``moe_fused``), the same result as :meth:`combine_send` then :meth:`combine_recv`."""
        op = "AllToAll.combine"
        cfg = self.config
        _check(op, "expert_y", expert_y, (self.max_recv_tokens, cfg.hidden), cfg.combine_dtype)
        if expert_counts is None:
            expert_counts = jnp.full((self.num_local_experts,), -1, jnp.int32)
        _check(op, "expert_counts", expert_counts, (self.num_local_experts,), np.int32)
        bound_m = _routing(op, cfg, indices, weights, bound_m)
        rank = _rank(op, self.axis_name, self.num_ranks)
        y, _ = _ffi(self._target("jg_moe_combine"),
                    (jax.ShapeDtypeStruct((cfg.max_tokens, cfg.hidden), cfg.combine_dtype), _TOKEN),
                    self.context_id, expert_y, expert_counts, indices, weights, bound_m, rank)
        return y


# ---------------------------------------------------------------------------------------------
# The same dispatch/combine on jax.lax.ragged_all_to_all (baseline and oracle on GPU).


def gather_ragged_all_to_all(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                             send_sizes: jax.Array, output_offsets: jax.Array,
                             recv_sizes: jax.Array, *, axis_name: str) -> jax.Array:
    """``jax.lax.ragged_all_to_all`` rebuilt from ``all_gather`` + scatter: slow, but it runs on
    XLA:CPU (which has no ragged all-to-all), so the CPU tests can check :class:`RaggedAllToAll`'s
    offset arithmetic. Same arguments and result."""
    del recv_sizes  # implied by the senders' sizes
    r = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    n_slices = input_offsets.shape[0]
    per_peer = n_slices // r
    ops = jax.lax.all_gather(operand, axis_name)            # [R, N, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)   # [R, S]
    sizes = jax.lax.all_gather(send_sizes, axis_name)
    out_off = jax.lax.all_gather(output_offsets, axis_name)
    rows = jnp.arange(operand.shape[0])
    dst = jnp.full((r, operand.shape[0]), output.shape[0], jnp.int32)  # out of bounds = dropped
    mine = jnp.arange(per_peer) + me * per_peer                         # slices aimed at me
    for j in range(per_peer):
        i = mine[j]
        lo = in_off[:, i][:, None]
        hit = (rows[None, :] >= lo) & (rows[None, :] < lo + sizes[:, i][:, None])
        dst = jnp.where(hit, out_off[:, i][:, None] + rows[None, :] - lo, dst)
    flat = ops.reshape((-1,) + operand.shape[1:])
    return output.at[dst.reshape(-1)].set(flat, mode="drop")


def _segments_traced(counts: jax.Array, expert_padding: int, max_recv_tokens: int
                     ) -> tuple[jax.Array, jax.Array]:
    """``compute_segments`` of ffi/moe/layout.h on traced counts ``[..., L]`` (a program cannot
    call the native one): ``(start, kept)``, vectorised over the leading axes. Closed form of the
    same formula: ``start[l] = min(sum_{l'<l} round_up(count[l'], pad), M)``, ``kept[l] =
    min(count[l], M - start[l])``. tests/test_moe_cpu.py checks it against the native function."""
    pad, m = expert_padding, max_recv_tokens
    padded = (counts + pad - 1) // pad * pad
    start = jnp.minimum(jnp.cumsum(padded, axis=-1) - padded, m)
    return start, jnp.minimum(counts, m - start)


def _clamp_bound_traced(bound_m: jax.Array, max_tokens: int) -> jax.Array:
    """``clamp_bound`` of ffi/moe/layout.h on a traced bound_m."""
    return jnp.clip(bound_m, 0, max_tokens)


class RaggedAllToAll:
    """Dispatch/combine with ``jax.lax.ragged_all_to_all``: same signatures, layout and semantics
    as :class:`AllToAll` (including capacity drops), no native state. Needs no ``close``.

    ``combine`` recomputes the routing plan (one all_gather of per-expert counts), so it needs the
    same ``indices``/``bound_m`` as the dispatch. ``ragged_all_to_all`` can be replaced (tests on
    CPU pass :func:`gather_ragged_all_to_all`). Summation in ``combine`` is f32 in k order, but XLA
    may fuse multiply and add, so it can differ from :class:`AllToAll` in the last bf16 bit.
    """

    def __init__(self, cfg: AllToAllConfig, mesh: jax.sharding.Mesh, axis_name: str = "ep", *,
                 ragged_all_to_all: Callable | None = None):
        _validate.check_instance("RaggedAllToAll: cfg", cfg, AllToAllConfig)
        _validate.check_instance("RaggedAllToAll: mesh", mesh, jax.sharding.Mesh)
        _validate.check_instance("RaggedAllToAll: axis_name", axis_name, str)
        if ragged_all_to_all is not None and not callable(ragged_all_to_all):
            raise TypeError(f"RaggedAllToAll: ragged_all_to_all must be callable, got "
                            f"{type(ragged_all_to_all).__name__}")
        if axis_name not in mesh.axis_names:
            raise ValueError(f"RaggedAllToAll: axis {axis_name!r} is not in the mesh axes "
                             f"{tuple(mesh.axis_names)}")
        self.config = cfg
        self.mesh = mesh
        self.axis_name = axis_name
        self.num_ranks = int(mesh.shape[axis_name])
        self.num_local_experts = cfg.local_experts(self.num_ranks)
        self.max_recv_tokens = cfg.recv_tokens(self.num_ranks)
        self._ragged = ragged_all_to_all or jax.lax.ragged_all_to_all

    def _plan(self, op, indices, bound_m):
        """Per-rank routing plan. Entries (t, k) are sorted by (dest rank, local expert, t, k);
        ``cnt[s, d, l]`` counts rows from s to d's expert l; ``keep[s, d, l]`` of them fit."""
        cfg = self.config
        r, n_l = self.num_ranks, self.num_local_experts
        t, k = cfg.max_tokens, cfg.experts_per_token
        me = _rank(op, self.axis_name, r)
        e = indices.reshape(-1)
        valid = ((jnp.arange(t * k) // k < _clamp_bound_traced(bound_m, t))
                 & (e >= 0) & (e < cfg.num_experts))
        key = jnp.where(valid, e, cfg.num_experts)                  # invalid entries sort last
        order = jnp.argsort(key, stable=True)
        mine = jnp.zeros((cfg.num_experts + 1,), jnp.int32).at[key].add(1)[:-1]
        cnt = jax.lax.all_gather(mine.reshape(r, n_l), self.axis_name)   # [s, d, l]
        total = cnt.sum(axis=0)                                          # [d, l]
        start, kept = _segments_traced(total, cfg.expert_padding, self.max_recv_tokens)
        before = jnp.cumsum(cnt, axis=0) - cnt                           # rows of ranks s' < s
        keep = jnp.clip(kept[None] - before, 0, cnt)                     # [s, d, l]
        dst_off = start[None] + before                                   # where s's rows land
        src_off = (jnp.cumsum(cnt.reshape(r, -1), axis=1) - cnt.reshape(r, -1))  # [s, d*L + l]
        return dict(me=me, order=order, valid=valid, cnt=cnt, keep=keep, dst_off=dst_off,
                    src_off=src_off, kept=kept)

    def dispatch(self, x: jax.Array, indices: jax.Array, weights: jax.Array,
                 x_scale: jax.Array | None = None, bound_m: jax.Array | int | None = None
                 ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """Same as :meth:`AllToAll.dispatch`."""
        op = "RaggedAllToAll.dispatch"
        cfg = self.config
        x, x_scale = _dispatch_input(op, cfg, x, x_scale)
        bound_m = _routing(op, cfg, indices, weights, bound_m)
        p = self._plan(op, indices, bound_m)
        me, k = p["me"], cfg.experts_per_token
        tok = p["order"] // k
        # Slice d*L + l of this rank goes to rank d: input offset in the sorted buffer, size kept,
        # offset chosen at the receiver. Receive sizes are indexed by source rank, then l.
        args = dict(
            input_offsets=p["src_off"][me],
            send_sizes=p["keep"][me].reshape(-1),
            output_offsets=p["dst_off"][me].reshape(-1),
            recv_sizes=p["keep"][:, me].reshape(-1),
        )
        m = self.max_recv_tokens
        expert_x = self._ragged(x[tok], jnp.zeros((m, cfg.hidden), x.dtype),
                                axis_name=self.axis_name, **args)
        expert_scale = None
        if cfg.is_fp8:
            expert_scale = self._ragged(x_scale[tok], jnp.zeros((m, cfg.scale_cols), jnp.float32),
                                        axis_name=self.axis_name, **args)
        return expert_x, expert_scale, p["kept"][me]

    def combine(self, expert_y: jax.Array, indices: jax.Array, weights: jax.Array,
                bound_m: jax.Array | int | None = None, expert_counts: jax.Array | None = None
                ) -> jax.Array:
        """Same as :meth:`AllToAll.combine` (``expert_counts`` is accepted and unused)."""
        op = "RaggedAllToAll.combine"
        cfg = self.config
        _check(op, "expert_y", expert_y, (self.max_recv_tokens, cfg.hidden), cfg.combine_dtype)
        bound_m = _routing(op, cfg, indices, weights, bound_m)
        p = self._plan(op, indices, bound_m)
        me, t, k = p["me"], cfg.max_tokens, cfg.experts_per_token
        # Reverse of dispatch: this rank's segment slices go back to their source ranks, landing
        # at the source's sorted positions.
        back = self._ragged(
            expert_y, jnp.zeros((t * k, cfg.hidden), expert_y.dtype),
            input_offsets=p["dst_off"][:, me].reshape(-1),
            send_sizes=p["keep"][:, me].reshape(-1),
            output_offsets=_slice_cols(p["src_off"], me, self.num_local_experts),
            recv_sizes=p["keep"][me].reshape(-1),
            axis_name=self.axis_name)
        # Un-sort to (t, k) order; rows sent nowhere or dropped contribute nothing.
        sorted_pos = jnp.zeros((t * k,), jnp.int32).at[p["order"]].set(jnp.arange(t * k))
        rank_of = jnp.clip(indices.reshape(-1), 0, cfg.num_experts - 1) // self.num_local_experts
        local = jnp.clip(indices.reshape(-1), 0, cfg.num_experts - 1) % self.num_local_experts
        # Position of entry within its (dest, expert) group decides whether it was kept.
        group_start = p["src_off"][me][rank_of * self.num_local_experts + local]
        kept_here = p["keep"][me][rank_of, local]
        ok = p["valid"] & (sorted_pos - group_start < kept_here)
        v = jnp.where(ok[:, None], back[sorted_pos], 0).reshape(t, k, cfg.hidden)
        acc = jnp.zeros((t, cfg.hidden), jnp.float32)
        for j in range(k):  # k order, f32
            acc = acc + weights[:, j, None] * v[:, j].astype(jnp.float32)
        return acc.astype(cfg.combine_dtype)


def _slice_cols(src_off, me, n_l):
    """Columns ``[me*L, (me+1)*L)`` of ``src_off[s, d*L + l]``, flattened by s: where the rows this
    rank received from each source s, expert l, sit in s's sorted buffer."""
    r = src_off.shape[0]
    return jax.lax.dynamic_slice(src_off, (0, me * n_l), (r, n_l)).reshape(-1)
