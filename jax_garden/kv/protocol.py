"""The kv control messages (mailbox protocol ``KV``), one frozen dataclass each.

decode -> prefill: TICKET (a ticket handed over the engine), ACCEPT / REJECT (answers to OPEN),
CANCEL. prefill -> decode: OPEN (a stream asks to start), FENCED (everything it posted completed at
the sender; how many imm writes). The sender's contact travels in the mailbox envelope.
"""

from __future__ import annotations

import enum

from jax_garden._service.codec import U8, U32, U64, Blob, Blobs, Protocol, Text, U32Array
from jax_garden._service.tags import ProtocolId

KV = Protocol("kv", ProtocolId.KV)


class Kind(enum.IntEnum):
    TICKET = 1
    OPEN = 2
    ACCEPT = 3
    REJECT = 4
    CANCEL = 5
    FENCED = 6


class FenceFlags(enum.IntFlag):
    NONE = 0
    FAILED_WRITES = 1  # some posted write failed at the sender: what landed is unknown
    UNKNOWN = 2        # the prefill side does not know the stream: nothing can be proven
    ABORT = 4          # sent unasked: the stream failed on the prefill side


@KV.message(Kind.TICKET)
class TicketMsg:
    ticket: Blob
    extra: Blob


@KV.message(Kind.OPEN)
class Open:
    cache_id: U64
    slot: U32
    generation: U32
    token: U32
    need_descriptors: U8
    num_layers: U32
    num_pages: U32
    page_tokens: U32
    kv_heads: U32
    head_dim: U32
    dtype: Text
    page_layout: Text
    src_shards: U32
    src_domains: U32
    split_threshold: U64
    src_pages: U32Array


@KV.message(Kind.ACCEPT)
class Accept:
    cache_id: U64
    slot: U32
    generation: U32
    token: U32
    expected_data: U64
    expected_payload: U64
    payload_offset: U64
    slot_bytes: U32
    descriptors: Blobs  # every cache buffer (layer, K/V, shard) then the payload region; empty if known


@KV.message(Kind.REJECT)
class Reject:
    cache_id: U64
    slot: U32
    generation: U32
    token: U32
    reason: Text


@KV.message(Kind.CANCEL)
class Cancel:
    cache_id: U64
    slot: U32
    generation: U32


@KV.message(Kind.FENCED)
class Fenced:
    cache_id: U64
    slot: U32
    generation: U32
    posted_data: U64
    posted_payload: U64
    flags: U8
    reason: Text
