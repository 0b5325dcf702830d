"""KV-cache streaming for disaggregated prefill/decode, on the TransferEngine.

A decode process owns a paged KV cache (per layer K and V ``jax.Array``s at stable, registered
addresses), reserves pages for a request and hands a small **ticket** to a prefill process. The
prefill's jitted program marks each finished layer (:func:`mark_layer`, a ``fabric.signal`` into a
watcher slot, ordered after that layer's KV write); a host service posts that layer's paged writes as
soon as the mark lands, and ``finish(payload)`` sends a small per-request payload last. The decode
side learns completion only by counting imms. Design and protocol: ``docs/kv.md``.

Decode side::

    cache = kv.PagedKVCache(eng, kv.KVLayout(num_layers=32, num_pages=4096, page_tokens=16,
                                             kv_heads=8, head_dim=128), devices=jax.devices()[:2])
    dec = kv.DecodeSide(cache)
    req = dec.reserve(num_tokens=len(prompt))        # pages + ticket (bytes)
    dec.send_ticket(prefill_contact, req, extra=prompt_bytes)   # or hand req.ticket over any channel
    req.wait(timeout=30)                              # READY / FAILED / CANCELLED (TimeoutError if PENDING)
    first_token = req.payload                         # bytes sent by the prefill's finish()
    k, v = step(cache.k, cache.v, ...)                # jitted, donate_argnums for the cache
    cache.commit(k, v)                                # refuses loudly if XLA moved a buffer
    req.release()                                     # pages back to the allocator when the sequence ends

Prefill side::

    src = kv.PagedKVCache(eng, layout)               # same layout, any page count / head sharding
    pf = kv.PrefillSide(src)
    ticket, prompt, _ = pf.recv_ticket(timeout=30)
    stream = pf.open_stream(ticket, src.allocator.alloc(n_pages))   # ValueError on a bad ticket
    # inside the jitted prefill, after writing layer l's K/V into the source pages:
    #     k_l, v_l = kv.mark_layer(pf.marks, l, token, k_l, v_l)   # token = jnp.uint32(stream.token)
    k, v = prefill(src.k, src.v, ..., jnp.uint32(stream.token)); src.commit(k, v)
    stream.finish(payload)                            # posts what is left, then the payload
    stream.wait(timeout=30)                           # every write completed at the sender

States (decode): ``PENDING`` -> ``READY`` | ``FAILED(reason)`` | ``CANCELLED``. Every wait has a
timeout; a dead peer turns into ``FAILED`` (decode) or a failed stream (prefill) within the timeouts.
"""

from __future__ import annotations

import dataclasses
import enum
import heapq
import itertools
import logging
import os
import queue
import struct
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from jax_garden import _lifetime, fabric

__all__ = [
    "KVLayout", "PagedKVCache", "PageAllocator", "OutOfPages", "BufferMovedError", "State", "Request",
    "DecodeSide", "PrefillSide", "Stream", "StreamError", "LayerMarks", "mark_layer", "Ticket", "Contact",
    "PlannedWrite", "plan_writes", "plan_imm_writes", "kv_imm", "unpack_imm", "IMM_DOORBELL", "IMM_PING",
]

log = logging.getLogger("jax_garden.kv")

# ------------------------------------------------------------------------------------------------
# Imm layout (32 bits; EFA and verbs carry 4 bytes)
#
#   31..28  0xB           tag: jax_garden.kv traffic (other users of the engine keep clear of 0xB.......)
#   27..24  cache tag     index of the DecodeSide on its engine, 0..14 (15: control imms below)
#   23..12  slot          request slot of that cache, 0..4094 (4095 reserved)
#   11..4   generation    low 8 bits of the slot's 32-bit generation
#    3..0   kind          0 = KV data write, 1 = payload write (2..15 reserved)
#
# The full generation travels in tickets and control messages; the imm carries its low bits so that
# arrivals of two uses of a slot go to different counters. Safety does not rest on those 8 bits: a
# slot (and its pages) is reused only once every write posted under the previous generation has been
# counted (READY, or a cancel/abort whose posted count was drained), or after a quarantine when that
# proof is impossible (a dead peer). Counters are keyed by imm and never deleted by the engine, so
# the 8 bits also bound how many exist: 2 kinds x slots in use x 256.

IMM_TAG = 0xB
MAX_SLOTS = 4095
MAX_CACHE_TAGS = 15
KIND_DATA = 0
KIND_PAYLOAD = 1
IMM_DOORBELL = 0xBFFFFFFF  # "a kv control message is on its way" (one per message)
IMM_PING = 0xBFFFFFFE      # liveness probe; nobody counts it, a failed one means the peer is gone


def kv_imm(cache_tag: int, slot: int, generation: int, kind: int) -> int:
    """The 32-bit imm of one (cache, slot, generation, kind); see the layout above."""
    if not 0 <= cache_tag < MAX_CACHE_TAGS:
        raise ValueError(f"cache tag must be in 0..{MAX_CACHE_TAGS - 1}, got {cache_tag}")
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot must be in 0..{MAX_SLOTS - 1}, got {slot}")
    if kind not in (KIND_DATA, KIND_PAYLOAD):
        raise ValueError(f"kind must be {KIND_DATA} (data) or {KIND_PAYLOAD} (payload), got {kind}")
    return (IMM_TAG << 28) | (cache_tag << 24) | (slot << 12) | ((generation & 0xFF) << 4) | kind


def unpack_imm(imm: int) -> tuple[int, int, int, int]:
    """``(cache_tag, slot, generation_low8, kind)`` of a kv imm (ValueError for other imms)."""
    if imm >> 28 != IMM_TAG or imm in (IMM_DOORBELL, IMM_PING) or not 0 <= imm <= 0xFFFFFFFF:
        raise ValueError(f"imm 0x{imm:08x} is not a kv data/payload imm")
    return (imm >> 24) & 0xF, (imm >> 12) & 0xFFF, (imm >> 4) & 0xFF, imm & 0xF


# ------------------------------------------------------------------------------------------------
# Errors and states


class OutOfPages(RuntimeError):
    """The allocator (or the request slots) cannot satisfy a reservation right now."""


class BufferMovedError(RuntimeError):
    """XLA placed a cache array somewhere else than its registered buffer (or the cache's arrays
    were donated and never committed): remote writes would land outside the cache."""


class StreamError(RuntimeError):
    """A prefill stream failed or was cancelled (the message says which and why)."""


class State(enum.Enum):
    PENDING = "PENDING"
    READY = "READY"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# ------------------------------------------------------------------------------------------------
# Layout


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

    @property
    def np_dtype(self) -> np.dtype:
        import jax.numpy as jnp

        return np.dtype(jnp.dtype(self.dtype))

    @property
    def head_axis(self) -> int:
        return 1 if self.page_layout == "HND" else 2

    @property
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


# ------------------------------------------------------------------------------------------------
# Wire helpers (tickets, contacts and control messages share them)


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> "_Writer":
        self.parts.append(struct.pack("<B", v))
        return self

    def u16(self, v: int) -> "_Writer":
        self.parts.append(struct.pack("<H", v))
        return self

    def u32(self, v: int) -> "_Writer":
        self.parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> "_Writer":
        self.parts.append(struct.pack("<Q", v))
        return self

    def blob(self, b: bytes) -> "_Writer":
        self.parts.append(struct.pack("<I", len(b)))
        self.parts.append(bytes(b))
        return self

    def text(self, s: str) -> "_Writer":
        return self.blob(s.encode())

    def u32s(self, a: np.ndarray) -> "_Writer":
        a = np.ascontiguousarray(a, dtype="<u4")
        self.parts.append(struct.pack("<I", a.size))
        self.parts.append(a.tobytes())
        return self

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = memoryview(data), 0, what

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.what}: truncated ({len(self.data)} bytes; needs {self.pos + n} at field ending "
                             f"at byte {self.pos + n})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self._take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self._take(8))[0]

    def blob(self) -> bytes:
        return bytes(self._take(self.u32()))

    def text(self) -> str:
        b = self.blob()
        try:
            return b.decode()
        except UnicodeDecodeError:
            raise ValueError(f"{self.what}: a text field is not UTF-8: {b[:32]!r}") from None

    def u32s(self) -> np.ndarray:
        n = self.u32()
        return np.frombuffer(self._take(4 * n), dtype="<u4").astype(np.uint32)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def _seal(magic: bytes, body: bytes) -> bytes:
    data = magic + body
    return data + struct.pack("<I", zlib.crc32(data))


def _unseal(data: Any, magic: bytes, what: str) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(magic) + 4:
        raise ValueError(f"{what}: truncated ({len(data)} bytes)")
    if data[:len(magic)] != magic:
        raise ValueError(f"{what}: wrong magic {data[:len(magic)]!r} (expected {magic!r}): not a {what}")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise ValueError(f"{what}: checksum mismatch ({len(data)} bytes): garbled or truncated")
    return data[len(magic):-4]


# ------------------------------------------------------------------------------------------------
# Contacts: how a kv side is reached (engine address + the descriptor its doorbell imms go to)


_CONTACT_MAGIC = b"JGKC"
_CONTACT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Contact:
    """Where a DecodeSide/PrefillSide listens: its engine address and the descriptor of its control
    region (doorbell imms announce each control message). Share ``bytes(side.contact)``."""

    address: fabric.NetAddress
    descriptor: fabric.MemoryDescriptor

    def __bytes__(self) -> bytes:
        body = _Writer().u16(_CONTACT_VERSION).blob(bytes(self.address)).blob(bytes(self.descriptor)).bytes()
        return _seal(_CONTACT_MAGIC, body)

    @property
    def key(self) -> bytes:
        return bytes(self.address)

    @staticmethod
    def from_bytes(data: Any) -> "Contact":
        r = _Reader(_unseal(data, _CONTACT_MAGIC, "kv contact"), "kv contact")
        version = r.u16()
        if version != _CONTACT_VERSION:
            raise ValueError(f"kv contact: version {version}, this build reads {_CONTACT_VERSION}")
        address = fabric.NetAddress.from_bytes(r.blob())
        descriptor = fabric.MemoryDescriptor.from_bytes(r.blob())
        r.end()
        return Contact(address, descriptor)


def _contact(c: Any) -> Contact:
    if isinstance(c, Contact):
        return c
    if isinstance(c, (bytes, bytearray, memoryview)):
        return Contact.from_bytes(c)
    raise TypeError(f"contact must be a kv.Contact or its bytes, got {type(c).__name__}")


# ------------------------------------------------------------------------------------------------
# Tickets


_TICKET_MAGIC = b"JGKT"
TICKET_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Ticket:
    """What the prefill side needs to stream one request into a decode cache (parsed and checked).

    Bytes: magic ``JGKT``, u16 version, u64 cache id, u32 slot, u32 generation, u32 tokens, u32
    payload capacity, the layout (layers, pages, tokens/page, heads, head dim, dtype, page layout),
    u32 decode shards, u8 cache tag, the decode side's contact, the page list (u32 each), then a
    CRC-32 of everything before. Parsing checks all of it (ValueError)."""

    cache_id: int
    cache_tag: int
    slot: int
    generation: int
    num_tokens: int
    payload_capacity: int
    layout: KVLayout
    shards: int
    contact: Contact
    pages: np.ndarray

    def __bytes__(self) -> bytes:
        lay = self.layout
        w = (_Writer().u16(TICKET_VERSION).u64(self.cache_id).u32(self.slot).u32(self.generation)
             .u32(self.num_tokens).u32(self.payload_capacity).u32(lay.num_layers).u32(lay.num_pages)
             .u32(lay.page_tokens).u32(lay.kv_heads).u32(lay.head_dim).text(lay.dtype).text(lay.page_layout)
             .u32(self.shards).u8(self.cache_tag).blob(bytes(self.contact)).u32s(self.pages))
        return _seal(_TICKET_MAGIC, w.bytes())

    @staticmethod
    def from_bytes(data: Any) -> "Ticket":
        r = _Reader(_unseal(data, _TICKET_MAGIC, "kv ticket"), "kv ticket")
        version = r.u16()
        if version != TICKET_VERSION:
            raise ValueError(f"kv ticket: version {version}, this build reads version {TICKET_VERSION}")
        cache_id, slot, generation, num_tokens, capacity = r.u64(), r.u32(), r.u32(), r.u32(), r.u32()
        dims = [r.u32() for _ in range(5)]
        dtype, page_layout = r.text(), r.text()
        shards, cache_tag = r.u32(), r.u8()
        contact_bytes = r.blob()
        pages = r.u32s()
        r.end()
        try:
            layout = KVLayout(*dims, dtype=dtype, page_layout=page_layout)
        except (TypeError, ValueError) as e:
            raise ValueError(f"kv ticket: bad layout: {e}") from None
        if not 0 < shards <= layout.kv_heads or layout.kv_heads % shards:
            raise ValueError(f"kv ticket: {shards} decode shards do not divide {layout.kv_heads} KV heads")
        if slot >= MAX_SLOTS or cache_tag >= MAX_CACHE_TAGS:
            raise ValueError(f"kv ticket: slot {slot} / cache tag {cache_tag} out of range")
        if num_tokens <= 0:
            raise ValueError(f"kv ticket: {num_tokens} tokens")
        if pages.size != layout.pages_for(num_tokens):
            raise ValueError(f"kv ticket: {pages.size} pages for {num_tokens} tokens of {layout.page_tokens} "
                             f"per page (expected {layout.pages_for(num_tokens)})")
        if pages.size and int(pages.max()) >= layout.num_pages:
            raise ValueError(f"kv ticket: page {int(pages.max())} out of range (the decode cache has "
                             f"{layout.num_pages} pages)")
        if np.unique(pages).size != pages.size:
            raise ValueError("kv ticket: a page appears twice in the page list")
        try:
            contact = Contact.from_bytes(contact_bytes)
        except ValueError as e:
            raise ValueError(f"kv ticket: bad decode contact: {e}") from None
        return Ticket(cache_id, cache_tag, slot, generation, num_tokens, capacity, layout, shards, contact, pages)


def _ticket(t: Any) -> Ticket:
    if isinstance(t, Ticket):
        return t
    if isinstance(t, Request):
        return Ticket.from_bytes(t.ticket)
    return Ticket.from_bytes(t)


# ------------------------------------------------------------------------------------------------
# Planning: which engine writes move one layer's K (or V) of a request, given both shardings


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
    src_pages = np.asarray(src_pages, dtype=np.int64).ravel()
    dst_pages = np.asarray(dst_pages, dtype=np.int64).ravel()
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


# ------------------------------------------------------------------------------------------------
# Page allocator


class PageAllocator:
    """Pages of one cache: ``alloc(n)`` returns the first run of ``n`` adjacent free pages when there
    is one (adjacent pages coalesce into single writes), else the lowest free pages. Thread-safe."""

    def __init__(self, num_pages: int):
        if isinstance(num_pages, bool) or not isinstance(num_pages, (int, np.integer)) or num_pages <= 0:
            raise ValueError(f"num_pages must be a positive int, got {num_pages!r}")
        self.num_pages = int(num_pages)
        self._free = np.ones(self.num_pages, dtype=bool)
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return int(self._free.sum())

    def is_free(self, pages: Any) -> np.ndarray:
        with self._lock:
            return self._free[np.asarray(pages, dtype=np.int64)].copy()

    def alloc(self, n: int) -> np.ndarray:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"alloc: n must be a positive int, got {n!r}")
        n = int(n)
        with self._lock:
            free = int(self._free.sum())
            if n > free:
                raise OutOfPages(f"alloc: {n} pages requested, {free} of {self.num_pages} free")
            edges = np.diff(np.concatenate(([0], self._free.view(np.int8), [0])))
            starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
            fit = np.flatnonzero(ends - starts >= n)
            if fit.size:
                pages = np.arange(starts[fit[0]], starts[fit[0]] + n)
            else:
                pages = np.flatnonzero(self._free)[:n]
            self._free[pages] = False
            return pages.astype(np.uint32)

    def free(self, pages: Any) -> None:
        pages = np.asarray(pages, dtype=np.int64).ravel()
        if pages.size == 0:
            return
        if pages.min() < 0 or pages.max() >= self.num_pages:
            raise ValueError(f"free: page {int(pages.max() if pages.max() >= self.num_pages else pages.min())} "
                             f"out of range 0..{self.num_pages - 1}")
        if np.unique(pages).size != pages.size:
            raise ValueError("free: a page appears twice")
        with self._lock:
            already = pages[self._free[pages]]
            if already.size:
                raise ValueError(f"free: page {int(already[0])} is not allocated (double free)")
            self._free[pages] = True


# ------------------------------------------------------------------------------------------------
# Paged cache


class PagedKVCache:
    """Per layer K and V ``jax.Array``s of ``layout.array_shape`` whose buffers are registered with
    ``engine`` and must stay where they are.

    ``devices``: the cache is sharded over KV heads across these devices (one equal head slice each,
    ``kv_heads % len(devices) == 0``); default: the first device. :attr:`sharding` is the
    ``NamedSharding`` to use in your jitted steps.

    **Lifetime rule (donation).** XLA owns the buffers; jax_garden registers them once. A jitted step
    that updates the cache must donate it (``donate_argnums``) so XLA writes the outputs in place, and
    hand the outputs back with :meth:`commit`, which checks that every output buffer is the registered
    one (``unsafe_buffer_pointer``). If XLA moved a buffer, ``commit`` raises :class:`BufferMovedError`:
    when the old arrays are still alive (nothing was donated) the cache keeps them and stays usable;
    when they were donated (their memory may be reused by XLA) the cache is marked broken, every
    pending request of a :class:`DecodeSide` on it is cancelled (fenced) and every stream of a
    :class:`PrefillSide` on it fails, and further use raises. Remote writes only ever target pages
    that no step reads or writes (pages of PENDING requests), so they never race with XLA.
    """

    def __init__(self, engine: fabric.TransferEngine, layout: KVLayout, *, devices: Sequence[Any] | None = None):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        if not isinstance(engine, fabric.TransferEngine):
            raise TypeError(f"engine must be a fabric.TransferEngine, got {type(engine).__name__}")
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a kv.KVLayout, got {type(layout).__name__}")
        devices = list(devices) if devices is not None else [jax.devices()[0]]
        if not devices:
            raise ValueError("devices must not be empty")
        if layout.kv_heads % len(devices):
            raise ValueError(f"{len(devices)} devices do not divide kv_heads={layout.kv_heads}: the cache is "
                             "sharded over KV heads, one equal slice per device")
        self.engine, self.layout = engine, layout
        self.num_shards = len(devices)
        self.mesh = Mesh(np.array(devices, dtype=object), ("kv_heads",))
        spec = [None] * 4
        spec[layout.head_axis] = "kv_heads"
        self.sharding = NamedSharding(self.mesh, PartitionSpec(*spec))
        make = jax.jit(lambda: jnp.zeros(layout.array_shape, layout.np_dtype), out_shardings=self.sharding)
        self._arrays: list[list[Any]] = [[make(), make()] for _ in range(layout.num_layers)]
        self._regions: list[list[list[fabric.MemoryRegion]]] = []
        self._bases: list[list[list[int]]] = []
        for pair in self._arrays:
            regs, bases = [], []
            for arr in pair:
                shards = self._shards(arr)
                regs.append([engine.register(s.data) for s in shards])
                bases.append([s.data.unsafe_buffer_pointer() for s in shards])
            self._regions.append(regs)
            self._bases.append(bases)
        self.shard_bytes = self._regions[0][0][0].length
        self.is_cuda = self._regions[0][0][0].is_cuda
        self.allocator = PageAllocator(layout.num_pages)
        self._broken: str | None = None
        self._lock = threading.Lock()
        self._listeners: "weakref.WeakSet[Any]" = weakref.WeakSet()

    def _shards(self, arr: Any) -> list[Any]:
        axis = self.layout.head_axis
        return sorted(arr.addressable_shards, key=lambda s: s.index[axis].start or 0)

    # -- arrays ------------------------------------------------------------------------------------
    @property
    def k(self) -> list[Any]:
        """The K arrays, one per layer (a new list; pass it to your step and commit its outputs)."""
        return [p[0] for p in self._arrays]

    @property
    def v(self) -> list[Any]:
        return [p[1] for p in self._arrays]

    @property
    def broken(self) -> str | None:
        """Why the cache can no longer be used (None while it can)."""
        return self._broken

    def region(self, layer: int, kind: int, shard: int) -> fabric.MemoryRegion:
        """The registered buffer of one shard of layer ``layer``'s K (kind 0) or V (kind 1)."""
        return self._regions[layer][kind][shard]

    def host_view(self, layer: int, kind: int, shard: int = 0) -> np.ndarray:
        """A writable uint8 NumPy view of one registered host buffer (layer, K=0/V=1, shard): raw access
        behind XLA's back, for inspection and tests. GPU caches raise ValueError."""
        import ctypes

        r = self._regions[layer][kind][shard]
        if r.is_cuda:
            raise ValueError("host_view: the cache lives in GPU memory")
        return np.ctypeslib.as_array((ctypes.c_uint8 * r.length).from_address(r.base))

    def descriptors(self) -> list[bytes]:
        """Descriptor bytes of every registered buffer, ordered layer, kind (K, V), shard."""
        return [bytes(r.descriptor) for regs in self._regions for kind in regs for r in kind]

    def _pointers(self, arr: Any) -> list[int]:
        return [s.data.unsafe_buffer_pointer() for s in self._shards(arr)]

    def commit(self, k: Sequence[Any], v: Sequence[Any]) -> None:
        """Adopt the outputs of a donated step (per layer K and V). Raises BufferMovedError if any
        buffer is not the registered one (see the class docstring for what happens then)."""
        self._check_usable()
        k, v = list(k), list(v)
        L = self.layout.num_layers
        if len(k) != L or len(v) != L:
            raise ValueError(f"commit: expected {L} K and {L} V arrays, got {len(k)} and {len(v)}")
        moved = []
        for layer in range(L):
            for kind, arr in enumerate((k[layer], v[layer])):
                if not hasattr(arr, "addressable_shards"):
                    raise TypeError(f"commit: layer {layer} {'KV'[kind]} is a {type(arr).__name__}, not a jax.Array")
                if tuple(arr.shape) != self.layout.array_shape or np.dtype(arr.dtype) != self.layout.np_dtype:
                    raise ValueError(f"commit: layer {layer} {'KV'[kind]} has shape {tuple(arr.shape)} {arr.dtype}, "
                                     f"the cache holds {self.layout.array_shape} {self.layout.dtype}")
                if arr.is_deleted():
                    raise ValueError(f"commit: layer {layer} {'KV'[kind]} was deleted (donated to another step)")
                ptrs = self._pointers(arr)
                if ptrs != self._bases[layer][kind]:
                    moved.append(f"layer {layer} {'KV'[kind]}: registered "
                                 f"{[hex(p) for p in self._bases[layer][kind]]}, got {[hex(p) for p in ptrs]}")
        if not moved:
            for layer in range(L):
                self._arrays[layer] = [k[layer], v[layer]]
            return
        detail = "; ".join(moved[:3]) + (f" (+{len(moved) - 3} more)" if len(moved) > 3 else "")
        if any(a.is_deleted() for pair in self._arrays for a in pair):
            self._mark_broken(f"XLA moved donated cache buffers ({detail}); the registered memory may be reused "
                              "by XLA, so the cache can no longer receive remote writes")
            raise BufferMovedError(self._broken)
        raise BufferMovedError(f"commit: outputs are not at the registered buffers ({detail}); the cache keeps "
                               "its registered arrays. Donate the cache arguments of the step "
                               "(jax.jit(..., donate_argnums=...)) so XLA updates them in place")

    def check(self) -> None:
        """Raise BufferMovedError unless every array is alive and at its registered buffer."""
        self._check_usable()
        for layer, pair in enumerate(self._arrays):
            for kind, arr in enumerate(pair):
                if arr.is_deleted():
                    raise BufferMovedError(f"layer {layer} {'KV'[kind]} was donated to a step whose outputs were "
                                           "not committed: call cache.commit(k, v) with the step's outputs")
                if self._pointers(arr) != self._bases[layer][kind]:
                    self._mark_broken(f"layer {layer} {'KV'[kind]} is no longer at its registered buffer")
                    raise BufferMovedError(self._broken)

    def block_until_ready(self) -> None:
        import jax

        jax.block_until_ready([a for pair in self._arrays for a in pair if not a.is_deleted()])

    def _check_usable(self) -> None:
        if self._broken:
            raise BufferMovedError(f"the cache is broken: {self._broken}")

    def _mark_broken(self, why: str) -> None:
        with self._lock:
            if self._broken:
                return
            self._broken = why
            listeners = list(self._listeners)
        log.error("kv cache broken: %s", why)
        for side in listeners:
            try:
                side._cache_broken(why)
            except Exception:  # noqa: BLE001 - every listener gets its chance
                log.exception("kv: cache-broken listener failed")

    def __repr__(self) -> str:
        lay = self.layout
        return (f"PagedKVCache({lay.num_layers} layers x {lay.num_pages} pages of {lay.page_tokens} tokens, "
                f"{lay.kv_heads} heads x {lay.head_dim} {lay.dtype} {lay.page_layout}, {self.num_shards} shard(s))")


# ------------------------------------------------------------------------------------------------
# Control channel: two-sided messages announced by a doorbell imm, one reader thread per engine
#
# A thread blocked in ``engine.recv`` keeps the engine's worker polling at full rate, so nothing
# waits in recv while idle: every kv message is followed by an imm-only write (IMM_DOORBELL) to the
# receiver's control region; the doorbell counter's callback wakes the reader, which then receives
# exactly that many kv messages (delivery is unordered, so it may wait briefly for the message the
# doorbell announced). Messages without the kv magic (raw ``engine.send`` traffic) go to a user queue.

_MSG_MAGIC = b"JGKV"
_MSG_VERSION = 1
MSG_TICKET, MSG_OPEN, MSG_ACCEPT, MSG_REJECT, MSG_CANCEL, MSG_FENCED, MSG_USER = range(1, 8)
_MSG_NAMES = {MSG_TICKET: "TICKET", MSG_OPEN: "OPEN", MSG_ACCEPT: "ACCEPT", MSG_REJECT: "REJECT",
              MSG_CANCEL: "CANCEL", MSG_FENCED: "FENCED", MSG_USER: "USER"}
FENCE_FAILED_WRITES = 1  # some posted write failed at the sender: what landed is unknown
FENCE_UNKNOWN = 2        # the prefill side does not know the stream: nothing can be proven
FENCE_ABORT = 4          # sent unasked: the stream failed on the prefill side


SEND_ATTEMPTS = 3  # a control message whose send or doorbell failed is sent again (same sequence number)


def _pack_msg(kind: int, channel_id: int, seq: int, body: bytes) -> bytes:
    return _seal(_MSG_MAGIC, struct.pack("<BBQQ", _MSG_VERSION, kind, channel_id, seq) + body)


def _unpack_msg(data: bytes) -> tuple[int, int, int, _Reader]:
    raw = _unseal(data, _MSG_MAGIC, "kv control message")
    if len(raw) < 18 or raw[0] != _MSG_VERSION:
        raise ValueError(f"kv control message: version {raw[0] if raw else None}, this build speaks {_MSG_VERSION}")
    _, kind, channel_id, seq = struct.unpack_from("<BBQQ", raw)
    return kind, channel_id, seq, _Reader(raw[18:], f"kv {_MSG_NAMES.get(kind, kind)} message")


class _Outgoing:
    """A control message until both its send and its doorbell completed (resent on failure)."""

    def __init__(self, to: "Contact", name: str, msg: bytes):
        self.to, self.name, self.msg = to, name, msg
        self.attempts = 0
        self.transfers: list[Any] = []


_channels: "weakref.WeakKeyDictionary[fabric.TransferEngine, _Channel]" = weakref.WeakKeyDictionary()
_channels_lock = threading.Lock()


class _Channel:
    def __init__(self, engine: fabric.TransferEngine):
        self.engine = engine
        self._ctrl = np.zeros(64, np.uint8)  # the target of doorbells and pings; its bytes are never read
        self._ctrl_region = engine.register(self._ctrl)
        self.contact = Contact(engine.address, self._ctrl_region.descriptor)
        self.recv_timeout = max(2.0 * engine.timeout, 1.0)
        self.decode_sides: dict[int, DecodeSide] = {}
        self.prefill: PrefillSide | None = None
        self.user_queue: "queue.Queue[tuple[Contact | None, bytes]]" = queue.Queue()
        self._cv = threading.Condition()
        self._bells = 0
        self._stop = False
        self.channel_id = int.from_bytes(os.urandom(8), "little")
        self._seq = itertools.count(1)
        self._sent: list[_Outgoing] = []  # sends in flight, checked (and resent on failure) by the tick
        # Peers whose liveness probe failed: nothing is sent to them any more. Every send to a dead
        # peer makes the provider try to reconnect (tcp;ofi_rxm 1.17 then loops on the reject), which
        # can starve connection set-up towards live peers.
        self._dead: dict[bytes, str] = {}
        self._seen: "OrderedDict[int, OrderedDict[int, None]]" = OrderedDict()  # sender -> recent seqs
        self._bell_counter = engine.imm_counter(IMM_DOORBELL)
        self._bell_fired = threading.Event()
        self._ring_cb = _weak_callback(self, _Channel._ring)  # the engine must not keep the channel alive
        self._bell_counter.on_count(1, self._ring_cb)
        self.fence_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kv-fence")
        self._reader = threading.Thread(target=self._read_loop, name="kv-control", daemon=True)
        self._ticker = threading.Thread(target=self._tick_loop, name="kv-heartbeat", daemon=True)
        self._tick_event = threading.Event()
        self.heartbeat_s = 0.25
        self._reader.start()
        self._ticker.start()

    @staticmethod
    def attach(engine: fabric.TransferEngine) -> "_Channel":
        with _channels_lock:
            ch = _channels.get(engine)
            if ch is None or ch._stop:
                ch = _channels[engine] = _Channel(engine)
            return ch

    def sides(self) -> list[Any]:
        with self._cv:
            return [*self.decode_sides.values(), *([self.prefill] if self.prefill else [])]

    def detach(self, side: Any) -> None:
        with self._cv:
            if isinstance(side, DecodeSide):
                self.decode_sides.pop(side.cache_id, None)
            elif self.prefill is side:
                self.prefill = None
            last = not self.decode_sides and self.prefill is None
        if last:
            self.stop()

    def stop(self) -> None:
        with _channels_lock:
            if _channels.get(self.engine) is self:
                del _channels[self.engine]
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._tick_event.set()
        if not self.engine.closed:
            # Consume the armed doorbell expectation (it holds a callback) with one last ring to ourselves.
            self._bell_fired.clear()
            try:
                self.engine.write_imm(self._ctrl_region.descriptor, IMM_DOORBELL)
                self._bell_fired.wait(2.0)
            except Exception:  # noqa: BLE001
                pass
        for t in (self._reader, self._ticker):
            if t is not threading.current_thread():
                t.join(timeout=5)
        self.fence_pool.shutdown(wait=False)

    # -- doorbells and the reader ---------------------------------------------------------------------
    def _ring(self) -> None:
        self._bell_fired.set()
        with self._cv:
            if self._stop:
                return
            self._bells += 1
            self._cv.notify_all()
        try:
            self._bell_counter.on_count(1, self._ring_cb)
        except Exception:  # noqa: BLE001 - the engine is closing
            pass

    def _read_loop(self) -> None:
        # Each doorbell announces one message, which may arrive just after it (unordered delivery):
        # wait briefly for as many messages as new doorbells, then take whatever else is there. A
        # message whose doorbell was lost, or that came late, is taken by the next wake (at most
        # 0.5 s later). Nothing blocks in recv for long, so the engine's worker is not kept busy.
        eng = self.engine
        seen_bells = 0
        while True:
            with self._cv:
                if self._bells == seen_bells and not self._stop:
                    self._cv.wait(0.5)
                if self._stop or eng.closed:
                    self._stop = True
                    return
                announced, seen_bells = self._bells - seen_bells, self._bells
            while True:
                try:
                    sender, data = eng.recv_message(timeout=0.05 if announced > 0 else 0.0)
                except TimeoutError:
                    break
                except fabric.TransferError:
                    return  # engine closed
                except Exception:  # noqa: BLE001
                    log.exception("kv: control recv failed")
                    break
                announced -= 1
                if not data.startswith(_MSG_MAGIC):
                    self.user_queue.put((None, data))
                    continue
                try:
                    self._dispatch(sender, data)
                except Exception:  # noqa: BLE001 - a bad message must not stop the reader
                    log.exception("kv: control message from %s dropped", sender)

    def _first_time(self, channel_id: int, seq: int) -> bool:
        """False for a message already handled (a resend of one whose completion was lost)."""
        seqs = self._seen.get(channel_id)
        if seqs is None:
            seqs = self._seen[channel_id] = OrderedDict()
            while len(self._seen) > 4096:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(channel_id)
        if seq in seqs:
            return False
        seqs[seq] = None
        while len(seqs) > 4096:
            seqs.popitem(last=False)
        return True

    def _dispatch(self, sender: fabric.NetAddress, data: bytes) -> None:
        kind, channel_id, seq, r = _unpack_msg(data)
        if not self._first_time(channel_id, seq):
            return
        if kind == MSG_USER:
            contact = Contact.from_bytes(r.blob())
            self.user_queue.put((contact, r.blob()))
            return
        if kind in (MSG_OPEN, MSG_FENCED):
            cache_id = r.u64()
            with self._cv:
                side = self.decode_sides.get(cache_id)
            if side is None:
                if kind == MSG_OPEN:
                    slot, gen, token = r.u32(), r.u32(), r.u32()
                    r.u8()
                    contact = Contact.from_bytes(r.blob())
                    reason = (f"unknown cache id {cache_id:#018x} at this decode side (a ticket from another cache, "
                              "or the cache was closed)")
                    self.send(contact, MSG_REJECT, _Writer().u64(cache_id).u32(slot).u32(gen).u32(token).text(reason).bytes())
                return
            (side._on_open if kind == MSG_OPEN else side._on_fenced)(cache_id, r)
            return
        pf = self.prefill
        if pf is None:
            log.warning("kv: %s message for a prefill side, none on this engine", _MSG_NAMES.get(kind, kind))
            return
        {MSG_TICKET: pf._on_ticket, MSG_ACCEPT: pf._on_accept, MSG_REJECT: pf._on_reject,
         MSG_CANCEL: pf._on_cancel}[kind](r)

    def send(self, to: Contact, kind: int, body: bytes) -> None:
        """Send one kv message and ring the receiver's doorbell (not waited for). If either fails
        (a dead peer, or a connection the provider could not set up in time) the tick sends both
        again, up to SEND_ATTEMPTS times; the receiver drops repeats by sequence number."""
        msg = _pack_msg(kind, self.channel_id, next(self._seq), body)
        if len(msg) > self.engine._native.max_message_bytes - 64:
            raise ValueError(f"kv {_MSG_NAMES[kind]} message of {len(msg)} bytes exceeds the engine's control-message "
                             f"limit ({self.engine._native.max_message_bytes}); create the engines with a larger "
                             "max_message_bytes")
        why = self._dead.get(to.key)
        if why is not None:
            raise ConnectionError(f"kv {_MSG_NAMES[kind]} not sent: {to.address} is unreachable ({why})")
        out = _Outgoing(to, _MSG_NAMES[kind], msg)
        self._post(out)
        with self._cv:
            self._sent.append(out)

    def _post(self, out: _Outgoing) -> None:
        out.attempts += 1
        out.transfers = [self.engine.send(out.to.address, out.msg), self.engine.write_imm(out.to.descriptor, IMM_DOORBELL)]

    def ping(self, to: Contact) -> Any:
        return self.engine.write_imm(to.descriptor, IMM_PING)

    def mark_dead(self, to: Contact, why: str) -> None:
        with self._cv:
            self._dead[to.key] = why
            while len(self._dead) > 4096:
                self._dead.pop(next(iter(self._dead)))

    def is_dead(self, to: Contact) -> str | None:
        return self._dead.get(to.key)

    # -- heartbeat ------------------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        while not self._stop:
            self._tick_event.wait(self.heartbeat_s)
            if self._stop:
                return
            if self.engine.closed:
                with self._cv:
                    self._stop = True
                    self._cv.notify_all()
                return
            now = time.monotonic()
            with self._cv:
                sent, self._sent = self._sent, []
            keep = []
            for out in sent:
                if not all(t.done for t in out.transfers):
                    keep.append(out)
                    continue
                failed = [t for t in out.transfers if t.failed]
                if not failed:
                    continue
                if out.attempts < SEND_ATTEMPTS and not self.engine.closed and out.to.key not in self._dead:
                    log.info("kv: %s to %s failed (%s); sending it again", out.name, out.to.address, failed[0].error)
                    try:
                        self._post(out)
                        keep.append(out)
                    except Exception as e:  # noqa: BLE001
                        log.info("kv: %s could not be sent again: %s", out.name, e)
                else:
                    log.info("kv: %s to %s failed %d times: %s", out.name, out.to.address, out.attempts,
                             failed[0].error)
            with self._cv:
                self._sent = keep + self._sent
            for side in self.sides():
                try:
                    side._tick(now)
                except Exception:  # noqa: BLE001
                    log.exception("kv: heartbeat of %r failed", side)


def _weak_callback(obj: Any, method: Callable) -> Callable:
    """A callable for the engine (doorbells, watchers) that does not keep ``obj`` alive: the engine
    holds its callbacks in C++, where Python's collector cannot see the cycle."""
    ref = weakref.ref(obj)

    def call(*args: Any) -> None:
        o = ref()
        if o is not None:
            method(o, *args)

    return call


class _Peer:
    """Liveness of one remote side, probed with imm-only writes while something depends on it."""

    def __init__(self, contact: Contact):
        self.contact = contact
        self.ping: Any = None
        self.dead: str | None = None

    def probe(self, channel: _Channel) -> str | None:
        """Returns why the peer is dead (once a probe failed), else None; sends a new probe when the
        previous one completed. A dead peer is remembered by the channel: nothing more goes to it."""
        if self.dead:
            return self.dead
        self.dead = channel.is_dead(self.contact)
        if self.dead:
            return self.dead
        p = self.ping
        if p is not None and p.done:
            if p.failed:
                self.dead = p.error or "probe failed"
            p = None
        if p is None and not self.dead:
            try:
                self.ping = channel.ping(self.contact)
            except Exception as e:  # noqa: BLE001
                self.dead = f"probe could not be posted: {e}"
        if self.dead:
            channel.mark_dead(self.contact, self.dead)
        return self.dead


def _check_timeout(timeout: Any, what: str = "timeout") -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"{what} must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


# ------------------------------------------------------------------------------------------------
# Decode side


_PAYLOAD_MAGIC = 0x4B56504C  # "KVPL"
_PAYLOAD_HEADER = 16          # magic, generation, length, crc32 (u32 each)


class Request:
    """One reservation on a :class:`DecodeSide`: its pages, its ticket and its state."""

    def __init__(self, side: "DecodeSide", slot: int, generation: int, pages: np.ndarray, num_tokens: int,
                 deadline: float):
        eng = side.cache.engine
        self._side = side
        self.slot, self.generation, self.num_tokens = slot, generation, num_tokens
        self._pages = pages
        self.deadline = deadline
        self.imm_data = kv_imm(side.cache_tag, slot, generation, KIND_DATA)
        self.imm_payload = kv_imm(side.cache_tag, slot, generation, KIND_PAYLOAD)
        self._counters = (eng.imm_counter(self.imm_data), eng.imm_counter(self.imm_payload))
        self._state = State.PENDING
        self._reason = ""
        self._owner: _Peer | None = None
        self._expected: tuple[int, int] | None = None
        self._taken = [0, 0]
        self._waiter = False
        self._ending: tuple[State, str] | None = None   # cancel / timeout / abort under way: the final state
        self._end_deadline = 0.0
        self._fence: tuple[int, int, int, str] | None = None  # posted data, posted payload, flags, reason
        self._payload: bytes | None = None
        self._released = False
        self.quarantined = False
        self.times: dict[str, float] = {"reserved": time.monotonic()}
        ticket = Ticket(side.cache_id, side.cache_tag, slot, generation, num_tokens, side.payload_bytes,
                        side.cache.layout, side.cache.num_shards, side.contact, pages)
        self.ticket: bytes = bytes(ticket)

    @property
    def pages(self) -> np.ndarray:
        """Destination page ids (uint32), in token order."""
        return self._pages.copy()

    @property
    def state(self) -> State:
        return self._state

    @property
    def reason(self) -> str:
        """Why the request FAILED or was CANCELLED ('' otherwise)."""
        return self._reason

    @property
    def payload(self) -> bytes:
        """The bytes the prefill side passed to ``finish`` (READY only)."""
        if self._state is not State.READY:
            raise RuntimeError(f"payload: the request is {self._state.value}{': ' + self._reason if self._reason else ''}")
        return self._payload  # type: ignore[return-value]

    def poll(self) -> State:
        """Take whatever arrived (never blocks) and return the state."""
        with self._side._cond:
            self._side._advance(self)
            return self._state

    def wait(self, timeout: float | None = None) -> State:
        """Block until the request is READY, FAILED or CANCELLED and return that state. Raises
        TimeoutError if it is still PENDING after ``timeout`` (default: the side's timeout); the
        request itself keeps its own deadline (``reserve(timeout=)``)."""
        side = self._side
        timeout = side.timeout if timeout is None else _check_timeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            with side._cond:
                side._advance(self)
                if self._state is not State.PENDING:
                    return self._state
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(f"kv request slot {self.slot} gen {self.generation}: still PENDING after "
                                       f"{timeout} s ({self._progress()})")
                kind = need = None
                if self._expected is not None and self._ending is None and not self._waiter:
                    # Block on the engine counter (its worker then polls at full rate) only once
                    # everything but the last two layers has arrived; until then check every millisecond,
                    # which leaves the CPU to the transfer and to the prefill on small machines.
                    exp_d = self._expected[KIND_DATA]
                    last_layer = 2 * exp_d // self._side.cache.layout.num_layers
                    if self._taken[KIND_DATA] + self._counters[KIND_DATA].credits >= exp_d - last_layer:
                        for k in (KIND_DATA, KIND_PAYLOAD):
                            if self._taken[k] < self._expected[k]:
                                kind, need = k, self._expected[k] - self._taken[k]
                                break
                if kind is None:
                    side._cond.wait(min(deadline - now, 0.001 if self._expected is not None else 0.05))
                    continue
                self._waiter = True
            got = 0
            try:
                self._counters[kind].wait(need, min(max(deadline - time.monotonic(), 0.0), 0.05) or 1e-3)
                got = need
            except TimeoutError:
                pass
            except fabric.TransferError as e:  # the engine closed
                with side._cond:
                    self._waiter = False
                    side._finish(self, State.FAILED, f"engine error while waiting: {e}", clean=False)
                    return self._state
            finally:
                with side._cond:
                    if self._waiter:
                        self._waiter = False
                        self._taken[kind] += got
                        side._cond.notify_all()

    def cancel(self, timeout: float | None = None) -> State:
        """Stop the request. Returns once the prefill side confirmed (fenced) that nothing more will
        land and every write it posted was counted here; only then are the pages reused. Returns the
        final state: CANCELLED, or READY/FAILED if the request had already ended. If the fence is not
        confirmed within ``timeout`` (default: the side's fence timeout) the request becomes FAILED
        and its pages are quarantined."""
        side = self._side
        timeout = side.fence_timeout if timeout is None else _check_timeout(timeout)
        with side._cond:
            side._begin_end(self, State.CANCELLED, "cancelled by the decode side", timeout)
        deadline = time.monotonic() + timeout + 1.0
        while True:
            with side._cond:
                side._advance(self)
                if self._state is not State.PENDING:
                    return self._state
                now = time.monotonic()
                if now >= deadline:  # _advance enforces the end deadline; this is a backstop
                    side._quarantine(self, State.FAILED, "cancel not confirmed in time")
                    return self._state
                fenced = self._fence is not None
                if not fenced or self._waiter:
                    side._cond.wait(min(deadline - now, 0.02))
                    continue
                kind = need = None
                for k in (KIND_DATA, KIND_PAYLOAD):
                    if self._taken[k] < self._fence[k]:
                        kind, need = k, self._fence[k] - self._taken[k]
                        break
                if kind is None:
                    continue
                self._waiter = True
            got = 0
            try:
                self._counters[kind].wait(need, 0.02)
                got = need
            except (TimeoutError, fabric.TransferError):
                pass
            finally:
                with side._cond:
                    self._waiter = False
                    self._taken[kind] += got
                    side._cond.notify_all()

    def release(self) -> None:
        """Give the pages back to the allocator (READY requests, once the sequence is done; requests
        that ended otherwise release theirs themselves)."""
        with self._side._cond:
            if self._state is State.PENDING:
                raise RuntimeError("release: the request is still PENDING (cancel it first)")
            if self._state is State.READY and not self._released:
                self._released = True
                self._side.cache.allocator.free(self._pages)

    def progress(self) -> dict:
        """Where the request stands: whether a prefill stream opened, writes expected and arrived so
        far (data and payload; arrivals counted here, not yet taken, included)."""
        with self._side._cond:
            exp = self._expected
            return {"state": self._state.value, "opened": self._owner is not None,
                    "expected_data": exp[0] if exp else None, "expected_payload": exp[1] if exp else None,
                    "arrived_data": self._taken[0] + max(self._counters[0].credits, 0),
                    "arrived_payload": self._taken[1] + max(self._counters[1].credits, 0)}

    def _progress(self) -> str:
        if self._expected is None:
            return "no prefill stream opened yet"
        return (f"{self._taken[0]} of {self._expected[0]} data writes and {self._taken[1]} of {self._expected[1]} "
                f"payload writes counted")

    def __repr__(self) -> str:
        return (f"Request(slot={self.slot}, gen={self.generation}, {self.num_tokens} tokens, {self._pages.size} pages, "
                f"{self._state.value}{': ' + self._reason if self._reason else ''})")


class DecodeSide:
    """The decode end: reserves pages of ``cache`` for requests, issues tickets, answers the prefill
    side's stream openings and counts arrivals.

    Args:
      cache: the destination :class:`PagedKVCache` (its engine carries everything).
      max_requests: request slots (concurrent requests), at most 4095.
      payload_bytes: capacity of the per-request payload (``Stream.finish(payload)``).
      timeout: default request deadline (``reserve``) and ``wait`` timeout, seconds.
      fence_timeout: how long a cancel waits for the prefill side's fence (default
        ``2 * engine.timeout + 1``); past it the request FAILS and its pages are quarantined.
      quarantine_s: how long pages of a request whose writes could not be accounted for (its prefill
        peer died or never fenced) are kept out of use (default ``engine.timeout``).
    """

    def __init__(self, cache: PagedKVCache, *, max_requests: int = 256, payload_bytes: int = 4096,
                 timeout: float = 30.0, fence_timeout: float | None = None, quarantine_s: float | None = None):
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a kv.PagedKVCache, got {type(cache).__name__}")
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or not 0 < max_requests < MAX_SLOTS:
            raise ValueError(f"max_requests must be in 1..{MAX_SLOTS - 1}, got {max_requests!r}")
        if isinstance(payload_bytes, bool) or not isinstance(payload_bytes, int) or not 0 < payload_bytes <= 1 << 20:
            raise ValueError(f"payload_bytes must be in 1..2^20, got {payload_bytes!r}")
        cache._check_usable()
        eng = cache.engine
        self.cache = cache
        self.timeout = _check_timeout(timeout)
        self.fence_timeout = _check_timeout(fence_timeout if fence_timeout is not None else 2 * eng.timeout + 1.0,
                                            "fence_timeout")
        self.quarantine_s = float(quarantine_s if quarantine_s is not None else eng.timeout)
        self.payload_bytes = payload_bytes
        self.slot_bytes = -(-(payload_bytes + _PAYLOAD_HEADER) // 64) * 64
        self.max_requests = max_requests
        self.cache_id = int.from_bytes(os.urandom(8), "little")
        self._payload_buf = np.zeros(max_requests * self.slot_bytes, np.uint8)
        self._payload_region = eng.register(self._payload_buf)
        self._descriptors = _Writer()
        descs = cache.descriptors() + [bytes(self._payload_region.descriptor)]
        self._descriptors.u32(len(descs))
        for d in descs:
            self._descriptors.blob(d)
        self._descriptor_blob = self._descriptors.bytes()
        limit = eng._native.max_message_bytes - 1024
        if len(self._descriptor_blob) > limit:
            raise ValueError(f"the cache's {len(descs)} buffer descriptors take {len(self._descriptor_blob)} bytes, more "
                             f"than one control message carries ({limit}); create the engine with a larger "
                             "max_message_bytes")
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._slots: list[Request | None] = [None] * max_requests
        self._gens = [0] * max_requests
        self._free_slots = list(range(max_requests))
        heapq.heapify(self._free_slots)
        self._held: list[tuple[float, Request]] = []  # quarantined requests and when they are released
        self._peers: dict[bytes, _Peer] = {}
        self._closed = False
        self.counts = {"reserved": 0, "ready": 0, "cancelled": 0, "failed": 0, "quarantined": 0, "rejected_opens": 0}
        self._channel = _Channel.attach(eng)
        with self._channel._cv:
            used = {s.cache_tag for s in self._channel.decode_sides.values()}
            free = [t for t in range(MAX_CACHE_TAGS) if t not in used]
            if not free:
                raise ValueError(f"at most {MAX_CACHE_TAGS} DecodeSides per engine")
            self.cache_tag = free[0]
            self._channel.decode_sides[self.cache_id] = self
        self.contact = self._channel.contact
        cache._listeners.add(self)
        _lifetime.close_at_exit(self, how=lambda side: side.close(timeout=1.0))  # no long fences at exit

    # -- public -----------------------------------------------------------------------------------------
    def reserve(self, num_tokens: int, *, timeout: float | None = None) -> Request:
        """Reserve pages for ``num_tokens`` tokens and a request slot; returns the :class:`Request`
        (``req.ticket`` is what the prefill side needs). The request FAILS if it is not READY within
        ``timeout`` (default: the side's timeout). Raises OutOfPages when pages or slots are short."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens <= 0:
            raise ValueError(f"reserve: num_tokens must be a positive int, got {num_tokens!r}")
        timeout = self.timeout if timeout is None else _check_timeout(timeout)
        self.cache._check_usable()
        n_pages = self.cache.layout.pages_for(num_tokens)
        if n_pages > self.cache.layout.num_pages:
            raise ValueError(f"reserve: {num_tokens} tokens need {n_pages} pages, the cache has "
                             f"{self.cache.layout.num_pages}")
        with self._cond:
            if self._closed:
                raise RuntimeError("reserve: the DecodeSide is closed")
            if not self._free_slots:
                raise OutOfPages(f"reserve: all {self.max_requests} request slots are in use")
            pages = self.cache.allocator.alloc(n_pages)
            slot = heapq.heappop(self._free_slots)
            # A generation whose counters hold stray credits is skipped: arrivals that nobody
            # accounted for must never count toward a new request.
            for _ in range(256):
                self._gens[slot] = (self._gens[slot] + 1) & 0xFFFFFFFF
                gen = self._gens[slot]
                eng = self.cache.engine
                if all(eng.imm_counter(kv_imm(self.cache_tag, slot, gen, k)).credits == 0
                       for k in (KIND_DATA, KIND_PAYLOAD)):
                    break
                log.warning("kv: slot %d generation %d has stray imm credits; skipped", slot, gen)
            req = Request(self, slot, gen, pages, int(num_tokens), time.monotonic() + timeout)
            self._slots[slot] = req
            self.counts["reserved"] += 1
            return req

    def send_ticket(self, to: Any, request: "Request | bytes", extra: bytes = b"") -> None:
        """Hand a ticket (and ``extra`` bytes, e.g. the prompt) to a prefill side over the engine;
        it arrives at ``PrefillSide.recv_ticket``."""
        ticket = request.ticket if isinstance(request, Request) else bytes(request)
        if not isinstance(extra, (bytes, bytearray, memoryview)):
            raise TypeError(f"send_ticket: extra must be bytes, got {type(extra).__name__}")
        self._channel.send(_contact(to), MSG_TICKET, _Writer().blob(ticket).blob(bytes(extra)).bytes())

    def send_message(self, to: Any, payload: bytes) -> None:
        _send_user(self._channel, to, payload)

    def recv_message(self, timeout: float | None = None) -> tuple[Contact | None, bytes]:
        """Next non-kv message that reached this engine: ``(sender contact or None, bytes)``."""
        return _recv_user(self._channel, self.timeout if timeout is None else timeout)

    def lookup(self, ticket: Any) -> Request:
        """The live request a ticket belongs to (ValueError for a ticket of another cache, or of a
        request that has ended and whose slot was reused)."""
        t = _ticket(ticket)
        if t.cache_id != self.cache_id:
            raise ValueError(f"ticket from another cache: cache id {t.cache_id:#018x}, this cache is {self.cache_id:#018x}")
        with self._cond:
            req = self._slots[t.slot] if t.slot < self.max_requests else None
            if req is None or req.generation != t.generation:
                raise ValueError(f"stale ticket: slot {t.slot} generation {t.generation} is not live here")
            return req

    def requests(self) -> list[Request]:
        """Requests that hold a slot (PENDING, or ended but quarantined)."""
        with self._cond:
            return [r for r in self._slots if r is not None]

    def poll(self) -> list[Request]:
        """Advance every live request (non-blocking); returns those that are no longer PENDING."""
        with self._cond:
            live = [r for r in self._slots if r is not None]
            for r in live:
                self._advance(r)
            return [r for r in live if r._state is not State.PENDING]

    def close(self, timeout: float | None = None) -> None:
        """Cancel every PENDING request (fenced; all at once, each waits at most ``timeout``, default
        the fence timeout) and detach from the engine."""
        timeout = self.fence_timeout if timeout is None else _check_timeout(timeout)
        with self._cond:
            if self._closed:
                return
            self._closed = True
            _lifetime.closed(self)
            live = [r for r in self._slots if r is not None and r._state is State.PENDING]
            for r in live:
                self._begin_end(r, State.CANCELLED, "the decode side closed", timeout)
            deadline = time.monotonic() + timeout
            while any(r._state is State.PENDING for r in live) and time.monotonic() < deadline:
                for r in live:
                    self._advance(r)
                self._cond.wait(0.01)
            for r in live:
                self._quarantine(r, State.FAILED, "the decode side closed before the fence came")
        self._channel.detach(self)

    def __enter__(self) -> "DecodeSide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- state machine (callers hold self._cond) --------------------------------------------------------
    def _take_available(self, req: Request, kind: int, limit: int) -> None:
        if req._waiter:
            return
        want = limit - req._taken[kind]
        if want <= 0:
            return
        avail = req._counters[kind].credits
        n = min(avail, want)
        if n > 0:
            req._counters[kind].wait(n, 1.0)
            req._taken[kind] += n

    def _advance(self, req: Request) -> None:
        if req._state is not State.PENDING:
            return
        now = time.monotonic()
        if req._ending is None:
            if req._expected is not None:
                for k in (KIND_DATA, KIND_PAYLOAD):
                    self._take_available(req, k, req._expected[k])
                if req._taken[0] == req._expected[0] and req._taken[1] == req._expected[1]:
                    self._ready(req)
                    return
            if now >= req.deadline:
                self._begin_end(req, State.FAILED, f"not READY within its deadline ({req._progress()})",
                                self.fence_timeout)
            return
        if req._fence is not None:
            posted_d, posted_p, flags, why = req._fence
            if flags & (FENCE_FAILED_WRITES | FENCE_UNKNOWN):
                what = "some writes failed at the sender" if flags & FENCE_FAILED_WRITES else "the prefill side lost the stream"
                self._quarantine(req, req._ending[0], f"{req._ending[1]}; {what}, pages quarantined")
                return
            for k, lim in ((KIND_DATA, posted_d), (KIND_PAYLOAD, posted_p)):
                self._take_available(req, k, lim)
            if req._taken[0] == posted_d and req._taken[1] == posted_p:
                extra = [c.credits for c in req._counters]
                if any(extra):
                    self._quarantine(req, req._ending[0], f"{req._ending[1]}; {extra} more writes than posted "
                                     "arrived, pages quarantined")
                    return
                self._finish(req, *req._ending, clean=True)
                return
        if now >= req._end_deadline:
            if req._fence is None:
                why = f"{req._ending[1]}; the prefill side did not confirm the fence within {self.fence_timeout} s"
            else:
                why = (f"{req._ending[1]}; {req._taken[0]}/{req._fence[0]} data and {req._taken[1]}/{req._fence[1]} "
                       "payload writes arrived before the drain deadline")
            self._quarantine(req, State.FAILED, why + ", pages quarantined")

    def _begin_end(self, req: Request, final: State, reason: str, fence_timeout: float) -> None:
        """Start ending a PENDING request: without an open stream it ends at once (any later OPEN is
        rejected); with one, CANCEL goes to the prefill side and the end waits for its fence."""
        if req._state is not State.PENDING or req._ending is not None:
            return
        if req._owner is None:
            self._finish(req, final, reason, clean=True)
            return
        req._ending = (final, reason)
        req._end_deadline = time.monotonic() + fence_timeout
        req.times["cancel_sent"] = time.monotonic()
        try:
            self._channel.send(req._owner.contact, MSG_CANCEL, _Writer().u64(self.cache_id).u32(req.slot)
                               .u32(req.generation).blob(bytes(self.contact)).bytes())
        except Exception as e:  # noqa: BLE001 - no fence can come: quarantine now
            self._quarantine(req, State.FAILED, f"{reason}; CANCEL could not be sent ({e}), pages quarantined")

    def _ready(self, req: Request) -> None:
        off = req.slot * self.slot_bytes
        head = self._payload_buf[off:off + _PAYLOAD_HEADER].view("<u4")
        magic, gen, length, crc = (int(x) for x in head)
        body = bytes(self._payload_buf[off + _PAYLOAD_HEADER:off + _PAYLOAD_HEADER + min(length, self.payload_bytes)])
        if magic != _PAYLOAD_MAGIC or gen != req.generation or length > self.payload_bytes or zlib.crc32(body) != crc:
            self._quarantine(req, State.FAILED, f"payload header invalid (magic {magic:#x}, generation {gen}, "
                             f"length {length}): pages quarantined")
            return
        req._payload = body
        req.times["ready"] = time.monotonic()
        req._state = State.READY
        self.counts["ready"] += 1
        self._free_slot(req)
        self._cond.notify_all()

    def _finish(self, req: Request, state: State, reason: str, *, clean: bool) -> None:
        """End a request whose posted writes are all accounted for (clean): pages and slot are free."""
        if req._state is not State.PENDING:
            return
        req._state, req._reason = state, reason
        req.times["ended"] = time.monotonic()
        self.counts["cancelled" if state is State.CANCELLED else "failed"] += 1
        if clean:
            self.cache.allocator.free(req._pages)
            req._released = True
            self._free_slot(req)
        self._cond.notify_all()

    def _quarantine(self, req: Request, state: State, reason: str) -> None:
        """End a request whose writes cannot all be accounted for: its pages and slot are held for
        quarantine_s, then reused."""
        if req._state is not State.PENDING:
            return
        self._finish(req, state, reason, clean=False)
        req.quarantined = True
        self.counts["quarantined"] += 1
        self._held.append((time.monotonic() + self.quarantine_s, req))
        log.warning("kv: request slot %d gen %d quarantined: %s", req.slot, req.generation, reason)

    def _free_slot(self, req: Request) -> None:
        if self._slots[req.slot] is req:
            self._slots[req.slot] = None
            heapq.heappush(self._free_slots, req.slot)

    # -- control messages and heartbeat ----------------------------------------------------------------
    def _on_open(self, cache_id: int, r: _Reader) -> None:
        slot, gen, token, need_desc = r.u32(), r.u32(), r.u32(), r.u8()
        contact = Contact.from_bytes(r.blob())
        dims = [r.u32() for _ in range(5)]
        dtype, page_layout = r.text(), r.text()
        src_shards, src_domains, split = r.u32(), r.u32(), r.u64()
        src_pages = r.u32s()
        r.end()

        def reject(why: str) -> None:
            self.counts["rejected_opens"] += 1
            self._channel.send(contact, MSG_REJECT, _Writer().u64(cache_id).u32(slot).u32(gen).u32(token).text(why).bytes())

        with self._cond:
            req = self._slots[slot] if slot < self.max_requests else None
            if req is None or req.generation != gen:
                return reject(f"stale ticket: slot {slot} generation {gen} is not live (cancelled, timed out or "
                              "already served)")
            if req._state is not State.PENDING or req._ending is not None:
                return reject(f"the request is {req._state.value if req._ending is None else 'ending'}")
            if req._owner is not None:
                return reject("the ticket was already opened by a prefill side")
            try:
                src_layout = KVLayout(*dims, dtype=dtype, page_layout=page_layout)
            except (TypeError, ValueError) as e:
                return reject(f"bad source layout: {e}")
            if bad := self.cache.layout.mismatches(src_layout):
                return reject(f"wrong layout: {', '.join(bad)}")
            if src_pages.size != req._pages.size:
                return reject(f"{src_pages.size} source pages for {req._pages.size} destination pages")
            try:
                plan = plan_writes(self.cache.layout, src_shards, self.cache.num_shards, src_pages, req._pages)
                per_layer = plan_imm_writes(plan, domains=src_domains, split_threshold=split)
                payload = fabric.imm_writes("write", domains=src_domains, length=self.slot_bytes, split_threshold=split)
            except ValueError as e:
                return reject(f"cannot plan the transfer: {e}")
            req._expected = (2 * self.cache.layout.num_layers * per_layer, payload)
            peer = self._peers.get(contact.key)
            if peer is None or peer.dead:
                peer = self._peers[contact.key] = _Peer(contact)
            req._owner = peer
            req.times["opened"] = time.monotonic()
            w = (_Writer().u64(cache_id).u32(slot).u32(gen).u32(token).u64(req._expected[0]).u64(req._expected[1])
                 .u64(slot * self.slot_bytes).u32(self.slot_bytes))
            w.u8(1 if need_desc else 0)
            body = w.bytes() + (self._descriptor_blob if need_desc else b"")
            self._channel.send(contact, MSG_ACCEPT, body)
            self._cond.notify_all()

    def _on_fenced(self, cache_id: int, r: _Reader) -> None:
        slot, gen, posted_d, posted_p, flags, why = r.u32(), r.u32(), r.u64(), r.u64(), r.u8(), r.text()
        r.end()
        with self._cond:
            req = self._slots[slot] if slot < self.max_requests else None
            if req is None or req.generation != gen or req._state is not State.PENDING:
                return
            if req._ending is None:
                if not flags & FENCE_ABORT:
                    log.warning("kv: unexpected FENCED for slot %d gen %d", slot, gen)
                req._ending = (State.FAILED, f"the prefill side aborted the stream: {why}")
                req._end_deadline = time.monotonic() + self.fence_timeout
            req._fence = (posted_d, posted_p, flags, why)
            req.times["fenced"] = time.monotonic()
            self._advance(req)
            self._cond.notify_all()

    def _tick(self, now: float) -> None:
        with self._cond:
            for until, req in list(self._held):
                if now >= until:
                    self._held.remove((until, req))
                    self.cache.allocator.free(req._pages)
                    req._released = True
                    self._free_slot(req)
            live = [r for r in self._slots if r is not None and r._state is State.PENDING]
            owners = {id(r._owner): r._owner for r in live if r._owner is not None}
        dead = {}
        for key, peer in owners.items():
            why = peer.probe(self._channel)
            if why:
                dead[key] = why
        with self._cond:
            for r in live:
                if r._owner is not None and id(r._owner) in dead and r._state is State.PENDING:
                    self._quarantine(r, State.FAILED, f"prefill side unreachable: {dead[id(r._owner)]}; pages "
                                     f"quarantined for {self.quarantine_s} s")
                else:
                    self._advance(r)
            for key in [k for k, p in self._peers.items() if p.dead]:
                del self._peers[key]

    def _cache_broken(self, why: str) -> None:
        with self._cond:
            live = [r for r in self._slots if r is not None and r._state is State.PENDING]
            for r in live:
                self._begin_end(r, State.FAILED, f"cache broken: {why}", self.fence_timeout)

    def __repr__(self) -> str:
        return f"DecodeSide(cache {self.cache_id:#018x}, tag {self.cache_tag}, {len(self.requests())} live requests)"


def _send_user(channel: _Channel, to: Any, payload: bytes) -> None:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"send_message: payload must be bytes, got {type(payload).__name__}")
    channel.send(_contact(to), MSG_USER, _Writer().blob(bytes(channel.contact)).blob(bytes(payload)).bytes())


def _recv_user(channel: _Channel, timeout: float) -> tuple[Contact | None, bytes]:
    try:
        return channel.user_queue.get(timeout=_check_timeout(timeout))
    except queue.Empty:
        raise TimeoutError(f"recv_message: no message within {timeout} s") from None


# ------------------------------------------------------------------------------------------------
# Prefill side


class LayerMarks:
    """Watcher slots of a :class:`PrefillSide`, one per layer: :func:`mark_layer` stores a stream's
    token into slot ``layer`` once that layer's KV is in the source cache."""

    def __init__(self, watcher: fabric.Watcher, num_layers: int):
        self.watcher = watcher
        self.num_layers = num_layers
        self._slots = [watcher.slot(i) for i in range(num_layers)]

    def slot(self, layer: int) -> fabric.WatcherSlot:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in 0..{self.num_layers - 1}, got {layer!r}")
        return self._slots[int(layer)]


def mark_layer(marks: LayerMarks, layer: int, token: Any, *arrays: Any, axis_name: str | None = None) -> Any:
    """Inside the jitted prefill: "layer ``layer`` of the stream ``token`` is in the cache".

    Stores ``token`` (``jnp.uint32(stream.token)``, passed to the program as an argument so every
    request stores its own value, also under CUDA-graph replay) into the layer's watcher slot once
    every array in ``arrays`` (that layer's updated K and V source arrays) is computed. Returns
    ``arrays`` unchanged. On GPU the store is a one-thread kernel on the program's stream: no host
    sync.

    The mark depends on one element read from each array, not on the arrays themselves: passing the
    cache arrays through the signal op (an aliasing custom call) makes XLA update a temporary and
    copy it into the cache buffer at the end of the program, after the mark. With a scalar
    dependency XLA updates the donated buffer in place, so the data is in the registered buffer when
    the mark is stored (``tests/test_kv.py`` checks this at every mark). Keep the cache updates
    plain (``.at[pages].set`` / ``dynamic_update_slice`` on the donated arrays).

    For a head-sharded source cache call it inside ``shard_map`` with ``axis_name`` = the mesh axis
    of the heads: the scalars are summed over the axis (a tiny all-reduce), so the mark is stored
    only after every device wrote its slice.
    """
    import jax
    import jax.numpy as jnp

    if not isinstance(marks, LayerMarks):
        raise TypeError(f"mark_layer: marks must be PrefillSide.marks, got {type(marks).__name__}")
    slot = marks.slot(layer)
    if not arrays:
        raise ValueError("mark_layer: pass the layer's updated K/V arrays (the mark is ordered after them)")
    dep = sum(jnp.ravel(a)[0].astype(jnp.float32) for a in arrays)
    if axis_name is not None:
        dep = jax.lax.psum(dep, axis_name)
    stored = fabric.signal(slot, token, dep)
    # Whatever consumes the returned arrays (the next layer) runs after the store: without this XLA
    # may schedule the store late (the CPU runtime did, up to the end of the program), and the layer
    # would stream only at finish(). The barrier aliases its operands, so no copy.
    arrays = jax.lax.optimization_barrier((stored, tuple(arrays)))[1]
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


class Stream:
    """One request being streamed from a :class:`PrefillSide`'s source pages to a decode cache."""

    OPENING, STREAMING, FINISHED, DONE, CANCELLED, FAILED = "opening", "streaming", "finished", "done", "cancelled", "failed"

    def __init__(self, side: "PrefillSide", ticket: Ticket, src_pages: np.ndarray, token: int, layerwise: bool):
        self._side = side
        self.ticket = ticket
        self.src_pages = src_pages
        self.token = token
        self.layerwise = layerwise
        self.key = (ticket.cache_id, ticket.slot, ticket.generation)
        self.state = Stream.OPENING
        self.reason = ""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._reply: tuple[str, Any] | None = None
        self.plan = plan_writes(ticket.layout, side.cache.num_shards, ticket.shards, src_pages, ticket.pages)
        self.per_layer_imms = plan_imm_writes(self.plan, domains=side.cache.engine.num_domains,
                                              split_threshold=side.cache.engine.split_threshold)
        self.expected = (2 * ticket.layout.num_layers * self.per_layer_imms,
                         0)  # payload part filled at ACCEPT (the decode side's slot size)
        self._dst: list[fabric.MemoryDescriptor] = []
        self._payload_desc: fabric.MemoryDescriptor | None = None
        self._payload_offset = 0
        self._slot_bytes = 0
        self._posted = np.zeros(ticket.layout.num_layers, dtype=bool)
        self._transfers: list[Any] = []
        self._staging: Any = None
        self.posted = [0, 0]  # imm-carrying writes posted: data, payload
        self.failed_writes = 0
        self.bytes_posted = 0
        self.pages_posted = 0
        self.layers_posted_on_mark = 0
        self.times: dict[str, Any] = {"opened": time.monotonic(), "marks": {}, "posted": {}}

    # -- public ------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in (Stream.DONE, Stream.CANCELLED, Stream.FAILED)

    def finish(self, payload: bytes = b"") -> None:
        """The prefill program has completed and its outputs were committed to the source cache:
        post every layer not posted yet, then the payload (last). Returns without waiting; see
        :meth:`wait`. Raises StreamError if the stream was cancelled or failed, ValueError if the
        payload exceeds the ticket's capacity, BufferMovedError if the source cache moved (the stream
        then fails)."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"finish: payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) > self.ticket.payload_capacity:
            raise ValueError(f"finish: payload of {len(payload)} bytes exceeds the ticket's capacity "
                             f"({self.ticket.payload_capacity})")
        side = self._side
        try:
            side.cache.block_until_ready()
            side.cache.check()
        except BufferMovedError as e:
            side._fail(self, f"source cache: {e}")
            raise
        with self._lock:
            if self.state != Stream.STREAMING:
                raise StreamError(f"finish: the stream is {self.state}{': ' + self.reason if self.reason else ''}")
            try:
                for layer in range(self.ticket.layout.num_layers):
                    if not self._posted[layer]:
                        self._post_layer_locked(layer)
                self._post_payload_locked(payload)
            except Exception as e:  # noqa: BLE001
                self._fail_locked(f"posting failed: {e}")
                raise StreamError(f"finish: posting failed: {e}") from e
            self.state = Stream.FINISHED
            self.times["finished"] = time.monotonic()

    def wait(self, timeout: float | None = None) -> dict:
        """Wait until every write of the stream completed at the sender (after :meth:`finish`), and
        return its statistics. Raises StreamError if the stream failed or was cancelled, TimeoutError
        after ``timeout`` (default: the side's timeout)."""
        timeout = self._side.timeout if timeout is None else _check_timeout(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.state == Stream.STREAMING or self.state == Stream.OPENING:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"stream {self.key}: finish() was not called within {timeout} s")
                self._cond.wait(min(left, 0.05))
            transfers = list(self._transfers)
        for t in transfers:
            left = deadline - time.monotonic()
            try:
                t.wait(max(left, 1e-3))
            except (fabric.TransferError, TimeoutError) as e:
                if not t.done:  # our wait ran out, the write is still in flight
                    raise TimeoutError(f"stream {self.key}: writes still in flight after {timeout} s") from None
                self._side._fail(self, f"a write failed: {e}")  # the engine failed it (peer dead or silent)
        self._side._maybe_done(self)
        if self.state in (Stream.FAILED, Stream.CANCELLED):
            raise StreamError(f"stream {self.key} {self.state}: {self.reason}")
        return self.stats()

    def stats(self) -> dict:
        return {"posted_data": self.posted[0], "posted_payload": self.posted[1], "bytes": self.bytes_posted,
                "pages": self.pages_posted, "layers_posted_on_mark": self.layers_posted_on_mark,
                "writes": len(self.plan) * 2 * self.ticket.layout.num_layers, "state": self.state}

    # -- posting (callers hold self._lock) -----------------------------------------------------------------
    def _post_layer_locked(self, layer: int) -> None:
        side, eng, t = self._side, self._side.cache.engine, self.ticket
        imm = kv_imm(t.cache_tag, t.slot, t.generation, KIND_DATA)
        dom, split = eng.num_domains, eng.split_threshold
        for kind in (0, 1):
            for w in self.plan:
                src = side.cache.region(layer, kind, w.src_shard)
                dst = self._dst[(layer * 2 + kind) * t.shards + w.dst_shard]
                if w.op == "write":
                    tr = eng.write(src, dst, w.nbytes, w.src_offset, w.dst_offset, imm)
                    n = fabric.imm_writes("write", domains=dom, length=w.nbytes, split_threshold=split)
                else:
                    tr = eng.write_paged(src, dst, w.nbytes, w.src_index, w.dst_index, w.src_stride, w.dst_stride,
                                         w.src_offset, w.dst_offset, imm)
                    n = fabric.imm_writes("paged", domains=dom, pages=w.blocks)
                self._transfers.append(tr)
                self.posted[0] += n
                self.bytes_posted += w.bytes_moved
        self.pages_posted += 2 * int(self.src_pages.size)
        self._posted[layer] = True
        self.times["posted"][layer] = time.monotonic()

    def _post_payload_locked(self, payload: bytes) -> None:
        side, eng, t = self._side, self._side.cache.engine, self.ticket
        region, offset = side._staging_slot(self, self._slot_bytes)
        buf = side._staging_view(region, offset, self._slot_bytes)
        buf[:] = 0
        head = np.array([_PAYLOAD_MAGIC, t.generation, len(payload), zlib.crc32(payload)], dtype="<u4")
        buf[:_PAYLOAD_HEADER] = head.view(np.uint8)
        buf[_PAYLOAD_HEADER:_PAYLOAD_HEADER + len(payload)] = np.frombuffer(payload, np.uint8)
        imm = kv_imm(t.cache_tag, t.slot, t.generation, KIND_PAYLOAD)
        tr = eng.write(region, self._payload_desc, self._slot_bytes, offset, self._payload_offset, imm)
        self._transfers.append(tr)
        self.posted[1] += fabric.imm_writes("write", domains=eng.num_domains, length=self._slot_bytes,
                                            split_threshold=eng.split_threshold)

    def _fail_locked(self, why: str) -> bool:
        if self.state in (Stream.DONE, Stream.FAILED, Stream.CANCELLED):
            return False
        self.state, self.reason = Stream.FAILED, why
        self._cond.notify_all()
        return True

    def __repr__(self) -> str:
        return (f"Stream(token={self.token}, slot={self.ticket.slot}, gen={self.ticket.generation}, {self.state}"
                f"{': ' + self.reason if self.reason else ''})")


class PrefillSide:
    """The prefill end: opens streams from tickets and posts each layer's writes from ``cache`` (the
    source pages) as the jitted prefill marks it done.

    Args:
      cache: the source :class:`PagedKVCache` (same layout as the decode caches, any page count and
        head sharding).
      timeout: default timeout of ``open_stream``, ``recv_ticket`` and ``Stream.wait``, seconds.
      payload_slots / payload_slot_bytes: the registered staging pool for payloads.
    """

    def __init__(self, cache: PagedKVCache, *, timeout: float = 30.0, payload_slots: int = 64,
                 payload_slot_bytes: int = 4096 + 64):
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"cache must be a kv.PagedKVCache, got {type(cache).__name__}")
        cache._check_usable()
        self.cache = cache
        self.timeout = _check_timeout(timeout)
        eng = cache.engine
        self._lock = threading.RLock()
        self._streams: dict[tuple[int, int, int], Stream] = {}
        self._by_token: dict[int, Stream] = {}
        self._ended: "OrderedDict[tuple[int, int, int], tuple[int, int, int]]" = OrderedDict()
        self._descs: dict[int, tuple[list[fabric.MemoryDescriptor], fabric.MemoryDescriptor]] = {}
        self._peers: dict[bytes, _Peer] = {}
        self._tickets: "queue.Queue[tuple[bytes, bytes]]" = queue.Queue()
        self._tokens = itertools.count(int.from_bytes(os.urandom(3), "little") + 1)
        self._staging_buf = np.zeros(payload_slots * payload_slot_bytes, np.uint8)
        self._staging_region = eng.register(self._staging_buf)
        self._staging_size = payload_slot_bytes
        self._staging_free = list(range(payload_slots))
        self._closed = False
        self.counts = {"opened": 0, "done": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._watcher = eng.watcher(_weak_callback(self, PrefillSide._on_mark))
        self.marks = LayerMarks(self._watcher, cache.layout.num_layers)
        self._channel = _Channel.attach(eng)
        with self._channel._cv:
            if self._channel.prefill is not None:
                raise ValueError("one PrefillSide per engine")
            self._channel.prefill = self
        self.contact = self._channel.contact
        cache._listeners.add(self)
        _lifetime.close_at_exit(self)

    # -- public -----------------------------------------------------------------------------------------
    def recv_ticket(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """Next ticket sent with ``DecodeSide.send_ticket``: ``(ticket bytes, extra bytes)``."""
        timeout = self.timeout if timeout is None else _check_timeout(timeout)
        try:
            return self._tickets.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"recv_ticket: no ticket within {timeout} s") from None

    def send_message(self, to: Any, payload: bytes) -> None:
        _send_user(self._channel, to, payload)

    def recv_message(self, timeout: float | None = None) -> tuple[Contact | None, bytes]:
        return _recv_user(self._channel, self.timeout if timeout is None else timeout)

    def open_stream(self, ticket: Any, src_pages: Any, *, layerwise: bool = True, timeout: float | None = None) -> Stream:
        """Check ``ticket`` against this side's source cache (ValueError: garbled, truncated, wrong
        layout, pages out of range, ...), then ask the decode side to accept the stream (ValueError if
        it rejects: a ticket from another cache, a stale or cancelled ticket). Nothing is posted before
        the decode side accepted. ``src_pages``: the request's pages in the source cache, in token
        order. ``layerwise=False`` posts everything at ``finish`` (bulk mode)."""
        t = _ticket(ticket)
        cache, eng = self.cache, self.cache.engine
        if bad := cache.layout.mismatches(t.layout):
            raise ValueError(f"kv ticket: wrong layout for this prefill cache: {', '.join(bad)}")
        if t.contact.address.provider != eng.provider:
            raise ValueError(f"kv ticket: decode side uses provider {t.contact.address.provider!r}, this engine "
                             f"{eng.provider!r}")
        try:
            src = np.asarray(src_pages)
        except Exception:  # noqa: BLE001
            raise TypeError(f"src_pages must be a sequence of ints, got {type(src_pages).__name__}") from None
        if src.ndim != 1 or (src.size and not np.issubdtype(src.dtype, np.integer)):
            raise TypeError(f"src_pages must be a 1-D sequence of ints, got {src.dtype} shape {src.shape}")
        if src.size != t.pages.size:
            raise ValueError(f"src_pages: {src.size} pages, the ticket has {t.pages.size}")
        if src.size and (int(src.min()) < 0 or int(src.max()) >= cache.layout.num_pages):
            raise ValueError(f"src_pages: page {int(src.max()) if src.max() >= cache.layout.num_pages else int(src.min())} "
                             f"out of range (the source cache has {cache.layout.num_pages} pages)")
        if np.unique(src).size != src.size:
            raise ValueError("src_pages: a page appears twice")
        if t.payload_capacity + _PAYLOAD_HEADER > 1 << 20:
            raise ValueError(f"kv ticket: payload capacity {t.payload_capacity} too large")
        cache._check_usable()
        timeout = self.timeout if timeout is None else _check_timeout(timeout)
        with self._lock:
            if self._closed:
                raise RuntimeError("open_stream: the PrefillSide is closed")
            old = self._streams.get((t.cache_id, t.slot, t.generation))
            if old is not None and not old.done:
                raise ValueError(f"kv ticket: slot {t.slot} generation {t.generation} already has a stream here")
            token = next(self._tokens) & 0xFFFFFFFF
            while token == 0 or token in self._by_token:
                token = next(self._tokens) & 0xFFFFFFFF
            s = Stream(self, t, src.astype(np.uint32), token, bool(layerwise))
            self._streams[s.key] = s
            need_desc = t.cache_id not in self._descs
        lay = cache.layout
        body = (_Writer().u64(t.cache_id).u32(t.slot).u32(t.generation).u32(token).u8(1 if need_desc else 0)
                .blob(bytes(self.contact)).u32(lay.num_layers).u32(lay.num_pages).u32(lay.page_tokens)
                .u32(lay.kv_heads).u32(lay.head_dim).text(lay.dtype).text(lay.page_layout)
                .u32(cache.num_shards).u32(eng.num_domains).u64(eng.split_threshold).u32s(s.src_pages).bytes())
        self._channel.send(t.contact, MSG_OPEN, body)
        deadline = time.monotonic() + timeout
        with s._lock:
            while s._reply is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s._cond.wait(min(left, 0.05))
            reply = s._reply
        if reply is None or reply[0] != "accept":
            if reply is None:
                # The decode side may still accept: tell it nothing will come (a fence with 0 posted).
                with s._lock:
                    s._fail_locked("no answer to OPEN")
                self._send_fence(s, FENCE_ABORT, "the prefill side gave up waiting for ACCEPT")
                self._record_end(s, FENCE_ABORT)
                raise TimeoutError(f"open_stream: the decode side did not answer within {timeout} s")
            if reply[0] == "cancel":  # its fence job answers the decode side
                raise StreamError(f"open_stream: {reply[1]}")
            with self._lock:
                self._streams.pop(s.key, None)
            self.counts["rejected"] += 1
            raise ValueError(f"kv ticket rejected by the decode side: {reply[1]}")
        return s

    def streams(self) -> list[Stream]:
        with self._lock:
            return [s for s in self._streams.values() if not s.done]

    def close(self) -> None:
        """Fail every live stream (no more posting) and detach from the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _lifetime.closed(self)
            live = [s for s in self._streams.values() if not s.done]
        for s in live:
            self._fail(s, "prefill side closed")
        self._channel.detach(self)

    def __enter__(self) -> "PrefillSide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- staging for payloads ------------------------------------------------------------------------------
    def _staging_slot(self, s: Stream, nbytes: int) -> tuple[fabric.MemoryRegion, int]:
        with self._lock:
            if nbytes <= self._staging_size and self._staging_free:
                i = self._staging_free.pop()
                s._staging = ("pool", i)
                return self._staging_region, i * self._staging_size
        buf = np.zeros(nbytes, np.uint8)  # rare: a bigger payload slot, or the pool is exhausted
        region = self.cache.engine.register(buf)
        s._staging = ("own", region)
        return region, 0

    def _staging_view(self, region: fabric.MemoryRegion, offset: int, nbytes: int) -> np.ndarray:
        if region is self._staging_region:
            return self._staging_buf[offset:offset + nbytes]
        return region._keepalive[offset:offset + nbytes]

    def _release_staging(self, s: Stream) -> None:
        st, s._staging = s._staging, None
        if st is not None and st[0] == "pool":
            with self._lock:
                self._staging_free.append(st[1])

    # -- marks -----------------------------------------------------------------------------------------
    def _on_mark(self, layer: int, old: int, new: int) -> None:
        s = self._by_token.get(new)
        if s is None:
            return
        now = time.monotonic()
        failed = False
        with s._lock:
            s.times["marks"][layer] = now
            if not s.layerwise or s.state != Stream.STREAMING or s._posted[layer]:
                return
            try:
                s._post_layer_locked(layer)
                s.layers_posted_on_mark += 1
            except Exception as e:  # noqa: BLE001
                failed = s._fail_locked(f"posting layer {layer} failed: {e}")
        if failed:
            self._after_fail(s)

    # -- failure, fences and completion ----------------------------------------------------------------
    def _fail(self, s: Stream, why: str) -> None:
        with s._lock:
            failed = s._fail_locked(why)
        if failed:
            self._after_fail(s)

    def _after_fail(self, s: Stream) -> None:
        self.counts["failed"] += 1
        with self._lock:
            self._by_token.pop(s.token, None)
        self._channel.fence_pool.submit(self._fence_job, s, FENCE_ABORT, s.reason)

    def _fence_job(self, s: Stream, flags: int, why: str) -> None:
        """Wait until every write of ``s`` completed at the sender, then tell the decode side how many
        imm-carrying writes were posted (it counts them in before reusing the pages)."""
        with s._lock:
            transfers = list(s._transfers)
        limit = self.cache.engine.timeout + 5.0
        for t in transfers:
            try:
                t.wait(limit)
            except (fabric.TransferError, TimeoutError):
                flags |= FENCE_FAILED_WRITES
        with s._lock:
            s.failed_writes = sum(1 for t in transfers if t.failed)
            s._transfers = []
        self._release_staging(s)
        self._send_fence(s, flags, why)
        self._record_end(s, flags)

    def _send_fence(self, s: Stream, flags: int, why: str) -> None:
        body = (_Writer().u64(s.ticket.cache_id).u32(s.ticket.slot).u32(s.ticket.generation).u64(s.posted[0])
                .u64(s.posted[1]).u8(flags).text(why).bytes())
        try:
            self._channel.send(s.ticket.contact, MSG_FENCED, body)
        except Exception as e:  # noqa: BLE001 - a dead decode side cannot hear it anyway
            log.info("kv: FENCED not sent: %s", e)

    def _record_end(self, s: Stream, flags: int) -> None:
        with self._lock:
            self._by_token.pop(s.token, None)
            if self._streams.get(s.key) is s:
                del self._streams[s.key]
            self._ended[s.key] = (s.posted[0], s.posted[1], flags)
            while len(self._ended) > 65536:
                self._ended.popitem(last=False)

    def _maybe_done(self, s: Stream) -> None:
        """A FINISHED stream whose writes all completed becomes DONE (its records are dropped)."""
        with s._lock:
            if s.state != Stream.FINISHED or not all(t.done for t in s._transfers):
                return
            failed = [t for t in s._transfers if t.failed]
            if failed:
                s._fail_locked(f"a write failed: {failed[0].error}")
            else:
                s.state = Stream.DONE
                s.times["done"] = time.monotonic()
                s._transfers = []
                s._cond.notify_all()
        if s.state == Stream.FAILED:
            self._after_fail(s)
            return
        self.counts["done"] += 1
        self._release_staging(s)
        self._record_end(s, 0)

    def _on_ticket(self, r: _Reader) -> None:
        ticket, extra = r.blob(), r.blob()
        r.end()
        self._tickets.put((ticket, extra))

    def _stream_of_reply(self, r: _Reader) -> tuple[Stream | None, _Reader]:
        key = (r.u64(), r.u32(), r.u32())
        token = r.u32()
        with self._lock:
            s = self._streams.get(key)
        if s is None or s.token != token:
            return None, r
        return s, r

    def _on_accept(self, r: _Reader) -> None:
        s, r = self._stream_of_reply(r)
        if s is None:
            return
        exp_d, exp_p, payload_off, slot_bytes, has_desc = r.u64(), r.u64(), r.u64(), r.u32(), r.u8()
        if has_desc:
            n = r.u32()
            descs = [fabric.MemoryDescriptor.from_bytes(r.blob()) for _ in range(n)]
            self._descs[s.ticket.cache_id] = (descs[:-1], descs[-1])
        r.end()
        lay = s.ticket.layout
        dst, payload_desc = self._descs.get(s.ticket.cache_id, (None, None))
        eng = self.cache.engine
        expect_p = fabric.imm_writes("write", domains=eng.num_domains, length=slot_bytes,
                                     split_threshold=eng.split_threshold)
        problem = None
        if dst is None or len(dst) != lay.num_layers * 2 * s.ticket.shards:
            problem = "the decode side's descriptors are missing or do not match the ticket"
        elif (exp_d, exp_p) != (s.expected[0], expect_p):
            problem = (f"imm accounting mismatch: decode expects {exp_d}+{exp_p} writes, this side plans "
                       f"{s.expected[0]}+{expect_p}")
        with s._lock:
            if s.state != Stream.OPENING:
                return
            if problem:
                s._reply = ("reject", problem)
                s._fail_locked(problem)
            else:
                s._dst, s._payload_desc = dst, payload_desc
                s._payload_offset, s._slot_bytes = payload_off, slot_bytes
                s.expected = (exp_d, exp_p)
                s.state = Stream.STREAMING
                s.times["accepted"] = time.monotonic()
                s._reply = ("accept", None)
                with self._lock:
                    self._by_token[s.token] = s
                    self.counts["opened"] += 1
                    peer = self._peers.get(s.ticket.contact.key)
                    if peer is None or peer.dead:
                        self._peers[s.ticket.contact.key] = _Peer(s.ticket.contact)
            s._cond.notify_all()
        if problem:
            self._send_fence(s, FENCE_ABORT, problem)

    def _on_reject(self, r: _Reader) -> None:
        s, r = self._stream_of_reply(r)
        if s is None:
            return
        why = r.text()
        with s._lock:
            if s.state == Stream.OPENING:
                s._reply = ("reject", why)
                s.state, s.reason = Stream.FAILED, f"rejected: {why}"
                s._cond.notify_all()

    def _on_cancel(self, r: _Reader) -> None:
        key = (r.u64(), r.u32(), r.u32())
        sender = Contact.from_bytes(r.blob())
        r.end()
        with self._lock:
            s = self._streams.get(key)
            ended = self._ended.get(key)
        if s is None:
            # Ended (its fence numbers are remembered) or never seen (nothing provable).
            posted_d, posted_p, flags = ended if ended is not None else (0, 0, FENCE_UNKNOWN)
            body = (_Writer().u64(key[0]).u32(key[1]).u32(key[2]).u64(posted_d).u64(posted_p).u8(flags)
                    .text("stream already ended" if ended is not None else "unknown stream").bytes())
            self._channel.send(sender, MSG_FENCED, body)
            return
        with s._lock:
            cancelled = s.state in (Stream.OPENING, Stream.STREAMING, Stream.FINISHED)
            if cancelled:
                if s.state == Stream.OPENING:  # the CANCEL overtook the ACCEPT: open_stream gives up now
                    s._reply = ("cancel", "cancelled by the decode side before the stream opened")
                s.state, s.reason = Stream.CANCELLED, "cancelled by the decode side"
                s._cond.notify_all()
        if cancelled:
            self.counts["cancelled"] += 1
            with self._lock:
                self._by_token.pop(s.token, None)
            self._channel.fence_pool.submit(self._fence_job, s, 0, "cancelled")
        # else: a DONE/FAILED stream already sent (or is sending) its fence numbers via _record_end.
        elif s.state == Stream.DONE:
            self._send_fence(s, 0, "stream already ended")

    def _tick(self, now: float) -> None:
        with self._lock:
            live = [s for s in self._streams.values() if not s.done]
        peers: dict[bytes, list[Stream]] = {}
        for s in live:
            if s.state == Stream.FINISHED:
                self._maybe_done(s)
                if s.done:
                    continue
            if s.state in (Stream.STREAMING, Stream.FINISHED):
                with s._lock:
                    failed = next((t for t in s._transfers if t.done and t.failed), None)
                if failed is not None:
                    self._fail(s, f"a write failed: {failed.error}")
                    continue
                peers.setdefault(s.ticket.contact.key, []).append(s)
        for key, streams in peers.items():
            with self._lock:
                peer = self._peers.get(key)
                if peer is None:
                    peer = self._peers[key] = _Peer(streams[0].ticket.contact)
            why = peer.probe(self._channel)
            if why:
                for s in streams:
                    self._fail(s, f"decode side unreachable: {why}")
        with self._lock:
            for key in [k for k, p in self._peers.items() if p.dead]:
                del self._peers[key]

    def _cache_broken(self, why: str) -> None:
        for s in self.streams():
            self._fail(s, f"source cache broken: {why}")

    def __repr__(self) -> str:
        return f"PrefillSide({len(self.streams())} live streams)"
