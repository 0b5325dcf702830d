"""Planning: which engine writes move one layer's K (or V) of a request, given both shardings."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jax_garden import fabric
from jax_garden._validate import check_int, check_int_array
from jax_garden.kv.layout import KVLayout


@dataclasses.dataclass(frozen=True)
class PlannedWrite:
    """One engine op of the per-layer plan (the same plan serves K and V of every layer).

    ``op == "write"``: ``nbytes`` from ``src_offset`` of source shard ``src_shard`` to ``dst_offset``
    of destination shard ``dst_shard`` (a run of adjacent pages, coalesced).
    ``op == "paged"``: block ``i`` moves ``nbytes`` from ``src_offset + src_index[i]*src_stride`` to
    ``dst_offset + dst_index[i]*dst_stride`` (one imm per block)."""

    op: str
    src_shard: int
    dst_shard: int
    nbytes: int
    src_offset: int = 0
    dst_offset: int = 0
    src_stride: int = 0
    dst_stride: int = 0
    src_index: np.ndarray | None = None
    dst_index: np.ndarray | None = None

    @property
    def blocks(self) -> int:
        return 1 if self.op == "write" else int(self.src_index.size)

    @property
    def bytes_moved(self) -> int:
        return self.nbytes * self.blocks


def _geometry(layout: KVLayout, shards: int) -> tuple[int, int, int]:
    """(block_bytes, head_bytes, blocks_per_page) of one shard: a block is the contiguous unit that
    holds every head of the shard (HND: a page; NHD: one token row of a page)."""
    heads = layout.kv_heads // shards
    if layout.page_layout == "HND":
        head_bytes = layout.page_tokens * layout.head_dim * layout.itemsize
        return heads * head_bytes, head_bytes, 1
    head_bytes = layout.head_dim * layout.itemsize
    return heads * head_bytes, head_bytes, layout.page_tokens


def _blocks(pages: np.ndarray, per_page: int) -> np.ndarray:
    pages = pages.astype(np.int64)
    if per_page == 1:
        return pages
    return (pages[:, None] * per_page + np.arange(per_page, dtype=np.int64)[None, :]).ravel()


def plan_writes(layout: KVLayout, src_shards: int, dst_shards: int, src_pages: Any, dst_pages: Any) -> list[PlannedWrite]:
    """Writes that copy pages ``src_pages[i]`` of a source cache sharded over ``src_shards`` equal
    head slices into pages ``dst_pages[i]`` of a destination cache sharded over ``dst_shards``.

    For each pair of shards whose head slices overlap: when the overlap is a whole block on both
    sides, runs of blocks adjacent on both sides become single ``write`` ops (coalesced) and
    lone blocks one ``paged`` op; otherwise one strided ``paged`` op per pair moves the head slice of
    every block. Pure and deterministic: both sides compute it, and :func:`plan_imm_writes` on it.
    """
    if not isinstance(layout, KVLayout):
        raise TypeError(f"plan_writes: layout must be a kv.KVLayout, got {type(layout).__name__}")
    src_shards = check_int("plan_writes: src_shards", src_shards, minimum=1)
    dst_shards = check_int("plan_writes: dst_shards", dst_shards, minimum=1)
    src_pages = check_int_array("plan_writes: src_pages", src_pages, minimum=0)
    dst_pages = check_int_array("plan_writes: dst_pages", dst_pages, minimum=0)
    if src_pages.size != dst_pages.size:
        raise ValueError(f"plan_writes: {src_pages.size} source pages but {dst_pages.size} destination pages")
    for n, name in ((src_shards, "src_shards"), (dst_shards, "dst_shards")):
        if not 0 < n <= layout.kv_heads or layout.kv_heads % n:
            raise ValueError(f"plan_writes: {name}={n} must divide kv_heads={layout.kv_heads}")
    s_block, s_head, per_page = _geometry(layout, src_shards)
    d_block, d_head, _ = _geometry(layout, dst_shards)
    assert s_head == d_head
    src_blocks, dst_blocks = _blocks(src_pages, per_page), _blocks(dst_pages, per_page)
    hs, hd = layout.kv_heads // src_shards, layout.kv_heads // dst_shards
    out: list[PlannedWrite] = []
    if src_blocks.size == 0:
        return out
    for d in range(dst_shards):
        d0, d1 = d * hd, (d + 1) * hd
        for s in range(src_shards):
            s0, s1 = s * hs, (s + 1) * hs
            h0, h1 = max(d0, s0), min(d1, s1)
            if h0 >= h1:
                continue
            nbytes = (h1 - h0) * s_head
            src_off, dst_off = (h0 - s0) * s_head, (h0 - d0) * d_head
            if nbytes == s_block == d_block:
                # Whole blocks on both sides: coalesce runs adjacent in both caches.
                breaks = np.flatnonzero((np.diff(src_blocks) != 1) | (np.diff(dst_blocks) != 1)) + 1
                starts = np.concatenate(([0], breaks))
                lengths = np.diff(np.concatenate((starts, [src_blocks.size])))
                singles = starts[lengths == 1]
                for st, ln in zip(starts[lengths > 1], lengths[lengths > 1]):
                    out.append(PlannedWrite("write", s, d, int(ln) * s_block, int(src_blocks[st]) * s_block,
                                            int(dst_blocks[st]) * d_block))
                if singles.size:
                    out.append(PlannedWrite("paged", s, d, s_block, 0, 0, s_block, d_block,
                                            src_blocks[singles].astype(np.uint32), dst_blocks[singles].astype(np.uint32)))
            else:
                out.append(PlannedWrite("paged", s, d, nbytes, src_off, dst_off, s_block, d_block,
                                        src_blocks.astype(np.uint32), dst_blocks.astype(np.uint32)))
    return out


def plan_imm_writes(plan: Sequence[PlannedWrite], *, domains: int, split_threshold: int) -> int:
    """Imm-carrying writes the decode side receives for one layer's K (or V) under ``plan``, from a
    sender with ``domains`` domains: the sum of :func:`fabric.imm_writes` over its ops."""
    n = 0
    for w in plan:
        if w.op == "write":
            n += fabric.imm_writes("write", domains=domains, length=w.nbytes, split_threshold=split_threshold)
        else:
            n += fabric.imm_writes("paged", domains=domains, pages=w.blocks)
    return n
