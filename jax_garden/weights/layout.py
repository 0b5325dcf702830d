"""Both sides' parameters as layouts: shapes, dtypes and the index box of every shard, from jax
shardings or from mesh descriptions without devices (:class:`MeshSharding`)."""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from jax_garden._validate import check_instance, check_int

PLAN_FORMAT = 1
MAX_RANKS = 1 << 16  # a rank is 16 bits of the imm

Box = tuple  # ((start, stop), ...) per dimension, in elements


# Shardings and layouts


def prod(xs: Iterable[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def dtype_name(dtype: Any) -> str:
    import jax.numpy as jnp

    return jnp.dtype(dtype).name


def np_dtype(name: str) -> np.dtype:
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
        if isinstance(axes, dict):
            items = list(axes.items())
        elif isinstance(axes, (list, tuple)) and all(isinstance(a, (list, tuple)) and len(a) == 2 for a in axes):
            items = [tuple(a) for a in axes]
        else:
            raise TypeError(f"MeshSharding axes must be a dict {{name: size}} or a sequence of (name, size), got "
                            f"{type(axes).__name__} {axes!r}")
        if not items:
            raise ValueError("MeshSharding needs at least one mesh axis")
        for n, size in items:
            check_instance("MeshSharding axis name", n, str)
            check_int(f"MeshSharding axis {n!r} size", size, minimum=1)
        self.axis_names = tuple(n for n, _ in items)
        self.axis_sizes = tuple(int(s) for _, s in items)
        if len(set(self.axis_names)) != len(self.axis_names):
            raise ValueError(f"mesh axis names repeat: {self.axis_names}")
        if spec is not None and (isinstance(spec, (str, bytes)) or not hasattr(spec, "__iter__")):
            raise TypeError(f"MeshSharding spec must be a PartitionSpec or a tuple of its entries, got "
                            f"{type(spec).__name__} {spec!r}")
        self.spec = tuple(spec) if spec is not None else ()
        for e in self.spec:
            names = () if e is None else (e,) if isinstance(e, str) else e
            if not isinstance(names, (tuple, list)) or not all(isinstance(x, str) for x in names):
                raise TypeError(f"MeshSharding spec entries must be None, an axis name or a tuple of names, got {e!r}")
        devices_per_rank = check_int("devices_per_rank", devices_per_rank, minimum=1)
        if self.num_devices % devices_per_rank:
            raise ValueError(f"devices_per_rank={devices_per_rank} must divide the {self.num_devices} mesh devices")
        self.devices_per_rank = devices_per_rank

    @classmethod
    def from_named(cls, sharding: Any, *, devices_per_rank: int = 1) -> "MeshSharding":
        """From a ``NamedSharding`` (over a real or an ``AbstractMesh``)."""
        mesh = sharding.mesh
        return cls(list(zip(mesh.axis_names, mesh.axis_sizes)), tuple(sharding.spec),
                   devices_per_rank=devices_per_rank)

    @property
    def num_devices(self) -> int:
        return prod(self.axis_sizes)

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
            n = prod(size[a] for a in axes)
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", check_shape("TensorSpec.shape", self.shape))
        try:
            dtype_name(self.dtype)
        except TypeError:
            raise TypeError(f"TensorSpec.dtype: {self.dtype!r} is not an array dtype") from None


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
        self.weight, self.scale, self.block = weight, scale, check_block(block)

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

    shape = check_shape("fp8_spec: shape", shape)
    block = check_block(block)
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
        return np_dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.itemsize


def box_of_index(index: tuple, shape: tuple) -> Box:
    out = []
    for d, n in enumerate(shape):
        s = index[d] if d < len(index) else slice(None)
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {index} is not supported")
        out.append((start, stop))
    return tuple(out)


def check_shape(name: str, shape: Any) -> tuple:
    """A shape: a sequence of ints >= 0 (TypeError / ValueError)."""
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints, got {type(shape).__name__} {shape!r}")
    return tuple(check_int(f"{name} entry", d) for d in shape)


def check_block(block: Any) -> tuple:
    """An fp8 block: one int >= 1 per dimension (1: no blocking on that dimension)."""
    if isinstance(block, (str, bytes)) or not hasattr(block, "__iter__"):
        raise TypeError(f"fp8 block must be a sequence of ints, got {type(block).__name__} {block!r}")
    block = tuple(block)
    for b in block:
        check_int(f"fp8 block entry (block {block})", b, minimum=None)
    if any(b <= 0 for b in block):
        raise ValueError(f"fp8 block {block}: every entry must be >= 1 (1 = no blocking on that dimension)")
    return tuple(int(b) for b in block)


def _leaf_info(leaf: Any, path: str) -> tuple[tuple, str, Any]:
    if isinstance(leaf, (TensorSpec,)) or (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        shape = tuple(int(s) for s in leaf.shape)
        try:
            dtype = dtype_name(leaf.dtype)
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
        if rank_of is not None and not callable(rank_of):
            raise TypeError(f"rank_of must be callable(device) -> rank, got {type(rank_of).__name__}")
        devices_per_rank = check_int("devices_per_rank", devices_per_rank, minimum=1)
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
            if sh is not None and not isinstance(sh, MeshSharding) and not is_abstract(sh):
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
            elif isinstance(sh, MeshSharding) or is_abstract(sh):
                ms = sh if isinstance(sh, MeshSharding) else MeshSharding.from_named(sh, devices_per_rank=devices_per_rank)
                try:
                    shards = tuple(ms.shard_boxes(shape))
                except ValueError as e:
                    raise ValueError(f"{path}: {e}") from None
            else:
                items = sorted(m.items(), key=lambda kv: kv[0].id)
                shards = tuple((*rank_of_dev[d.id], box_of_index(idx, shape)) for d, idx in items)
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
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise TypeError(f"Layout.from_bytes takes bytes, got {type(b).__name__}")
        if bytes(b[:4]) != b"JGWL":
            raise ValueError("not the bytes of a weights.Layout (bad magic)")
        try:
            return cls.from_json(json.loads(zlib.decompress(bytes(b[4:]))))
        except (zlib.error, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"garbled weights.Layout bytes: {e}") from None

    def same_placement(self, other: "Layout") -> bool:
        return self.to_json(with_devices=False) == other.to_json(with_devices=False)

    def __repr__(self) -> str:
        return f"Layout({len(self.tensors)} tensors, {self.num_ranks} ranks)"


def is_abstract(sharding: Any) -> bool:
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
            if not (nd and prod(t.shape) == 0):
                raise ValueError(f"{t.path}: shard box {box} does not fit shape {t.shape}")
    # Distinct boxes must tile the array (a jax sharding is a grid of equal blocks plus replicas).
    uniq = {box for _, _, box in t.shards}
    if sum(prod(b - a for a, b in box) for box in uniq) != prod(t.shape):
        raise ValueError(f"{t.path}: the shard boxes do not tile shape {t.shape} exactly once")


def slices(lo: Sequence[int], ext: Sequence[int]) -> tuple:
    return tuple(slice(a, a + e) for a, e in zip(lo, ext))
