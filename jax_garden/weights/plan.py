"""The plan of a weight push: who sends which box of which tensor to whom, packed into chunks, with
the imm counts between every pair of ranks. Built once, deterministic, serialisable."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from jax_garden import fabric
from jax_garden._validate import check_int
from jax_garden.weights.layout import PLAN_FORMAT, Box, Layout, prod

DEFAULT_CHUNK_BYTES = 64 << 20
DEFAULT_DIRECT_MIN_BYTES = 4 << 20
STAGE_ALIGN = 256  # staging offsets (GPU copy engines and vector loads like aligned starts)
BYTES_MODE_MIN = 1 << 20  # scatter runs at least this long are posted cut over all sender domains

KIND_COPY, KIND_FP8, KIND_SCALE = 0, 1, 2
_KIND_NAMES = {KIND_COPY: "copy", KIND_FP8: "fp8", KIND_SCALE: "scale"}


@dataclasses.dataclass
class PieceGeometry:
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


class Piece:
    """A piece of one tensor: its geometry plus the tensors and the holder it is for."""

    __slots__ = ("g", "dst_tensor", "src_tensor", "src_rank", "src_local")

    def __init__(self, g: PieceGeometry, dst_tensor: int, src_tensor: int, src_rank: int, src_local: int):
        self.g, self.dst_tensor, self.src_tensor, self.src_rank, self.src_local = g, dst_tensor, src_tensor, src_rank, src_local

    def __getattr__(self, name: str) -> Any:
        return getattr(self.g, name)

    def __repr__(self) -> str:
        return (f"Piece(tensor {self.dst_tensor} from {self.src_tensor}, holder ({self.src_rank}, {self.src_local}), "
                f"{_KIND_NAMES[self.g.kind]} ext {self.g.ext} -> {len(self.g.receivers)} receivers)")


class Chunk:
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
    return k, prod(ext[:k])


def _split_box(ext: tuple, itemsize: int, limit: int) -> list[tuple[tuple, tuple]]:
    """Cut a box (in row-major order) into sub-boxes of at most ``limit`` bytes:
    [(offset, sub extent)]."""
    nd = len(ext)
    if prod(ext) * itemsize <= limit or nd == 0:
        return [((0,) * nd, tuple(ext))]
    k = 0
    while prod(ext[k + 1:]) * itemsize > limit:
        k += 1
        if k == nd - 1 and itemsize > limit:
            raise ValueError(f"one element ({itemsize} bytes) exceeds chunk_bytes={limit}")
    slab = prod(ext[k + 1:]) * itemsize
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
        chunk_bytes = check_int("chunk_bytes", chunk_bytes, minimum=4096, maximum=1 << 30)
        direct_min_bytes = check_int("direct_min_bytes", direct_min_bytes)
        self.src, self.dst = src, dst
        self.chunk_bytes, self.direct_min_bytes = chunk_bytes, direct_min_bytes
        t0 = time.perf_counter()
        self._pairs = self._match()
        self.fingerprint = self._fingerprint()
        self._build()
        self.build_seconds = time.perf_counter() - t0
        self._chunks: dict[int, list[Chunk]] = {}
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
        self._items: dict[tuple[int, int], list[Piece]] = {}  # (holder rank, local) -> pieces
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
                lst.append(Piece(g, di, si, r, l))
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

    def _geometry_tables(self, geoms: list[PieceGeometry]) -> tuple:
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

    def _tensor_geometry(self, di: int, si: int, kind: int) -> list[PieceGeometry]:
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
        out: list[PieceGeometry] = []
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
                if prod(pext) == 0:
                    continue
                sl = tuple(a - b for a, b in zip(plo, (x for x, _ in sbox)))
                dl = tuple(a - b for a, b in zip(plo, (x for x, _ in dbox)))
                for g in self._make_geoms(kind, di, si, sshape, sl, pext, dl, dshape, tuple(recv), out_itemsize, block):
                    g.holders, g.h = hold, h
                    out.append(g)
        return out

    def _make_geoms(self, kind: int, di: int, si: int, sshape: tuple, sl: tuple, pext: tuple, dl: tuple,
                    dshape: tuple, recv: tuple, out_itemsize: int, block: tuple | None) -> list[PieceGeometry]:
        s = self.src.tensors[si]
        nbytes = prod(pext) * out_itemsize
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

    def _geom(self, kind, di, slo, ext, dlo, dshape, recv, out_itemsize, sshape, s, block) -> PieceGeometry:
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
        return PieceGeometry(kind, tuple(slo), tuple(ext), tuple(dlo), recv, prod(ext) * out_itemsize, run_bytes, n_runs,
                     tuple(ext[:k]), tuple(strides[:k]), base, key=key, region_lo=tuple(region_lo), kid=kid,
                     big=run_bytes >= BYTES_MODE_MIN)

    # -- chunks ---------------------------------------------------------------------------------
    def chunks_of(self, src_rank: int) -> list[Chunk]:
        """The chunks ``src_rank`` posts, in order (packed on first use, then kept)."""
        src_rank = check_int("src_rank", src_rank, maximum=max(0, self.num_src_ranks - 1))
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
    def chunks(self) -> dict[int, list[Chunk]]:
        """Every source rank's chunks (packs all of them)."""
        return {r: self.chunks_of(r) for r in range(self.num_src_ranks)}

    def _pack(self, rank: int, local: int, items: list[Piece]) -> list[Chunk]:
        chunks = [Chunk(rank, local, False, [it], [it.g.src_byte_off], 0) for it in items if it.g.direct]
        # Same geometry next to each other: one batched stage call covers a run of them.
        staged = sorted((it for it in items if not it.g.direct), key=lambda it: (it.g.kid, it.dst_tensor, it.g.dst_lo))
        cur: Chunk | None = None
        limit, align = self.chunk_bytes, STAGE_ALIGN
        for it in staged:
            need = -(-it.g.nbytes // align) * align
            if cur is None or cur.nbytes + need > limit:
                cur = Chunk(rank, local, True, [], [], 0)
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

    def _items_between(self, src_rank: int, dst_rank: int) -> Iterator[Piece]:
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
                        stage_calls[r] += len(stage_groups(c))
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
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise TypeError(f"Plan.from_bytes takes bytes, got {type(b).__name__}")
        if bytes(b[:4]) != b"JGWP":
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


MAX_STAGE_BATCH = 32


def stage_groups(chunk: Chunk) -> list[tuple[tuple, list[int]]]:
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


def _row_major_offset(idx: Sequence[int], shape: Sequence[int]) -> int:
    off = 0
    for i, n in zip(idx, shape):
        off = off * n + i
    return off
