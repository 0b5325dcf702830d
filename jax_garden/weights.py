"""RL weight push from trainer processes to inference processes on the TransferEngine.

A :class:`Plan` is built once from the two sides' parameter pytrees (shapes, dtypes and
shardings: any ``jax.sharding``, or :class:`MeshSharding` for meshes one does not have). From the
index boxes of every source and destination shard it computes which box each source shard sends
to which destination buffers: every source sends its own bytes straight to where they go (no
funnel through one rank), replicated sources split the work between them, and every destination
replica gets its own copy. Pieces are gathered on the sender into a bounded staging ring laid out
in the destination's row-major order, so each write is as contiguous as the destination layout
allows; large contiguous pieces are written straight from the source shard. The plan is
deterministic, serialisable (:meth:`Plan.to_bytes`) and has a fingerprint both sides check when
they connect.

:class:`Publisher` (trainer processes) pushes a version of the parameters: ``push(params,
version)`` returns a :class:`PushHandle`; chunk k+1 is gathered (and optionally quantized to fp8
e4m3 with per-block scales, declared on the inference side with :class:`Fp8`) while chunk k is on
the wire. :class:`Subscriber` (inference processes) owns two registered copies of its parameter
shards (double buffering): pushes land in the copy not in service and the model switches to a new
version only in :meth:`Subscriber.refresh` / :meth:`Subscriber.wait`, once every byte of it has
landed on every subscriber rank. Completion is learned only by counting imms; each imm carries an
epoch the subscriber handed out for that push, so writes of an abandoned push never count toward a
newer one. See docs/weights.md for the design and the failure semantics.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import threading
import time
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from jax_garden import _lifetime, fabric

__all__ = [
    "MeshSharding", "TensorSpec", "Fp8", "fp8_spec", "TensorLayout", "Layout", "Plan", "Publisher", "PushHandle",
    "Subscriber", "quantize_fp8", "dequantize_fp8", "fp8_error_bound", "imm_value", "imm_fields",
]

PLAN_FORMAT = 1
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INV_FP8_MAX = np.float32(1.0 / 448.0)
DEFAULT_CHUNK_BYTES = 64 << 20
DEFAULT_DIRECT_MIN_BYTES = 4 << 20
STAGE_ALIGN = 256  # staging offsets (GPU copy engines and vector loads like aligned starts)
BYTES_MODE_MIN = 1 << 20  # scatter runs at least this long are posted cut over all sender domains
WELCOME_BYTES = 48 << 10  # descriptors per welcome message (the engine's default limit is 256 KiB)

KIND_COPY, KIND_FP8, KIND_SCALE = 0, 1, 2
_KIND_NAMES = {KIND_COPY: "copy", KIND_FP8: "fp8", KIND_SCALE: "scale"}

Box = tuple  # ((start, stop), ...) per dimension, in elements


# ----------------------------------------------------------------------------------------------
# imm layout: tag (4 bits) | epoch (12 bits) | source rank (16 bits)

IMM_TAG_SHIFT, IMM_EPOCH_SHIFT = 28, 16
EPOCH_MOD = 1 << 12
MAX_RANKS = 1 << 16


def imm_value(tag: int, epoch: int, src_rank: int) -> int:
    """The imm a source writes with: ``tag << 28 | (epoch % 4096) << 16 | src_rank``."""
    if not 0 <= tag < 16:
        raise ValueError(f"imm tag must be in 0..15, got {tag}")
    if not 0 <= src_rank < MAX_RANKS:
        raise ValueError(f"source rank must be in 0..{MAX_RANKS - 1}, got {src_rank}")
    return (tag << IMM_TAG_SHIFT) | ((epoch % EPOCH_MOD) << IMM_EPOCH_SHIFT) | src_rank


def imm_fields(imm: int) -> tuple[int, int, int]:
    """(tag, epoch, source rank) of an imm made by :func:`imm_value`."""
    return imm >> IMM_TAG_SHIFT, (imm >> IMM_EPOCH_SHIFT) & (EPOCH_MOD - 1), imm & (MAX_RANKS - 1)


# ----------------------------------------------------------------------------------------------
# Shardings and layouts


def _prod(xs: Iterable[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _dtype_name(dtype: Any) -> str:
    import jax.numpy as jnp

    return jnp.dtype(dtype).name


def _np_dtype(name: str) -> np.dtype:
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(name))


def _normalize_spec(spec: Any, ndim: int, axis_names: Sequence[str]) -> tuple:
    entries = tuple(spec) if spec is not None else ()
    if len(entries) > ndim:
        raise ValueError(f"partition spec {spec} has {len(entries)} entries for a {ndim}-d array")
    out, used = [], set()
    for e in entries + (None,) * (ndim - len(entries)):
        axes = () if e is None else (e,) if isinstance(e, str) else tuple(e)
        for a in axes:
            if a not in axis_names:
                raise ValueError(f"partition spec {spec} names mesh axis {a!r}; the mesh has {tuple(axis_names)}")
            if a in used:
                raise ValueError(f"partition spec {spec} uses mesh axis {a!r} twice")
            used.add(a)
        out.append(axes)
    return tuple(out)


_BOX_CACHE: dict[tuple, tuple] = {}


class MeshSharding:
    """A ``NamedSharding`` described without devices, for planning meshes one does not have.

    ``axes`` maps mesh axis names to sizes (in mesh order), ``spec`` is a ``PartitionSpec`` (or its
    tuple of entries). Mesh position i (row-major over the axes, as ``Mesh(devices.reshape(...))``
    numbers devices) lives on rank ``i // devices_per_rank`` as its local device
    ``i % devices_per_rank``. The boxes equal ``NamedSharding(mesh, spec).devices_indices_map``
    for a mesh built from the devices in that order.
    """

    def __init__(self, axes: dict[str, int] | Sequence[tuple[str, int]], spec: Any = (), *,
                 devices_per_rank: int = 1):
        items = list(axes.items()) if isinstance(axes, dict) else [tuple(a) for a in axes]
        if not items:
            raise ValueError("MeshSharding needs at least one mesh axis")
        self.axis_names = tuple(str(n) for n, _ in items)
        self.axis_sizes = tuple(int(s) for _, s in items)
        if min(self.axis_sizes) <= 0:
            raise ValueError(f"mesh axis sizes must be > 0, got {dict(items)}")
        if len(set(self.axis_names)) != len(self.axis_names):
            raise ValueError(f"mesh axis names repeat: {self.axis_names}")
        self.spec = tuple(spec) if spec is not None else ()
        if devices_per_rank <= 0 or self.num_devices % devices_per_rank:
            raise ValueError(f"devices_per_rank={devices_per_rank} must divide the {self.num_devices} mesh devices")
        self.devices_per_rank = int(devices_per_rank)

    @classmethod
    def from_named(cls, sharding: Any, *, devices_per_rank: int = 1) -> "MeshSharding":
        """From a ``NamedSharding`` (over a real or an ``AbstractMesh``)."""
        mesh = sharding.mesh
        return cls(list(zip(mesh.axis_names, mesh.axis_sizes)), tuple(sharding.spec),
                   devices_per_rank=devices_per_rank)

    @property
    def num_devices(self) -> int:
        return _prod(self.axis_sizes)

    def shard_boxes(self, shape: Sequence[int]) -> list[tuple[int, int, Box]]:
        """[(rank, local, box)] for every mesh position, in mesh order."""
        shape = tuple(int(s) for s in shape)
        key = (self._key(), shape)
        hit = _BOX_CACHE.get(key)
        if hit is None:
            hit = _BOX_CACHE[key] = self._shard_boxes(shape)
            if len(_BOX_CACHE) > 4096:
                _BOX_CACHE.pop(next(iter(_BOX_CACHE)))
        return list(hit)

    def _shard_boxes(self, shape: tuple) -> tuple:
        spec = _normalize_spec(self.spec, len(shape), self.axis_names)
        size = dict(zip(self.axis_names, self.axis_sizes))
        parts = []
        for d, axes in enumerate(spec):
            n = _prod(size[a] for a in axes)
            if shape[d] % n:
                raise ValueError(f"dimension {d} of shape {shape} is split {n} ways by {self.spec}; "
                                 f"{n} must divide {shape[d]}")
            parts.append(shape[d] // n)
        coords = np.indices(self.axis_sizes).reshape(len(self.axis_sizes), -1).T
        pos = {a: i for i, a in enumerate(self.axis_names)}
        out = []
        for i, c in enumerate(coords):
            box = []
            for d, axes in enumerate(spec):
                idx = 0
                for a in axes:
                    idx = idx * size[a] + int(c[pos[a]])
                box.append((idx * parts[d], (idx + 1) * parts[d]))
            out.append((i // self.devices_per_rank, i % self.devices_per_rank, tuple(box)))
        return tuple(out)

    def _key(self) -> tuple:
        return (self.axis_names, self.axis_sizes, self.spec, self.devices_per_rank)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, MeshSharding) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        axes = ", ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.axis_sizes))
        return f"MeshSharding({axes}; spec={self.spec}, devices_per_rank={self.devices_per_rank})"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A parameter described by shape, dtype and sharding (a :class:`MeshSharding`, any
    ``jax.sharding.Sharding``, or None for one unsharded copy on rank 0)."""

    shape: tuple
    dtype: Any
    sharding: Any = None


class Fp8:
    """Destination declaration: this parameter arrives as ``float8_e4m3fn`` plus float32 scales.

    ``weight``: spec (shape = the source parameter's shape, dtype float8_e4m3fn, any sharding).
    ``scale``: spec with shape ``ceil(shape[d] / block[d])`` per dimension, dtype float32, any
    sharding. ``block``: one block size per dimension (1 = no blocking on that dimension), e.g.
    ``(128, 128)`` for a matrix, ``(1, 128, 128)`` for stacked experts.

    Definition (what the sender computes, per block ``B`` of the source parameter ``x``):
    ``scale[B] = max|x[B]| * float32(1/448)`` (1.0 where the block is all zero) and
    ``weight[B] = float8_e4m3fn(clip(x[B] * (1 / scale[B]), -448, 448))`` (round to nearest even),
    all in float32 (multiplications by an exactly rounded reciprocal, so every backend computes the
    same bits); dequantize with ``weight * scale``. Every source shard of a quantized
    parameter must hold whole blocks (its box starts and ends on block boundaries, or at the end
    of the array), so each sender computes its scales alone.
    """

    def __init__(self, weight: Any, scale: Any, block: Sequence[int]):
        self.weight, self.scale, self.block = weight, scale, tuple(int(b) for b in block)

    def __repr__(self) -> str:
        return f"Fp8(weight={self.weight!r}, scale={self.scale!r}, block={self.block})"


def _register_fp8_pytree() -> None:
    import jax

    jax.tree_util.register_pytree_with_keys(
        Fp8,
        lambda n: (((jax.tree_util.GetAttrKey("weight"), n.weight), (jax.tree_util.GetAttrKey("scale"), n.scale)),
                   n.block),
        lambda block, ch: Fp8(ch[0], ch[1], block))


_register_fp8_pytree()


def fp8_spec(shape: Sequence[int], weight_sharding: Any = None, scale_sharding: Any = None,
             block: Sequence[int] = (128, 128)) -> Fp8:
    """An :class:`Fp8` declaration from shardings (``scale_sharding`` defaults to ``weight_sharding``)."""
    import jax.numpy as jnp

    shape = tuple(int(s) for s in shape)
    block = tuple(int(b) for b in block)
    if len(block) != len(shape):
        raise ValueError(f"fp8 block {block} must have one entry per dimension of shape {shape}")
    scale_shape = tuple(-(-s // b) for s, b in zip(shape, block))
    return Fp8(TensorSpec(shape, jnp.float8_e4m3fn, weight_sharding),
               TensorSpec(scale_shape, jnp.float32, weight_sharding if scale_sharding is None else scale_sharding),
               block)


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    """One tensor of a side: where each of its shards lives."""

    path: str
    shape: tuple
    dtype: str
    shards: tuple  # ((rank, local, box), ...)
    kind: str = "array"  # "array" | "fp8" (a quantized weight) | "scale" (its scales)
    block: tuple | None = None
    devices: tuple | None = None  # jax device id per shard, when built from real devices (not fingerprinted)

    @property
    def itemsize(self) -> int:
        return _np_dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return _prod(self.shape) * self.itemsize


def _box_of_index(index: tuple, shape: tuple) -> Box:
    out = []
    for d, n in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {index} is not supported")
        out.append((start, stop))
    return tuple(out)


def _leaf_info(leaf: Any, path: str) -> tuple[tuple, str, Any]:
    if isinstance(leaf, (TensorSpec,)) or (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        shape = tuple(int(s) for s in leaf.shape)
        try:
            dtype = _dtype_name(leaf.dtype)
        except TypeError:
            raise TypeError(f"{path}: dtype {leaf.dtype!r} is not an array dtype") from None
        return shape, dtype, getattr(leaf, "sharding", None)
    raise TypeError(f"{path}: expected an array, jax.ShapeDtypeStruct or weights.TensorSpec leaf, "
                    f"got {type(leaf).__name__}")


class Layout:
    """Every tensor of one side (trainer or inference): paths, shapes, dtypes and shard boxes.

    Build it with :meth:`from_pytree`; ship it as bytes (:meth:`to_bytes`) to the other side when
    the two sides are separate jobs. Ranks are the side's processes (one engine each); ``local`` is
    a device index within a rank.
    """

    def __init__(self, tensors: Sequence[TensorLayout], *, process_indices: Sequence[int] | None = None):
        self.tensors = list(tensors)
        ranks = [r for t in self.tensors for r, _, _ in t.shards]
        self.num_ranks = max(ranks) + 1 if ranks else 0
        if self.num_ranks > MAX_RANKS:
            raise ValueError(f"{self.num_ranks} ranks: at most {MAX_RANKS} are supported (imm layout)")
        self.process_indices = list(process_indices) if process_indices is not None else None
        paths = [t.path for t in self.tensors]
        if len(set(paths)) != len(paths):
            raise ValueError("tensor paths repeat in the layout")
        self._by_path = {t.path: i for i, t in enumerate(self.tensors)}
        self._json_cache: dict[bool, dict] = {}
        for t in self.tensors:
            _check_tensor_layout(t)

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_pytree(cls, tree: Any, *, rank_of: Callable[[Any], int] | None = None,
                    devices_per_rank: int = 1) -> "Layout":
        """Layout of a pytree whose leaves are ``jax.Array``, ``jax.ShapeDtypeStruct`` (with a
        sharding), :class:`TensorSpec`, numpy arrays (one unsharded copy on rank 0) or
        :class:`Fp8` declarations (destination side).

        Real shardings are read with ``devices_indices_map``; ranks are the processes owning the
        devices, numbered 0.. in ``process_index`` order (``rank_of(device)`` overrides), and a
        device's local index is its position among its rank's devices by id. ``NamedSharding``
        over an ``AbstractMesh`` and :class:`MeshSharding` map mesh positions to ranks with
        ``devices_per_rank``.
        """
        import jax

        flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, (Fp8, TensorSpec)))
        if not flat:
            raise ValueError("the pytree has no leaves")
        entries = []  # (path, kind, block, shape, dtype, sharding)
        for kp, leaf in flat:
            path = jax.tree_util.keystr(kp)
            if isinstance(leaf, Fp8):
                ws, wd, wsh = _leaf_info(leaf.weight, path + ".weight")
                ss, sd, ssh = _leaf_info(leaf.scale, path + ".scale")
                if len(leaf.block) != len(ws) or min(leaf.block, default=1) <= 0:
                    raise ValueError(f"{path}: fp8 block {leaf.block} must have one positive entry per "
                                     f"dimension of shape {ws}")
                if wd != "float8_e4m3fn":
                    raise TypeError(f"{path}: an Fp8 weight must have dtype float8_e4m3fn, got {wd}")
                want = tuple(-(-s // b) for s, b in zip(ws, leaf.block))
                if ss != want:
                    raise ValueError(f"{path}: scale shape {ss} does not match weight shape {ws} in blocks "
                                     f"{leaf.block}: expected {want}")
                if sd != "float32":
                    raise TypeError(f"{path}: fp8 scales must be float32, got {sd}")
                entries.append((path, "fp8", leaf.block, ws, wd, wsh))
                entries.append((path + ".scale", "scale", leaf.block, ss, sd, ssh))
            else:
                shape, dtype, sh = _leaf_info(leaf, path)
                entries.append((path, "array", None, shape, dtype, sh))

        # Real devices: ranks from process indices over the whole side, locals by device id.
        real: dict[int, Any] = {}
        maps = []
        for path, kind, block, shape, dtype, sh in entries:
            m = None
            if sh is not None and not isinstance(sh, MeshSharding) and not _is_abstract(sh):
                try:
                    m = sh.devices_indices_map(shape)
                except Exception as e:  # indivisible shapes and the like
                    raise ValueError(f"{path}: {e}") from None
                for dev in m:
                    real[dev.id] = dev
            maps.append(m)
        rank_of_dev: dict[int, tuple[int, int]] = {}
        process_indices = None
        if real:
            devs = sorted(real.values(), key=lambda d: d.id)
            if rank_of is None:
                process_indices = sorted({d.process_index for d in devs})
                pos = {p: i for i, p in enumerate(process_indices)}
                ranks = {d.id: pos[d.process_index] for d in devs}
            else:
                ranks = {d.id: int(rank_of(d)) for d in devs}
            counter: dict[int, int] = {}
            for d in devs:
                r = ranks[d.id]
                rank_of_dev[d.id] = (r, counter.get(r, 0))
                counter[r] = counter.get(r, 0) + 1

        tensors = []
        for (path, kind, block, shape, dtype, sh), m in zip(entries, maps):
            devices = None
            if sh is None:
                shards = ((0, 0, tuple((0, s) for s in shape)),)
            elif isinstance(sh, MeshSharding) or _is_abstract(sh):
                ms = sh if isinstance(sh, MeshSharding) else MeshSharding.from_named(sh, devices_per_rank=devices_per_rank)
                try:
                    shards = tuple(ms.shard_boxes(shape))
                except ValueError as e:
                    raise ValueError(f"{path}: {e}") from None
            else:
                items = sorted(m.items(), key=lambda kv: kv[0].id)
                shards = tuple((*rank_of_dev[d.id], _box_of_index(idx, shape)) for d, idx in items)
                devices = tuple(d.id for d, _ in items)
            tensors.append(TensorLayout(path, shape, dtype, shards, kind, block, devices))
        return cls(tensors, process_indices=process_indices)

    # -- queries ----------------------------------------------------------------------------------
    def index(self, path: str) -> int:
        return self._by_path[path]

    def locals_of(self, rank: int) -> int:
        """Number of local devices of ``rank`` (highest local index + 1)."""
        return 1 + max((l for t in self.tensors for r, l, _ in t.shards if r == rank), default=-1)

    def rank_of_process(self, process_index: int) -> int:
        if self.process_indices is None:
            raise ValueError("this layout was not built from real devices; pass rank= explicitly")
        if process_index not in self.process_indices:
            raise ValueError(f"process {process_index} owns no device of this layout "
                             f"(its processes are {self.process_indices}); pass rank= explicitly")
        return self.process_indices.index(process_index)

    def device_id(self, tensor: int, rank: int, local: int) -> int | None:
        t = self.tensors[tensor]
        if t.devices is None:
            return None
        for (r, l, _), d in zip(t.shards, t.devices):
            if r == rank and l == local:
                return d
        return None

    # -- serialisation ----------------------------------------------------------------------------
    def to_json(self, *, with_devices: bool = True) -> dict:
        cached = self._json_cache.get(with_devices)
        if cached is None:
            cached = self._json_cache[with_devices] = self._to_json(with_devices)
        return cached

    def _to_json(self, with_devices: bool) -> dict:
        tables: dict[tuple, int] = {}
        out = []
        for t in self.tensors:
            tid = tables.setdefault(t.shards, len(tables))
            d = {"path": t.path, "shape": list(t.shape), "dtype": t.dtype, "kind": t.kind, "shards": tid}
            if t.block is not None:
                d["block"] = list(t.block)
            if with_devices and t.devices is not None:
                d["devices"] = list(t.devices)
            out.append(d)
        tab = [[[r, l, [list(b) for b in box]] for r, l, box in key] for key in tables]
        j = {"format": PLAN_FORMAT, "tensors": out, "tables": tab}
        if with_devices and self.process_indices is not None:
            j["process_indices"] = self.process_indices
        return j

    @classmethod
    def from_json(cls, j: dict) -> "Layout":
        if j.get("format") != PLAN_FORMAT:
            raise ValueError(f"layout format {j.get('format')!r} is not {PLAN_FORMAT}")
        tables = [tuple((int(r), int(l), tuple((int(a), int(b)) for a, b in box)) for r, l, box in tab)
                  for tab in j["tables"]]
        tensors = [TensorLayout(d["path"], tuple(d["shape"]), d["dtype"], tables[d["shards"]], d.get("kind", "array"),
                                tuple(d["block"]) if d.get("block") is not None else None,
                                tuple(d["devices"]) if d.get("devices") is not None else None)
                   for d in j["tensors"]]
        return cls(tensors, process_indices=j.get("process_indices"))

    def to_bytes(self) -> bytes:
        return b"JGWL" + zlib.compress(json.dumps(self.to_json(), separators=(",", ":")).encode())

    @classmethod
    def from_bytes(cls, b: bytes) -> "Layout":
        if not isinstance(b, (bytes, bytearray)) or bytes(b[:4]) != b"JGWL":
            raise ValueError("not the bytes of a weights.Layout (bad magic)")
        try:
            return cls.from_json(json.loads(zlib.decompress(bytes(b[4:]))))
        except (zlib.error, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"garbled weights.Layout bytes: {e}") from None

    def same_placement(self, other: "Layout") -> bool:
        return self.to_json(with_devices=False) == other.to_json(with_devices=False)

    def __repr__(self) -> str:
        return f"Layout({len(self.tensors)} tensors, {self.num_ranks} ranks)"


def _is_abstract(sharding: Any) -> bool:
    mesh = getattr(sharding, "mesh", None)
    return mesh is not None and type(mesh).__name__ == "AbstractMesh"


_CHECKED: dict[tuple, bool] = {}


def _check_tensor_layout(t: TensorLayout) -> None:
    key = (t.shape, t.shards)
    if key in _CHECKED:
        return
    _check_tensor_layout_uncached(t)
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED[key] = True


def _check_tensor_layout_uncached(t: TensorLayout) -> None:
    nd = len(t.shape)
    for r, l, box in t.shards:
        if r < 0 or l < 0:
            raise ValueError(f"{t.path}: negative rank/local ({r}, {l})")
        if len(box) != nd or any(not (0 <= a < b <= n) for (a, b), n in zip(box, t.shape)):
            if not (nd and _prod(t.shape) == 0):
                raise ValueError(f"{t.path}: shard box {box} does not fit shape {t.shape}")
    # Distinct boxes must tile the array (a jax sharding is a grid of equal blocks plus replicas).
    uniq = {box for _, _, box in t.shards}
    if sum(_prod(b - a for a, b in box) for box in uniq) != _prod(t.shape):
        raise ValueError(f"{t.path}: the shard boxes do not tile shape {t.shape} exactly once")


# ----------------------------------------------------------------------------------------------
# Plan


@dataclasses.dataclass
class _Geom:
    """A piece's geometry, shared by every tensor with the same shapes and shardings: a box of the
    destination tensor that one holder sends to some receivers."""

    kind: int
    src_lo: tuple  # start in the holder's shard (elements; scale blocks for KIND_SCALE)
    ext: tuple  # extent in the destination tensor's index space
    dst_lo: tuple  # start in the receivers' shard
    receivers: tuple  # ((rank, local), ...)
    nbytes: int  # bytes on the wire to each receiver
    run_bytes: int  # destination runs: contiguous pieces of the receivers' shard
    n_runs: int
    run_outer: tuple  # extents of the dims iterated run by run
    run_strides: tuple  # destination byte strides of those dims
    dst_base: int  # destination byte offset of dst_lo
    direct: bool = False
    src_byte_off: int = 0  # direct pieces: byte offset in the source shard
    key: tuple = ()  # staged pieces: what the stager computes (same key = one batched stage call)
    region_lo: tuple = ()  # staged pieces: dynamic start of the region the stager reads
    holders: tuple = ()  # every (rank, local) holding the box; tensor t's piece goes to holders[(h + t) % len]
    h: int = 0
    kid: int = 0  # small id of key, for sorting
    big: bool = False  # runs >= BYTES_MODE_MIN (cut over all sender domains)

    def run_dst_offsets(self) -> np.ndarray:
        """Destination byte offset of every run, in staging order."""
        if not self.run_outer:
            return np.array([self.dst_base], np.int64)
        grids = np.indices(self.run_outer).reshape(len(self.run_outer), -1)
        return self.dst_base + (np.asarray(self.run_strides, np.int64)[:, None] * grids).sum(0)


class _Item:
    """A piece of one tensor: its geometry plus the tensors and the holder it is for."""

    __slots__ = ("g", "dst_tensor", "src_tensor", "src_rank", "src_local")

    def __init__(self, g: _Geom, dst_tensor: int, src_tensor: int, src_rank: int, src_local: int):
        self.g, self.dst_tensor, self.src_tensor, self.src_rank, self.src_local = g, dst_tensor, src_tensor, src_rank, src_local

    def __getattr__(self, name: str) -> Any:
        return getattr(self.g, name)

    def __repr__(self) -> str:
        return (f"_Item(tensor {self.dst_tensor} from {self.src_tensor}, holder ({self.src_rank}, {self.src_local}), "
                f"{_KIND_NAMES[self.g.kind]} ext {self.g.ext} -> {len(self.g.receivers)} receivers)")


class _Chunk:
    """What one holder device posts at once: staged pieces packed into one staging slot, or one
    direct piece written from the source shard."""

    def __init__(self, src_rank: int, src_local: int, staged: bool, items: list, offsets: list, nbytes: int):
        self.src_rank, self.src_local, self.staged = src_rank, src_local, staged
        self.items, self.offsets, self.nbytes = items, offsets, nbytes
        self._rank_targets: dict | None = None

    @property
    def src_tensor(self) -> int:
        return self.items[0].src_tensor

    @property
    def rank_targets(self) -> dict[int, tuple[int, int, int]]:
        """{dst rank: (targets of small runs, targets of big runs, bytes)}."""
        if self._rank_targets is None:
            rt: dict[int, list] = {}
            for it in self.items:
                g = it.g
                for r, _ in g.receivers:
                    e = rt.get(r)
                    if e is None:
                        e = rt[r] = [0, 0, 0]
                    e[1 if g.big else 0] += g.n_runs
                    e[2] += g.nbytes
            self._rank_targets = {r: tuple(v) for r, v in rt.items()}
        return self._rank_targets


def _runs(lo: Sequence[int], ext: Sequence[int], shape: Sequence[int]) -> tuple[int, int]:
    """(k, n_runs) of a box in a row-major array: dims after k are whole, so each run spans dim k
    (its extent) and everything inside; runs = product of the extents before k."""
    nd = len(shape)
    if nd == 0:
        return 0, 1
    k = nd - 1
    while k > 0 and ext[k] == shape[k]:
        k -= 1
    return k, _prod(ext[:k])


def _split_box(ext: tuple, itemsize: int, limit: int) -> list[tuple[tuple, tuple]]:
    """Cut a box (in row-major order) into sub-boxes of at most ``limit`` bytes:
    [(offset, sub extent)]."""
    nd = len(ext)
    if _prod(ext) * itemsize <= limit or nd == 0:
        return [((0,) * nd, tuple(ext))]
    k = 0
    while _prod(ext[k + 1:]) * itemsize > limit:
        k += 1
        if k == nd - 1 and itemsize > limit:
            raise ValueError(f"one element ({itemsize} bytes) exceeds chunk_bytes={limit}")
    slab = _prod(ext[k + 1:]) * itemsize
    g = max(1, limit // slab)
    out = []
    for outer in np.ndindex(*ext[:k]) if k else [()]:
        for s in range(0, ext[k], g):
            n = min(g, ext[k] - s)
            out.append((tuple(outer) + (s,) + (0,) * (nd - k - 1), (1,) * k + (n,) + tuple(ext[k + 1:])))
    return out


def _imms_per_target(domains: int, big: bool) -> int:
    """Imms one scatter target delivers: big runs are posted with sharding="bytes" (cut over the
    sender's domains), the others with sharding="targets"."""
    return fabric.imm_writes("scatter", domains=domains, sharding="bytes" if big and domains > 1 else "targets")


class Plan:
    """The static schedule of a weight push: built once, deterministic, serialisable.

    Args:
      src: the trainer side's :class:`Layout` (plain arrays).
      dst: the inference side's :class:`Layout` (same paths; quantized parameters declared with
        :class:`Fp8`, their scales under ``path + ".scale"``).
      chunk_bytes: staging chunk size (a publisher posts one or two scatters per chunk and
        subscriber rank); also the most a staged piece may hold.
      direct_min_bytes: pieces contiguous on both sides, untransformed and at least this long are
        written straight from the source shard (no staging).

    Building computes every piece (who sends which box to whom) and the imm counts between every
    pair of ranks; each source rank's chunks are packed when first asked for (:meth:`chunks_of`).
    """

    def __init__(self, src: Layout, dst: Layout, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 direct_min_bytes: int = DEFAULT_DIRECT_MIN_BYTES):
        if not isinstance(src, Layout) or not isinstance(dst, Layout):
            raise TypeError(f"Plan(src, dst) takes two weights.Layout, got {type(src).__name__}, {type(dst).__name__}")
        if not (isinstance(chunk_bytes, int) and 4096 <= chunk_bytes <= (1 << 30)):
            raise ValueError(f"chunk_bytes must be an int in 4096..2^30, got {chunk_bytes!r}")
        if not (isinstance(direct_min_bytes, int) and direct_min_bytes >= 0):
            raise ValueError(f"direct_min_bytes must be an int >= 0, got {direct_min_bytes!r}")
        self.src, self.dst = src, dst
        self.chunk_bytes, self.direct_min_bytes = chunk_bytes, direct_min_bytes
        t0 = time.perf_counter()
        self._pairs = self._match()
        self.fingerprint = self._fingerprint()
        self._build()
        self.build_seconds = time.perf_counter() - t0
        self._chunks: dict[int, list[_Chunk]] = {}
        self._chunk_lock = threading.Lock()

    # -- matching the two sides -------------------------------------------------------------------
    def _match(self) -> list[tuple[int, int, int]]:
        """[(dst tensor, src tensor, kind)] with every check on shapes and dtypes."""
        src_paths = {t.path: i for i, t in enumerate(self.src.tensors)}
        for t in self.src.tensors:
            if t.kind != "array":
                raise ValueError(f"{t.path}: the source side must hold plain arrays (found {t.kind})")
        pairs, seen = [], set()
        for di, d in enumerate(self.dst.tensors):
            base = d.path[: -len(".scale")] if d.kind == "scale" else d.path
            si = src_paths.get(base)
            if si is None:
                raise ValueError(f"destination tensor {d.path} has no source tensor {base!r}")
            s = self.src.tensors[si]
            if d.kind == "array":
                if d.shape != s.shape:
                    raise ValueError(f"{d.path}: destination shape {d.shape} != source shape {s.shape}")
                if d.dtype != s.dtype:
                    raise TypeError(f"{d.path}: destination dtype {d.dtype} != source dtype {s.dtype} "
                                    "(only float8_e4m3fn, declared with weights.Fp8, may differ)")
                kind = KIND_COPY
            else:
                if s.dtype not in ("float16", "bfloat16", "float32"):
                    raise TypeError(f"{d.path}: fp8 needs a float16/bfloat16/float32 source, got {s.dtype}")
                block = d.block
                if d.kind == "fp8" and d.shape != s.shape:
                    raise ValueError(f"{d.path}: fp8 weight shape {d.shape} != source shape {s.shape}")
                for box in {box for _, _, box in s.shards}:
                    for (a, b), bs, n in zip(box, block, s.shape):
                        if a % bs or (b % bs and b != n):
                            r, l = next((r, l) for r, l, x in s.shards if x == box)
                            raise ValueError(
                                f"{base}: fp8 block {block} straddles source shards: a shard of rank {r} holds "
                                f"{[list(x) for x in box]} of {s.shape}; reshard the source so every shard holds "
                                f"whole blocks")
                kind = KIND_FP8 if d.kind == "fp8" else KIND_SCALE
            pairs.append((di, si, kind))
            seen.add(si)
        missing = [t.path for i, t in enumerate(self.src.tensors) if i not in seen]
        if missing:
            raise ValueError(f"source tensors with no destination: {missing}")
        return pairs

    def _fingerprint(self) -> str:
        j = {"src": self.src.to_json(with_devices=False), "dst": self.dst.to_json(with_devices=False),
             "chunk_bytes": self.chunk_bytes, "direct_min_bytes": self.direct_min_bytes, "format": PLAN_FORMAT}
        return hashlib.sha256(json.dumps(j, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]

    # -- building ---------------------------------------------------------------------------------
    def _build(self) -> None:
        S, R = self.src.num_ranks, max(1, self.dst.num_ranks)
        self.num_src_ranks, self.num_dst_ranks = self.src.num_ranks, self.dst.num_ranks
        self._key_ids: dict[tuple, int] = {}
        self._items: dict[tuple[int, int], list[_Item]] = {}  # (holder rank, local) -> pieces
        # Per (source rank, destination rank): targets of small runs, of big runs, and bytes.
        self._small = np.zeros((S, R), np.int64)
        self._big = np.zeros((S, R), np.int64)
        self._bytes = np.zeros((S, R), np.int64)
        cache: dict[tuple, tuple] = {}
        for di, si, kind in self._pairs:
            d, s = self.dst.tensors[di], self.src.tensors[si]
            key = (kind, d.shape, d.dtype, s.shape, s.dtype, d.block if kind != KIND_COPY else None, s.shards, d.shards)
            geo = cache.get(key)
            if geo is None:
                geo = cache[key] = self._geometry_tables(self._tensor_geometry(di, si, kind))
            geoms, g_h, g_k, hold_r, hold_l, c_g, c_r, c_small, c_big, c_bytes = geo
            # Geometry shared by same-shaped tensors; the holder rotates with the tensor index so
            # replicas share the work across tensors, not only within one.
            pick = (g_h + di) % g_k
            hr = hold_r[np.arange(len(geoms)), pick]
            hl = hold_l[np.arange(len(geoms)), pick]
            items = self._items
            for g, r, l in zip(geoms, hr.tolist(), hl.tolist()):
                lst = items.get((r, l))
                if lst is None:
                    lst = items[(r, l)] = []
                lst.append(_Item(g, di, si, r, l))
            if len(c_g):
                src_r = hr[c_g]
                np.add.at(self._small, (src_r, c_r), c_small)
                np.add.at(self._big, (src_r, c_r), c_big)
                np.add.at(self._bytes, (src_r, c_r), c_bytes)
        self._buffers: dict[int, list[tuple[int, int]]] = {}
        for di, d in enumerate(self.dst.tensors):
            for r, l, _ in d.shards:
                self._buffers.setdefault(r, []).append((di, l))
        self._buffer_index = {r: {b: i for i, b in enumerate(bl)} for r, bl in self._buffers.items()}

    def _geometry_tables(self, geoms: list[_Geom]) -> tuple:
        n = len(geoms)
        kmax = max((len(g.holders) for g in geoms), default=1)
        g_h = np.array([g.h for g in geoms], np.int64)
        g_k = np.array([len(g.holders) for g in geoms], np.int64)
        hold_r = np.zeros((n, kmax), np.int64)
        hold_l = np.zeros((n, kmax), np.int64)
        c_g, c_r, c_small, c_big, c_bytes = [], [], [], [], []
        for i, g in enumerate(geoms):
            for j, (r, l) in enumerate(g.holders):
                hold_r[i, j], hold_l[i, j] = r, l
            per: dict[int, int] = {}
            for r, _ in g.receivers:
                per[r] = per.get(r, 0) + 1
            for r, m in per.items():
                c_g.append(i)
                c_r.append(r)
                c_small.append(0 if g.big else m * g.n_runs)
                c_big.append(m * g.n_runs if g.big else 0)
                c_bytes.append(m * g.nbytes)
        a = lambda x: np.array(x, np.int64)  # noqa: E731
        return geoms, g_h, g_k, hold_r, hold_l, a(c_g), a(c_r), a(c_small), a(c_big), a(c_bytes)

    def _tensor_geometry(self, di: int, si: int, kind: int) -> list[_Geom]:
        d, s = self.dst.tensors[di], self.src.tensors[si]
        nd = len(d.shape)
        block = d.block
        out_itemsize = d.itemsize

        def src_box(box: Box) -> Box:  # source boxes in the destination's index space
            if kind == KIND_SCALE:
                return tuple((a // b, -(-e // b)) for (a, e), b in zip(box, block))
            return box

        holders: dict[Box, list] = {}
        for r, l, box in s.shards:
            holders.setdefault(src_box(box), []).append((r, l, box))
        receivers: dict[Box, list] = {}
        for r, l, box in d.shards:
            receivers.setdefault(box, []).append((r, l))
        sb, db = list(holders), list(receivers)
        if nd == 0:
            pairs = [(0, 0)] if sb and db else []
            lo = hi = None
        else:
            S = np.array(sb, np.int64).reshape(len(sb), nd, 2)
            D = np.array(db, np.int64).reshape(len(db), nd, 2)
            lo = np.maximum(S[:, None, :, 0], D[None, :, :, 0])
            hi = np.minimum(S[:, None, :, 1], D[None, :, :, 1])
            pairs = np.argwhere(np.all(hi > lo, axis=-1)).tolist()
        out: list[_Geom] = []
        for i, j in pairs:
            sbox, dbox = sb[i], db[j]
            xlo = tuple(int(v) for v in lo[i, j]) if nd else ()
            xhi = tuple(int(v) for v in hi[i, j]) if nd else ()
            hs = sorted(holders[sbox], key=lambda h: (h[0], h[1]))
            rs = sorted(receivers[dbox])
            k, m = len(hs), len(rs)
            ext = tuple(b - a for a, b in zip(xlo, xhi))
            # Replicas split the work: cut the box into parts along its first long dimension, and
            # deal the (part, receiver) units round robin over the holders.
            split = next((q for q in range(nd) if ext[q] > 1), None)
            parts = 1 if split is None else max(1, min(k // m, ext[split]))
            rot = (i + j) % k
            groups: dict[tuple[int, int], list] = {}
            for q in range(parts):
                for u in range(m):
                    groups.setdefault(((q * m + u + rot) % k, q), []).append(rs[u])
            hold = tuple((r_, l_) for r_, l_, _ in hs)
            hbox = hs[0][2]
            sshape = tuple(b - a for a, b in hbox)  # a holder's shard, elements
            dshape = tuple(b - a for a, b in dbox)
            for (h, q), recv in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                plo, phi = list(xlo), list(xhi)
                if split is not None and parts > 1:
                    e = ext[split]
                    plo[split] = xlo[split] + (e * q) // parts
                    phi[split] = xlo[split] + (e * (q + 1)) // parts
                pext = tuple(b - a for a, b in zip(plo, phi))
                if _prod(pext) == 0:
                    continue
                sl = tuple(a - b for a, b in zip(plo, (x for x, _ in sbox)))
                dl = tuple(a - b for a, b in zip(plo, (x for x, _ in dbox)))
                for g in self._make_geoms(kind, di, si, sshape, sl, pext, dl, dshape, tuple(recv), out_itemsize, block):
                    g.holders, g.h = hold, h
                    out.append(g)
        return out

    def _make_geoms(self, kind: int, di: int, si: int, sshape: tuple, sl: tuple, pext: tuple, dl: tuple,
                    dshape: tuple, recv: tuple, out_itemsize: int, block: tuple | None) -> list[_Geom]:
        s = self.src.tensors[si]
        nbytes = _prod(pext) * out_itemsize
        # Direct: untransformed, one run on both sides, big enough to be worth its own write.
        if kind == KIND_COPY and nbytes >= max(1, self.direct_min_bytes):
            _, n_src = _runs(sl, pext, sshape)
            _, n_dst = _runs(dl, pext, dshape)
            if n_src == 1 and n_dst == 1:
                g = self._geom(kind, di, sl, pext, dl, dshape, recv, out_itemsize, sshape, s, block)
                g.direct = True
                g.src_byte_off = _row_major_offset(sl, sshape) * s.itemsize
                return [g]
        # Transformed pieces are cut smaller: the stage program's temporaries scale with a piece
        # (its source region is read at the source's width), and must stay well inside the bound.
        limit = self.chunk_bytes if kind == KIND_COPY else max(4096, self.chunk_bytes // 4)
        out = []
        for off, sub in _split_box(pext, out_itemsize, limit):
            slo = tuple(a + o for a, o in zip(sl, off))
            dlo = tuple(a + o for a, o in zip(dl, off))
            out.append(self._geom(kind, di, slo, sub, dlo, dshape, recv, out_itemsize, sshape, s, block))
        return out

    def _geom(self, kind, di, slo, ext, dlo, dshape, recv, out_itemsize, sshape, s, block) -> _Geom:
        k, n_runs = _runs(dlo, ext, dshape)
        nd = len(dshape)
        strides = [out_itemsize] * nd
        for q in range(nd - 2, -1, -1):
            strides[q] = strides[q + 1] * dshape[q + 1]
        run_bytes = (ext[k] * strides[k]) if nd else out_itemsize
        base = _row_major_offset(dlo, dshape) * out_itemsize
        # Staged geometry: what the stager reads (a block-aligned region for fp8 and scales).
        if kind == KIND_COPY:
            region_lo, region_ext, crop = slo, ext, ()
        elif kind == KIND_FP8:
            region_lo = tuple((a // b) * b for a, b in zip(slo, block))
            region_hi = tuple(min(-(-(a + e) // b) * b, n) for a, e, b, n in zip(slo, ext, block, sshape))
            region_ext = tuple(h - l for l, h in zip(region_lo, region_hi))
            crop = tuple(a - l for a, l in zip(slo, region_lo))
        else:  # scale: slo/ext in blocks of the holder's shard
            region_lo = tuple(a * b for a, b in zip(slo, block))
            region_ext = tuple(min((a + e) * b, n) - a * b for a, e, b, n in zip(slo, ext, block, sshape))
            crop = ()
        key = (kind, sshape, s.dtype, tuple(ext), self.dst.tensors[di].dtype, block, region_ext, crop)
        kid = self._key_ids.setdefault(key, len(self._key_ids))
        return _Geom(kind, tuple(slo), tuple(ext), tuple(dlo), recv, _prod(ext) * out_itemsize, run_bytes, n_runs,
                     tuple(ext[:k]), tuple(strides[:k]), base, key=key, region_lo=tuple(region_lo), kid=kid,
                     big=run_bytes >= BYTES_MODE_MIN)

    # -- chunks ---------------------------------------------------------------------------------
    def chunks_of(self, src_rank: int) -> list[_Chunk]:
        """The chunks ``src_rank`` posts, in order (packed on first use, then kept)."""
        with self._chunk_lock:
            cl = self._chunks.get(src_rank)
            if cl is None:
                by_local = [self._pack(src_rank, l, items) for (r, l), items in sorted(self._items.items())
                            if r == src_rank]
                # Interleave the devices' chunks so every device of the rank works at once.
                cl = []
                for i in range(max((len(q) for q in by_local), default=0)):
                    cl.extend(q[i] for q in by_local if i < len(q))
                self._chunks[src_rank] = cl
            return cl

    @property
    def chunks(self) -> dict[int, list[_Chunk]]:
        """Every source rank's chunks (packs all of them)."""
        return {r: self.chunks_of(r) for r in range(self.num_src_ranks)}

    def _pack(self, rank: int, local: int, items: list[_Item]) -> list[_Chunk]:
        chunks = [_Chunk(rank, local, False, [it], [it.g.src_byte_off], 0) for it in items if it.g.direct]
        # Same geometry next to each other: one batched stage call covers a run of them.
        staged = sorted((it for it in items if not it.g.direct), key=lambda it: (it.g.kid, it.dst_tensor, it.g.dst_lo))
        cur: _Chunk | None = None
        limit, align = self.chunk_bytes, STAGE_ALIGN
        for it in staged:
            need = -(-it.g.nbytes // align) * align
            if cur is None or cur.nbytes + need > limit:
                cur = _Chunk(rank, local, True, [], [], 0)
                chunks.append(cur)
            cur.items.append(it)
            cur.offsets.append(cur.nbytes)
            cur.nbytes += need
        return chunks

    # -- queries --------------------------------------------------------------------------------
    def sources_of(self, dst_rank: int) -> list[int]:
        """Source ranks that write to ``dst_rank``."""
        return np.nonzero(self._bytes[:, dst_rank])[0].tolist() if self.num_dst_ranks else []

    def destinations_of(self, src_rank: int) -> list[int]:
        return np.nonzero(self._bytes[src_rank])[0].tolist()

    def buffers(self, dst_rank: int) -> list[tuple[int, int]]:
        """Destination buffers of ``dst_rank``: [(dst tensor index, local)]; the list index is the buffer id."""
        return list(self._buffers.get(dst_rank, []))

    def buffer_id(self, dst_rank: int, tensor: int, local: int) -> int:
        return self._buffer_index[dst_rank][(tensor, local)]

    def _items_between(self, src_rank: int, dst_rank: int) -> Iterator[_Item]:
        for (r, _), items in self._items.items():
            if r == src_rank:
                for it in items:
                    if any(rr == dst_rank for rr, _ in it.g.receivers):
                        yield it

    def buffer_ids_between(self, src_rank: int, dst_rank: int) -> list[int]:
        """Buffer ids of ``dst_rank`` that ``src_rank`` writes into."""
        ids = set()
        for it in self._items_between(src_rank, dst_rank):
            ids.update(self.buffer_id(dst_rank, it.dst_tensor, l) for r, l in it.g.receivers if r == dst_rank)
        return sorted(ids)

    def expected_imms(self, src_rank: int, dst_rank: int, domains: int) -> int:
        """Imms ``dst_rank`` receives from one push of ``src_rank`` whose engine has ``domains``
        domains: one per scatter target, as :func:`fabric.imm_writes` counts them for the sharding
        the publisher posts each target with."""
        return int(self._small[src_rank, dst_rank]) * _imms_per_target(domains, False) + \
            int(self._big[src_rank, dst_rank]) * _imms_per_target(domains, True)

    def tensors_between(self, src_rank: int, dst_rank: int) -> list[str]:
        """Destination tensors ``src_rank`` writes to ``dst_rank``: path, the bounding box of those
        pieces in the tensor's global index space, and the piece count."""
        out: dict[int, list] = {}
        for it in self._items_between(src_rank, dst_rank):
            out.setdefault(it.dst_tensor, []).append(it)
        res = []
        for di, its in sorted(out.items()):
            t = self.dst.tensors[di]
            lo = [None] * len(t.shape)
            hi = [None] * len(t.shape)
            for it in its:
                base = next(box for r, l, box in t.shards if (r, l) in it.g.receivers)
                for d, ((b0, _), a, e) in enumerate(zip(base, it.g.dst_lo, it.g.ext)):
                    lo[d] = b0 + a if lo[d] is None else min(lo[d], b0 + a)
                    hi[d] = b0 + a + e if hi[d] is None else max(hi[d], b0 + a + e)
            box = "[" + ", ".join(f"{a}:{b}" for a, b in zip(lo, hi)) + "]"
            res.append(f"{t.path} {box} ({len(its)} piece{'s' if len(its) > 1 else ''})")
        return res

    def stats(self, *, chunks: bool = True) -> dict:
        """Bytes and writes per source and destination rank (what one push moves); with ``chunks``
        also the chunk, stage-call and scatter counts (this packs every source rank)."""
        out = {
            "src_ranks": int(self.num_src_ranks), "dst_ranks": int(self.num_dst_ranks),
            "items": int(sum(len(v) for v in self._items.values())),
            "bytes_per_src": self._bytes.sum(1), "bytes_per_dst": self._bytes.sum(0),
            "writes_per_src": (self._small + self._big).sum(1), "writes_per_dst": (self._small + self._big).sum(0),
            "total_bytes": int(self._bytes.sum()),
        }
        if chunks:
            stage_calls = np.zeros(self.num_src_ranks, np.int64)
            scatters = np.zeros(self.num_src_ranks, np.int64)
            n = 0
            for r in range(self.num_src_ranks):
                for c in self.chunks_of(r):
                    n += 1
                    if c.staged:
                        stage_calls[r] += len(_stage_groups(c))
                    for small, big, _ in c.rank_targets.values():
                        scatters[r] += (small > 0) + (big > 0)
            out.update(chunks=n, stage_calls_per_src=stage_calls, scatters_per_src=scatters)
        return out

    # -- serialisation --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The plan's inputs (both layouts and options) plus its fingerprint; :meth:`from_bytes`
        rebuilds the same schedule (the build is deterministic) and checks the fingerprint."""
        j = {"src": self.src.to_json(), "dst": self.dst.to_json(), "chunk_bytes": self.chunk_bytes,
             "direct_min_bytes": self.direct_min_bytes, "fingerprint": self.fingerprint, "format": PLAN_FORMAT}
        return b"JGWP" + zlib.compress(json.dumps(j, separators=(",", ":")).encode(), 6)

    @classmethod
    def from_bytes(cls, b: bytes) -> "Plan":
        if not isinstance(b, (bytes, bytearray)) or bytes(b[:4]) != b"JGWP":
            raise ValueError("not the bytes of a weights.Plan (bad magic)")
        try:
            j = json.loads(zlib.decompress(bytes(b[4:])))
            if j.get("format") != PLAN_FORMAT:
                raise ValueError(f"plan format {j.get('format')!r} is not {PLAN_FORMAT}")
            plan = cls(Layout.from_json(j["src"]), Layout.from_json(j["dst"]), chunk_bytes=j["chunk_bytes"],
                       direct_min_bytes=j["direct_min_bytes"])
        except (zlib.error, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"garbled weights.Plan bytes: {e}") from None
        if plan.fingerprint != j.get("fingerprint"):
            raise ValueError(f"plan fingerprint mismatch after rebuild: stored {j.get('fingerprint')}, "
                             f"rebuilt {plan.fingerprint} (different jax_garden version?)")
        return plan

    def __repr__(self) -> str:
        return (f"Plan({self.num_src_ranks} -> {self.num_dst_ranks} ranks, {len(self.dst.tensors)} tensors, "
                f"fingerprint {self.fingerprint[:12]})")



def _row_major_offset(idx: Sequence[int], shape: Sequence[int]) -> int:
    off = 0
    for i, n in zip(idx, shape):
        off = off * n + i
    return off


# ----------------------------------------------------------------------------------------------
# fp8 e4m3 with per-block scales: NumPy reference (the stager computes the same in jax)


def _interleave(shape: tuple, block: tuple) -> tuple[tuple, tuple]:
    """Padded shape split into (blocks, block) pairs: (n0, b0, n1, b1, ...), and the padding."""
    nb = tuple(-(-s // b) for s, b in zip(shape, block))
    split = tuple(v for n, b in zip(nb, block) for v in (n, b))
    pad = tuple((0, n * b - s) for n, b, s in zip(nb, block, shape))
    return split, pad


def _np_block_amax(x: np.ndarray, block: tuple) -> np.ndarray:
    split, pad = _interleave(x.shape, block)
    a = np.abs(np.pad(x.astype(np.float32), pad)).reshape(split)
    return a.max(axis=tuple(range(1, 2 * x.ndim, 2))) if x.ndim else a


def quantize_fp8(x: Any, block: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Reference: ``(weight float8_e4m3fn, scale float32)`` of ``x`` in blocks (see :class:`Fp8`)."""
    import ml_dtypes

    x = np.asarray(x)
    block = tuple(int(b) for b in block)
    if len(block) != x.ndim:
        raise ValueError(f"block {block} must have one entry per dimension of shape {x.shape}")
    amax = _np_block_amax(x, block)
    scale = np.where(amax > 0, amax * _INV_FP8_MAX, np.float32(1.0)).astype(np.float32)
    split, pad = _interleave(x.shape, block)
    xs = np.pad(x.astype(np.float32), pad).reshape(split)
    inv = (np.float32(1.0) / scale).astype(np.float32)
    sb = inv.reshape(tuple(v for n in scale.shape for v in (n, 1)))
    q = np.clip(xs * sb, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
    q = q.reshape(tuple(n * b for n, b in zip(scale.shape, block)))
    return q[tuple(slice(0, s) for s in x.shape)], scale


def dequantize_fp8(weight: Any, scale: Any, block: Sequence[int]) -> np.ndarray:
    """``weight * scale`` (float32), each scale broadcast over its block."""
    w = np.asarray(weight).astype(np.float32)
    s = np.asarray(scale, np.float32)
    for d, b in enumerate(block):
        s = np.repeat(s, b, axis=d)
    return w * s[tuple(slice(0, n) for n in w.shape)]


def fp8_error_bound(x: Any, scale: Any, block: Sequence[int]) -> np.ndarray:
    """Per-element bound on ``|dequantize(quantize(x)) - x|``: half a float8_e4m3fn step at the
    value's binade (2^-4 relative for normal values) and half the subnormal step (2^-10 of the
    scale) below that, plus float32 rounding."""
    x = np.abs(np.asarray(x).astype(np.float32))
    s = np.asarray(scale, np.float32)
    for d, b in enumerate(block):
        s = np.repeat(s, b, axis=d)
    s = s[tuple(slice(0, n) for n in x.shape)]
    return np.maximum(x * 2.0 ** -4, s * 2.0 ** -10) * (1 + 2.0 ** -20) + 1e-30


def _slices(lo: Sequence[int], ext: Sequence[int]) -> tuple:
    return tuple(slice(a, a + e) for a, e in zip(lo, ext))


def stage_item_numpy(item: _Item, src_shard: np.ndarray, plan: Plan) -> np.ndarray:
    """Reference for what the stager puts on the wire for one item: its bytes (uint8, 1-D) in the
    destination's row-major order. ``src_shard`` is the holder's shard of the source tensor."""
    block = plan.dst.tensors[item.dst_tensor].block
    if item.kind == KIND_COPY:
        piece = np.ascontiguousarray(src_shard[_slices(item.src_lo, item.ext)])
    else:
        region_ext = item.key[6]
        region = src_shard[_slices(item.region_lo, region_ext)]
        q, sc = quantize_fp8(region, block)
        piece = sc if item.kind == KIND_SCALE else np.ascontiguousarray(q[_slices(item.key[7], item.ext)])
    return piece.reshape(-1).view(np.uint8)


# ----------------------------------------------------------------------------------------------
# The stager: gathers (and quantizes) pieces into registered staging slots with jax, in place


def _jax_block_scale(region: Any, block: tuple) -> tuple[Any, Any]:
    """(region padded and split into blocks, float32 scales) of a region (any float dtype)."""
    import jax.numpy as jnp

    split, pad = _interleave(region.shape, block)
    xs = (jnp.pad(region, pad) if any(p for _, p in pad) else region).reshape(split)
    amax = jnp.max(jnp.abs(xs), axis=tuple(range(1, 2 * region.ndim, 2))) if region.ndim else jnp.abs(xs)
    amax = amax.astype(jnp.float32)
    scale = jnp.where(amax > 0, amax * _INV_FP8_MAX, jnp.float32(1.0)).astype(jnp.float32)
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


MAX_STAGE_BATCH = 32


def _stage_groups(chunk: _Chunk) -> list[tuple[tuple, list[int]]]:
    """Runs of same-geometry items of a chunk (item indices), at most MAX_STAGE_BATCH each."""
    groups: list[tuple[tuple, list[int]]] = []
    last = -1
    for i, it in enumerate(chunk.items):
        kid = it.g.kid
        if kid == last and len(groups[-1][1]) < MAX_STAGE_BATCH:
            groups[-1][1].append(i)
        else:
            groups.append((it.g.key, [i]))
            last = kid
    return groups


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


class _StagingRing:
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
        self._prepared: dict[int, tuple[_Chunk, list]] = {}

    def acquire(self, on_done: Callable[[int, Any], None]) -> int:
        k = self.next
        self.next = (k + 1) % len(self.arrays)
        for r, t in self.busy[k]:
            on_done(r, t)
        self.busy[k] = []
        return k

    def stage(self, k: int, chunk: _Chunk, srcs: dict) -> None:
        if self.host:
            self._stage_host(k, chunk, srcs)
        else:
            self._stage_device(k, chunk, srcs)

    def view(self, k: int) -> np.ndarray:
        """The slot's bytes as NumPy (a copy for device slots)."""
        return np.asarray(self.arrays[k])

    def _stage_calls(self, chunk: _Chunk) -> list[tuple[Any, list, Any, Any]]:
        """A chunk's stage calls (jitted fn, source keys, piece starts and slot offsets already on the
        device), built at the chunk's first push: later pushes only dispatch."""
        hit = self._prepared.get(id(chunk))
        if hit is not None and hit[0] is chunk:
            return hit[1]
        import jax

        calls = []
        for key, idx in _stage_groups(chunk):
            items = [chunk.items[i] for i in idx]
            starts = np.array([it.g.region_lo for it in items], np.int32).reshape(len(items), len(key[1]))
            offs = np.array([chunk.offsets[i] for i in idx], np.int32)
            calls.append((_stage_fn(key, len(idx)), [(it.src_tensor, it.src_local) for it in items],
                          jax.device_put(starts, self.device), jax.device_put(offs, self.device)))
        self._prepared[id(chunk)] = (chunk, calls)  # holds the chunk: its id is not reused meanwhile
        return calls

    def _stage_host(self, k: int, chunk: _Chunk, srcs: dict) -> None:
        slot = self.arrays[k]
        for key, idx in _stage_groups(chunk):
            items = [chunk.items[i] for i in idx]
            if key[0] == KIND_COPY:
                for i, it in zip(idx, items):
                    src = np.asarray(srcs[(it.src_tensor, it.src_local)])
                    off, n = chunk.offsets[i], it.g.nbytes
                    np.copyto(slot[off:off + n].view(src.dtype).reshape(it.g.ext), src[_slices(it.g.region_lo, it.g.ext)])
            else:
                starts = np.array([it.g.region_lo for it in items], np.int32).reshape(len(items), len(key[1]))
                out = np.asarray(_bytes_fn(key, len(items))(tuple(srcs[(it.src_tensor, it.src_local)] for it in items),
                                                            starts))
                n = items[0].g.nbytes
                for j, i in enumerate(idx):
                    off = chunk.offsets[i]
                    slot[off:off + n] = out[j * n:(j + 1) * n]

    def _stage_device(self, k: int, chunk: _Chunk, srcs: dict) -> None:
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


HOST_STAGING = True  # CPU devices stage through NumPy slots (False: the jax in-place scheme, as on GPUs)


# ----------------------------------------------------------------------------------------------
# Control messages (two-sided, through the engines): hello/welcome at connect, request/grant per
# push, status rounds between subscriber ranks. JSON after a magic; never on the data path.

_MAGIC = b"JGW1"


def _msg(kind: str, **fields: Any) -> bytes:
    return _MAGIC + json.dumps({"t": kind, **fields}, separators=(",", ":")).encode()


def _parse(payload: bytes) -> dict | None:
    if not payload.startswith(_MAGIC):
        return None
    try:
        m = json.loads(payload[len(_MAGIC):])
    except (ValueError, UnicodeDecodeError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("t"), str) else None


def _address(a: Any, what: str) -> fabric.NetAddress:
    if isinstance(a, fabric.NetAddress):
        return a
    if isinstance(a, str):
        a = bytes.fromhex(a)
    if isinstance(a, (bytes, bytearray, memoryview)):
        return fabric.NetAddress.from_bytes(bytes(a))
    raise TypeError(f"{what} must be an engine address (bytes or fabric.NetAddress), got {type(a).__name__}")


def _kv_key(name: str, rank: int) -> str:
    return f"jax_garden/weights/{name}/subscriber/{rank}"


def _kv_client() -> Any:
    from jax_garden._compat import distributed_client

    client = distributed_client()
    if client is None:
        raise RuntimeError("kv bootstrap needs jax.distributed.initialize() (both sides in one JAX job); "
                           "otherwise move the address bytes yourself")
    return client


def _default_rank(layout: Layout, rank: int | None, side: str) -> int:
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


def _local_devices(layout: Layout, rank: int, devices: Sequence[Any] | None) -> list[Any]:
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


def _put(x: Any, device: Any) -> Any:
    import jax

    if hasattr(x, "devices") and x.devices() == {device}:
        return x
    return jax.device_put(x, device)


# ----------------------------------------------------------------------------------------------
# Publisher


class PushHandle:
    """A push in flight. :meth:`wait` returns once every write left this process (the subscriber
    learns that they landed by counting imms) and raises what went wrong."""

    def __init__(self, version: int, ranks: Sequence[int]):
        self.version = version
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.bytes_sent = {r: 0 for r in ranks}
        self.skipped: list[int] = []  # subscriber ranks that already had this version from us
        self.started = time.monotonic()
        self.seconds: float | None = None
        self.chunks_posted = 0
        self.stage_seconds = 0.0

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> "PushHandle":
        if not self._done.wait(timeout):
            raise TimeoutError(f"push of version {self.version} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self.seconds = time.monotonic() - self.started
        self._done.set()

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._error else f"done in {self.seconds:.3f} s")
        return f"PushHandle(version={self.version}, {state})"


class Publisher:
    """Pushes parameter versions from one trainer process (one rank of the plan's source side).

    Args:
      plan: the :class:`Plan`.
      rank: this process's source rank (default: from ``jax.process_index()`` for layouts built
        from real devices, 0 for one-rank sides).
      engine: a TransferEngine whose control messages this publisher may consume; by default it
        makes its own (``provider``, ``domains``, ``engine_timeout``).
      staging_bytes: staging memory per process (split over its devices): chunk k+1 is gathered
        into one slot while chunk k is written from another. At least 2 chunks per device.
      timeout: seconds for connecting, for grants, and for each write to complete.
      imm_tag: 4-bit tag in every imm (must match the subscriber's).
      devices: jax device of each local index (default from the layout / ``jax.local_devices()``).
    """

    def __init__(self, plan: Plan, rank: int | None = None, *, engine: fabric.TransferEngine | None = None,
                 provider: str | None = None, domains: int = 1, engine_timeout: float = fabric.DEFAULT_TIMEOUT,
                 staging_bytes: int = 256 << 20, timeout: float = 60.0, imm_tag: int = 0xB,
                 devices: Sequence[Any] | None = None):
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a weights.Plan, got {type(plan).__name__}")
        if not (isinstance(staging_bytes, int) and staging_bytes > 0):
            raise ValueError(f"staging_bytes must be a positive int, got {staging_bytes!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        imm_value(imm_tag, 0, 0)
        self.plan, self.timeout, self.imm_tag = plan, float(timeout), imm_tag
        self.rank = _default_rank(plan.src, rank, "source")
        self._own_engine = engine is None
        self.engine = engine or fabric.TransferEngine(provider, domains, timeout=engine_timeout)
        self._devices = _local_devices(plan.src, self.rank, devices)
        self._chunks = plan.chunks_of(self.rank)
        self._dests = plan.destinations_of(self.rank)
        staged_locals = sorted({c.src_local for c in self._chunks if c.staged})
        self.staging_bytes = staging_bytes
        self._rings: dict[int, _StagingRing] = {}
        if staged_locals:
            per = staging_bytes // len(staged_locals)
            slots = per // plan.chunk_bytes
            if slots < 2:
                raise ValueError(f"staging_bytes={staging_bytes} holds {slots} chunk(s) of {plan.chunk_bytes} bytes per "
                                 f"device ({len(staged_locals)} devices stage here); need at least 2 to pipeline")
            for l in staged_locals:
                self._rings[l] = _StagingRing(self.engine, self._devices[l], slots, plan.chunk_bytes)
        self._subs: dict[int, dict] = {}
        self._targets: list[dict] | None = None
        self._inbox: list[tuple[fabric.NetAddress, dict]] = []
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None
        self._handle: PushHandle | None = None  # the last push's
        self._req = 0
        self._closed = False
        _lifetime.close_at_exit(self)

    @property
    def address(self) -> bytes:
        return bytes(self.engine.address)

    # -- connecting -------------------------------------------------------------------------------
    def connect(self, addresses: Sequence[Any] | None = None, *, kv: str | None = None,
                timeout: float | None = None) -> None:
        """Say hello to every subscriber rank this rank writes to and get its buffers' descriptors.

        ``addresses[r]`` is subscriber rank r's :attr:`Subscriber.address` (bytes the caller moved),
        or ``kv=name`` reads them from ``jax.distributed``'s key-value store (both sides one JAX job,
        subscribers called :meth:`Subscriber.announce` with the same name). Raises ``ValueError`` if
        a subscriber runs another plan (fingerprint mismatch), ``TimeoutError`` if one is silent.
        """
        t = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + t
        if (addresses is None) == (kv is None):
            raise ValueError("connect takes either addresses or kv=name")
        addr: dict[int, fabric.NetAddress] = {}
        if kv is not None:
            client = _kv_client()
            for r in self._dests:
                try:
                    v = client.blocking_key_value_get(_kv_key(kv, r), int(max(1, deadline - time.monotonic()) * 1000))
                except Exception as e:
                    raise TimeoutError(f"subscriber rank {r} did not announce {kv!r} in the key-value store within "
                                       f"{t} s: {e}") from None
                addr[r] = _address(v, f"kv value of subscriber rank {r}")
        else:
            addresses = list(addresses)
            if len(addresses) < self.plan.num_dst_ranks:
                raise ValueError(f"connect needs the addresses of all {self.plan.num_dst_ranks} subscriber ranks, "
                                 f"got {len(addresses)}")
            for r in self._dests:
                addr[r] = _address(addresses[r], f"addresses[{r}]")
        with self._busy:
            for r in self._dests:
                self.engine.send(addr[r], _msg("hello", fp=self.plan.fingerprint, src=self.rank,
                                               domains=self.engine.num_domains)).wait(t)
            waiting = set(self._dests)
            subs: dict[int, dict] = {r: {"addr": addr[r], "descs": {}, "parts": set()} for r in self._dests}
            while waiting:
                a, m = self._next_message(deadline, lambda m: m["t"] in ("welcome", "refuse"),
                                          lambda: f"no answer to hello from subscriber ranks {sorted(waiting)}")
                r = m.get("dst")
                if m["t"] == "refuse":
                    raise ValueError(f"subscriber rank {r} refused the connection: {m.get('reason')}")
                if m.get("fp") != self.plan.fingerprint:
                    raise ValueError(f"plan fingerprint mismatch: subscriber rank {r} runs plan {m.get('fp')}, "
                                     f"this publisher runs {self.plan.fingerprint}")
                if r not in waiting:
                    continue
                subs[r]["descs"].update({int(k): [fabric.MemoryDescriptor.from_bytes(base64.b64decode(x)) for x in v]
                                         for k, v in m["descs"].items()})
                subs[r]["parts"].add(int(m.get("part", 0)))
                if len(subs[r]["parts"]) == int(m.get("parts", 1)):
                    waiting.discard(r)
            self._subs = subs
            self._targets = self._build_targets()

    def _build_targets(self) -> list[dict]:
        """Per chunk: {dst rank: [(targets for slot 0, targets for slot 1, sharding), ...]}: one
        scatter for the small runs (sharding "targets") and one for the big ones ("bytes")."""
        out = []
        multi = self.engine.num_domains > 1
        for c in self._chunks:
            per: dict[int, list] = {}
            for r in c.rank_targets:
                lists = {False: ([], []), True: ([], [])}
                descs = self._subs[r]["descs"]
                for it, off in zip(c.items, c.offsets):
                    g = it.g
                    dsts = None
                    for rr, l in g.receivers:
                        if rr != r:
                            continue
                        bid = self.plan.buffer_id(r, it.dst_tensor, l)
                        if dsts is None:
                            dsts = g.run_dst_offsets().tolist()
                        d0, d1 = descs[bid]
                        l0, l1 = lists[g.big]
                        for t, do in enumerate(dsts):
                            so = off + t * g.run_bytes
                            l0.append((d0, g.run_bytes, so, do))
                            l1.append((d1, g.run_bytes, so, do))
                # Checked and converted once here: each push then posts them without per-target work.
                per[r] = [(fabric.ScatterTargets(l0), fabric.ScatterTargets(l1), "bytes" if big and multi else "targets")
                          for big, (l0, l1) in lists.items() if l0]
            out.append(per)
        return out

    def _next_message(self, deadline: float, want: Callable[[dict], bool], what: Callable[[], str]
                      ) -> tuple[fabric.NetAddress, dict]:
        for i, (a, m) in enumerate(self._inbox):
            if want(m):
                return self._inbox.pop(i)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"weights publisher rank {self.rank}: {what()}")
            try:
                a, payload = self.engine.recv_message(timeout=min(left, 0.05))
            except TimeoutError:
                continue
            m = _parse(payload)
            if m is None:
                continue
            if want(m):
                return a, m
            self._inbox.append((a, m))
            del self._inbox[:-256]  # bounded: stale answers of old pushes are dropped

    # -- pushing ---------------------------------------------------------------------------------
    def push(self, params: Any, version: int) -> PushHandle:
        """Push ``params`` (a pytree like the plan's source side: global jax arrays, this rank's
        shard of each leaf, or whole numpy arrays) as ``version`` (an int, increasing).

        Checks everything before anything is sent: ``ValueError`` for a wrong structure, shape or
        sharding, ``TypeError`` for a wrong dtype. The push runs on a background thread (grants,
        then the pipelined chunks); the returned handle's ``wait`` raises its errors."""
        if self._targets is None:
            raise RuntimeError("Publisher.connect() must run before push()")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 1 << 62:
            raise ValueError(f"version must be an int in 0..2^62, got {version!r}")
        if self._thread is not None:
            # The handle is done before its thread has quite returned: a push right after
            # wait() must not be refused for that.
            if not self._handle.done():
                raise RuntimeError("a push is still running on this publisher; wait for its handle first")
            self._thread.join()
        srcs = self._sources(params)
        handle = self._handle = PushHandle(version, self._dests)
        self._thread = threading.Thread(target=self._run, args=(handle, srcs), name="jax_garden-weights-push",
                                        daemon=True)
        self._thread.start()
        return handle

    def _sources(self, params: Any) -> dict[tuple[int, int], Any]:
        """{(src tensor, local): single-device array} for this rank, after checking the pytree."""
        import jax

        flat, _ = jax.tree_util.tree_flatten_with_path(params)
        got = {jax.tree_util.keystr(kp): leaf for kp, leaf in flat}
        want = [t.path for t in self.plan.src.tensors]
        if set(got) != set(want):
            missing = [p for p in want if p not in got]
            extra = [p for p in got if p not in set(want)]
            raise ValueError(f"params do not match the plan: missing {missing[:8]}, unexpected {extra[:8]}")
        out: dict[tuple[int, int], Any] = {}
        for ti, t in enumerate(self.plan.src.tensors):
            leaf = got[t.path]
            mine = [(l, box) for r, l, box in t.shards if r == self.rank]
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
                raise TypeError(f"{t.path}: expected an array, got {type(leaf).__name__}")
            try:
                dt = _dtype_name(leaf.dtype)
            except TypeError:
                raise TypeError(f"{t.path}: dtype {leaf.dtype!r} is not an array dtype") from None
            if dt != t.dtype:
                raise TypeError(f"{t.path}: dtype {dt}, the plan says {t.dtype}")
            shape = tuple(int(s) for s in leaf.shape)
            if not mine:
                continue
            for l, box in mine:
                ext = tuple(b - a for a, b in box)
                arr = None
                if shape == t.shape and hasattr(leaf, "addressable_shards"):
                    did = self.plan.src.device_id(ti, self.rank, l)
                    cands = [s for s in leaf.addressable_shards
                             if (did is None or s.device.id == did) and _box_of_index(s.index, shape) == box]
                    if did is None:  # abstract layout: the l-th shard with this box on this process
                        same = [lb for lb in mine if lb[1] == box]
                        cands = sorted(cands, key=lambda s: s.device.id)
                        pos = same.index((l, box))
                        cands = cands[pos:pos + 1]
                    if not cands:
                        have = sorted({_box_of_index(s.index, shape) for s in leaf.addressable_shards})
                        raise ValueError(f"{t.path}: this process holds no shard {list(box)} (rank {self.rank}, "
                                         f"device {l}); its shards are {[list(h) for h in have]}")
                    arr = cands[0].data
                elif shape == ext:
                    arr = leaf
                elif shape == t.shape:
                    arr = np.asarray(leaf)[_slices([a for a, _ in box], ext)]
                else:
                    raise ValueError(f"{t.path}: shape {shape}; the plan wants {t.shape} (global) or this rank's "
                                     f"shard {ext}")
                out[(ti, l)] = arr
        # Staged pieces are read on the staging device; direct pieces straight from the shard, so
        # their values must exist before the engine reads them (jit results may still be running).
        for (ti, l), arr in list(out.items()):
            out[(ti, l)] = _put(arr, self._devices[l]) if self._rings else arr
        jax.block_until_ready([a for a in out.values() if not isinstance(a, np.ndarray)])
        return out

    def _before_chunk(self, index: int) -> None:
        """Called before each chunk is staged (tests use it to kill a publisher mid-push)."""

    def _run(self, handle: PushHandle, srcs: dict) -> None:
        try:
            grants = self._request_grants(handle)
            self._pipeline(handle, srcs, grants)
            handle._finish(None)
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the handle
            handle._finish(e)

    def _request_grants(self, handle: PushHandle) -> dict[int, tuple[int, int]]:
        self._req += 1
        req = f"{self.rank}:{self._req}:{time.monotonic_ns()}"
        deadline = time.monotonic() + self.timeout
        for r in self._dests:
            self.engine.send(self._subs[r]["addr"], _msg("req", src=self.rank, version=handle.version, id=req)
                             ).wait(self.timeout)
        grants: dict[int, tuple[int, int]] = {}
        waiting = set(self._dests)
        reasons: dict[int, str] = {}
        while waiting:
            _, m = self._next_message(
                deadline, lambda m: m.get("id") == req,
                lambda: (f"push of version {handle.version}: no grant within {self.timeout} s from subscriber ranks "
                         f"{sorted(waiting)}" + "".join(f"; rank {r}: {reasons[r]}" for r in sorted(waiting) if r in reasons)))
            r = m.get("dst")
            if m["t"] == "pending":
                reasons[r] = m.get("reason", "")
            elif m["t"] == "reject":
                raise ValueError(f"push of version {handle.version} refused by subscriber rank {r}: {m.get('reason')}")
            elif m["t"] == "done":
                handle.skipped.append(r)
                waiting.discard(r)
            elif m["t"] == "grant":
                grants[r] = (int(m["slot"]), int(m["epoch"]))
                waiting.discard(r)
        return grants

    def _pipeline(self, handle: PushHandle, srcs: dict, grants: dict[int, tuple[int, int]]) -> None:
        failed: dict[int, str] = {}
        direct: list = []
        regions: dict[tuple[int, int], Any] = {}

        def reap(r: int, t: Any) -> None:
            try:
                t.wait(self.timeout)
            except (fabric.TransferError, TimeoutError) as e:
                failed.setdefault(r, str(e))

        assert self._targets is not None
        try:
            self._post_chunks(handle, srcs, grants, failed, direct, regions, reap)
        finally:
            # Every write is complete (or failed) before the staging slots are refilled by another
            # push or the source arrays and their registrations are let go.
            for ring in self._rings.values():
                for k in range(len(ring.busy)):
                    for r, t in ring.busy[k]:
                        reap(r, t)
                    ring.busy[k] = []
            for r, t in direct:
                reap(r, t)
            regions.clear()
        if failed:
            detail = "; ".join(f"rank {r}: {e}" for r, e in sorted(failed.items()))
            raise fabric.TransferError(f"push of version {handle.version} failed toward subscriber ranks "
                                       f"{sorted(failed)}: {detail}")

    def _post_chunks(self, handle: PushHandle, srcs: dict, grants: dict, failed: dict, direct: list,
                     regions: dict, reap: Callable[[int, Any], None]) -> None:
        assert self._targets is not None
        for ci, c in enumerate(self._chunks):
            ranks = [r for r in c.rank_targets if r in grants and r not in failed]
            if not ranks:
                continue
            self._before_chunk(ci)
            if c.staged:
                ring = self._rings[c.src_local]
                k = ring.acquire(reap)
                t0 = time.perf_counter()
                ring.stage(k, c, srcs)
                handle.stage_seconds += time.perf_counter() - t0
                region = ring.regions[k]
            else:
                key = (c.src_tensor, c.src_local)
                region = regions.get(key)
                if region is None:
                    region = regions[key] = self.engine.register(_registrable(srcs[key]))
            posted = []
            for r in ranks:
                slot, epoch = grants[r]
                imm = imm_value(self.imm_tag, epoch, self.rank)
                try:
                    for lists in self._targets[ci][r]:
                        posted.append((r, self.engine.scatter(region, lists[slot], imm=imm, sharding=lists[2])))
                except (fabric.TransferError, ValueError) as e:
                    failed.setdefault(r, str(e))
                    continue
                handle.bytes_sent[r] += c.rank_targets[r][2]
            handle.chunks_posted += 1
            if c.staged:
                ring.busy[k] = posted
            else:
                direct.extend(posted)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _lifetime.closed(self)
        if self._thread is not None:
            self._thread.join(self.timeout)
        self._rings.clear()
        if self._own_engine:
            self.engine.close()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _registrable(arr: Any) -> Any:
    if isinstance(arr, np.ndarray):
        return np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()
    return arr


# ----------------------------------------------------------------------------------------------
# Subscriber


def _layout_difference(got: Layout, want: Layout) -> str:
    gp, wp = [t.path for t in got.tensors], [t.path for t in want.tensors]
    if gp != wp:
        return f"paths differ: specs have {sorted(set(gp) - set(wp))[:6]} not in the plan, " \
               f"the plan has {sorted(set(wp) - set(gp))[:6]} not in the specs"
    for a, b in zip(got.tensors, want.tensors):
        if a.shape != b.shape:
            return f"{a.path}: shape {a.shape}, the plan says {b.shape}"
        if a.dtype != b.dtype:
            return f"{a.path}: dtype {a.dtype}, the plan says {b.dtype}"
        if a.kind != b.kind or a.block != b.block:
            return f"{a.path}: {a.kind} {a.block}, the plan says {b.kind} {b.block}"
        if a.shards != b.shards:
            return f"{a.path}: shards {[(r, l, list(x)) for r, l, x in a.shards[:4]]}..., the plan says " \
                   f"{[(r, l, list(x)) for r, l, x in b.shards[:4]]}..."
    return "layouts differ"


class Subscriber:
    """Receives parameter versions on one inference process (one rank of the plan's destination side).

    Owns two registered copies of this rank's parameter shards (double buffering): a push lands in
    the copy not in service, and the model sees a new version only when :meth:`refresh` or
    :meth:`wait` switches to it, which happens once every byte of it landed on every subscriber
    rank (the ranks agree in a round of status messages, so all of them switch at the same call).
    After a switch, the previous copy is rewritten by the next push unless a reader holds it
    (:meth:`hold`); finish work that reads the old version before calling :meth:`refresh`.

    Args:
      plan: the :class:`Plan`.
      specs: this side's pytree of specs (the one the plan's destination layout came from); gives
        :meth:`params` its structure and, for real shardings, global arrays.
      rank: this process's destination rank (default as for :class:`Publisher`).
      engine: a TransferEngine whose control messages this subscriber may consume; by default it
        makes its own.
      fence_s: a source whose push did not complete is granted a new push only this long after
        its last write arrived, so a late write of the abandoned push cannot land in the new one.
      imm_tag: 4-bit tag of this service's imms.
      devices / devices_per_rank: how local indices map to jax devices / how abstract meshes map
        to ranks (as in :meth:`Layout.from_pytree`).
    """

    def __init__(self, plan: Plan, specs: Any, rank: int | None = None, *,
                 engine: fabric.TransferEngine | None = None, provider: str | None = None, domains: int = 1,
                 engine_timeout: float = fabric.DEFAULT_TIMEOUT, fence_s: float = 2.0, imm_tag: int = 0xB,
                 devices: Sequence[Any] | None = None, devices_per_rank: int = 1, poll_s: float = 0.002):
        import jax.numpy as jnp

        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a weights.Plan, got {type(plan).__name__}")
        if not fence_s >= 0:
            raise ValueError(f"fence_s must be >= 0, got {fence_s}")
        imm_value(imm_tag, 0, 0)
        layout = Layout.from_pytree(specs, devices_per_rank=devices_per_rank)
        if not layout.same_placement(plan.dst):
            raise ValueError(f"specs do not match the plan's destination side: {_layout_difference(layout, plan.dst)}")
        self.plan, self.fence_s, self.imm_tag, self._poll = plan, float(fence_s), imm_tag, float(poll_s)
        self.rank = _default_rank(plan.dst, rank, "destination")
        self._specs = specs
        self._own_engine = engine is None
        self.engine = engine or fabric.TransferEngine(provider, domains, timeout=engine_timeout)
        self._devices = _local_devices(plan.dst, self.rank, devices)
        self._buffers = plan.buffers(self.rank)
        self._arrays: list[list[Any]] = [[], []]
        self._regions: list[list[Any]] = [[], []]
        for di, l in self._buffers:
            t = plan.dst.tensors[di]
            box = next(b for r, ll, b in t.shards if r == self.rank and ll == l)
            shape = tuple(b - a for a, b in box)
            for s in (0, 1):
                a = jnp.zeros(shape, t.dtype, device=self._devices[l])
                a.block_until_ready()
                self._arrays[s].append(a)
                self._regions[s].append(self.engine.register(a))
        ptrs = [r.base for rs in self._regions for r in rs]
        if len(set(ptrs)) != len(ptrs):
            raise RuntimeError("weights: two destination buffers share memory; cannot write into them separately")
        self._sources = plan.sources_of(self.rank)
        self._cond = threading.Condition()
        self._serving_slot: int | None = None
        self._serving_version: int | None = None
        self._attempt: dict | None = None
        self._pubs: dict[int, dict] = {}
        self._next_epoch: dict[int, int] = {}
        self._fence_until: dict[int, float] = {}
        self._requests: list[tuple[fabric.NetAddress, dict]] = []
        self._leases = [0, 0]
        self._errors: list[str] = []
        self._sends: list = []
        self._peers: list[fabric.NetAddress | None] | None = None
        self._round = 0
        self._done_round = 0
        self._pending_round: int | None = None
        self._statuses: dict[int, dict[int, dict]] = {}
        self._last_statuses: dict[int, dict] = {}
        self._params_cache: dict[int, Any] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="jax_garden-weights-subscriber", daemon=True)
        self._thread.start()
        _lifetime.close_at_exit(self)

    # -- bootstrap --------------------------------------------------------------------------------
    @property
    def address(self) -> bytes:
        """This rank's engine address: give it (all ranks', in rank order) to publishers' ``connect``
        and to every subscriber rank's :meth:`set_peers`."""
        return bytes(self.engine.address)

    def set_peers(self, addresses: Sequence[Any]) -> None:
        """Addresses of all subscriber ranks (index = rank), for the switch-over rounds."""
        addresses = list(addresses)
        if len(addresses) != self.plan.num_dst_ranks:
            raise ValueError(f"set_peers needs {self.plan.num_dst_ranks} addresses (one per subscriber rank), "
                             f"got {len(addresses)}")
        self._peers = [None if r == self.rank else _address(a, f"addresses[{r}]") for r, a in enumerate(addresses)]

    def announce(self, kv: str, timeout: float = 60.0) -> None:
        """Bootstrap through ``jax.distributed``'s key-value store: publish this rank's address
        under ``kv`` and read the other subscriber ranks' (publishers then ``connect(kv=kv)``)."""
        client = _kv_client()
        client.key_value_set(_kv_key(kv, self.rank), self.address.hex())
        addrs: list[Any] = []
        for r in range(self.plan.num_dst_ranks):
            if r == self.rank:
                addrs.append(self.address)
                continue
            try:
                addrs.append(client.blocking_key_value_get(_kv_key(kv, r), int(timeout * 1000)))
            except Exception as e:
                raise TimeoutError(f"subscriber rank {r} did not announce {kv!r} within {timeout} s: {e}") from None
        self.set_peers(addrs)

    # -- what the model sees ------------------------------------------------------------------------
    @property
    def current_version(self) -> int | None:
        """The version in service (None before the first one)."""
        return self._serving_version

    def params(self) -> Any:
        """The parameters of the version in service, as a pytree shaped like ``specs``: global
        ``jax.Array`` for real shardings, else this rank's shard (a list if it holds several)."""
        with self._cond:
            if self._serving_slot is None:
                raise RuntimeError("no version is in service yet (wait for one first)")
            return self._slot_params(self._serving_slot)

    @contextlib.contextmanager
    def hold(self) -> Iterator[tuple[int, Any]]:
        """``with sub.hold() as (version, params):`` keeps that version's buffers from being
        rewritten until the block ends, even if :meth:`refresh` switches meanwhile."""
        with self._cond:
            if self._serving_slot is None:
                raise RuntimeError("no version is in service yet (wait for one first)")
            slot = self._serving_slot
            self._leases[slot] += 1
            v, p = self._serving_version, self._slot_params(slot)
        try:
            yield v, p
        finally:
            with self._cond:
                self._leases[slot] -= 1

    def _slot_params(self, slot: int) -> Any:
        cached = self._params_cache.get(slot)
        if cached is not None:
            return cached
        import jax

        def assemble(path: str, spec: Any) -> Any:
            di = self.plan.dst.index(path)
            t = self.plan.dst.tensors[di]
            mine = [(l, self.plan.buffer_id(self.rank, di, l)) for r, l, _ in t.shards if r == self.rank]
            arrays = [self._arrays[slot][b] for _, b in mine]
            sh = getattr(spec, "sharding", None)
            if sh is not None and not isinstance(sh, MeshSharding) and not _is_abstract(sh) and arrays:
                return jax.make_array_from_single_device_arrays(t.shape, sh, arrays)
            if not arrays:
                return None
            return arrays[0] if len(arrays) == 1 else arrays

        def build(kp: Any, leaf: Any) -> Any:
            path = jax.tree_util.keystr(kp)
            if isinstance(leaf, Fp8):
                return Fp8(assemble(path, leaf.weight), assemble(path + ".scale", leaf.scale), leaf.block)
            return assemble(path, leaf)

        out = jax.tree_util.tree_map_with_path(build, self._specs, is_leaf=lambda x: isinstance(x, (Fp8, TensorSpec)))
        self._params_cache[slot] = out
        return out

    # -- switching versions -------------------------------------------------------------------------
    def refresh(self, timeout: float = 30.0) -> int | None:
        """Take the newest version that landed on every subscriber rank into service; returns the
        version in service. With several subscriber ranks this is a collective call (every rank
        calls it; they exchange one status message each and take the same decision). A round that
        times out (``TimeoutError``) is finished by the next call."""
        self._raise_errors()
        if self.plan.num_dst_ranks <= 1:
            with self._cond:
                a = self._attempt
                if a is not None and a.get("complete_at") is not None:
                    self._switch(a)
                return self._serving_version
        if self._peers is None:
            raise RuntimeError("this subscriber has peers: call set_peers() or announce() first")
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._pending_round is None:
                self._round += 1
                k = self._pending_round = self._round
                a = self._attempt
                status = {"serving": self._serving_version,
                          "candidate": a["version"] if a is not None and a.get("complete_at") is not None else None,
                          "missing": self._missing_summary()}
                self._statuses.setdefault(k, {})[self.rank] = status
                send = True
            else:
                k, send = self._pending_round, False
        if send:
            payload = _msg("status", round=k, rank=self.rank, **self._statuses[k][self.rank])
            for r, a in enumerate(self._peers):
                if a is not None:
                    t = self.engine.send(a, payload)
                    with self._cond:
                        self._sends.append(t)
        with self._cond:
            while len(self._statuses.get(k, {})) < self.plan.num_dst_ranks:
                left = deadline - time.monotonic()
                if left <= 0:
                    have = sorted(self._statuses.get(k, {}))
                    raise TimeoutError(f"weights subscriber rank {self.rank}: refresh round {k}: no status from "
                                       f"ranks {sorted(set(range(self.plan.num_dst_ranks)) - set(have))} within "
                                       f"{timeout} s")
                self._cond.wait(min(left, 0.05))
            st = self._statuses.pop(k)
            self._last_statuses = st
            for old in [x for x in self._statuses if x < k]:
                del self._statuses[old]
            sets = [{s["serving"], s["candidate"]} - {None} for s in st.values()]
            common = set.intersection(*sets) if sets else set()
            target = max(common) if common else None
            a = self._attempt
            if target is not None and target != self._serving_version and a is not None \
                    and a["version"] == target and a.get("complete_at") is not None:
                self._switch(a)
            self._pending_round = None
            self._done_round = k
            self._cond.notify_all()
            return self._serving_version

    def _switch(self, a: dict) -> None:
        self._serving_slot, self._serving_version = a["slot"], a["version"]
        self._attempt = None
        self._cond.notify_all()

    def wait(self, version: int, timeout: float = 30.0) -> int:
        """Block until ``version`` (or a newer one) is in service; returns the version in service.
        Collective like :meth:`refresh`. ``TimeoutError`` names what is missing: the sources whose
        writes did not all arrive (with counts) and the tensors they carry."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"version must be an int, got {type(version).__name__}")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                v = self.refresh(max(left, 0.001))
            except TimeoutError as e:
                raise TimeoutError(self._missing_report(version, timeout, str(e))) from None
            if v is not None and v >= version:
                return v
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(self._missing_report(version, timeout))
            with self._cond:
                self._cond.wait(min(left, 0.02))

    def _missing_summary(self) -> str:
        a = self._attempt
        if a is None:
            return "no push in progress"
        parts = []
        for p in self._sources:
            st = a["sources"].get(p)
            if st is None:
                parts.append(f"source {p}: no request for version {a['version']}")
            elif st.get("complete_at") is None:
                got = self.engine.imm_counter(st["imm"]).total - st["base_total"]
                parts.append(f"source {p}: {got} of {st['expected']} writes")
        return f"version {a['version']}: " + ("; ".join(parts) if parts else "complete")

    def _missing_report(self, version: int, timeout: float, extra: str = "") -> str:
        now = time.monotonic()
        with self._cond:
            lines = [f"weights: version {version} not in service at subscriber rank {self.rank} after {timeout} s "
                     f"(serving {self._serving_version})"]
            a = self._attempt
            if a is None:
                lines.append(f"no push is in progress here (sources: {self._sources}; none asked for a version "
                             f"newer than {self._serving_version})")
            else:
                lines.append(f"collecting version {a['version']} into buffer {a['slot']}")
                for p in self._sources:
                    st = a["sources"].get(p)
                    tensors = self.plan.tensors_between(p, self.rank)
                    shown = "; ".join(tensors[:6]) + (f"; and {len(tensors) - 6} more" if len(tensors) > 6 else "")
                    if st is None:
                        lines.append(f"source {p} has not asked to push version {a['version']} (what it writes here: "
                                     f"{shown})")
                    elif st.get("complete_at") is None:
                        got = self.engine.imm_counter(st["imm"]).total - st["base_total"]
                        lines.append(f"source {p}: {got} of {st['expected']} writes arrived (epoch {st['epoch']}, "
                                     f"granted {now - st['granted_at']:.1f} s ago, last arrival "
                                     f"{now - st['last_progress']:.1f} s ago); what it writes here: {shown}")
            for r, s in sorted(self._last_statuses.items()):
                if r != self.rank:
                    lines.append(f"peer rank {r}: serving {s.get('serving')}, {s.get('missing')}")
            if extra:
                lines.append(extra)
        return "\n  ".join(lines)

    def status(self) -> dict:
        """Snapshot: version in service, the push being collected and each source's progress."""
        with self._cond:
            a = self._attempt
            out = {"rank": self.rank, "serving": self._serving_version, "leases": list(self._leases)}
            if a is not None:
                out["collecting"] = {"version": a["version"], "slot": a["slot"],
                                     "complete": a.get("complete_at") is not None,
                                     "sources": {p: {"epoch": st["epoch"], "expected": st["expected"],
                                                     "arrived": self.engine.imm_counter(st["imm"]).total - st["base_total"],
                                                     "complete": st.get("complete_at") is not None}
                                                 for p, st in a["sources"].items()}}
            return out

    def _raise_errors(self) -> None:
        with self._cond:
            if self._errors:
                e, self._errors = self._errors[0], self._errors[1:]
                raise ValueError(e)

    # -- the service thread -------------------------------------------------------------------------
    def _serve(self) -> None:
        idle_since = time.monotonic()
        while not self._stop:
            active = False
            while True:
                try:
                    addr, payload = self.engine.recv_message(timeout=0.0)
                except TimeoutError:
                    break
                except fabric.TransferError:
                    return  # engine closed
                active = True
                m = _parse(payload)
                if m is not None:
                    try:
                        self._on_message(addr, m)
                    except Exception as e:  # noqa: BLE001 - a bad message must not stop the service
                        with self._cond:
                            self._errors.append(f"weights subscriber rank {self.rank}: bad message {m.get('t')}: {e}")
            with self._cond:
                active |= self._poll_attempt()
                active |= self._serve_requests()
            with self._cond:
                self._sends = [t for t in self._sends if not _settled(t)]
            now = time.monotonic()
            if active:
                idle_since = now
            # Fast while things happen, slower when idle (every empty poll wakes the engine's worker).
            time.sleep(self._poll if now - idle_since < 0.2 else max(self._poll, 0.005))

    def _reply(self, addr: fabric.NetAddress, kind: str, **fields: Any) -> None:
        try:
            t = self.engine.send(addr, _msg(kind, dst=self.rank, **fields))
        except (fabric.TransferError, ValueError):
            return  # the publisher is gone; it will time out on its side
        with self._cond:
            self._sends.append(t)

    def _on_message(self, addr: fabric.NetAddress, m: dict) -> None:
        t = m["t"]
        if t == "hello":
            src = m.get("src")
            if m.get("fp") != self.plan.fingerprint:
                reason = (f"plan fingerprint mismatch: publisher rank {src} runs plan {m.get('fp')}, subscriber rank "
                          f"{self.rank} runs {self.plan.fingerprint}")
                with self._cond:
                    self._errors.append(reason)
                self._reply(addr, "refuse", fp=self.plan.fingerprint, reason=reason)
                return
            if not isinstance(src, int) or not 0 <= src < self.plan.num_src_ranks:
                self._reply(addr, "refuse", fp=self.plan.fingerprint, reason=f"bad source rank {src!r}")
                return
            domains = int(m.get("domains", 1))
            with self._cond:
                self._pubs[src] = {"addr": addr, "domains": domains}
            # Descriptors of every buffer this source writes here, both slots; in parts that fit the
            # engine's control-message size (a big model has thousands of buffers).
            ids = self.plan.buffer_ids_between(src, self.rank)
            entries = [(str(b), [base64.b64encode(bytes(self._regions[s][b].descriptor)).decode() for s in (0, 1)])
                       for b in ids]
            per = max(1, WELCOME_BYTES // max(1, max((len(e[1][0]) * 2 + 16 for e in entries), default=1)))
            parts = [entries[i:i + per] for i in range(0, len(entries), per)] or [[]]
            for i, part in enumerate(parts):
                self._reply(addr, "welcome", fp=self.plan.fingerprint, descs=dict(part), part=i, parts=len(parts))
        elif t == "req":
            with self._cond:
                self._requests.append((addr, m))
        elif t == "status":
            with self._cond:
                k, r = int(m["round"]), int(m["rank"])
                if k > self._done_round:  # older rounds were decided already
                    self._statuses.setdefault(k, {})[r] = {"serving": m.get("serving"),
                                                           "candidate": m.get("candidate"),
                                                           "missing": m.get("missing")}
                self._cond.notify_all()

    def _poll_attempt(self) -> bool:
        a = self._attempt
        if a is None or a.get("complete_at") is not None:
            return False
        now = time.monotonic()
        changed = False
        for p, st in a["sources"].items():
            if st.get("complete_at") is not None:
                continue
            c = st["counter"]
            total = c.total
            if total != st["last_total"]:
                st["last_total"], st["last_progress"] = total, now
                changed = True
            if c.credits >= st["expected"]:
                c.wait(st["expected"], 1.0)
                st["complete_at"] = now
                changed = True
        if all(p in a["sources"] and a["sources"][p].get("complete_at") is not None for p in self._sources):
            a["complete_at"] = now
            self._cond.notify_all()
        return changed

    def _serve_requests(self) -> bool:
        if not self._requests:
            return False
        keep, acted = [], False
        for addr, m in self._requests:
            try:
                kind, fields = self._decide(m)
            except Exception as e:  # noqa: BLE001
                kind, fields = "reject", {"reason": f"{type(e).__name__}: {e}"}
            if kind == "pending":
                if m.get("_told") != fields["reason"]:
                    m["_told"] = fields["reason"]
                    self._reply(addr, "pending", id=m.get("id"), **fields)
                keep.append((addr, m))
                continue
            acted = True
            self._reply(addr, kind, id=m.get("id"), **fields)
        self._requests = keep
        return acted

    def _decide(self, m: dict) -> tuple[str, dict]:
        """Answer one push request (under the lock): grant / done / reject / pending."""
        src, version = m.get("src"), m.get("version")
        if not isinstance(src, int) or src not in self._pubs:
            return "reject", {"reason": f"source rank {src!r} did not connect (hello) first"}
        if src not in self._sources:
            return "reject", {"reason": f"source rank {src} has nothing to write to subscriber rank {self.rank}"}
        if not isinstance(version, int) or version < 0:
            return "reject", {"reason": f"bad version {version!r}"}
        if self._serving_version is not None and version <= self._serving_version:
            return "reject", {"reason": f"version {version} is not newer than version {self._serving_version} in "
                                        f"service at subscriber rank {self.rank}"}
        now = time.monotonic()
        a = self._attempt
        if a is not None and version < a["version"]:
            return "reject", {"reason": f"subscriber rank {self.rank} is collecting the newer version {a['version']}"}
        if a is not None and version > a["version"]:
            if a.get("complete_at") is not None and self._pending_round is not None:
                return "pending", {"reason": f"version {a['version']} landed and a refresh round is deciding on it"}
            self._abandon(a, now)
            a = None
        if a is None:
            slot = 0 if self._serving_slot is None else 1 - self._serving_slot
            if self._leases[slot]:
                return "pending", {"reason": f"buffer {slot} (version before the one in service) is held by "
                                             f"{self._leases[slot]} reader(s) (Subscriber.hold)"}
            a = self._attempt = {"version": version, "slot": slot, "sources": {}, "started": now}
            self._params_cache.pop(slot, None)
        st = a["sources"].get(src)
        if st is not None and st.get("complete_at") is not None:
            return "done", {"version": version}
        if st is not None:  # a re-push of this version by this source: fence its earlier writes
            self._fence_until[src] = max(self._fence_until.get(src, 0.0), st["last_progress"] + self.fence_s)
        wait_s = self._fence_until.get(src, 0.0) - now
        if wait_s > 0:
            return "pending", {"reason": f"fencing source {src} for {wait_s:.1f} s more (its previous push "
                                         f"did not complete)"}
        epoch = self._next_epoch.get(src, 0)
        self._next_epoch[src] = epoch + 1
        imm = imm_value(self.imm_tag, epoch, src)
        c = self.engine.imm_counter(imm)
        stale = c.credits
        if stale > 0:  # arrivals from 4096 epochs ago: never count them
            c.wait(stale, 1.0)
        total = c.total
        a["sources"][src] = {"epoch": epoch % EPOCH_MOD, "imm": imm, "counter": c, "granted_at": now, "base_total": total,
                             "last_total": total, "last_progress": now,
                             "expected": self.plan.expected_imms(src, self.rank, self._pubs[src]["domains"])}
        return "grant", {"version": version, "slot": a["slot"], "epoch": epoch % EPOCH_MOD}

    def _abandon(self, a: dict, now: float) -> None:
        for p, st in a["sources"].items():
            if st.get("complete_at") is None:
                self._fence_until[p] = max(self._fence_until.get(p, 0.0), st["last_progress"] + self.fence_s)
        if self._attempt is a:
            self._attempt = None

    def close(self) -> None:
        """Stop the service thread and (if it made it) close the engine. Buffers are released."""
        if self._stop:
            return
        self._stop = True
        _lifetime.closed(self)
        self._thread.join(5.0)
        if self._own_engine:
            self.engine.close()
        self._regions = [[], []]
        self._params_cache.clear()

    def __enter__(self) -> "Subscriber":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _settled(t: Any) -> bool:
    try:
        return bool(t.done)
    except AttributeError:
        return False
