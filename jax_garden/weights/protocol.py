"""What a weight push puts on the wire besides the weights: the imm layout and the control messages
(mailbox protocol ``WEIGHTS``), one frozen dataclass each.

imm: ``tag (4 bits) << 28 | epoch (12 bits) << 16 | source rank (16 bits)``; the tag defaults to the
weights entry of the service table (``0xA``), away from kv's, MoE's and the mailbox's.

Messages: connect: publisher -> subscriber HELLO (with a session id, new at every connect),
answered by WELCOME (in parts: the descriptors of the buffers the publisher writes, both copies) or
REFUSE. Standing grants: subscriber -> publisher OFFER (slot and epoch for the next push, made while
nothing is being collected into the copy not in service); the publisher's next push then sends
PUSH_CLAIM and writes at once, without waiting for an answer. Push without an offer: PUSH_REQUEST,
answered by GRANT, DONE, REJECT or PENDING (then a GRANT later); a claim is answered by GRANT or
REJECT. Later IN_SERVICE (the version went into service at that subscriber rank) or REFUSED (it
never will: replaced by a newer one before it was complete). Switch: STATUS between subscriber
ranks.

``serial`` (grants, offers, claims) is the subscriber's unwrapped epoch count for that source: a
publisher drops an offer whose serial is not above every grant it already got from that rank.
"""

from __future__ import annotations

import enum

from jax_garden._service.codec import U8, U16, U32, U64, Blobs, OptU64, Protocol, Text, U32Array
from jax_garden._service.tags import ProtocolId, Service, imm_tag, owner_of_tag
from jax_garden.weights.layout import MAX_RANKS

DEFAULT_IMM_TAG = imm_tag(Service.WEIGHTS)
IMM_TAG_SHIFT, IMM_EPOCH_SHIFT = 28, 16
EPOCH_MOD = 1 << 12
WELCOME_BYTES = 48 << 10  # descriptors per welcome message (the engine's default limit is 256 KiB)


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


def check_imm_tag(tag: object) -> int:
    """An imm tag for weights: an int in 0..15 that no other service of the table uses."""
    if isinstance(tag, bool) or not isinstance(tag, int):
        raise TypeError(f"imm_tag must be an int in 0..15, got {type(tag).__name__} {tag!r}")
    if not 0 <= tag < 16:
        raise ValueError(f"imm_tag must be in 0..15, got {tag}")
    owner = owner_of_tag(tag)
    if owner is not None and owner is not Service.WEIGHTS:
        raise ValueError(f"imm_tag {tag:#x} belongs to jax_garden's {owner.value} service (its imms would be "
                         f"counted as weights'); pick another (default {DEFAULT_IMM_TAG:#x})")
    return tag


WEIGHTS = Protocol("weights", ProtocolId.WEIGHTS)


class Kind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    PUSH_REQUEST = 4
    GRANT = 5
    PENDING = 6
    REJECT = 7
    DONE = 8
    STATUS = 9
    IN_SERVICE = 10
    REFUSED = 11
    OFFER = 12
    PUSH_CLAIM = 13


@WEIGHTS.message(Kind.HELLO)
class Hello:
    fingerprint: Text
    src: U32
    domains: U32
    session: U64  # new at every connect: offers of an earlier session are never used


@WEIGHTS.message(Kind.WELCOME)
class Welcome:
    fingerprint: Text
    dst: U32
    part: U32
    parts: U32
    buffers: U32Array  # buffer ids of this part
    descriptors: Blobs  # two per buffer: copy 0, copy 1


@WEIGHTS.message(Kind.REFUSE)
class Refuse:
    fingerprint: Text
    dst: U32
    reason: Text


@WEIGHTS.message(Kind.PUSH_REQUEST)
class PushRequest:
    src: U32
    version: U64
    request: U64


@WEIGHTS.message(Kind.GRANT)
class Grant:
    dst: U32
    request: U64
    version: U64
    slot: U8
    epoch: U16
    serial: U64


@WEIGHTS.message(Kind.OFFER)
class Offer:
    """subscriber -> a source: a standing grant for its next push of a version newer than
    ``after_version`` (the version in service here when it was made), into copy ``slot`` with
    ``epoch``. Valid until used: the copy cannot go into service before this source writes it."""
    dst: U32
    session: U64
    serial: U64
    slot: U8
    epoch: U16
    after_version: OptU64


@WEIGHTS.message(Kind.PUSH_CLAIM)
class PushClaim:
    """source -> subscriber: this push uses offer ``serial``; its writes are already on their way."""
    src: U32
    session: U64
    serial: U64
    version: U64
    request: U64


@WEIGHTS.message(Kind.PENDING)
class Pending:
    dst: U32
    request: U64
    reason: Text


@WEIGHTS.message(Kind.REJECT)
class Reject:
    dst: U32
    request: U64
    reason: Text


@WEIGHTS.message(Kind.DONE)
class Done:
    dst: U32
    request: U64
    version: U64


@WEIGHTS.message(Kind.STATUS)
class Status:
    round: U64
    rank: U32
    serving: OptU64
    candidate: OptU64
    missing: Text


@WEIGHTS.message(Kind.IN_SERVICE)
class InService:
    """subscriber -> each source of a version: it is in service here now."""
    dst: U32
    version: U64


@WEIGHTS.message(Kind.REFUSED)
class Refused:
    """subscriber -> each source of a granted version that will never go into service here."""
    dst: U32
    version: U64
    reason: Text


ANSWERS = (Grant, Pending, Reject, Done)
