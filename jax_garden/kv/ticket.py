"""Tickets: what the prefill side needs to stream one request into a decode cache."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jax_garden._service.codec import Reader, Writer, seal, unseal
from jax_garden._service.mailbox import Contact
from jax_garden._validate import has_repeats
from jax_garden.kv.imm import MAX_CACHE_TAGS, MAX_SLOTS
from jax_garden.kv.layout import KVLayout

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
        w = (Writer().u16(TICKET_VERSION).u64(self.cache_id).u32(self.slot).u32(self.generation)
             .u32(self.num_tokens).u32(self.payload_capacity).u32(lay.num_layers).u32(lay.num_pages)
             .u32(lay.page_tokens).u32(lay.kv_heads).u32(lay.head_dim).text(lay.dtype).text(lay.page_layout)
             .u32(self.shards).u8(self.cache_tag).blob(bytes(self.contact)).u32s(self.pages))
        return seal(_TICKET_MAGIC, w.bytes())

    @staticmethod
    def from_bytes(data: Any) -> "Ticket":
        r = Reader(unseal(data, _TICKET_MAGIC, "kv ticket"), "kv ticket")
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
        if has_repeats(pages):
            raise ValueError("kv ticket: a page appears twice in the page list")
        try:
            contact = Contact.from_bytes(contact_bytes)
        except ValueError as e:
            raise ValueError(f"kv ticket: bad decode contact: {e}") from None
        return Ticket(cache_id, cache_tag, slot, generation, num_tokens, capacity, layout, shards, contact, pages)


def as_ticket(t: Any) -> Ticket:
    """A :class:`Ticket` from itself, its bytes, or a request holding one (``.ticket``)."""
    if isinstance(t, Ticket):
        return t
    if not isinstance(t, (bytes, bytearray, memoryview)) and isinstance(getattr(t, "ticket", None), bytes):
        return Ticket.from_bytes(t.ticket)
    return Ticket.from_bytes(t)
